package decider

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"

	"google.golang.org/grpc/credentials"
)

// TLSFiles names the PEM files a Client reaches Decider with over TLS.
type TLSFiles struct {
	// CAFile holds the CAs Decider's certificate must chain to; empty means
	// the system's trusted roots.
	CAFile string
	// CertFile and KeyFile are the client certificate and key for mTLS (both
	// or neither). They are read at every new connection, so a certificate
	// rotated on disk is presented from the next reconnect on.
	CertFile string
	KeyFile  string
	// ServerName is the name Decider's certificate must carry when it is not
	// the host part of the target (dialing an IP address, or through a proxy).
	ServerName string
}

// Credentials checks the files and returns gRPC transport credentials. Each
// error names the file it is about.
func (f TLSFiles) Credentials() (credentials.TransportCredentials, error) {
	cfg, err := f.Config()
	if err != nil {
		return nil, err
	}
	return credentials.NewTLS(cfg), nil
}

// Config is the tls.Config behind Credentials.
func (f TLSFiles) Config() (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: f.ServerName}
	if f.CAFile != "" {
		pem, err := os.ReadFile(f.CAFile)
		if err != nil {
			return nil, fmt.Errorf("decider: TLS CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("decider: TLS CA file %s: no PEM certificate in it", f.CAFile)
		}
		cfg.RootCAs = pool
	}
	if (f.CertFile == "") != (f.KeyFile == "") {
		return nil, errors.New("decider: TLS client certificate and key go together: set both CertFile and KeyFile, or neither")
	}
	if f.CertFile != "" {
		// Checked now so a bad file fails Dial, not the first call.
		if _, err := f.clientCertificate(); err != nil {
			return nil, err
		}
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return f.clientCertificate()
		}
	}
	return cfg, nil
}

func (f TLSFiles) clientCertificate() (*tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("decider: TLS client certificate %s with key %s: %w", f.CertFile, f.KeyFile, err)
	}
	return &cert, nil
}
