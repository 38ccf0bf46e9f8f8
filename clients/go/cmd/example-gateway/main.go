// Command example-gateway is the reference integration: an OpenAI-compatible
// reverse proxy that asks Decider where to send each /v1/chat/completions
// request, retries across the fallbacks, and reports every outcome.
//
//	example-gateway -listen 127.0.0.1:8080 -decider 127.0.0.1:50051 -fail-open
//
// Over mTLS: -tls-ca-file ca.pem -tls-cert-file gw.pem -tls-key-file gw-key.pem
// (or DECIDER_CLIENT_TLS_CA_FILE, _CERT_FILE, _KEY_FILE, _SERVER_NAME).
//
// The session comes from the X-Session-Id header (or the body's "user"), the
// tenant from X-Tenant. Responses carry X-Decider-Endpoint and X-Decider-Attempts.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/decider-dev/decider/clients/go/decider"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "example-gateway:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("example-gateway", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:8080", "HTTP address to serve on")
	target := fs.String("decider", "127.0.0.1:50051", "Decider gRPC address")
	failOpen := fs.Bool("fail-open", true, "route to the last known healthy endpoints when Decider is unreachable")
	decideTimeout := fs.Duration("decide-timeout", 500*time.Millisecond, "deadline of each Decide call")
	attemptTimeout := fs.Duration("attempt-timeout", 5*time.Minute, "deadline of one attempt at one endpoint")
	headerTimeout := fs.Duration("header-timeout", 60*time.Second, "how long an endpoint may take to send response headers")
	refresh := fs.Duration("refresh", 30*time.Second, "how often to list the registry for fail-open (0 = never)")
	adminToken := fs.String("admin-token", os.Getenv("DECIDER_ADMIN_TOKEN"), "bearer token for RegistryService.ListEndpoints")
	stream := fs.Bool("stream", false, "send every Decide over one shared DecideStream (for high request rates)")
	useTLS := fs.Bool("tls", false, "reach Decider over TLS with the system's trusted CAs (implied by any -tls-* flag)")
	tlsFiles := decider.TLSFiles{}
	fs.StringVar(&tlsFiles.CAFile, "tls-ca-file", os.Getenv("DECIDER_CLIENT_TLS_CA_FILE"), "PEM CA bundle to verify Decider with")
	fs.StringVar(&tlsFiles.CertFile, "tls-cert-file", os.Getenv("DECIDER_CLIENT_TLS_CERT_FILE"), "client certificate (PEM) for mTLS")
	fs.StringVar(&tlsFiles.KeyFile, "tls-key-file", os.Getenv("DECIDER_CLIENT_TLS_KEY_FILE"), "client private key (PEM) for mTLS")
	fs.StringVar(&tlsFiles.ServerName, "tls-server-name", os.Getenv("DECIDER_CLIENT_TLS_SERVER_NAME"), "name Decider's certificate must carry")
	if err := fs.Parse(args); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	var tlsOpt *decider.TLSFiles
	if *useTLS || tlsFiles != (decider.TLSFiles{}) {
		tlsOpt = &tlsFiles
	}

	client, err := decider.Dial(*target, decider.Options{
		DecideTimeout:   *decideTimeout,
		FailOpen:        *failOpen,
		Watch:           true,
		RefreshInterval: *refresh,
		AdminToken:      *adminToken,
		Logger:          log,
		Stream:          *stream,
		TLS:             tlsOpt,
	})
	if err != nil {
		return err
	}
	defer client.Close()

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	gw := NewGateway(client, newTransport(*headerTimeout), GatewayConfig{AttemptTimeout: *attemptTimeout}, log)
	srv := &http.Server{Handler: gw, ReadHeaderTimeout: 10 * time.Second}
	// Tests and scripts read the bound address from this line.
	fmt.Printf("example-gateway listening on http://%s\n", ln.Addr())

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdown); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func newTransport(headerTimeout time.Duration) *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.ResponseHeaderTimeout = headerTimeout
	t.MaxIdleConnsPerHost = 64
	return t
}
