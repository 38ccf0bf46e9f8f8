"""Verdicts on endpoints, from the breakers and the prober: what each one changes. Outcomes are
counted into the breakers here; whenever a verdict changes which endpoints are usable, the model's
pools are dropped (pools.py rebuilds them on next use, as Envoy's load balancers see only hosts
the outlier detector left in) and a HealthEvent is published.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from decider.core.breaker import BreakerTransition
from decider.core.model import BreakerState, HealthEvent, HealthStatus
from decider.core.stats import EndpointStats

if TYPE_CHECKING:
    from decider.core.pool import Pools
    from decider.core.state import Breakers, LoadStats


class Verdicts:
    __slots__ = ("_breakers", "_on_event", "_pools", "_stats")

    def __init__(
        self,
        *,
        breakers: Breakers,
        stats: LoadStats,
        pools: Pools,
        on_event: Callable[[HealthEvent], None] | None,
    ) -> None:
        self._breakers = breakers
        self._stats = stats
        self._pools = pools
        self._on_event = on_event

    def added(self, s: EndpointStats, *, now: float) -> None:
        self._breakers.add(s.id, now=now)
        self.publish(s, s.health_reason)

    def removed(self, s: EndpointStats) -> None:
        self._breakers.remove(s.id)
        self._emit(
            HealthEvent(
                endpoint_id=s.id,
                model=s.model,
                status=s.health,
                breaker_state=BreakerState.UNKNOWN,
                reason="deregistered",
                removed=True,
            )
        )

    def record(self, s: EndpointStats, *, ok: bool, now: float) -> None:
        """An outcome with a verdict (success, error, timeout) for the endpoint's breaker."""
        half_open = self._breakers.state(s.id) is BreakerState.HALF_OPEN
        transition = self._breakers.record(s.id, ok=ok, now=now)
        if transition is not None:
            self._on_transition(transition)
        elif half_open:
            # A finished trial frees a slot: the pool's view of the endpoint may change.
            self._pools.drop(s.model)

    def release(self, s: EndpointStats) -> None:
        """A request ended with no verdict (cancelled, rate limited, expired): a half-open
        trial slot it held is free again."""
        if self._breakers.release_trial(s.id):
            self._pools.drop(s.model)

    def advance(self, now: float) -> None:
        """Open breakers whose time is up turn half-open."""
        for transition in self._breakers.advance(now):
            self._on_transition(transition)

    def set_health(self, s: EndpointStats, status: HealthStatus, reason: str) -> bool:
        """A prober verdict; True when the status changed (then the event is published)."""
        if not self._stats.set_health(s, status, reason):
            return False
        self._pools.drop(s.model)
        self.publish(s, reason)
        return True

    def _on_transition(self, transition: BreakerTransition) -> None:
        s = self._stats.get(transition.endpoint_id)
        if s is None:
            return
        self._pools.drop(s.model)
        self._emit(
            HealthEvent(
                endpoint_id=s.id,
                model=s.model,
                status=s.health,
                breaker_state=transition.state,
                reason=transition.reason,
            )
        )

    def publish(self, s: EndpointStats, reason: str) -> None:
        self._emit(
            HealthEvent(
                endpoint_id=s.id,
                model=s.model,
                status=s.health,
                breaker_state=self._breakers.state(s.id),
                reason=reason,
            )
        )

    def _emit(self, event: HealthEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)
