"""A small stand-in router so the simulator's own model is tested without the engine."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from decider.core.model import (
    Decision,
    Endpoint,
    HealthStatus,
    LoadReport,
    Outcome,
    Refusal,
    RefusalKind,
    RetryAdvice,
    RouteRequest,
)

# bench/ lives at the repository root, outside the installed packages.
_ROOT = str(Path(__file__).resolve().parents[3])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


class RoundRobinRouter:
    """Round robin over usable endpoints of the model; records every call it gets."""

    def __init__(self) -> None:
        self.endpoints: list[Endpoint] = []
        self.health: dict[str, HealthStatus] = {}
        self.outcomes: list[Outcome] = []
        self.health_calls: list[tuple[float, str, HealthStatus]] = []
        self.loads: list[tuple[float, str, LoadReport]] = []
        self.decisions: list[tuple[float, str]] = []
        self.ticks = 0
        self._next = 0

    def set_endpoints(self, endpoints: Sequence[Endpoint], *, now: float) -> None:
        self.endpoints = list(endpoints)

    def decide(self, request: RouteRequest, *, now: float) -> Decision | Refusal:
        usable = [
            e
            for e in self.endpoints
            if e.model == request.model
            and request.required_capabilities <= e.capabilities
            and e.id not in request.exclude_endpoint_ids
            and self.health.get(e.id) is not HealthStatus.UNHEALTHY
        ]
        if not usable:
            return Refusal(kind=RefusalKind.NO_HEALTHY_ENDPOINT, message="none", model="m")
        self._next += 1
        start = self._next % len(usable)
        ordered = usable[start:] + usable[:start]
        self.decisions.append((now, ordered[0].id))
        return Decision(
            decision_id=f"d{self._next}",
            endpoint=ordered[0],
            fallbacks=tuple(ordered[1:3]),
            strategy="round_robin",
            reason="",
            scores={},
            retry=RetryAdvice(
                max_attempts=3, initial_backoff_s=0.0, max_backoff_s=0.0, backoff_multiplier=1.0
            ),
            affinity_hit=False,
            candidate_count=len(usable),
            skipped={},
        )

    def record_outcome(self, outcome: Outcome, *, now: float) -> bool:
        self.outcomes.append(outcome)
        return True

    def set_health(
        self, endpoint_id: str, status: HealthStatus, *, reason: str, now: float
    ) -> None:
        self.health[endpoint_id] = status
        self.health_calls.append((now, endpoint_id, status))

    def record_load(self, endpoint_id: str, load: LoadReport, *, now: float) -> None:
        self.loads.append((now, endpoint_id, load))

    def tick(self, *, now: float) -> None:
        self.ticks += 1


@pytest.fixture
def router() -> RoundRobinRouter:
    return RoundRobinRouter()


@pytest.fixture
def new_router() -> type[RoundRobinRouter]:
    return RoundRobinRouter
