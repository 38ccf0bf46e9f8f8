package decider_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/decider-dev/decider/clients/go/decider"
	pb "github.com/decider-dev/decider/clients/go/gen/decider/v1"
	"github.com/decider-dev/decider/clients/go/internal/decidertest"
)

// These tests run the real Decider from the project's venv (they skip, saying
// so, only when the venv is missing) against real HTTP backends on 127.0.0.1.

// cluster is a Decider serving model "m" on the given backends.
type cluster struct {
	server   *decidertest.Server
	backends map[string]*decidertest.Backend
}

func startCluster(t *testing.T, ids ...string) *cluster {
	t.Helper()
	// Breakers open after 3 reported failures so failover tests converge fast;
	// fallbacks cover every other endpoint so one decision can route around two dead ones.
	var cfg strings.Builder
	cfg.WriteString(`
[routing]
max_fallbacks = 3
retry_max_attempts = 4
retry_initial_backoff_s = 0.005
retry_max_backoff_s = 0.02

[breaker]
consecutive_failures = 3
open_s = 120
`)
	c := &cluster{backends: map[string]*decidertest.Backend{}}
	for _, id := range ids {
		b := decidertest.StartBackend(t, id)
		c.backends[id] = b
		fmt.Fprintf(&cfg, "\n[[endpoints]]\nid = %q\naddress = %q\nmodel = \"m\"\n", id, b.Addr)
	}
	c.server = decidertest.Start(t, cfg.String())
	return c
}

func (c *cluster) client(t *testing.T, opts decider.Options) *decider.Client {
	t.Helper()
	if opts.DecideTimeout == 0 {
		opts.DecideTimeout = 5 * time.Second
	}
	cl, err := decider.Dial(c.server.Addr, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cl.Close() })
	return cl
}

// try sends a plain HTTP request to the endpoint's address, as a gateway would.
func try(ctx context.Context, ep *pb.Endpoint) decider.Attempt {
	body := strings.NewReader(`{"model":"m","messages":[{"role":"user","content":"hi"}]}`)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+ep.GetAddress()+"/v1/chat/completions", body)
	if err != nil {
		return decider.Attempt{Result: pb.Result_RESULT_ERROR, Err: err}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return decider.Attempt{Result: pb.Result_RESULT_ERROR, Err: err}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return decider.Attempt{Result: pb.Result_RESULT_ERROR, Err: errors.New(resp.Status)}
	}
	return decider.Attempt{Result: pb.Result_RESULT_SUCCESS,
		InputTokens: decidertest.PromptTokens, OutputTokens: decidertest.CompletionTokens}
}

// listEndpoints returns the registry's live status of every endpoint.
func listEndpoints(t *testing.T, addr string) map[string]*pb.EndpointStatus {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	resp, err := pb.NewRegistryServiceClient(conn).ListEndpoints(ctx, &pb.ListEndpointsRequest{Model: "m"})
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetStatuses()
}

func TestRealDeciderRoutesAcrossEndpointsAndTakesOutcomes(t *testing.T) {
	c := startCluster(t, "a", "b", "c")
	cl := c.client(t, decider.Options{})

	const n = 30
	for range n {
		r, err := cl.Route(t.Context(), &pb.DecideRequest{Model: "m", Strategy: "round_robin"}, try)
		if err != nil {
			t.Fatal(err)
		}
		if r.DecisionID == "" || r.FailOpen || len(r.Tried) != 1 {
			t.Fatalf("routed %+v", r)
		}
	}
	var total int64
	for id, b := range c.backends {
		if b.Hits.Load() == 0 {
			t.Errorf("round_robin never chose %s", id)
		}
		total += b.Hits.Load()
	}
	if total != n {
		t.Fatalf("backends served %d requests, want %d", total, n)
	}
	// Every decision's outcome came back: nothing is left in flight, and each
	// endpoint has a latency average from the reported latencies.
	if err := cl.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	for id, st := range listEndpoints(t, c.server.Addr) {
		if st.GetInFlight() != 0 || st.GetLatencyEwma().AsDuration() <= 0 {
			t.Errorf("%s: in_flight %d, latency_ewma %v after all outcomes", id, st.GetInFlight(), st.GetLatencyEwma().AsDuration())
		}
	}
	if s := cl.Stats(); s.FailedReports != 0 || s.DroppedReports != 0 {
		t.Fatalf("reports failed: %+v", s)
	}
}

func TestRealDeciderKeepsSessionsOnOneEndpoint(t *testing.T) {
	c := startCluster(t, "a", "b", "c")
	cl := c.client(t, decider.Options{})
	first := ""
	for range 10 {
		d, err := cl.Decide(t.Context(), &pb.DecideRequest{Model: "m", SessionId: "user-7", Strategy: "affinity"})
		if err != nil {
			t.Fatal(err)
		}
		if first == "" {
			first = d.Endpoint.GetId()
		}
		if d.Endpoint.GetId() != first {
			t.Fatalf("session moved from %s to %s", first, d.Endpoint.GetId())
		}
	}
}

func TestRealDeciderFailoverWhenABackendDies(t *testing.T) {
	c := startCluster(t, "a", "b", "c")
	cl := c.client(t, decider.Options{Watch: true})
	decidertest.WaitFor(t, "the first health snapshot", func() bool { return cl.HealthSnapshots() > 0 })
	c.backends["a"].Kill()

	for range 24 {
		r, err := cl.Route(t.Context(), &pb.DecideRequest{Model: "m", Strategy: "round_robin"}, try)
		if err != nil {
			t.Fatalf("request failed although b and c are up: %v", err)
		}
		if r.Endpoint.GetId() == "a" {
			t.Fatalf("routed %+v to the dead backend", r)
		}
	}
	// The reported errors open a's breaker, and WatchHealth brings that to the
	// client's local view.
	decidertest.WaitFor(t, "a's breaker to open in the health view", func() bool {
		h, ok := cl.Health("a")
		return ok && h.BreakerState == pb.BreakerState_BREAKER_STATE_OPEN
	})
	// With the breaker open Decider stops choosing a at all.
	for range 6 {
		d, err := cl.Decide(t.Context(), &pb.DecideRequest{Model: "m", Strategy: "round_robin"})
		if err != nil {
			t.Fatal(err)
		}
		if d.Endpoint.GetId() == "a" {
			t.Fatal("Decider chose a with its breaker open")
		}
	}
}

func TestRealDeciderRefusals(t *testing.T) {
	c := startCluster(t, "a")
	cl := c.client(t, decider.Options{FailOpen: true})

	_, err := cl.Decide(t.Context(), &pb.DecideRequest{Model: "nobody-serves-this"})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("unknown model: %v, want NOT_FOUND", err)
	}
	_, err = cl.Decide(t.Context(), &pb.DecideRequest{Model: "m", ExcludeEndpointIds: []string{"a"}})
	if !decider.NoHealthyEndpoint(err) {
		t.Fatalf("every endpoint excluded: %v, want UNAVAILABLE with NO_HEALTHY_ENDPOINT", err)
	}
	if cl.Stats().FailOpenDecisions != 0 {
		t.Fatal("a refusal from a live Decider must not trigger fail-open")
	}
}

func TestRealDeciderFailOpenAfterItDies(t *testing.T) {
	c := startCluster(t, "a", "b")
	open := c.client(t, decider.Options{FailOpen: true, Watch: true, DecideTimeout: time.Second})
	closed := c.client(t, decider.Options{DecideTimeout: time.Second})
	decidertest.WaitFor(t, "the first health snapshot", func() bool { return open.HealthSnapshots() > 0 })
	for range 4 {
		if _, err := open.Route(t.Context(), &pb.DecideRequest{Model: "m", Strategy: "round_robin"}, try); err != nil {
			t.Fatal(err)
		}
		if _, err := closed.Decide(t.Context(), &pb.DecideRequest{Model: "m"}); err != nil {
			t.Fatal(err)
		}
	}
	c.server.Kill()

	before := c.backends["a"].Hits.Load() + c.backends["b"].Hits.Load()
	for range 10 {
		r, err := open.Route(t.Context(), &pb.DecideRequest{Model: "m"}, try)
		if err != nil {
			t.Fatalf("fail-open request failed: %v", err)
		}
		if !r.FailOpen {
			t.Fatalf("routed %+v without Decider, but not marked fail-open", r)
		}
	}
	if after := c.backends["a"].Hits.Load() + c.backends["b"].Hits.Load(); after-before != 10 {
		t.Fatalf("backends served %d of 10 fail-open requests", after-before)
	}
	if _, err := closed.Decide(t.Context(), &pb.DecideRequest{Model: "m"}); !errors.Is(err, decider.ErrUnreachable) {
		t.Fatalf("fail-closed client: %v, want ErrUnreachable", err)
	}
}
