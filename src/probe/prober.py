"""Prober: schedules health, liveness and load checks of every endpoint on one timer heap.

One asyncio task runs the heap; each due check runs as a short task of its own, so a check
waiting out its timeout never delays the others. Verdicts reach the engine through HealthSink.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import httpx

from decider.core.model import Endpoint, HealthStatus, LoadReport

from .checks import (
    CheckKind,
    Connector,
    ProbeResult,
    TcpConnector,
    http_check,
    liveness_connect,
)
from .health import EndpointHealth
from .load import parse_load
from .settings import ProbeSettings

log = logging.getLogger("decider.probe")

# run() starts every check due within this window in one pass: at 1000 endpoints about 500
# checks a second would otherwise wake the loop 500 times, for at most 10 ms of earliness.
_BATCH_S = 0.01


class HealthSink(Protocol):
    """Where verdicts go; the Engine is one. Called from the event loop, must not block."""

    def set_health(
        self, endpoint_id: str, status: HealthStatus, *, reason: str, now: float
    ) -> None: ...

    def record_load(self, endpoint_id: str, load: LoadReport, *, now: float) -> None: ...


@runtime_checkable
class LoadExpiringSink(Protocol):
    """Optional: a sink with this method is told when an endpoint's load became unknown."""

    def expire_load(self, endpoint_id: str, *, now: float) -> None: ...


@dataclass(slots=True, eq=False)
class _Target:
    """The prober's state for one endpoint; replaced when the endpoint's probe inputs change."""

    endpoint: Endpoint
    health: EndpointHealth
    headers: Mapping[str, str]
    host: str = ""
    port: int = 0
    # Generation per check kind: a heap entry whose generation is old is skipped.
    generation: dict[CheckKind, int] = field(default_factory=dict)
    due: dict[CheckKind, float] = field(default_factory=dict)
    in_flight: set[CheckKind] = field(default_factory=set)
    http_started_at: float | None = None
    published: HealthStatus = HealthStatus.UNKNOWN
    published_reason: str = ""
    load: LoadReport | None = None
    load_at: float | None = None


class Prober:
    def __init__(
        self,
        settings: ProbeSettings,
        sink: HealthSink,
        *,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
        connect: Connector | None = None,
        rng: random.Random | None = None,
        on_result: Callable[[ProbeResult], None] | None = None,
        on_scrape_error: Callable[[str, str], None] | None = None,
    ) -> None:
        """`on_result` sees every completed check; `on_scrape_error(endpoint_id, reason)` a
        load scrape that answered but could not be parsed (both for metrics; must not block)."""
        self._settings = settings
        self._sink = sink
        self._clock = clock
        self._connect = connect or TcpConnector(resolve_every_s=settings.interval_s)
        self._rng = rng or random.Random()
        self._on_result = on_result
        self._on_scrape_error = on_scrape_error
        # trust_env=False: probes go straight to the endpoint, never through an HTTP proxy
        # picked up from the environment. HTTP checks share max_concurrent_http slots, taken
        # before a check's timeout starts, so waiting for a slot never counts as the
        # endpoint's failure. No keep-alive: httpcore's pool scans every pooled connection on
        # each request, and with one idle connection per endpoint that made a GET cost ~15 ms
        # of CPU at 1000 endpoints; full checks 30 s apart would not reuse them anyway
        # (measured in bench/bench_detection.py).
        self._http_slots = asyncio.Semaphore(settings.max_concurrent_http)
        self._client = httpx.AsyncClient(
            transport=transport,
            trust_env=False,
            follow_redirects=False,
            limits=httpx.Limits(
                max_connections=settings.max_concurrent_http, max_keepalive_connections=0
            ),
        )
        self._targets: dict[str, _Target] = {}
        self._heap: list[tuple[float, int, str, CheckKind, int]] = []
        self._seq = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiter: asyncio.Future[None] | None = None
        # The first set_endpoints call is the start-up snapshot: its first checks are spread.
        self._snapshot_seen = False

    # -- membership and passive evidence -------------------------------------------------

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        """Replace the endpoint set with a full snapshot; unchanged endpoints keep their state.

        The first snapshot's checks are spread over `first_check_spread_s`; an endpoint that
        is new (or whose probe inputs changed) in a later snapshot is checked at once, so it
        can take traffic as soon as one check succeeds (Envoy checks a new host immediately).
        """
        now = self._clock()
        spread = not self._snapshot_seen
        self._snapshot_seen = True
        fresh: dict[str, _Target] = {}
        for endpoint in endpoints:
            old = self._targets.get(endpoint.id)
            if old is not None and _same_probe_inputs(old.endpoint, endpoint):
                old.endpoint = endpoint
                fresh[endpoint.id] = old
                continue
            if old is not None and old.load_at is not None:
                # A new metrics_url (or kind) must not keep the old URL's load alive.
                self._expire_load(old, now)
            target = self._new_target(endpoint)
            fresh[endpoint.id] = target
            self._schedule_first(target, now, spread=spread)
        self._targets = fresh
        self._wake()

    def probe_soon(self, endpoint_id: str) -> None:
        """Passive evidence of a failure: run the HTTP check now, at most once per
        unhealthy_interval_s however many failed requests report it."""
        target = self._targets.get(endpoint_id)
        if target is None or not target.endpoint.health_url:
            return
        if CheckKind.HTTP in target.in_flight:
            return
        now = self._clock()
        due = now
        if target.http_started_at is not None:
            due = max(now, target.http_started_at + self._settings.unhealthy_interval_s)
        if due < target.due.get(CheckKind.HTTP, float("inf")):
            self._schedule(target, CheckKind.HTTP, due)
            self._wake()

    def last_result(self, endpoint_id: str) -> ProbeResult | None:
        """The latest health or liveness result that counted for the endpoint."""
        target = self._targets.get(endpoint_id)
        return target.health.last if target is not None else None

    def status(self, endpoint_id: str) -> tuple[HealthStatus, str]:
        target = self._targets.get(endpoint_id)
        if target is None:
            return HealthStatus.UNKNOWN, "not probed"
        return target.published, target.published_reason

    def load(self, endpoint_id: str) -> LoadReport | None:
        """The latest load when fresh, else None."""
        target = self._targets.get(endpoint_id)
        return target.load if target is not None else None

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Run checks as they fall due, until cancelled."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                now = self._clock()
                for task in self._dispatch_due(now + _BATCH_S):
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                delay = self._heap[0][0] - now if self._heap else 3600.0
                # A bare future and one timer handle per sleep: wait_for(event.wait()) would
                # create a task per wake-up, a measurable share of the loop at 1000 endpoints.
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiter = waiter
                timer = loop.call_later(max(delay, 0.0), _resolve, waiter)
                try:
                    await waiter
                finally:
                    timer.cancel()
                    self._waiter = None
        finally:
            await self._cancel_tasks()

    async def run_due(self) -> float | None:
        """Run every check due at the clock's now to completion; returns the next due time.

        For tests with a fake clock, and for one-shot probing; run() is the long-lived loop.
        """
        tasks = self._dispatch_due(self._clock())
        if tasks:
            await asyncio.gather(*tasks)
        return self.next_due()

    def next_due(self) -> float | None:
        while self._heap and not self._is_current(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    async def aclose(self) -> None:
        await self._cancel_tasks()
        await self._client.aclose()

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    # -- scheduling ----------------------------------------------------------------------

    def _wake(self) -> None:
        """Make run() look at the heap again: something was scheduled sooner."""
        if self._waiter is not None:
            _resolve(self._waiter)

    def _new_target(self, endpoint: Endpoint) -> _Target:
        headers = dict(endpoint.probe_headers)
        headers.update(self._settings.headers.get(endpoint.id, {}))
        target = _Target(endpoint=endpoint, health=EndpointHealth(self._settings), headers=headers)
        if endpoint.health_url:
            with contextlib.suppress(httpx.InvalidURL):
                url = httpx.URL(endpoint.health_url)
                target.host = url.host
                target.port = url.port or (443 if url.scheme == "https" else 80)
        return target

    def _schedule_first(self, target: _Target, now: float, *, spread: bool) -> None:
        # Spread the first checks of the start-up snapshot instead of a burst; a later
        # newcomer is checked now (max_concurrent_http still caps a large registration).
        s = self._settings
        if target.endpoint.health_url:
            delay_s = self._rng.uniform(0, min(s.interval_s, s.first_check_spread_s))
            self._schedule(target, CheckKind.HTTP, now + (delay_s if spread else 0.0))
            if s.liveness != "off" and target.host:
                self._schedule(
                    target, CheckKind.LIVENESS, now + self._jittered(s.liveness_interval_s)
                )
        if target.endpoint.metrics_url:
            delay_s = self._rng.uniform(0, s.metrics_interval_s)
            self._schedule(target, CheckKind.METRICS, now + (delay_s if spread else 0.0))

    def _schedule(self, target: _Target, kind: CheckKind, due: float) -> None:
        generation = target.generation.get(kind, 0) + 1
        target.generation[kind] = generation
        target.due[kind] = due
        if not self._heap or due < self._heap[0][0]:
            # run() sleeps until the earliest entry; an earlier one must wake it.
            self._wake()
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, target.endpoint.id, kind, generation))

    def _jittered(self, interval_s: float) -> float:
        # Only ever shorter than the interval, so detection bounds computed from the
        # interval hold (Envoy adds jitter instead; we shorten).
        return interval_s * (1.0 - self._settings.jitter_fraction * self._rng.random())

    def _is_current(self, entry: tuple[float, int, str, CheckKind, int]) -> bool:
        _, _, endpoint_id, kind, generation = entry
        target = self._targets.get(endpoint_id)
        return target is not None and target.generation.get(kind) == generation

    def _dispatch_due(self, now: float) -> list[asyncio.Task[None]]:
        tasks: list[asyncio.Task[None]] = []
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            if not self._is_current(entry):
                continue
            target = self._targets[entry[2]]
            kind = entry[3]
            target.due.pop(kind, None)
            if kind in target.in_flight:
                # The running check reschedules this kind when it completes.
                continue
            if kind is CheckKind.LIVENESS and (
                target.health.failing or CheckKind.HTTP in target.in_flight
            ):
                # HTTP checks every unhealthy_interval already watch a failing endpoint.
                self._schedule(
                    target, kind, now + self._jittered(self._settings.liveness_interval_s)
                )
                continue
            target.in_flight.add(kind)
            if kind is CheckKind.HTTP:
                target.http_started_at = now
            tasks.append(asyncio.create_task(self._check(target, kind)))
        return tasks

    # -- checks --------------------------------------------------------------------------

    async def _check(self, target: _Target, kind: CheckKind) -> None:
        try:
            result = await self._probe(target, kind)
        except Exception:
            # A bug here must not silently stop probing this endpoint: log, and try again
            # one interval later.
            log.exception("%s check of endpoint %s failed", kind.value, target.endpoint.id)
            result = None
        finally:
            target.in_flight.discard(kind)
        # The endpoint was removed or replaced while the check ran: its result is moot.
        if self._targets.get(target.endpoint.id) is not target:
            return
        now = self._clock()
        try:
            if result is None:
                self._schedule(
                    target, kind, now + self._jittered(_interval_for(self._settings, kind))
                )
            elif kind is CheckKind.METRICS:
                self._on_metrics(target, result, now)
            else:
                self._on_health(target, result, now)
            if result is not None and self._on_result is not None:
                self._on_result(result)
        except Exception:
            log.exception(
                "handling the %s result of endpoint %s failed", kind.value, target.endpoint.id
            )
            if kind not in target.due:
                self._schedule(
                    target, kind, now + self._jittered(_interval_for(self._settings, kind))
                )

    async def _probe(self, target: _Target, kind: CheckKind) -> ProbeResult:
        s = self._settings
        endpoint = target.endpoint
        if kind is CheckKind.LIVENESS and s.liveness == "connect":
            return await liveness_connect(
                self._connect,
                endpoint_id=endpoint.id,
                host=target.host,
                port=target.port,
                timeout_s=s.liveness_timeout_s,
                clock=self._clock,
            )
        async with self._http_slots:
            return await http_check(
                self._client,
                endpoint_id=endpoint.id,
                url=endpoint.metrics_url if kind is CheckKind.METRICS else endpoint.health_url,
                headers=target.headers,
                timeout_s=_timeout_for(s, kind),
                kind=kind,
                clock=self._clock,
            )

    def _on_health(self, target: _Target, result: ProbeResult, now: float) -> None:
        s = self._settings
        target.health.observe(result)
        if not (result.healthy and result.kind is CheckKind.LIVENESS):
            # A successful liveness check changes nothing: skip building a reason.
            self._publish(target, now)
        if result.kind is CheckKind.LIVENESS:
            self._schedule(target, CheckKind.LIVENESS, now + self._jittered(s.liveness_interval_s))
        if target.health.failing:
            due = now + s.unhealthy_interval_s
            if due < target.due.get(CheckKind.HTTP, float("inf")) or result.kind is CheckKind.HTTP:
                self._schedule(target, CheckKind.HTTP, due)
        elif result.kind is CheckKind.HTTP:
            self._schedule(target, CheckKind.HTTP, now + self._jittered(s.interval_s))

    def _on_metrics(self, target: _Target, result: ProbeResult, now: float) -> None:
        s = self._settings
        self._schedule(target, CheckKind.METRICS, now + self._jittered(s.metrics_interval_s))
        load: LoadReport | None = None
        if result.healthy:
            try:
                load = parse_load(result.body, target.endpoint.metrics_kind)
            except ValueError:
                load = None
                if self._on_scrape_error is not None:
                    self._on_scrape_error(target.endpoint.id, "parse_error")
        if load is not None:
            target.load = load
            target.load_at = now
            self._sink.record_load(target.endpoint.id, load, now=now)
        elif target.load_at is not None and now - target.load_at > s.metrics_stale_after_s:
            self._expire_load(target, now)
        target.health.observe_load(target.load)
        self._publish(target, now)

    def _expire_load(self, target: _Target, now: float) -> None:
        target.load = None
        target.load_at = None
        if isinstance(self._sink, LoadExpiringSink):
            self._sink.expire_load(target.endpoint.id, now=now)

    def _publish(self, target: _Target, now: float) -> None:
        status, reason = target.health.status()
        target.published_reason = reason
        # Only changes go out: reasons alone change on every probe (latency) and would flood
        # WatchHealth. UNKNOWN is the engine's starting point, never a verdict to send.
        if status is target.published or status is HealthStatus.UNKNOWN:
            return
        target.published = status
        self._sink.set_health(target.endpoint.id, status, reason=reason, now=now)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _interval_for(settings: ProbeSettings, kind: CheckKind) -> float:
    if kind is CheckKind.METRICS:
        return settings.metrics_interval_s
    if kind is CheckKind.LIVENESS:
        return settings.liveness_interval_s
    return settings.interval_s


def _timeout_for(settings: ProbeSettings, kind: CheckKind) -> float:
    if kind is CheckKind.METRICS:
        return settings.metrics_timeout_s
    if kind is CheckKind.LIVENESS:
        return settings.liveness_timeout_s
    return settings.timeout_s


def _same_probe_inputs(a: Endpoint, b: Endpoint) -> bool:
    return (
        a.health_url == b.health_url
        and a.metrics_url == b.metrics_url
        and a.metrics_kind == b.metrics_kind
        and a.probe_headers == b.probe_headers
    )
