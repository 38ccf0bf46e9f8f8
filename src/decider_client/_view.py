"""The client's local view: the endpoints it knows and the health Decider last published for
them, and the fail-open choice made from it when Decider cannot answer."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthView:
    """The last health Decider published for one endpoint."""

    endpoint_id: str
    model: str
    status: epb.HealthStatus.ValueType
    breaker_state: epb.BreakerState.ValueType
    reason: str = ""

    @property
    def usable(self) -> bool:
        # Mirrors Decider's filter: unhealthy, draining and breaker-open are out.
        if self.status in (epb.HEALTH_STATUS_UNHEALTHY, epb.HEALTH_STATUS_DRAINING):
            return False
        return self.breaker_state != epb.BREAKER_STATE_OPEN


class LocalView:
    """Owns the known endpoints and their health; `scope_model` ("" = all) is the model the
    WatchHealth stream and registry refreshes cover."""

    def __init__(self, *, scope_model: str = "") -> None:
        self._scope_model = scope_model
        self._endpoints: dict[str, epb.Endpoint] = {}
        self._health: dict[str, HealthView] = {}
        self._snapshots = 0
        self._rotation = itertools.count()

    @property
    def snapshots(self) -> int:
        """WatchHealth snapshots applied; 0 means the view has not synced yet."""
        return self._snapshots

    def health(self, endpoint_id: str) -> HealthView | None:
        return self._health.get(endpoint_id)

    def known_endpoints(self, model: str = "") -> list[epb.Endpoint]:
        return [ep for _, ep in sorted(self._endpoints.items()) if not model or ep.model == model]

    def learn(self, endpoints: Iterable[epb.Endpoint]) -> None:
        """Adds or updates endpoints seen in a decision, a seed list or the registry."""
        for ep in endpoints:
            if ep.id and ep.address:
                self._endpoints[ep.id] = ep

    def replace_endpoints(self, endpoints: Iterable[epb.Endpoint]) -> None:
        """The registry's list replaces every known endpoint in scope."""
        for ep_id in [i for i, ep in self._endpoints.items() if self._in_scope(ep.model)]:
            del self._endpoints[ep_id]
        self.learn(endpoints)

    def apply(self, resp: dpb.WatchHealthResponse) -> None:
        """One WatchHealth message: a snapshot replaces the health in scope, events update it."""
        if resp.snapshot:
            for ep_id in [i for i, h in self._health.items() if self._in_scope(h.model)]:
                del self._health[ep_id]
        for ev in resp.events:
            if ev.removed:
                self._health.pop(ev.endpoint_id, None)
                self._endpoints.pop(ev.endpoint_id, None)
                continue
            self._health[ev.endpoint_id] = HealthView(
                endpoint_id=ev.endpoint_id,
                model=ev.model,
                status=ev.status,
                breaker_state=ev.breaker_state,
                reason=ev.reason,
            )
        if resp.snapshot:
            self._snapshots += 1

    def usable(self, request: dpb.DecideRequest) -> list[epb.Endpoint]:
        """The fail-open choice: endpoints of the model with the required capabilities, not
        excluded, not unhealthy, draining or breaker-open; healthy ones rotated so load
        spreads, then degraded ones."""
        healthy: list[epb.Endpoint] = []
        degraded: list[epb.Endpoint] = []
        excluded = set(request.exclude_endpoint_ids)
        wanted = set(request.required_capabilities)
        for ep_id in sorted(self._endpoints):
            ep = self._endpoints[ep_id]
            if ep.model != request.model or ep_id in excluded:
                continue
            if not wanted <= set(ep.capabilities):
                continue
            health = self._health.get(ep_id)
            if health is None:
                healthy.append(ep)
            elif not health.usable:
                continue
            elif health.status == epb.HEALTH_STATUS_DEGRADED:
                degraded.append(ep)
            else:
                healthy.append(ep)
        if len(healthy) > 1:
            k = next(self._rotation) % len(healthy)
            healthy = healthy[k:] + healthy[:k]
        return healthy + degraded

    def _in_scope(self, model: str) -> bool:
        return not self._scope_model or model == self._scope_model
