package decider_test

import (
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/decider-dev/decider/clients/go/decider"
	pb "github.com/decider-dev/decider/clients/go/gen/decider/v1"
	"github.com/decider-dev/decider/clients/go/internal/decidertest"
)

// startTLSDecider runs the real Decider with [server.tls] and two endpoints of model "m".
func startTLSDecider(t *testing.T, pki *decidertest.PKI, server decidertest.Pair, mutual bool, admins ...string) *decidertest.Server {
	t.Helper()
	var cfg strings.Builder
	fmt.Fprintf(&cfg, "[server.tls]\ncert_file = %q\nkey_file = %q\n", server.CertFile, server.KeyFile)
	if mutual {
		fmt.Fprintf(&cfg, "client_ca_file = %q\n", pki.CAFile)
	}
	if len(admins) > 0 {
		fmt.Fprintf(&cfg, "admin_client_names = [%q]\n", strings.Join(admins, `", "`))
	}
	for _, id := range []string{"a", "b"} {
		fmt.Fprintf(&cfg, "\n[[endpoints]]\nid = %q\naddress = \"127.0.0.1:1\"\nmodel = \"m\"\n", id)
	}
	return decidertest.Start(t, cfg.String())
}

func decideOnce(t *testing.T, target string, files decider.TLSFiles) (*decider.Decision, error) {
	t.Helper()
	cl, err := decider.Dial(target, decider.Options{DecideTimeout: 5 * time.Second, TLS: &files})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	return cl.Decide(t.Context(), &pb.DecideRequest{Model: "m"})
}

func TestTLSAgainstTheRealDecider(t *testing.T) {
	pki := decidertest.NewPKI(t, "Test CA")
	srv := startTLSDecider(t, pki, pki.Server("decider"), false)

	t.Run("a TLS client decides", func(t *testing.T) {
		d, err := decideOnce(t, srv.Addr, decider.TLSFiles{CAFile: pki.CAFile})
		if err != nil || d.Endpoint.GetId() == "" {
			t.Fatalf("decision %+v, err %v", d, err)
		}
	})
	t.Run("a plaintext client fails as unreachable", func(t *testing.T) {
		cl, err := decider.Dial(srv.Addr, decider.Options{DecideTimeout: 2 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		_, err = cl.Decide(t.Context(), &pb.DecideRequest{Model: "m"})
		if !errors.Is(err, decider.ErrUnreachable) {
			t.Fatalf("err %v, want ErrUnreachable", err)
		}
	})
	t.Run("a client trusting another CA fails", func(t *testing.T) {
		other := decidertest.NewPKI(t, "Other CA")
		_, err := decideOnce(t, srv.Addr, decider.TLSFiles{CAFile: other.CAFile})
		if !errors.Is(err, decider.ErrUnreachable) {
			t.Fatalf("err %v, want ErrUnreachable", err)
		}
	})
}

func TestTLSServerNameVerifiesAnotherName(t *testing.T) {
	pki := decidertest.NewPKI(t, "Test CA")
	srv := startTLSDecider(t, pki, pki.Named("decider", "decider.internal"), false)
	if _, err := decideOnce(t, srv.Addr, decider.TLSFiles{CAFile: pki.CAFile}); err == nil {
		t.Fatal("a certificate without 127.0.0.1 was accepted for 127.0.0.1")
	}
	d, err := decideOnce(t, srv.Addr, decider.TLSFiles{CAFile: pki.CAFile, ServerName: "decider.internal"})
	if err != nil || d.Endpoint.GetId() == "" {
		t.Fatalf("decision %+v, err %v", d, err)
	}
}

func TestMTLSAgainstTheRealDecider(t *testing.T) {
	pki := decidertest.NewPKI(t, "Test CA")
	srv := startTLSDecider(t, pki, pki.Server("decider"), true, "ops-admin")
	gateway := pki.Client("gateway-1")
	ops := pki.Client("ops-admin")

	t.Run("a client with a certificate decides", func(t *testing.T) {
		d, err := decideOnce(t, srv.Addr, decider.TLSFiles{CAFile: pki.CAFile, CertFile: gateway.CertFile, KeyFile: gateway.KeyFile})
		if err != nil || d.Endpoint.GetId() == "" {
			t.Fatalf("decision %+v, err %v", d, err)
		}
	})
	t.Run("a client without a certificate is refused", func(t *testing.T) {
		_, err := decideOnce(t, srv.Addr, decider.TLSFiles{CAFile: pki.CAFile})
		if !errors.Is(err, decider.ErrUnreachable) {
			t.Fatalf("err %v, want ErrUnreachable", err)
		}
	})
	t.Run("only the admin list lists the registry", func(t *testing.T) {
		for _, tc := range []struct {
			pair decidertest.Pair
			want codes.Code
		}{{ops, codes.OK}, {gateway, codes.PermissionDenied}} {
			cl, err := decider.Dial(srv.Addr, decider.Options{DecideTimeout: 5 * time.Second, TLS: &decider.TLSFiles{
				CAFile: pki.CAFile, CertFile: tc.pair.CertFile, KeyFile: tc.pair.KeyFile}})
			if err != nil {
				t.Fatal(err)
			}
			err = cl.RefreshEndpoints(t.Context())
			cl.Close()
			if got := status.Code(err); got != tc.want {
				t.Fatalf("%s: code %v (%v), want %v", tc.pair.CertFile, got, err, tc.want)
			}
		}
	})
}

func TestTLSFilesNameTheBadFile(t *testing.T) {
	pki := decidertest.NewPKI(t, "Test CA")
	client := pki.Client("gw")
	missing := t.TempDir() + "/missing.pem"
	for _, tc := range []struct {
		files decider.TLSFiles
		want  string
	}{
		{decider.TLSFiles{CAFile: missing}, missing},
		{decider.TLSFiles{CAFile: client.KeyFile}, client.KeyFile + ": no PEM certificate"},
		{decider.TLSFiles{CertFile: client.CertFile, KeyFile: missing}, missing},
		{decider.TLSFiles{CertFile: client.CertFile}, "set both CertFile and KeyFile"},
	} {
		_, err := decider.Dial("127.0.0.1:1", decider.Options{TLS: &tc.files})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: err %v, want it to mention %q", tc.files, err, tc.want)
		}
	}
}

func TestTLSClientCertificateIsReadAtEachHandshake(t *testing.T) {
	pki := decidertest.NewPKI(t, "Test CA")
	first, second := pki.Client("first"), pki.Client("second")
	files := decider.TLSFiles{CAFile: pki.CAFile, CertFile: first.CertFile, KeyFile: first.KeyFile}
	cfg, err := files.Config()
	if err != nil {
		t.Fatal(err)
	}
	commonName := func() string {
		cert, err := cfg.GetClientCertificate(nil)
		if err != nil {
			t.Fatal(err)
		}
		leaf, err := x509.ParseCertificate(cert.Certificate[0])
		if err != nil {
			t.Fatal(err)
		}
		return leaf.Subject.CommonName
	}
	if got := commonName(); got != "first" {
		t.Fatalf("presented %q", got)
	}
	for _, f := range [][2]string{{second.CertFile, first.CertFile}, {second.KeyFile, first.KeyFile}} {
		data, err := os.ReadFile(f[0])
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f[1], data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if got := commonName(); got != "second" {
		t.Fatalf("after rotation presented %q", got)
	}
}
