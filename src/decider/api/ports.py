"""What the servicers need from the rest of the process, as Protocols (the Engine fits)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from decider.core.model import (
    Decision,
    EndpointState,
    HealthStatus,
    LoadReport,
    Outcome,
    Refusal,
    RouteRequest,
)

Clock = Callable[[], float]


class DecisionEngine(Protocol):
    def decide(self, request: RouteRequest, *, now: float) -> Decision | Refusal: ...

    def record_outcome(self, outcome: Outcome, *, now: float) -> bool: ...

    def set_health(
        self, endpoint_id: str, status: HealthStatus, *, reason: str, now: float
    ) -> None: ...

    def record_load(self, endpoint_id: str, load: LoadReport, *, now: float) -> None: ...

    def endpoint_states(self, *, model: str = "", now: float) -> list[EndpointState]: ...


class Observer(Protocol):
    """Hook for telemetry (spans, metrics): called after each decision and outcome.

    Implementations must be cheap and must not raise; the default does nothing.
    """

    def decided(
        self, request: RouteRequest, result: Decision | Refusal, *, elapsed_s: float
    ) -> None: ...

    def decide_rejected(self, reason: str) -> None:
        """A Decide answered with an error before the engine decided (`reason`: a short,
        bounded label such as "invalid_argument")."""

    def outcome_reported(self, outcome: Outcome, *, decision_found: bool) -> None: ...


class NullObserver:
    def decided(
        self, request: RouteRequest, result: Decision | Refusal, *, elapsed_s: float
    ) -> None:
        pass

    def decide_rejected(self, reason: str) -> None:
        pass

    def outcome_reported(self, outcome: Outcome, *, decision_found: bool) -> None:
        pass
