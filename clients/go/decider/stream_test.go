package decider_test

import (
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/decider-dev/decider/clients/go/decider"
	pb "github.com/decider-dev/decider/clients/go/gen/decider/v1"
)

// Streaming mode against the real Decider: the same answers, errors and
// fail-open as unary calls, over one shared DecideStream.

func TestStreamDecidesConcurrentlyAndRoutes(t *testing.T) {
	c := startCluster(t, "a", "b", "c")
	cl := c.client(t, decider.Options{Stream: true})

	const callers, each = 20, 10
	var mu sync.Mutex
	ids := map[string]bool{}
	errs := make(chan error, callers*each)
	var wg sync.WaitGroup
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				d, err := cl.Decide(t.Context(), &pb.DecideRequest{Model: "m", Strategy: "round_robin"})
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				ids[d.ID] = true
				mu.Unlock()
				if d.FailOpen || d.Endpoint.GetId() == "" || len(d.Fallbacks) == 0 {
					t.Errorf("decision %+v", d)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if len(ids) != callers*each {
		t.Fatalf("%d distinct decision ids for %d decisions", len(ids), callers*each)
	}

	// The whole gateway flow on the stream; every outcome is reported.
	for range 9 {
		if _, err := cl.Route(t.Context(), &pb.DecideRequest{Model: "m", Strategy: "round_robin"}, try); err != nil {
			t.Fatal(err)
		}
	}
	for id, b := range c.backends {
		if b.Hits.Load() != 3 {
			t.Errorf("%s served %d of 9 round-robin requests", id, b.Hits.Load())
		}
	}
}

func TestStreamRefusalIsAStatusAndTheStreamGoesOn(t *testing.T) {
	c := startCluster(t, "a")
	cl := c.client(t, decider.Options{Stream: true, FailOpen: true})

	if _, err := cl.Decide(t.Context(), &pb.DecideRequest{Model: "m"}); err != nil {
		t.Fatal(err)
	}
	_, err := cl.Decide(t.Context(), &pb.DecideRequest{Model: "nobody-serves-this"})
	st, _ := status.FromError(err)
	if st.Code() != codes.NotFound {
		t.Fatalf("unknown model: %v, want NOT_FOUND", err)
	}
	reason := ""
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			reason = info.GetReason()
		}
	}
	if reason != "MODEL_NOT_FOUND" {
		t.Fatalf("ErrorInfo reason %q, want MODEL_NOT_FOUND", reason)
	}
	_, err = cl.Decide(t.Context(), &pb.DecideRequest{Model: "m", ExcludeEndpointIds: []string{"a"}})
	if !decider.NoHealthyEndpoint(err) {
		t.Fatalf("every endpoint excluded: %v, want UNAVAILABLE with NO_HEALTHY_ENDPOINT", err)
	}
	_, err = cl.Decide(t.Context(), &pb.DecideRequest{})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("no model: %v, want INVALID_ARGUMENT", err)
	}
	if d, err := cl.Decide(t.Context(), &pb.DecideRequest{Model: "m"}); err != nil || d.Endpoint.GetId() != "a" {
		t.Fatalf("after the refusals: %+v, %v", d, err)
	}
	if cl.Stats().FailOpenDecisions != 0 {
		t.Fatal("a refusal from a live Decider must not trigger fail-open")
	}
}

func TestStreamFailsOpenWhenDeciderStops(t *testing.T) {
	c := startCluster(t, "a", "b")
	cl := c.client(t, decider.Options{Stream: true, FailOpen: true, DecideTimeout: time.Second})
	for range 4 {
		if _, err := cl.Decide(t.Context(), &pb.DecideRequest{Model: "m", Strategy: "round_robin"}); err != nil {
			t.Fatal(err)
		}
	}
	// A graceful stop ends the open stream with UNAVAILABLE (SHUTTING_DOWN).
	c.server.Stop()
	for range 5 {
		d, err := cl.Decide(t.Context(), &pb.DecideRequest{Model: "m"})
		if err != nil {
			t.Fatalf("fail-open decide failed: %v", err)
		}
		if !d.FailOpen {
			t.Fatalf("decided %+v without Decider, but not marked fail-open", d)
		}
	}
}
