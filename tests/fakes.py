"""Fakes for the pure core's tests: a clock you move by hand, scripted randomness, an event log,
and short builders for endpoints and requests. No mocks, no patching."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

from decider.core.model import Endpoint, HealthEvent, RouteRequest


class FakeClock:
    """Monotonic seconds that only move when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class ScriptedRandom(random.Random):
    """A Random whose random() returns the scripted values in order, then repeats the last."""

    def __init__(self, values: Iterable[float]) -> None:
        super().__init__(0)
        self._values = list(values)
        self._i = 0

    def random(self) -> float:
        value = self._values[min(self._i, len(self._values) - 1)]
        self._i += 1
        return value


class EventLog:
    """An on_event sink that keeps every event."""

    def __init__(self) -> None:
        self.events: list[HealthEvent] = []

    def __call__(self, event: HealthEvent) -> None:
        self.events.append(event)

    def for_endpoint(self, endpoint_id: str) -> list[HealthEvent]:
        return [e for e in self.events if e.endpoint_id == endpoint_id]


def endpoint(endpoint_id: str, model: str = "m", **fields: Any) -> Endpoint:
    fields.setdefault("address", f"{endpoint_id}.local:8000")
    return Endpoint(id=endpoint_id, model=model, **fields)


def endpoints(ids: Sequence[str], model: str = "m", **fields: Any) -> list[Endpoint]:
    return [endpoint(i, model, **fields) for i in ids]


def request(model: str = "m", **fields: Any) -> RouteRequest:
    for key in ("required_capabilities", "exclude_endpoint_ids"):
        if key in fields:
            fields[key] = frozenset(fields[key])
    if "prefix_hashes" in fields:
        fields["prefix_hashes"] = tuple(fields["prefix_hashes"])
    return RouteRequest(model=model, **fields)
