package decider

import (
	"context"
	"sync"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/status"

	pb "github.com/decider-dev/decider/clients/go/gen/decider/v1"
)

// streamDecider multiplexes concurrent Decide calls over one DecideStream: each
// request carries a correlation id and waits for the answer with that id. A
// broken stream fails every call waiting on it with the stream's status (so
// Unreachable and fail-open treat it like a failed unary call) and the next
// call opens a new stream.
type streamDecider struct {
	ctx  context.Context // the client's: cancelled by Close, which ends the stream
	api  pb.DeciderServiceClient
	bg   *sync.WaitGroup
	late func(*pb.DecideResponse) // a decision that came after its caller gave up

	mu   sync.Mutex // guards cur, next and every liveStream's pending
	cur  *liveStream
	next uint64
}

// liveStream is one DecideStream and the calls waiting on it.
type liveStream struct {
	stream  pb.DeciderService_DecideStreamClient
	cancel  context.CancelFunc
	pending map[uint64]chan streamAnswer
	sendMu  sync.Mutex // a gRPC stream allows one Send at a time
}

type streamAnswer struct {
	resp *pb.DecideResponse
	err  error
}

func newStreamDecider(ctx context.Context, api pb.DeciderServiceClient, bg *sync.WaitGroup,
	late func(*pb.DecideResponse)) *streamDecider {
	return &streamDecider{ctx: ctx, api: api, bg: bg, late: late}
}

// decide sends req on the shared stream and waits for its answer or ctx's end.
func (s *streamDecider) decide(ctx context.Context, req *pb.DecideRequest) (*pb.DecideResponse, error) {
	answer := make(chan streamAnswer, 1)
	ls, id, err := s.enqueue(answer)
	if err != nil {
		return nil, err
	}
	ls.sendMu.Lock()
	err = ls.stream.Send(&pb.DecideStreamRequest{CorrelationId: id, Decide: req})
	ls.sendMu.Unlock()
	if err != nil {
		// Send reports only io.EOF for a broken stream; the receiving side
		// delivers the real status to every waiting call, this one included.
		s.retire(ls)
	}
	select {
	case a := <-answer:
		return a.resp, a.err
	case <-ctx.Done():
		s.mu.Lock()
		delete(ls.pending, id)
		var missed *pb.DecideResponse
		select {
		case a := <-answer: // answered in the meantime: nobody will use it now
			missed = a.resp
		default:
		}
		s.mu.Unlock()
		if missed != nil && s.late != nil {
			s.late(missed)
		}
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}

// enqueue registers a waiting call, opening a stream first when there is none.
func (s *streamDecider) enqueue(answer chan streamAnswer) (*liveStream, uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil {
		sctx, cancel := context.WithCancel(s.ctx)
		stream, err := s.api.DecideStream(sctx)
		if err != nil {
			cancel()
			return nil, 0, err
		}
		s.cur = &liveStream{stream: stream, cancel: cancel, pending: map[uint64]chan streamAnswer{}}
		s.bg.Add(1)
		go s.receive(s.cur)
	}
	s.next++
	s.cur.pending[s.next] = answer
	return s.cur, s.next, nil
}

// retire stops new calls from using ls and cancels it; receive then fails the
// calls still waiting on it.
func (s *streamDecider) retire(ls *liveStream) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == ls {
		s.cur = nil
	}
	ls.cancel()
}

// receive hands each answer to the call waiting for it until the stream ends.
func (s *streamDecider) receive(ls *liveStream) {
	defer s.bg.Done()
	for {
		resp, err := ls.stream.Recv()
		if err != nil {
			s.retire(ls)
			if _, ok := status.FromError(err); !ok {
				err = status.FromContextError(err).Err()
			}
			s.mu.Lock()
			for id, answer := range ls.pending {
				answer <- streamAnswer{err: err}
				delete(ls.pending, id)
			}
			s.mu.Unlock()
			return
		}
		// Answers are handed over under the lock (the channels are buffered), so
		// a caller giving up at the same moment either gets it or sees it missed.
		s.mu.Lock()
		answer, ok := ls.pending[resp.GetCorrelationId()]
		delete(ls.pending, resp.GetCorrelationId())
		switch {
		case !ok:
		case resp.GetError() != nil:
			answer <- streamAnswer{err: statusError(resp.GetError())}
		default:
			answer <- streamAnswer{resp: resp.GetDecide()}
		}
		s.mu.Unlock()
		if !ok && resp.GetDecide() != nil && s.late != nil {
			s.late(resp.GetDecide())
		}
	}
}

// statusError turns a per-message error into the status error a unary Decide
// would have returned: the message is a google.rpc.Status twin.
func statusError(e *pb.Status) error {
	return status.FromProto(&spb.Status{Code: e.GetCode(), Message: e.GetMessage(), Details: e.GetDetails()}).Err()
}
