"""Fakes for prober tests: a settable clock, a recording sink, scripted HTTP and connect."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from decider.core.model import Endpoint, HealthStatus, LoadReport


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RecordingSink:
    health: list[tuple[str, HealthStatus, str, float]] = field(default_factory=list)
    loads: list[tuple[str, LoadReport, float]] = field(default_factory=list)
    expired: list[tuple[str, float]] = field(default_factory=list)

    def set_health(
        self, endpoint_id: str, status: HealthStatus, *, reason: str, now: float
    ) -> None:
        self.health.append((endpoint_id, status, reason, now))

    def record_load(self, endpoint_id: str, load: LoadReport, *, now: float) -> None:
        self.loads.append((endpoint_id, load, now))

    def expire_load(self, endpoint_id: str, *, now: float) -> None:
        self.expired.append((endpoint_id, now))

    def statuses(self, endpoint_id: str) -> list[HealthStatus]:
        return [s for eid, s, _, _ in self.health if eid == endpoint_id]


class ScriptedHTTP:
    """A MockTransport handler: each URL answers with whatever its current behaviour returns."""

    def __init__(self) -> None:
        self.behaviour: dict[str, Callable[[httpx.Request], httpx.Response]] = {}
        self.requests: list[httpx.Request] = []

    def set(self, url: str, behaviour: Callable[[httpx.Request], httpx.Response]) -> None:
        self.behaviour[url] = behaviour

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.behaviour[str(request.url)](request)

    def count(self, url: str) -> int:
        return sum(1 for r in self.requests if str(r.url) == url)


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, text="ok")


def status(code: int) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(code, text="no")


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


def timeout(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=request)


class FakeConnector:
    """Liveness connects: succeed unless the port is in `down`."""

    def __init__(self) -> None:
        self.down: set[int] = set()
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int, timeout_s: float) -> None:
        self.calls.append((host, port))
        if port in self.down:
            raise ConnectionRefusedError(111, "Connection refused")


def endpoint(eid: str = "a", port: int = 8001, **kwargs: object) -> Endpoint:
    return Endpoint(
        id=eid,
        address=f"127.0.0.1:{port}",
        model="m",
        health_url=f"http://127.0.0.1:{port}/health",
        **kwargs,  # type: ignore[arg-type]
    )
