package main

import (
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/decider-dev/decider/clients/go/decider"
	"github.com/decider-dev/decider/clients/go/internal/decidertest"
)

// The gateway end to end: real Decider from the venv, real HTTP backends,
// real HTTP clients, all on 127.0.0.1.
func TestGatewayWithRealDecider(t *testing.T) {
	backends := map[string]*decidertest.Backend{}
	var cfg strings.Builder
	cfg.WriteString("[routing]\ndefault_strategy = \"round_robin\"\nmax_fallbacks = 2\nretry_initial_backoff_s = 0.005\n\n[breaker]\nconsecutive_failures = 3\nopen_s = 120\n")
	for _, id := range []string{"a", "b", "c"} {
		b := decidertest.StartBackend(t, id)
		backends[id] = b
		fmt.Fprintf(&cfg, "\n[[endpoints]]\nid = %q\naddress = %q\nmodel = \"m\"\n", id, b.Addr)
	}
	server := decidertest.Start(t, cfg.String())
	gw, client := startGateway(t, server.Addr, decider.Options{FailOpen: true, Watch: true})

	t.Run("routes every request to a backend and says which", func(t *testing.T) {
		for range 9 {
			r := chat(t, gw, hello)
			if r.status != http.StatusOK || r.backend == "" || r.backend != r.endpoint {
				t.Fatalf("reply %+v", r)
			}
		}
		for id, b := range backends {
			if b.Hits.Load() == 0 {
				t.Errorf("backend %s got no traffic", id)
			}
		}
	})

	t.Run("unknown model is a 404", func(t *testing.T) {
		if r := chat(t, gw, `{"model":"nope","messages":[]}`); r.status != http.StatusNotFound {
			t.Fatalf("reply %+v", r)
		}
	})

	t.Run("a dead backend costs retries, never errors", func(t *testing.T) {
		backends["a"].Kill()
		for range 12 {
			if r := chat(t, gw, hello); r.status != http.StatusOK || r.backend == "a" {
				t.Fatalf("reply %+v", r)
			}
		}
	})

	t.Run("Decider down: fail-open keeps serving", func(t *testing.T) {
		if err := client.Flush(t.Context()); err != nil {
			t.Fatal(err)
		}
		server.Kill()
		for range 6 {
			if r := chat(t, gw, hello); r.status != http.StatusOK || r.backend == "a" {
				t.Fatalf("reply %+v", r)
			}
		}
		if client.Stats().FailOpenDecisions == 0 {
			t.Fatal("no fail-open decisions recorded")
		}
	})
}
