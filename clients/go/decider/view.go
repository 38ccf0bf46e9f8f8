package decider

import (
	"cmp"
	"slices"
	"sync"
	"sync/atomic"

	pb "github.com/decider-dev/decider/clients/go/gen/decider/v1"
)

// HealthView is the last health Decider published for one endpoint.
type HealthView struct {
	EndpointID   string
	Model        string
	Status       pb.HealthStatus
	BreakerState pb.BreakerState
	Reason       string
}

// Usable mirrors Decider's own filter: unhealthy, draining and breaker-open
// endpoints are out; unknown health counts as usable.
func (h HealthView) Usable() bool {
	switch h.Status {
	case pb.HealthStatus_HEALTH_STATUS_UNHEALTHY, pb.HealthStatus_HEALTH_STATUS_DRAINING:
		return false
	}
	return h.BreakerState != pb.BreakerState_BREAKER_STATE_OPEN
}

// view owns the client's local knowledge: endpoints seen in decisions, seeds or
// registry listings, and the health stream's latest word on each.
type view struct {
	mu        sync.RWMutex
	endpoints map[string]*pb.Endpoint
	health    map[string]HealthView
	// snapshots counts WatchHealth snapshots applied, so callers can wait for the first.
	snapshots atomic.Uint64
	next      atomic.Uint64 // rotates fail-open picks across usable endpoints
}

func newView() *view {
	return &view{endpoints: map[string]*pb.Endpoint{}, health: map[string]HealthView{}}
}

func (v *view) learn(eps ...*pb.Endpoint) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, ep := range eps {
		if ep.GetId() != "" && ep.GetAddress() != "" {
			v.endpoints[ep.GetId()] = ep
		}
	}
}

// replaceEndpoints swaps every endpoint of the listed scope ("" = all models) for eps.
func (v *view) replaceEndpoints(model string, eps []*pb.Endpoint) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for id, ep := range v.endpoints {
		if model == "" || ep.GetModel() == model {
			delete(v.endpoints, id)
		}
	}
	for _, ep := range eps {
		if ep.GetId() != "" && ep.GetAddress() != "" {
			v.endpoints[ep.GetId()] = ep
		}
	}
}

// apply folds one WatchHealth response into the view. A snapshot replaces the
// health of every endpoint in scope ("" = all models).
func (v *view) apply(scope string, resp *pb.WatchHealthResponse) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if resp.GetSnapshot() {
		for id, h := range v.health {
			if scope == "" || h.Model == scope {
				delete(v.health, id)
			}
		}
	}
	for _, ev := range resp.GetEvents() {
		id := ev.GetEndpointId()
		if ev.GetRemoved() {
			delete(v.health, id)
			delete(v.endpoints, id)
			continue
		}
		v.health[id] = HealthView{
			EndpointID:   id,
			Model:        ev.GetModel(),
			Status:       ev.GetStatus(),
			BreakerState: ev.GetBreakerState(),
			Reason:       ev.GetReason(),
		}
	}
	if resp.GetSnapshot() {
		v.snapshots.Add(1)
	}
}

// usable lists known endpoints that could serve req, healthy ones first, in an
// order that rotates on every call so fail-open traffic spreads out.
func (v *view) usable(req *pb.DecideRequest) []*pb.Endpoint {
	v.mu.RLock()
	var healthy, degraded []*pb.Endpoint
	for id, ep := range v.endpoints {
		if ep.GetModel() != req.GetModel() || slices.Contains(req.GetExcludeEndpointIds(), id) {
			continue
		}
		if !hasAll(ep.GetCapabilities(), req.GetRequiredCapabilities()) {
			continue
		}
		h, known := v.health[id]
		switch {
		case known && !h.Usable():
		case known && h.Status == pb.HealthStatus_HEALTH_STATUS_DEGRADED:
			degraded = append(degraded, ep)
		default:
			healthy = append(healthy, ep)
		}
	}
	v.mu.RUnlock()
	slices.SortFunc(healthy, byID)
	slices.SortFunc(degraded, byID)
	if n := len(healthy); n > 1 {
		k := int(v.next.Add(1) % uint64(n))
		healthy = append(healthy[k:], healthy[:k]...)
	}
	return append(healthy, degraded...)
}

func (v *view) healthOf(id string) (HealthView, bool) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	h, ok := v.health[id]
	return h, ok
}

func (v *view) healthAll() map[string]HealthView {
	v.mu.RLock()
	defer v.mu.RUnlock()
	out := make(map[string]HealthView, len(v.health))
	for id, h := range v.health {
		out[id] = h
	}
	return out
}

func (v *view) known(model string) []*pb.Endpoint {
	v.mu.RLock()
	defer v.mu.RUnlock()
	var out []*pb.Endpoint
	for _, ep := range v.endpoints {
		if model == "" || ep.GetModel() == model {
			out = append(out, ep)
		}
	}
	slices.SortFunc(out, byID)
	return out
}

func byID(a, b *pb.Endpoint) int { return cmp.Compare(a.GetId(), b.GetId()) }

func hasAll(have, want []string) bool {
	for _, w := range want {
		if !slices.Contains(have, w) {
			return false
		}
	}
	return true
}

// Health returns the last published health of an endpoint.
func (c *Client) Health(endpointID string) (HealthView, bool) { return c.view.healthOf(endpointID) }

// HealthAll returns a copy of the whole local health view.
func (c *Client) HealthAll() map[string]HealthView { return c.view.healthAll() }

// HealthSnapshots counts WatchHealth snapshots received; 0 means the view has
// not synced with Decider yet.
func (c *Client) HealthSnapshots() uint64 { return c.view.snapshots.Load() }

// KnownEndpoints lists endpoints the client could use in fail-open mode ("" = all models).
func (c *Client) KnownEndpoints(model string) []*pb.Endpoint { return c.view.known(model) }
