package decider

import (
	"context"
	"time"

	pb "github.com/decider-dev/decider/clients/go/gen/decider/v1"
)

const (
	minReconnect = 100 * time.Millisecond
	maxReconnect = 5 * time.Second
)

// watchLoop keeps one WatchHealth stream open, reconnecting with capped
// exponential backoff. Each stream has a deadline (WatchMaxAge) so a stream
// that silently died is replaced, and every reconnect starts with a snapshot.
func (c *Client) watchLoop(ctx context.Context) {
	defer c.bg.Done()
	backoff := minReconnect
	for ctx.Err() == nil {
		got := c.watchOnce(ctx)
		if got {
			backoff = minReconnect
		}
		if !sleep(ctx, backoff) {
			return
		}
		backoff = min(2*backoff, maxReconnect)
	}
}

// watchOnce runs one stream to its end and reports whether it received anything.
func (c *Client) watchOnce(ctx context.Context) bool {
	sctx, cancel := context.WithTimeout(ctx, c.opts.WatchMaxAge)
	defer cancel()
	stream, err := c.api.WatchHealth(sctx, &pb.WatchHealthRequest{Model: c.opts.WatchModel})
	if err != nil {
		return false
	}
	got := false
	for {
		resp, err := stream.Recv()
		if err != nil {
			if ctx.Err() == nil && sctx.Err() == nil {
				c.opts.Logger.Debug("decider: health stream ended", "err", err)
			}
			return got
		}
		got = true
		c.view.apply(c.opts.WatchModel, resp)
	}
}

// refreshLoop lists the registry every RefreshInterval so fail-open knows every
// endpoint of every model, not only the ones decisions have named.
func (c *Client) refreshLoop(ctx context.Context) {
	defer c.bg.Done()
	for {
		if err := c.RefreshEndpoints(ctx); err != nil && ctx.Err() == nil {
			c.opts.Logger.Debug("decider: endpoint refresh failed", "err", err)
		}
		if !sleep(ctx, c.opts.RefreshInterval) {
			return
		}
	}
}

// RefreshEndpoints replaces the known endpoints of WatchModel ("" = all) with
// the registry's list, within DecideTimeout.
func (c *Client) RefreshEndpoints(ctx context.Context) error {
	rctx, cancel := context.WithTimeout(c.withAdminToken(ctx), c.opts.DecideTimeout)
	defer cancel()
	resp, err := c.registry.ListEndpoints(rctx, &pb.ListEndpointsRequest{Model: c.opts.WatchModel})
	if err != nil {
		return err
	}
	c.view.replaceEndpoints(c.opts.WatchModel, resp.GetEndpoints())
	return nil
}

// sleep waits d or until ctx ends; it reports whether the full time passed.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
