package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/decider-dev/decider/clients/go/decider"
	pb "github.com/decider-dev/decider/clients/go/gen/decider/v1"
)

const chatPath = "/v1/chat/completions"

// Gateway is an OpenAI-compatible reverse proxy that asks Decider where to
// send each /v1/chat/completions request.
type Gateway struct {
	client *decider.Client
	http   *http.Client
	cfg    GatewayConfig
	log    *slog.Logger
}

type GatewayConfig struct {
	// AttemptTimeout bounds one attempt at one endpoint, body included.
	AttemptTimeout time.Duration
	// MaxRequestBytes bounds the request body the gateway buffers for retries.
	MaxRequestBytes int64
	// MaxResponseBytes bounds a non-streaming response body.
	MaxResponseBytes int64
}

func NewGateway(client *decider.Client, transport http.RoundTripper, cfg GatewayConfig, log *slog.Logger) *Gateway {
	if cfg.AttemptTimeout <= 0 {
		cfg.AttemptTimeout = 5 * time.Minute
	}
	if cfg.MaxRequestBytes <= 0 {
		cfg.MaxRequestBytes = 16 << 20
	}
	if cfg.MaxResponseBytes <= 0 {
		cfg.MaxResponseBytes = 64 << 20
	}
	if log == nil {
		log = slog.Default()
	}
	return &Gateway{client: client, http: &http.Client{Transport: transport}, cfg: cfg, log: log}
}

func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/healthz":
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, "ok\n")
	case r.URL.Path == chatPath && r.Method == http.MethodPost:
		g.chat(w, r)
	case r.URL.Path == chatPath:
		w.Header().Set("Allow", http.MethodPost)
		writeError(w, http.StatusMethodNotAllowed, "method_not_allowed", "use POST")
	default:
		writeError(w, http.StatusNotFound, "not_found", "only "+chatPath+" is proxied")
	}
}

// chatRequest is the part of an OpenAI chat request the gateway routes on.
type chatRequest struct {
	Model    string            `json:"model"`
	User     string            `json:"user"`
	Stream   bool              `json:"stream"`
	Messages []json.RawMessage `json:"messages"`
}

func (g *Gateway) chat(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, g.cfg.MaxRequestBytes))
	if err != nil {
		writeError(w, http.StatusRequestEntityTooLarge, "invalid_request_error", err.Error())
		return
	}
	var cr chatRequest
	if err := json.Unmarshal(body, &cr); err != nil {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "body is not a chat request: "+err.Error())
		return
	}
	if cr.Model == "" {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "model is required")
		return
	}
	session := r.Header.Get("X-Session-Id")
	if session == "" {
		session = cr.User
	}
	req := &pb.DecideRequest{
		RequestId: requestID(r),
		Model:     cr.Model,
		SessionId: session,
		Tenant:    r.Header.Get("X-Tenant"),
		// About four bytes of JSON per token: good enough for quota estimates,
		// which the outcome's actual usage replaces.
		EstimatedInputTokens: uint32(min(len(body)/4, 1<<30)),
		PrefixHashes:         prefixHashes(body),
	}

	p := &proxy{g: g, w: w, in: r, body: body}
	routed, err := g.client.Route(r.Context(), req, p.try)
	if p.committed {
		return
	}
	if err == nil {
		// A final attempt that did not commit a response cannot happen; keep the client informed anyway.
		err = errors.New("no response")
	}
	g.fail(w, routed, p, err)
}

// fail answers when no endpoint produced a response the client can see.
func (g *Gateway) fail(w http.ResponseWriter, routed *decider.Routed, p *proxy, err error) {
	if routed != nil && len(routed.Tried) > 0 {
		w.Header().Set("X-Decider-Attempts", strconv.Itoa(len(routed.Tried)))
	}
	st, isStatus := status.FromError(err)
	switch {
	case errors.Is(err, decider.ErrAttemptsExhausted):
		if p.lastStatus == http.StatusTooManyRequests {
			writeError(w, http.StatusTooManyRequests, "rate_limit_error", err.Error())
			return
		}
		writeError(w, http.StatusBadGateway, "upstream_error", err.Error())
	case errors.Is(err, decider.ErrUnreachable):
		writeError(w, http.StatusServiceUnavailable, "router_unavailable", err.Error())
	case isStatus && st.Code() == codes.NotFound:
		writeError(w, http.StatusNotFound, "model_not_found", st.Message())
	case isStatus && st.Code() == codes.ResourceExhausted:
		if d := decider.RetryAfter(err); d > 0 {
			w.Header().Set("Retry-After", strconv.Itoa(int((d+time.Second-1)/time.Second)))
		}
		writeError(w, http.StatusTooManyRequests, "rate_limit_error", st.Message())
	case isStatus && st.Code() == codes.InvalidArgument:
		writeError(w, http.StatusBadRequest, "invalid_request_error", st.Message())
	case isStatus && st.Code() == codes.Unavailable:
		writeError(w, http.StatusServiceUnavailable, "no_healthy_endpoint", st.Message())
	case errors.Is(err, context.Canceled):
		// The client went away; nobody reads this.
		w.WriteHeader(499)
	default:
		writeError(w, http.StatusBadGateway, "upstream_error", err.Error())
	}
}

// proxy sends one request to successive endpoints until one answers.
type proxy struct {
	g         *Gateway
	w         http.ResponseWriter
	in        *http.Request
	body      []byte
	attempts  int
	committed bool
	// lastStatus is the HTTP status of the last endpoint that answered with a retryable error.
	lastStatus int
}

// forwarded are the request headers an OpenAI-compatible backend may need.
var forwarded = []string{"Authorization", "Content-Type", "Accept", "OpenAI-Organization", "OpenAI-Project", "X-Request-Id"}

func (p *proxy) try(ctx context.Context, ep *pb.Endpoint) decider.Attempt {
	p.attempts++
	ctx, cancel := context.WithTimeout(ctx, p.g.cfg.AttemptTimeout)
	defer cancel()
	out, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+ep.GetAddress()+chatPath, bytes.NewReader(p.body))
	if err != nil {
		return decider.Attempt{Result: pb.Result_RESULT_ERROR, Err: err}
	}
	for _, h := range forwarded {
		if v := p.in.Header.Values(h); len(v) > 0 {
			out.Header[h] = v
		}
	}
	start := time.Now()
	resp, err := p.g.http.Do(out)
	if err != nil {
		return decider.Attempt{Result: transportResult(err), Err: err}
	}
	defer resp.Body.Close()

	switch code := resp.StatusCode; {
	case code == http.StatusTooManyRequests:
		p.lastStatus = code
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		return decider.Attempt{Result: pb.Result_RESULT_RATE_LIMITED, Err: errors.New(resp.Status)}
	case code == http.StatusRequestTimeout || code == http.StatusGatewayTimeout:
		p.lastStatus = code
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		return decider.Attempt{Result: pb.Result_RESULT_TIMEOUT, Err: errors.New(resp.Status)}
	case code >= 500 || code == http.StatusNotFound:
		// 404 means this endpoint does not serve the path or the model: try another.
		p.lastStatus = code
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		return decider.Attempt{Result: pb.Result_RESULT_ERROR, Err: errors.New(resp.Status)}
	}

	// 2xx, or a 4xx that is the request's own fault: this response goes to the client.
	a := decider.Attempt{Result: pb.Result_RESULT_SUCCESS, Final: true}
	if strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		p.commit(resp, ep)
		p.w.WriteHeader(resp.StatusCode)
		u, ttft, err := copyStream(p.w, resp.Body, start)
		a.InputTokens, a.OutputTokens, a.TimeToFirstToken = u.PromptTokens, u.CompletionTokens, ttft
		if err != nil {
			a.Result, a.Err = transportResult(err), err
		}
		return a
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, p.g.cfg.MaxResponseBytes))
	if err != nil {
		// Nothing reached the client yet, so another endpoint can still answer.
		return decider.Attempt{Result: transportResult(err), Err: err}
	}
	if resp.StatusCode < 300 {
		u := usageOf(data)
		a.InputTokens, a.OutputTokens = u.PromptTokens, u.CompletionTokens
	}
	p.commit(resp, ep)
	p.w.Header().Set("Content-Length", strconv.Itoa(len(data)))
	p.w.WriteHeader(resp.StatusCode)
	_, _ = p.w.Write(data)
	return a
}

// commit copies the endpoint's response headers: from here on this attempt's
// response is the client's, and there is no retrying.
func (p *proxy) commit(resp *http.Response, ep *pb.Endpoint) {
	p.committed = true
	hdr := p.w.Header()
	for k, v := range resp.Header {
		if k != "Content-Length" && !hopByHop(k) {
			hdr[k] = v
		}
	}
	hdr.Set("X-Decider-Endpoint", ep.GetId())
	hdr.Set("X-Decider-Attempts", strconv.Itoa(p.attempts))
}

type usage struct {
	PromptTokens     uint32 `json:"prompt_tokens"`
	CompletionTokens uint32 `json:"completion_tokens"`
}

func usageOf(data []byte) usage {
	var body struct {
		Usage *usage `json:"usage"`
	}
	if json.Unmarshal(data, &body) != nil || body.Usage == nil {
		return usage{}
	}
	return *body.Usage
}

// copyStream relays server-sent events line by line, flushing each event, and
// picks the usage out of the chunk that carries it (OpenAI sends it last when
// stream_options.include_usage is set).
func copyStream(w http.ResponseWriter, body io.Reader, start time.Time) (usage, time.Duration, error) {
	var u usage
	var ttft time.Duration
	flusher, _ := w.(http.Flusher)
	rd := bufio.NewReaderSize(body, 32<<10)
	for {
		line, err := rd.ReadBytes('\n')
		if len(line) > 0 {
			if ttft == 0 {
				ttft = time.Since(start)
			}
			if data, ok := bytes.CutPrefix(line, []byte("data: ")); ok && bytes.Contains(data, []byte(`"usage"`)) {
				if got := usageOf(bytes.TrimSpace(data)); got != (usage{}) {
					u = got
				}
			}
			if _, werr := w.Write(line); werr != nil {
				return u, ttft, werr
			}
			if flusher != nil && len(bytes.TrimSpace(line)) == 0 {
				flusher.Flush()
			}
		}
		if errors.Is(err, io.EOF) {
			if flusher != nil {
				flusher.Flush()
			}
			return u, ttft, nil
		}
		if err != nil {
			return u, ttft, err
		}
	}
}

func transportResult(err error) pb.Result {
	var ne net.Error
	if errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) {
		return pb.Result_RESULT_TIMEOUT
	}
	return pb.Result_RESULT_ERROR
}

func hopByHop(h string) bool {
	switch h {
	case "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade":
		return true
	}
	return false
}

// prefixHashes are the prompt's block hashes by the shared definition
// (docs/PREFIX_HASH.md): two requests whose prompts share their first k blocks
// of text share their first k hashes, whatever else differs, so a shared system
// prompt matches even when the messages after it differ.
func prefixHashes(body []byte) []uint64 {
	text, err := decider.PromptText(body)
	if err != nil {
		return nil
	}
	return decider.PrefixHashes(text, decider.MaxPrefixBlocks)
}

func requestID(r *http.Request) string {
	if id := r.Header.Get("X-Request-Id"); id != "" {
		return id
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func writeError(w http.ResponseWriter, code int, kind, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string]any{
		"error": map[string]any{"message": msg, "type": kind, "code": fmt.Sprint(code)},
	})
}
