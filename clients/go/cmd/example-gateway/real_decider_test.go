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

// The gateway over mTLS to the real Decider: the same flow, the flags that set it up, and
// a bad file refused before the gateway listens.
func TestGatewayWithRealDeciderOverMTLS(t *testing.T) {
	pki := decidertest.NewPKI(t, "Test CA")
	server, gwCert := pki.Server("decider"), pki.Client("gateway-1")
	b := decidertest.StartBackend(t, "a")
	cfg := fmt.Sprintf("[server.tls]\ncert_file = %q\nkey_file = %q\nclient_ca_file = %q\n\n"+
		"[[endpoints]]\nid = \"a\"\naddress = %q\nmodel = \"m\"\n",
		server.CertFile, server.KeyFile, pki.CAFile, b.Addr)
	srv := decidertest.Start(t, cfg)

	gw, _ := startGateway(t, srv.Addr, decider.Options{TLS: &decider.TLSFiles{
		CAFile: pki.CAFile, CertFile: gwCert.CertFile, KeyFile: gwCert.KeyFile}})
	if r := chat(t, gw, hello); r.status != http.StatusOK || r.backend != "a" || r.endpoint != "a" {
		t.Fatalf("reply %+v", r)
	}

	missing := t.TempDir() + "/nope.pem"
	err := run([]string{"-listen", "127.0.0.1:0", "-decider", srv.Addr, "-tls-ca-file", missing})
	if err == nil || !strings.Contains(err.Error(), missing) {
		t.Fatalf("run with a missing CA file: %v", err)
	}
}
