// Package decider is the gateway side of Decider: ask where to send a request,
// try the endpoint and its fallbacks, and report how it went.
//
// A Client keeps a local view of endpoint health from WatchHealth and the
// endpoints it has learned about, so that in fail-open mode a Decider outage
// degrades routing to "last known healthy endpoints" instead of failing requests.
package decider

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	pb "github.com/decider-dev/decider/clients/go/gen/decider/v1"
)

// Options configures a Client. The zero value is usable: every field has a default.
type Options struct {
	// DecideTimeout bounds each Decide call (default 500ms).
	DecideTimeout time.Duration
	// ReportTimeout bounds each ReportOutcome call (default 2s).
	ReportTimeout time.Duration
	// FailOpen makes Decide fall back to the last known healthy endpoints when
	// Decider cannot be reached, instead of returning an error.
	FailOpen bool
	// SeedEndpoints are known before any decision, so fail-open works even when
	// Decider was never reachable.
	SeedEndpoints []*pb.Endpoint
	// Watch starts a WatchHealth stream that keeps the local health view current.
	Watch bool
	// WatchModel limits the health view to one model; empty means all.
	WatchModel string
	// WatchMaxAge is the deadline of one WatchHealth stream; the client then
	// reconnects and gets a fresh snapshot (default 5m).
	WatchMaxAge time.Duration
	// RefreshInterval, when set, lists the registry (RegistryService.ListEndpoints)
	// that often so fail-open knows every endpoint, not only those seen in decisions.
	RefreshInterval time.Duration
	// AdminToken is sent as a bearer token on RegistryService calls.
	AdminToken string
	// MaxAttempts applies when a decision carries no retry policy (default 3).
	MaxAttempts int
	// MaxBackoff caps the pause between attempts, whatever the policy says (default 1s).
	MaxBackoff time.Duration
	// MaxPendingReports bounds ReportOutcome calls in flight; beyond it reports
	// are dropped and counted rather than queued (default 1024).
	MaxPendingReports int
	// Logger receives warnings about the Decider connection (default: slog.Default()).
	Logger *slog.Logger
	// TLS, when set, makes Dial connect over TLS (mTLS with a client
	// certificate) instead of plaintext.
	TLS *TLSFiles
	// Stream sends every Decide over one shared DecideStream instead of a unary
	// call each: for high-volume gateways, it costs Decider less than half the
	// server CPU per decision. Answers, errors, deadlines and fail-open behave as
	// with unary calls. A decision that arrives after its caller gave up is
	// reported as RESULT_CANCELLED so its in-flight slot is freed at once.
	Stream bool
}

func (o *Options) setDefaults() {
	if o.DecideTimeout <= 0 {
		o.DecideTimeout = 500 * time.Millisecond
	}
	if o.ReportTimeout <= 0 {
		o.ReportTimeout = 2 * time.Second
	}
	if o.WatchMaxAge <= 0 {
		o.WatchMaxAge = 5 * time.Minute
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = 3
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = time.Second
	}
	if o.MaxPendingReports <= 0 {
		o.MaxPendingReports = 1024
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
}

// Client talks to one Decider. It is safe for concurrent use.
type Client struct {
	opts     Options
	conn     *grpc.ClientConn // nil when the caller owns the connection
	api      pb.DeciderServiceClient
	registry pb.RegistryServiceClient
	view     *view
	stream   *streamDecider // nil unless Options.Stream

	reports        chan struct{} // a slot per ReportOutcome in flight
	droppedReports atomic.Uint64
	failedReports  atomic.Uint64
	failOpenCount  atomic.Uint64

	cancel context.CancelFunc
	bg     sync.WaitGroup
}

// Dial connects to Decider at target (host:port), over TLS when opts.TLS is
// set and plaintext HTTP/2 otherwise; extra dial options replace the defaults
// they cover.
func Dial(target string, opts Options, dialOpts ...grpc.DialOption) (*Client, error) {
	creds := insecure.NewCredentials()
	if opts.TLS != nil {
		tlsCreds, err := opts.TLS.Credentials()
		if err != nil {
			return nil, err
		}
		creds = tlsCreds
	}
	all := append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, dialOpts...)
	conn, err := grpc.NewClient(target, all...)
	if err != nil {
		return nil, fmt.Errorf("decider: dial %s: %w", target, err)
	}
	c := New(conn, opts)
	c.conn = conn
	return c, nil
}

// New builds a Client on a connection the caller owns and closes.
func New(conn grpc.ClientConnInterface, opts Options) *Client {
	opts.setDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	c := &Client{
		opts:     opts,
		api:      pb.NewDeciderServiceClient(conn),
		registry: pb.NewRegistryServiceClient(conn),
		view:     newView(),
		reports:  make(chan struct{}, opts.MaxPendingReports),
		cancel:   cancel,
	}
	c.view.learn(opts.SeedEndpoints...)
	if opts.Stream {
		c.stream = newStreamDecider(ctx, c.api, &c.bg, c.cancelLate)
	}
	if opts.Watch {
		c.bg.Add(1)
		go c.watchLoop(ctx)
	}
	if opts.RefreshInterval > 0 {
		c.bg.Add(1)
		go c.refreshLoop(ctx)
	}
	return c
}

// API is the generated DeciderService client, for calls the helpers don't cover.
func (c *Client) API() pb.DeciderServiceClient { return c.api }

// Close stops the background loops, waits for pending reports (bounded by
// their deadline) and closes the connection if Dial opened it.
func (c *Client) Close() error {
	c.cancel()
	c.bg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), c.opts.ReportTimeout)
	defer cancel()
	_ = c.Flush(ctx)
	if c.conn != nil {
		return c.conn.Close()
	}
	return nil
}

// Stats counts what the client did without Decider's help.
type Stats struct {
	// FailOpenDecisions were made locally because Decider was unreachable.
	FailOpenDecisions uint64
	// DroppedReports were not sent because MaxPendingReports were in flight.
	DroppedReports uint64
	// FailedReports were sent and returned an error.
	FailedReports uint64
}

func (c *Client) Stats() Stats {
	return Stats{
		FailOpenDecisions: c.failOpenCount.Load(),
		DroppedReports:    c.droppedReports.Load(),
		FailedReports:     c.failedReports.Load(),
	}
}

// Decision is where to send a request: Endpoint first, then Fallbacks in order.
type Decision struct {
	// ID goes back to Decider in ReportOutcome; empty for fail-open decisions.
	ID        string
	Endpoint  *pb.Endpoint
	Fallbacks []*pb.Endpoint
	Retry     *pb.RetryPolicy
	Reason    string
	Strategy  string
	// FailOpen is true when Decider was unreachable and the client chose
	// from the last known healthy endpoints.
	FailOpen bool
}

// Decide asks Decider for an endpoint within DecideTimeout. When Decider is
// unreachable and FailOpen is set, it answers from the local view instead.
// Decider's own refusals (NOT_FOUND, RESOURCE_EXHAUSTED, UNAVAILABLE with
// NO_HEALTHY_ENDPOINT, INVALID_ARGUMENT) come back as gRPC status errors.
func (c *Client) Decide(ctx context.Context, req *pb.DecideRequest) (*Decision, error) {
	dctx, cancel := context.WithTimeout(ctx, c.opts.DecideTimeout)
	var resp *pb.DecideResponse
	var err error
	if c.stream != nil {
		resp, err = c.stream.decide(dctx, req)
	} else {
		resp, err = c.api.Decide(dctx, req)
	}
	cancel()
	if err == nil {
		c.view.learn(resp.GetEndpoint())
		c.view.learn(resp.GetFallbacks()...)
		return &Decision{
			ID:        resp.GetDecisionId(),
			Endpoint:  resp.GetEndpoint(),
			Fallbacks: resp.GetFallbacks(),
			Retry:     resp.GetRetry(),
			Reason:    resp.GetReason(),
			Strategy:  resp.GetStrategy(),
		}, nil
	}
	if ctx.Err() != nil || !Unreachable(err) {
		return nil, err
	}
	if !c.opts.FailOpen {
		return nil, fmt.Errorf("%w: %w", ErrUnreachable, err)
	}
	eps := c.view.usable(req)
	if len(eps) == 0 {
		return nil, fmt.Errorf("%w: no last known healthy endpoint for model %q: %w",
			ErrUnreachable, req.GetModel(), err)
	}
	c.failOpenCount.Add(1)
	return &Decision{
		Endpoint:  eps[0],
		Fallbacks: eps[1:],
		Reason: fmt.Sprintf("fail-open: decider unreachable (%v); %d last known healthy endpoints",
			statusMessage(err), len(eps)),
		Strategy: "fail_open",
		FailOpen: true,
	}, nil
}

// Outcome is how one attempt at one endpoint went.
type Outcome struct {
	DecisionID   string
	EndpointID   string
	Result       pb.Result
	Latency      time.Duration
	InputTokens  uint32
	OutputTokens uint32
	// TimeToFirstToken is zero when unknown.
	TimeToFirstToken time.Duration
	Load             *pb.LoadReport
}

func (o Outcome) request() *pb.ReportOutcomeRequest {
	req := &pb.ReportOutcomeRequest{
		DecisionId:   o.DecisionID,
		EndpointId:   o.EndpointID,
		Result:       o.Result,
		Latency:      durationProto(o.Latency),
		InputTokens:  o.InputTokens,
		OutputTokens: o.OutputTokens,
		Load:         o.Load,
	}
	if o.TimeToFirstToken > 0 {
		req.TimeToFirstToken = durationProto(o.TimeToFirstToken)
	}
	return req
}

// ReportOutcome sends one outcome and waits for the answer, within ReportTimeout.
func (c *Client) ReportOutcome(ctx context.Context, o Outcome) error {
	rctx, cancel := context.WithTimeout(ctx, c.opts.ReportTimeout)
	defer cancel()
	_, err := c.api.ReportOutcome(rctx, o.request())
	return err
}

// ReportOutcomeAsync sends the outcome in the background so the request path
// never waits for it. When MaxPendingReports are in flight it drops the report.
func (c *Client) ReportOutcomeAsync(o Outcome) {
	select {
	case c.reports <- struct{}{}:
	default:
		c.droppedReports.Add(1)
		return
	}
	go func() {
		defer func() { <-c.reports }()
		if err := c.ReportOutcome(context.Background(), o); err != nil {
			c.failedReports.Add(1)
		}
	}()
}

// Flush waits until every report started before it has finished, or ctx ends.
func (c *Client) Flush(ctx context.Context) error {
	taken := 0
	defer func() {
		for ; taken > 0; taken-- {
			<-c.reports
		}
	}()
	for taken < cap(c.reports) {
		select {
		case c.reports <- struct{}{}:
			taken++
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// cancelLate frees the in-flight slot of a decision nobody waits for any more.
func (c *Client) cancelLate(resp *pb.DecideResponse) {
	c.ReportOutcomeAsync(Outcome{
		DecisionID: resp.GetDecisionId(),
		EndpointID: resp.GetEndpoint().GetId(),
		Result:     pb.Result_RESULT_CANCELLED,
	})
}

// ErrUnreachable wraps Decide errors when Decider could not be reached and
// fail-open had nothing to offer (or is off).
var ErrUnreachable = errors.New("decider unreachable")

func (c *Client) withAdminToken(ctx context.Context) context.Context {
	if c.opts.AdminToken == "" {
		return ctx
	}
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.opts.AdminToken)
}
