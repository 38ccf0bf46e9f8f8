// Package decidertest starts the real Decider (from the project's venv) and
// stand-in OpenAI-compatible backends on 127.0.0.1 for the module's tests.
package decidertest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// RepoRoot walks up from the working directory to the checkout's root (the
// directory holding protos/decider/v1).
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for range 10 {
		if _, err := os.Stat(filepath.Join(dir, "protos", "decider", "v1")); err == nil {
			return dir
		}
		dir = filepath.Dir(dir)
	}
	t.Fatal("decidertest: cannot find the repository root (protos/decider/v1) above the working directory")
	return ""
}

// Python returns the venv interpreter, or skips the test when the venv is
// missing: that is the one case where the real server cannot be run.
func Python(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("DECIDER_PYTHON"); p != "" {
		return p
	}
	py := filepath.Join(RepoRoot(t), ".venv", "bin", "python")
	if _, err := os.Stat(py); err != nil {
		t.Skipf("SKIP: the project venv is missing (%s); run `make install` to test against the real Decider", py)
	}
	return py
}

// Server is one running `python -m decider serve` process.
type Server struct {
	Addr string
	cmd  *exec.Cmd
	done chan struct{}

	mu  sync.Mutex
	log strings.Builder
}

var portLine = regexp.MustCompile(`decider serving on \S+ \(port (\d+)\)`)

// Start runs Decider with configTOML on 127.0.0.1 (port 0) and waits until it
// logs its bound port. The process is stopped when the test ends.
func Start(t testing.TB, configTOML string) *Server {
	t.Helper()
	py := Python(t)
	root := RepoRoot(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "decider.toml")
	if err := os.WriteFile(cfg, []byte(configTOML), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(py, "-m", "decider", "serve", "--listen", "127.0.0.1:0",
		"--config", cfg, "--data-dir", filepath.Join(dir, "data"), "--grace-period-s", "1")
	// src/ on the path lets the tests run from a checkout whose package is not
	// installed in the venv yet; an editable install resolves to the same files.
	cmd.Env = append(os.Environ(),
		"PYTHONPATH="+filepath.Join(root, "src"),
		"DECIDER_LOG_LEVEL=INFO",
		"PYTHONUNBUFFERED=1",
	)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatalf("decidertest: start %s: %v", py, err)
	}
	s := &Server{cmd: cmd, done: make(chan struct{})}
	ports := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			s.mu.Lock()
			s.log.WriteString(line + "\n")
			s.mu.Unlock()
			if m := portLine.FindStringSubmatch(line); m != nil {
				select {
				case ports <- m[1]:
				default:
				}
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
	}()
	go func() {
		_ = cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(s.Stop)

	select {
	case port := <-ports:
		s.Addr = "127.0.0.1:" + port
	case <-s.done:
		t.Fatalf("decidertest: decider exited before serving:\n%s", s.Log())
	case <-time.After(60 * time.Second):
		t.Fatalf("decidertest: decider did not report its port within 60s:\n%s", s.Log())
	}
	return s
}

// Log is everything the server wrote to stderr so far.
func (s *Server) Log() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log.String()
}

// Stop sends SIGTERM and waits for the drain; after 15s it kills the process.
func (s *Server) Stop() {
	select {
	case <-s.done:
		return
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(15 * time.Second):
		s.Kill()
	}
}

// Kill ends the process at once, as a crash would.
func (s *Server) Kill() {
	_ = s.cmd.Process.Kill()
	<-s.done
}

// Backend is a stand-in OpenAI-compatible model server on 127.0.0.1.
type Backend struct {
	ID   string
	Addr string
	// Hits counts chat completions served.
	Hits atomic.Int64
	// Status, when non-zero, is returned instead of a completion.
	Status atomic.Int32
	srv    *http.Server
}

// Usage tokens every Backend reports, so tests can check they reach Decider.
const (
	PromptTokens     = 21
	CompletionTokens = 7
)

// StartBackend serves /v1/chat/completions (JSON or, with "stream": true,
// server-sent events ending in a usage chunk) and /health.
func StartBackend(t testing.TB, id string) *Backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &Backend{ID: id, Addr: ln.Addr().String()}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") })
	mux.HandleFunc("POST /v1/chat/completions", b.chat)
	b.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = b.srv.Serve(ln) }()
	t.Cleanup(b.Kill)
	return b
}

func (b *Backend) chat(w http.ResponseWriter, r *http.Request) {
	if code := b.Status.Load(); code != 0 {
		http.Error(w, "scripted failure", int(code))
		return
	}
	var req struct {
		Model  string `json:"model"`
		Stream bool   `json:"stream"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	b.Hits.Add(1)
	usage := map[string]int{"prompt_tokens": PromptTokens, "completion_tokens": CompletionTokens, "total_tokens": PromptTokens + CompletionTokens}
	if req.Stream {
		w.Header().Set("Content-Type", "text/event-stream")
		for _, chunk := range []any{
			map[string]any{"object": "chat.completion.chunk", "model": req.Model, "backend": b.ID,
				"choices": []any{map[string]any{"index": 0, "delta": map[string]string{"content": "hi"}}}},
			map[string]any{"object": "chat.completion.chunk", "model": req.Model, "backend": b.ID, "choices": []any{}, "usage": usage},
		} {
			data, _ := json.Marshal(chunk)
			fmt.Fprintf(w, "data: %s\n\n", data)
			w.(http.Flusher).Flush()
		}
		_, _ = io.WriteString(w, "data: [DONE]\n\n")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"object":  "chat.completion",
		"model":   req.Model,
		"backend": b.ID,
		"choices": []any{map[string]any{"index": 0, "message": map[string]string{"role": "assistant", "content": "hi from " + b.ID}, "finish_reason": "stop"}},
		"usage":   usage,
	})
}

// Kill stops the backend abruptly: its port refuses connections from now on.
func (b *Backend) Kill() { _ = b.srv.Close() }

// WaitFor polls cond every 10ms for at most 20s; the bound keeps a broken test
// from hanging, and nothing asserts on how long it took.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for range 2000 {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("gave up waiting for %s", what)
}
