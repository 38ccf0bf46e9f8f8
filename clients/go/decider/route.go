package decider

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/decider-dev/decider/clients/go/gen/decider/v1"
)

// Attempt is what a TryFunc learned from sending the request to one endpoint.
type Attempt struct {
	Result       pb.Result
	InputTokens  uint32
	OutputTokens uint32
	// TimeToFirstToken is zero when unknown (for example a non-streaming response).
	TimeToFirstToken time.Duration
	Load             *pb.LoadReport
	// Final stops the retries even though Result is not a success: the response
	// already reached the user, or the failure is the request's own fault.
	Final bool
	// Err describes a failure, for the error Route returns when attempts run out.
	Err error
}

// TryFunc sends the request to ep. It must honour ctx.
type TryFunc func(ctx context.Context, ep *pb.Endpoint) Attempt

// Routed is the outcome of Route.
type Routed struct {
	// Endpoint is the last endpoint tried; Attempt is what it returned.
	Endpoint *pb.Endpoint
	Attempt  Attempt
	// Tried lists endpoint ids in the order they were tried.
	Tried []string
	// DecisionID of the last decision; empty when it was made in fail-open mode.
	DecisionID string
	FailOpen   bool
}

// ErrAttemptsExhausted is returned (wrapped) by Route when every attempt failed.
var ErrAttemptsExhausted = errors.New("every attempt failed")

// Route runs the whole gateway flow for one request: Decide, then try the
// endpoint and its fallbacks in order; when they run out while attempts remain,
// Decide again with the endpoints already tried in exclude_endpoint_ids. Every
// attempt's outcome goes back to Decider with ReportOutcomeAsync.
//
// The number of attempts is the decision's retry policy max_attempts (or
// Options.MaxAttempts), and the pause between attempts follows its backoff,
// capped at Options.MaxBackoff.
func (c *Client) Route(ctx context.Context, req *pb.DecideRequest, try TryFunc) (*Routed, error) {
	dec, err := c.Decide(ctx, req)
	if err != nil {
		return nil, err
	}
	plan := c.retryPlan(dec.Retry)
	out := &Routed{DecisionID: dec.ID, FailOpen: dec.FailOpen}
	queue := append([]*pb.Endpoint{dec.Endpoint}, dec.Fallbacks...)
	decides := 1
	for len(out.Tried) < plan.attempts {
		if len(queue) == 0 {
			if decides >= plan.attempts {
				// Decider keeps naming endpoints already tried; stop asking.
				break
			}
			decides++
			// Fallbacks exhausted: ask again without what already failed.
			again := proto.Clone(req).(*pb.DecideRequest)
			again.ExcludeEndpointIds = append(slices.Clone(req.GetExcludeEndpointIds()), out.Tried...)
			dec, err = c.Decide(ctx, again)
			if err != nil {
				return out, fmt.Errorf("%w after %d attempts (%s); no endpoint left: %w",
					ErrAttemptsExhausted, len(out.Tried), lastErr(out), err)
			}
			out.DecisionID, out.FailOpen = dec.ID, dec.FailOpen
			queue = append([]*pb.Endpoint{dec.Endpoint}, dec.Fallbacks...)
		}
		ep := queue[0]
		queue = queue[1:]
		if ep == nil || slices.Contains(out.Tried, ep.GetId()) {
			continue
		}
		if len(out.Tried) > 0 {
			if !sleep(ctx, plan.backoff) {
				return out, ctx.Err()
			}
			plan.backoff = min(time.Duration(float64(plan.backoff)*plan.multiplier), plan.maxBackoff)
		}
		start := time.Now()
		a := try(ctx, ep)
		latency := time.Since(start)
		out.Tried = append(out.Tried, ep.GetId())
		out.Endpoint, out.Attempt = ep, a
		if ctx.Err() != nil && a.Result != pb.Result_RESULT_SUCCESS {
			// The caller gave up (a user closing the connection), which says nothing about
			// the endpoint: RESULT_CANCELLED frees the decision's in-flight slot at once
			// without counting toward the endpoint's breaker or latency.
			c.ReportOutcomeAsync(Outcome{DecisionID: dec.ID, EndpointID: ep.GetId(),
				Result: pb.Result_RESULT_CANCELLED, Latency: latency})
			return out, ctx.Err()
		}
		c.ReportOutcomeAsync(Outcome{
			DecisionID:       dec.ID,
			EndpointID:       ep.GetId(),
			Result:           a.Result,
			Latency:          latency,
			InputTokens:      a.InputTokens,
			OutputTokens:     a.OutputTokens,
			TimeToFirstToken: a.TimeToFirstToken,
			Load:             a.Load,
		})
		if a.Result == pb.Result_RESULT_SUCCESS || a.Final {
			return out, nil
		}
	}
	return out, fmt.Errorf("%w: %d attempts (%s)", ErrAttemptsExhausted, len(out.Tried), lastErr(out))
}

type retryPlan struct {
	attempts   int
	backoff    time.Duration // before the next attempt
	multiplier float64
	maxBackoff time.Duration
}

func (c *Client) retryPlan(p *pb.RetryPolicy) retryPlan {
	plan := retryPlan{attempts: c.opts.MaxAttempts, multiplier: 2, maxBackoff: c.opts.MaxBackoff}
	if p == nil {
		return plan
	}
	if p.GetMaxAttempts() > 0 {
		// Bounded so a misconfigured policy cannot spin one request for long.
		plan.attempts = min(int(p.GetMaxAttempts()), 16)
	}
	if p.GetBackoffMultiplier() >= 1 {
		plan.multiplier = p.GetBackoffMultiplier()
	}
	if m := p.GetMaxBackoff().AsDuration(); m > 0 {
		plan.maxBackoff = min(plan.maxBackoff, m)
	}
	plan.backoff = max(min(p.GetInitialBackoff().AsDuration(), plan.maxBackoff), 0)
	return plan
}

func lastErr(r *Routed) string {
	if len(r.Tried) == 0 {
		return "none tried"
	}
	msg := fmt.Sprintf("last: %s %s", r.Endpoint.GetId(), r.Attempt.Result)
	if r.Attempt.Err != nil {
		msg += ": " + r.Attempt.Err.Error()
	}
	return msg
}
