package decidertest

import (
	"context"
	"net"
	"slices"
	"sync"
	"testing"

	"google.golang.org/grpc"

	pb "github.com/decider-dev/decider/clients/go/gen/decider/v1"
)

// Fake is a scripted DeciderService on 127.0.0.1 that records what it is
// asked. Unit tests use it where the real server's choices would make the
// assertion indirect (exact outcomes, tokens, exclusions, outages).
type Fake struct {
	pb.UnimplementedDeciderServiceServer
	// DecideFunc answers Decide.
	DecideFunc func(*pb.DecideRequest) (*pb.DecideResponse, error)
	// Health receives responses to send on every open WatchHealth stream.
	Health chan *pb.WatchHealthResponse
	Addr   string

	mu       sync.Mutex
	requests []*pb.DecideRequest
	outcomes []*pb.ReportOutcomeRequest
	srv      *grpc.Server
	stopOnce sync.Once
}

// StartFake serves f until the test ends or Stop is called.
func StartFake(t testing.TB, f *Fake) *Fake {
	t.Helper()
	if f.Health == nil {
		f.Health = make(chan *pb.WatchHealthResponse, 16)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.Addr = ln.Addr().String()
	f.srv = grpc.NewServer()
	pb.RegisterDeciderServiceServer(f.srv, f)
	go func() { _ = f.srv.Serve(ln) }()
	t.Cleanup(f.Stop)
	return f
}

// Stop takes the fake down at once: Decider becomes unreachable.
func (f *Fake) Stop() { f.stopOnce.Do(f.srv.Stop) }

func (f *Fake) Decide(_ context.Context, req *pb.DecideRequest) (*pb.DecideResponse, error) {
	f.mu.Lock()
	f.requests = append(f.requests, req)
	f.mu.Unlock()
	return f.DecideFunc(req)
}

func (f *Fake) ReportOutcome(_ context.Context, req *pb.ReportOutcomeRequest) (*pb.ReportOutcomeResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.outcomes = append(f.outcomes, req)
	return &pb.ReportOutcomeResponse{DecisionFound: true}, nil
}

func (f *Fake) WatchHealth(_ *pb.WatchHealthRequest, stream grpc.ServerStreamingServer[pb.WatchHealthResponse]) error {
	for {
		select {
		case resp := <-f.Health:
			if err := stream.Send(resp); err != nil {
				return err
			}
		case <-stream.Context().Done():
			return nil
		}
	}
}

// Requests returns the Decide requests received so far.
func (f *Fake) Requests() []*pb.DecideRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.requests)
}

// Outcomes returns the ReportOutcome requests received so far.
func (f *Fake) Outcomes() []*pb.ReportOutcomeRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.outcomes)
}
