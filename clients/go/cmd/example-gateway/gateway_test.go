package main

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/decider-dev/decider/clients/go/decider"
	pb "github.com/decider-dev/decider/clients/go/gen/decider/v1"
	"github.com/decider-dev/decider/clients/go/internal/decidertest"
)

// startGateway serves a Gateway backed by a Decider at target on 127.0.0.1.
func startGateway(t *testing.T, target string, opts decider.Options) (*httptest.Server, *decider.Client) {
	t.Helper()
	if opts.DecideTimeout == 0 {
		opts.DecideTimeout = 2 * time.Second
	}
	client, err := decider.Dial(target, opts)
	if err != nil {
		t.Fatal(err)
	}
	gw := NewGateway(client, newTransport(10*time.Second), GatewayConfig{AttemptTimeout: 10 * time.Second}, nil)
	srv := httptest.NewServer(gw)
	t.Cleanup(func() {
		srv.Close()
		_ = client.Close()
	})
	return srv, client
}

type chatReply struct {
	status   int
	endpoint string
	attempts string
	backend  string
	body     string
}

func chat(t *testing.T, gw *httptest.Server, body string, headers ...string) chatReply {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, gw.URL+chatPath, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := gw.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var parsed struct {
		Backend string `json:"backend"`
	}
	_ = json.Unmarshal(data, &parsed)
	return chatReply{
		status:   resp.StatusCode,
		endpoint: resp.Header.Get("X-Decider-Endpoint"),
		attempts: resp.Header.Get("X-Decider-Attempts"),
		backend:  parsed.Backend,
		body:     string(data),
	}
}

const hello = `{"model":"m","messages":[{"role":"system","content":"be brief and cite the manual section for every step"},{"role":"user","content":"hi"}]}`

func endpointFor(b *decidertest.Backend) *pb.Endpoint {
	return &pb.Endpoint{Id: b.ID, Address: b.Addr, Model: "m"}
}

func TestGatewayProxiesAndReportsUsage(t *testing.T) {
	a := decidertest.StartBackend(t, "a")
	fake := decidertest.StartFake(t, &decidertest.Fake{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) {
		return &pb.DecideResponse{DecisionId: "d1", Endpoint: endpointFor(a)}, nil
	}})
	gw, client := startGateway(t, fake.Addr, decider.Options{})

	r := chat(t, gw, hello, "X-Session-Id", "s1", "X-Tenant", "acme")
	if r.status != http.StatusOK || r.backend != "a" || r.endpoint != "a" || r.attempts != "1" {
		t.Fatalf("reply %+v", r)
	}
	if err := client.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	reqs := fake.Requests()
	if len(reqs) != 1 {
		t.Fatalf("%d Decide calls", len(reqs))
	}
	d := reqs[0]
	if d.GetModel() != "m" || d.GetSessionId() != "s1" || d.GetTenant() != "acme" || len(d.GetPrefixHashes()) != 1 || !slices.Equal(d.GetPrefixHashes(), prefixHashes([]byte(hello))) || d.GetEstimatedInputTokens() == 0 {
		t.Fatalf("Decide request %v", d)
	}
	outs := fake.Outcomes()
	if len(outs) != 1 {
		t.Fatalf("%d outcomes", len(outs))
	}
	o := outs[0]
	if o.GetDecisionId() != "d1" || o.GetEndpointId() != "a" || o.GetResult() != pb.Result_RESULT_SUCCESS ||
		o.GetInputTokens() != decidertest.PromptTokens || o.GetOutputTokens() != decidertest.CompletionTokens || o.GetLatency().AsDuration() <= 0 {
		t.Fatalf("outcome %v", o)
	}
}

func TestGatewayStreamsAndReportsUsageFromTheLastChunk(t *testing.T) {
	a := decidertest.StartBackend(t, "a")
	fake := decidertest.StartFake(t, &decidertest.Fake{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) {
		return &pb.DecideResponse{DecisionId: "d1", Endpoint: endpointFor(a)}, nil
	}})
	gw, client := startGateway(t, fake.Addr, decider.Options{})

	r := chat(t, gw, `{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}`)
	if r.status != http.StatusOK || r.endpoint != "a" {
		t.Fatalf("reply %+v", r)
	}
	var events []string
	sc := bufio.NewScanner(strings.NewReader(r.body))
	for sc.Scan() {
		if line, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			events = append(events, line)
		}
	}
	if len(events) != 3 || events[2] != "[DONE]" {
		t.Fatalf("events %q", events)
	}
	if err := client.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	outs := fake.Outcomes()
	if len(outs) != 1 || outs[0].GetOutputTokens() != decidertest.CompletionTokens || outs[0].GetTimeToFirstToken().AsDuration() <= 0 {
		t.Fatalf("outcomes %v", outs)
	}
}

func TestGatewayFailsOverToFallbacks(t *testing.T) {
	dead := decidertest.StartBackend(t, "dead")
	dead.Kill()
	busy := decidertest.StartBackend(t, "busy")
	busy.Status.Store(http.StatusTooManyRequests)
	ok := decidertest.StartBackend(t, "ok")
	fake := decidertest.StartFake(t, &decidertest.Fake{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) {
		return &pb.DecideResponse{DecisionId: "d1", Endpoint: endpointFor(dead),
			Fallbacks: []*pb.Endpoint{endpointFor(busy), endpointFor(ok)}}, nil
	}})
	gw, client := startGateway(t, fake.Addr, decider.Options{})

	r := chat(t, gw, hello)
	if r.status != http.StatusOK || r.backend != "ok" || r.attempts != "3" {
		t.Fatalf("reply %+v", r)
	}
	if err := client.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	got := map[string]pb.Result{}
	for _, o := range fake.Outcomes() {
		got[o.GetEndpointId()] = o.GetResult()
	}
	want := map[string]pb.Result{"dead": pb.Result_RESULT_ERROR, "busy": pb.Result_RESULT_RATE_LIMITED, "ok": pb.Result_RESULT_SUCCESS}
	if len(got) != 3 || got["dead"] != want["dead"] || got["busy"] != want["busy"] || got["ok"] != want["ok"] {
		t.Fatalf("outcomes %v, want %v", got, want)
	}
}

func TestGatewayPassesClientErrorsThroughWithoutRetrying(t *testing.T) {
	a := decidertest.StartBackend(t, "a")
	a.Status.Store(http.StatusBadRequest)
	b := decidertest.StartBackend(t, "b")
	fake := decidertest.StartFake(t, &decidertest.Fake{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) {
		return &pb.DecideResponse{DecisionId: "d1", Endpoint: endpointFor(a), Fallbacks: []*pb.Endpoint{endpointFor(b)}}, nil
	}})
	gw, _ := startGateway(t, fake.Addr, decider.Options{})

	r := chat(t, gw, hello)
	if r.status != http.StatusBadRequest || r.endpoint != "a" || b.Hits.Load() != 0 {
		t.Fatalf("reply %+v, b hits %d", r, b.Hits.Load())
	}
}

func TestGatewayMapsRefusalsToHTTP(t *testing.T) {
	cases := []struct {
		code codes.Code
		want int
	}{
		{codes.NotFound, http.StatusNotFound},
		{codes.ResourceExhausted, http.StatusTooManyRequests},
		{codes.InvalidArgument, http.StatusBadRequest},
	}
	for _, tc := range cases {
		t.Run(tc.code.String(), func(t *testing.T) {
			fake := decidertest.StartFake(t, &decidertest.Fake{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) {
				return nil, status.Error(tc.code, "refused")
			}})
			gw, _ := startGateway(t, fake.Addr, decider.Options{FailOpen: true})
			if r := chat(t, gw, hello); r.status != tc.want {
				t.Fatalf("status %d, want %d: %s", r.status, tc.want, r.body)
			}
		})
	}
}

func TestGatewayFailsOpenWhenDeciderIsDown(t *testing.T) {
	a := decidertest.StartBackend(t, "a")
	b := decidertest.StartBackend(t, "b")
	fake := decidertest.StartFake(t, &decidertest.Fake{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) {
		return &pb.DecideResponse{DecisionId: "d1", Endpoint: endpointFor(a), Fallbacks: []*pb.Endpoint{endpointFor(b)}}, nil
	}})
	gw, client := startGateway(t, fake.Addr, decider.Options{FailOpen: true, DecideTimeout: 300 * time.Millisecond})
	closed, _ := startGateway(t, fake.Addr, decider.Options{DecideTimeout: 300 * time.Millisecond})
	if r := chat(t, gw, hello); r.status != http.StatusOK {
		t.Fatalf("reply %+v", r)
	}
	fake.Stop()

	var backends []string
	for range 6 {
		r := chat(t, gw, hello)
		if r.status != http.StatusOK {
			t.Fatalf("fail-open reply %+v", r)
		}
		backends = append(backends, r.backend)
	}
	if !slices.Contains(backends, "a") || !slices.Contains(backends, "b") {
		t.Fatalf("fail-open used %v, want both known endpoints", backends)
	}
	if client.Stats().FailOpenDecisions != 6 {
		t.Fatalf("stats %+v", client.Stats())
	}
	if r := chat(t, closed, hello); r.status != http.StatusServiceUnavailable {
		t.Fatalf("fail-closed gateway answered %d, want 503", r.status)
	}
}

func TestGatewayRejectsBadRequests(t *testing.T) {
	fake := decidertest.StartFake(t, &decidertest.Fake{DecideFunc: func(*pb.DecideRequest) (*pb.DecideResponse, error) {
		return nil, status.Error(codes.Internal, "must not be called")
	}})
	gw, _ := startGateway(t, fake.Addr, decider.Options{})
	for _, body := range []string{`not json`, `{"messages":[]}`} {
		if r := chat(t, gw, body); r.status != http.StatusBadRequest {
			t.Errorf("%q: status %d", body, r.status)
		}
	}
	if len(fake.Requests()) != 0 {
		t.Fatal("bad requests reached Decider")
	}
}

func TestPrefixHashesShareTheCommonPrefix(t *testing.T) {
	system := strings.Repeat("You are a support assistant. ", 8)
	x := prefixHashes([]byte(`{"model":"m","messages":[{"role":"system","content":"` + system +
		`"},{"role":"user","content":"How do I reset my router? Please answer in two sentences."}]}`))
	y := prefixHashes([]byte(`{"model": "m", "messages": [{"role": "system", "content": "` + system +
		`"}, {"role": "user", "content": "Where is the manual for the X200 model, in English?"}]}`))
	// The system message is 3 full blocks (its role prefix included); formatting
	// of the JSON does not matter, only the text.
	if len(x) < 4 || len(y) < 4 || x[0] != y[0] || x[2] != y[2] || x[len(x)-1] == y[len(y)-1] {
		t.Fatalf("x=%v y=%v: want the system prompt's blocks shared and the last different", x, y)
	}
}

// The gateway hashes bodies by the shared definition: every vector's body gives
// the vector's hashes (vectors with a smaller cap are for the library).
func TestPrefixHashesMatchTheSharedVectors(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "..", "..", "..", "testdata", "prefix_hash_vectors.json"))
	if err != nil {
		t.Fatal(err)
	}
	var file struct {
		Vectors []struct {
			Name      string          `json:"name"`
			Body      json.RawMessage `json:"body"`
			MaxBlocks int             `json:"max_blocks"`
			Hashes    []string        `json:"hashes"`
		} `json:"vectors"`
	}
	if err := json.Unmarshal(raw, &file); err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, v := range file.Vectors {
		if v.MaxBlocks != 0 {
			continue
		}
		got := prefixHashes(v.Body)
		if len(got) != len(v.Hashes) {
			t.Errorf("%s: %d hashes, want %d", v.Name, len(got), len(v.Hashes))
			continue
		}
		for i, want := range v.Hashes {
			if strconv.FormatUint(got[i], 10) != want {
				t.Errorf("%s: hash %d is %d, want %s", v.Name, i, got[i], want)
			}
		}
		checked++
	}
	if checked == 0 {
		t.Fatal("no vectors checked")
	}
}
