"""BreakerReasons: why each endpoint's circuit breaker is open or half-open, for ListEndpoints.

Fed with the engine's HealthEvents (the server's on_event). An event whose breaker state
differs from the endpoint's previous one is a breaker transition, and its reason is the
breaker's; other events are health changes that leave the breaker's reason standing. One
entry per registered endpoint at most: removal events drop it.
"""

from __future__ import annotations

from decider.core.model import BreakerState, HealthEvent


class BreakerReasons:
    def __init__(self) -> None:
        self._states: dict[str, BreakerState] = {}
        self._reasons: dict[str, str] = {}

    def observe(self, event: HealthEvent) -> None:
        endpoint_id = event.endpoint_id
        if event.removed:
            self._states.pop(endpoint_id, None)
            self._reasons.pop(endpoint_id, None)
            return
        state = event.breaker_state
        if self._states.get(endpoint_id) is state:
            return
        self._states[endpoint_id] = state
        if state is BreakerState.OPEN or state is BreakerState.HALF_OPEN:
            self._reasons[endpoint_id] = event.reason
        else:
            self._reasons.pop(endpoint_id, None)

    def __len__(self) -> int:
        """Endpoints tracked: at most the registered ones."""
        return len(self._states)

    def reason(self, endpoint_id: str) -> str:
        """Empty while the breaker is closed (or the endpoint unknown)."""
        return self._reasons.get(endpoint_id, "")
