package decider

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/decider-dev/decider/clients/go/gen/decider/v1"
	"github.com/decider-dev/decider/clients/go/internal/decidertest"
)

type fakeDecider = decidertest.Fake

// startFake serves f on 127.0.0.1 and returns a client for it plus a stop
// function that takes the fake down (Decider "unreachable").
func startFake(t *testing.T, f *fakeDecider, opts Options) (*Client, func()) {
	t.Helper()
	decidertest.StartFake(t, f)
	c, err := Dial(f.Addr, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, f.Stop
}

func ep(id string) *pb.Endpoint {
	return &pb.Endpoint{Id: id, Address: id + ".local:80", Model: "m"}
}

func tryScript(results map[string]pb.Result) (TryFunc, *[]string) {
	var mu sync.Mutex
	var seen []string
	return func(_ context.Context, e *pb.Endpoint) Attempt {
		mu.Lock()
		seen = append(seen, e.GetId())
		mu.Unlock()
		r, ok := results[e.GetId()]
		if !ok {
			r = pb.Result_RESULT_SUCCESS
		}
		return Attempt{Result: r, InputTokens: 10, OutputTokens: 5}
	}, &seen
}

func TestRouteTriesFallbacksInOrderAndReportsEachAttempt(t *testing.T) {
	f := &fakeDecider{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) {
		return &pb.DecideResponse{DecisionId: "d1", Endpoint: ep("a"), Fallbacks: []*pb.Endpoint{ep("b"), ep("c")}}, nil
	}}
	c, _ := startFake(t, f, Options{})
	try, seen := tryScript(map[string]pb.Result{"a": pb.Result_RESULT_ERROR, "b": pb.Result_RESULT_RATE_LIMITED})

	routed, err := c.Route(context.Background(), &pb.DecideRequest{Model: "m"}, try)
	if err != nil {
		t.Fatal(err)
	}
	if got := *seen; !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Fatalf("tried %v, want a, b, c", got)
	}
	if routed.Endpoint.GetId() != "c" || routed.DecisionID != "d1" || routed.FailOpen {
		t.Fatalf("routed = %+v", routed)
	}
	if err := c.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	outcomes := f.Outcomes()
	results := map[string]pb.Result{}
	for _, o := range outcomes {
		if o.GetDecisionId() != "d1" || o.GetInputTokens() != 10 || o.GetOutputTokens() != 5 || o.GetLatency() == nil {
			t.Errorf("outcome %v lacks decision, tokens or latency", o)
		}
		results[o.GetEndpointId()] = o.GetResult()
	}
	want := map[string]pb.Result{"a": pb.Result_RESULT_ERROR, "b": pb.Result_RESULT_RATE_LIMITED, "c": pb.Result_RESULT_SUCCESS}
	if len(results) != 3 || results["a"] != want["a"] || results["b"] != want["b"] || results["c"] != want["c"] {
		t.Fatalf("reported %v, want %v", results, want)
	}
}

func TestRouteDecidesAgainExcludingTriedEndpoints(t *testing.T) {
	f := &fakeDecider{DecideFunc: func(req *pb.DecideRequest) (*pb.DecideResponse, error) {
		if slices.Contains(req.GetExcludeEndpointIds(), "a") {
			return &pb.DecideResponse{DecisionId: "d2", Endpoint: ep("b")}, nil
		}
		return &pb.DecideResponse{DecisionId: "d1", Endpoint: ep("a")}, nil
	}}
	c, _ := startFake(t, f, Options{})
	try, seen := tryScript(map[string]pb.Result{"a": pb.Result_RESULT_TIMEOUT})

	routed, err := c.Route(context.Background(), &pb.DecideRequest{Model: "m", ExcludeEndpointIds: []string{"z"}}, try)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(*seen, []string{"a", "b"}) || routed.DecisionID != "d2" {
		t.Fatalf("tried %v, decision %q", *seen, routed.DecisionID)
	}
	reqs := f.Requests()
	if len(reqs) != 2 || !slices.Equal(reqs[1].GetExcludeEndpointIds(), []string{"z", "a"}) {
		t.Fatalf("second Decide excluded %v, want [z a]", reqs[len(reqs)-1].GetExcludeEndpointIds())
	}
}

func TestRouteStopsAtPolicyMaxAttempts(t *testing.T) {
	f := &fakeDecider{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) {
		return &pb.DecideResponse{
			DecisionId: "d", Endpoint: ep("a"), Fallbacks: []*pb.Endpoint{ep("b"), ep("c")},
			Retry: &pb.RetryPolicy{MaxAttempts: 2, InitialBackoff: durationpb.New(time.Millisecond)},
		}, nil
	}}
	c, _ := startFake(t, f, Options{})
	try, seen := tryScript(map[string]pb.Result{"a": pb.Result_RESULT_ERROR, "b": pb.Result_RESULT_ERROR})

	_, err := c.Route(context.Background(), &pb.DecideRequest{Model: "m"}, try)
	if !errors.Is(err, ErrAttemptsExhausted) {
		t.Fatalf("err = %v, want ErrAttemptsExhausted", err)
	}
	if !slices.Equal(*seen, []string{"a", "b"}) {
		t.Fatalf("tried %v, want a, b", *seen)
	}
}

func TestRouteStopsWhenDeciderKeepsNamingTriedEndpoints(t *testing.T) {
	f := &fakeDecider{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) {
		return &pb.DecideResponse{DecisionId: "d", Endpoint: ep("a")}, nil
	}}
	c, _ := startFake(t, f, Options{MaxAttempts: 4})
	try, seen := tryScript(map[string]pb.Result{"a": pb.Result_RESULT_ERROR})

	_, err := c.Route(context.Background(), &pb.DecideRequest{Model: "m"}, try)
	if !errors.Is(err, ErrAttemptsExhausted) || len(*seen) != 1 {
		t.Fatalf("err = %v after %v", err, *seen)
	}
}

func TestRefusalsAreNotUnreachable(t *testing.T) {
	noHealthy, _ := status.New(codes.Unavailable, "3 registered, 3 unhealthy").WithDetails(
		&errdetails.ErrorInfo{Reason: ReasonNoHealthyEndpoint, Domain: "decider.dev"})
	quota, _ := status.New(codes.ResourceExhausted, "tenant t over quota").WithDetails(
		&errdetails.RetryInfo{RetryDelay: durationpb.New(1500 * time.Millisecond)})
	cases := []struct {
		name        string
		err         error
		unreachable bool
		noHealthy   bool
		retryAfter  time.Duration
	}{
		{"no healthy endpoint", noHealthy.Err(), false, true, 0},
		{"quota", quota.Err(), false, false, 1500 * time.Millisecond},
		{"not found", status.Error(codes.NotFound, "model m"), false, false, 0},
		{"invalid", status.Error(codes.InvalidArgument, "strategy"), false, false, 0},
		{"transport unavailable", status.Error(codes.Unavailable, "connection refused"), true, false, 0},
		{"draining", withInfo(codes.Unavailable, ReasonShuttingDown), true, false, 0},
		{"overloaded", withInfo(codes.ResourceExhausted, ReasonServerOverloaded), true, false, 0},
		{"message too large", status.Error(codes.ResourceExhausted, "grpc: received message larger than max"), false, false, 0},
		{"deadline", status.Error(codes.DeadlineExceeded, "deadline"), true, false, 0},
		{"plain error", errors.New("boom"), true, false, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := Unreachable(tc.err); got != tc.unreachable {
				t.Errorf("Unreachable = %v, want %v", got, tc.unreachable)
			}
			if got := NoHealthyEndpoint(tc.err); got != tc.noHealthy {
				t.Errorf("NoHealthyEndpoint = %v, want %v", got, tc.noHealthy)
			}
			if got := RetryAfter(tc.err); got != tc.retryAfter {
				t.Errorf("RetryAfter = %v, want %v", got, tc.retryAfter)
			}
		})
	}
}

func TestRefusalIsReturnedEvenInFailOpenMode(t *testing.T) {
	st, _ := status.New(codes.Unavailable, "none usable").WithDetails(&errdetails.ErrorInfo{Reason: ReasonNoHealthyEndpoint})
	f := &fakeDecider{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) { return nil, st.Err() }}
	c, _ := startFake(t, f, Options{FailOpen: true, SeedEndpoints: []*pb.Endpoint{ep("a")}})

	_, err := c.Decide(context.Background(), &pb.DecideRequest{Model: "m"})
	if !NoHealthyEndpoint(err) {
		t.Fatalf("err = %v, want Decider's NO_HEALTHY_ENDPOINT refusal", err)
	}
}

func TestFailOpenUsesLastKnownHealthyEndpoints(t *testing.T) {
	f := &fakeDecider{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) {
		return &pb.DecideResponse{DecisionId: "d", Endpoint: ep("a"), Fallbacks: []*pb.Endpoint{ep("b"), ep("c")}}, nil
	}}
	c, stop := startFake(t, f, Options{FailOpen: true, Watch: true, DecideTimeout: 200 * time.Millisecond})
	// The health stream marks b unhealthy and c breaker-open before Decider goes away.
	f.Health <- &pb.WatchHealthResponse{Snapshot: true, Events: []*pb.HealthEvent{
		{EndpointId: "a", Model: "m", Status: pb.HealthStatus_HEALTH_STATUS_HEALTHY},
		{EndpointId: "b", Model: "m", Status: pb.HealthStatus_HEALTH_STATUS_UNHEALTHY},
		{EndpointId: "c", Model: "m", Status: pb.HealthStatus_HEALTH_STATUS_HEALTHY, BreakerState: pb.BreakerState_BREAKER_STATE_OPEN},
	}}
	if _, err := c.Decide(context.Background(), &pb.DecideRequest{Model: "m"}); err != nil {
		t.Fatal(err)
	}
	decidertest.WaitFor(t, "health snapshot", func() bool { return c.HealthSnapshots() > 0 })
	stop()

	try, seen := tryScript(nil)
	for range 3 {
		routed, err := c.Route(context.Background(), &pb.DecideRequest{Model: "m"}, try)
		if err != nil {
			t.Fatal(err)
		}
		if !routed.FailOpen || routed.DecisionID != "" {
			t.Fatalf("routed = %+v, want a fail-open decision", routed)
		}
	}
	if !slices.Equal(*seen, []string{"a", "a", "a"}) {
		t.Fatalf("fail-open tried %v, want only the healthy a", *seen)
	}
	if c.Stats().FailOpenDecisions != 3 {
		t.Fatalf("stats %+v", c.Stats())
	}
	// Another model was never seen, so there is nothing to fail open to.
	if _, err := c.Decide(context.Background(), &pb.DecideRequest{Model: "other"}); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("err = %v, want ErrUnreachable", err)
	}
}

func TestFailClosedReturnsUnreachable(t *testing.T) {
	f := &fakeDecider{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) { return nil, nil }}
	c, stop := startFake(t, f, Options{SeedEndpoints: []*pb.Endpoint{ep("a")}, DecideTimeout: 200 * time.Millisecond})
	stop()
	if _, err := c.Decide(context.Background(), &pb.DecideRequest{Model: "m"}); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("err = %v, want ErrUnreachable", err)
	}
}

func TestFailOpenRotatesAndSkipsExcluded(t *testing.T) {
	v := newView()
	v.learn(ep("a"), ep("b"), ep("c"), &pb.Endpoint{Id: "x", Address: "x:1", Model: "other"},
		&pb.Endpoint{Id: "v", Address: "v:1", Model: "m", Capabilities: []string{"vision"}})
	v.apply("", &pb.WatchHealthResponse{Snapshot: true, Events: []*pb.HealthEvent{
		{EndpointId: "c", Model: "m", Status: pb.HealthStatus_HEALTH_STATUS_DEGRADED},
	}})
	firsts := map[string]int{}
	for range 10 {
		got := v.usable(&pb.DecideRequest{Model: "m", ExcludeEndpointIds: []string{"b"}})
		ids := make([]string, len(got))
		for i, e := range got {
			ids[i] = e.GetId()
		}
		// Healthy (or unknown) first, rotating; degraded last.
		if len(ids) != 3 || ids[2] != "c" || slices.Contains(ids, "b") || slices.Contains(ids, "x") {
			t.Fatalf("usable = %v", ids)
		}
		firsts[ids[0]]++
	}
	if firsts["a"] == 0 || firsts["v"] == 0 {
		t.Fatalf("first picks %v do not rotate", firsts)
	}
	got := v.usable(&pb.DecideRequest{Model: "m", RequiredCapabilities: []string{"vision"}})
	if len(got) != 1 || got[0].GetId() != "v" {
		t.Fatalf("vision-capable = %v", got)
	}
	// A removal event forgets the endpoint entirely.
	v.apply("", &pb.WatchHealthResponse{Events: []*pb.HealthEvent{{EndpointId: "a", Removed: true}}})
	if known := v.known("m"); len(known) != 3 {
		t.Fatalf("known after removal = %v", known)
	}
}

func TestDecideHasADeadline(t *testing.T) {
	block := make(chan struct{})
	f := &fakeDecider{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) {
		<-block
		return nil, status.Error(codes.Canceled, "unblocked")
	}}
	c, _ := startFake(t, f, Options{DecideTimeout: 50 * time.Millisecond})
	defer close(block)
	_, err := c.Decide(context.Background(), &pb.DecideRequest{Model: "m"})
	if !errors.Is(err, ErrUnreachable) || status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("err = %v, want a deadline-exceeded ErrUnreachable", err)
	}
}

func TestRouteDoesNotBlameTheEndpointWhenTheCallerGivesUp(t *testing.T) {
	f := &fakeDecider{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) {
		return &pb.DecideResponse{DecisionId: "d", Endpoint: ep("a"), Fallbacks: []*pb.Endpoint{ep("b")}}, nil
	}}
	c, _ := startFake(t, f, Options{})
	ctx, cancel := context.WithCancel(t.Context())
	var tried []string
	_, err := c.Route(ctx, &pb.DecideRequest{Model: "m"}, func(_ context.Context, e *pb.Endpoint) Attempt {
		tried = append(tried, e.GetId())
		cancel() // the user hung up while the endpoint was working
		return Attempt{Result: pb.Result_RESULT_ERROR, Err: context.Canceled}
	})
	if !errors.Is(err, context.Canceled) || !slices.Equal(tried, []string{"a"}) {
		t.Fatalf("err = %v after %v, want context.Canceled after a only", err, tried)
	}
	if err := c.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	outs := f.Outcomes()
	if len(outs) != 1 || outs[0].GetResult() != pb.Result_RESULT_CANCELLED || outs[0].GetEndpointId() != "a" {
		t.Fatalf("reported %v for a cancelled request, want one RESULT_CANCELLED for a", outs)
	}
}

func withInfo(code codes.Code, reason string) error {
	st, err := status.New(code, reason).WithDetails(&errdetails.ErrorInfo{Reason: reason})
	if err != nil {
		panic(err)
	}
	return st.Err()
}
