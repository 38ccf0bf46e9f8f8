"""Prometheus metrics: Decider's own registry, the counters the hot path bumps, gauges read
from live engine state at scrape time, and the /metrics server behind `--metrics-listen`.

Per-decision work is a dict update or two on plain numbers (plain_metrics). Endpoint
health, breaker state, in-flight and watcher gauges are never updated on the hot path: a
collector asks the engine at scrape time, on the event loop thread (the engine is not
thread-safe), and the text is rendered in a worker thread so a large fleet does not stall Decide.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse
from wsgiref.types import WSGIApplication as WSGIApp

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, generate_latest

from decider import __version__
from decider.core.model import (
    BreakerState,
    Decision,
    EndpointState,
    HealthStatus,
    Refusal,
    RefusalKind,
    Result,
    RouteRequest,
    StateUsage,
)
from decider.obs.plain_metrics import PlainCounter, PlainHistogram

__all__ = [
    "MetricName",
    "Metrics",
    "MetricsServer",
    "ProbeResultLike",
    "failure_label",
]

log = logging.getLogger("decider.metrics")


class MetricName:
    """Every series Decider exports (documented in docs/OBSERVABILITY.md)."""

    DECISIONS: Final = "decider_decisions_total"
    DECISION_DURATION: Final = "decider_decision_duration_seconds"
    OUTCOMES: Final = "decider_outcomes_total"
    OUTCOMES_UNMATCHED: Final = "decider_outcomes_unmatched_total"
    ENDPOINT_DECISIONS: Final = "decider_endpoint_decisions_total"
    ENDPOINT_OUTCOMES: Final = "decider_endpoint_outcomes_total"
    ENDPOINT_REQUEST_DURATION: Final = "decider_endpoint_request_duration_seconds"
    QUOTA_REJECTIONS: Final = "decider_quota_rejections_total"
    PROBES: Final = "decider_probes_total"
    PROBE_DURATION: Final = "decider_probe_duration_seconds"
    PROBE_SCRAPE_ERRORS: Final = "decider_probe_scrape_errors_total"
    ENDPOINT_HEALTH: Final = "decider_endpoint_health"
    ENDPOINT_BREAKER_STATE: Final = "decider_endpoint_breaker_state"
    ENDPOINT_IN_FLIGHT: Final = "decider_endpoint_in_flight"
    ENDPOINT_LATENCY_EWMA: Final = "decider_endpoint_latency_ewma_seconds"
    ENDPOINT_QUEUE_DEPTH: Final = "decider_endpoint_queue_depth"
    ENDPOINT_KV_CACHE_UTILIZATION: Final = "decider_endpoint_kv_cache_utilization"
    WATCHERS: Final = "decider_watchers"
    STATE_ENTRIES: Final = "decider_state_entries"
    STATE_LIMIT: Final = "decider_state_limit"
    STATE_EVICTIONS: Final = "decider_state_evictions_total"
    BUILD_INFO: Final = "decider_build_info"


# Decisions are tens of microseconds in the engine, a few hundred through gRPC.
DECISION_BUCKETS_S: Final = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)
# Reported request latency of an LLM call: tens of milliseconds to minutes.
REQUEST_BUCKETS_S: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PROBE_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# The `result` label: "ok", "explain", or the refusal kind in lower case.
_REFUSAL_RESULT: Final = {kind: kind.value.lower() for kind in RefusalKind}
_HEALTH_LABELS: Final = tuple((s, s.name.lower()) for s in HealthStatus)
_BREAKER_LABELS: Final = tuple((s, s.name.lower()) for s in BreakerState)
_OUTCOME_LABELS: Final = {r: r.name.lower() for r in Result}


class _KindLike(Protocol):
    @property
    def value(self) -> str: ...


class ProbeResultLike(Protocol):
    """The fields of probe.checks.ProbeResult that metrics read."""

    @property
    def endpoint_id(self) -> str: ...
    @property
    def kind(self) -> _KindLike: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def latency_s(self) -> float: ...
    @property
    def reason(self) -> str: ...
    @property
    def status_code(self) -> int: ...


def failure_label(result: ProbeResultLike) -> str:
    """A bounded label value for a failed check: probe reasons carry timings and free text."""
    if result.status_code:
        return f"http_{result.status_code}"
    reason = result.reason.lower()
    if reason.startswith("timeout"):
        return "timeout"
    return re.sub(r"[^a-z0-9]+", "_", reason).strip("_")[:40] or "error"


@dataclass(frozen=True, slots=True)
class _Snapshot:
    endpoints: tuple[EndpointState, ...]
    watchers: int | None
    state: tuple[tuple[str, StateUsage], ...] = ()


class _LiveState:
    """Collector for gauges whose truth lives elsewhere (the engine, the watch hub)."""

    def __init__(self) -> None:
        self.endpoint_states: Callable[[], Sequence[EndpointState]] | None = None
        self.watcher_count: Callable[[], int] | None = None
        self.state_usage: list[Callable[[], Mapping[str, StateUsage]]] = []
        # Set by MetricsServer in the rendering thread's context: the snapshot taken on the loop.
        self.pinned: contextvars.ContextVar[_Snapshot | None] = contextvars.ContextVar(
            "decider_metrics_snapshot", default=None
        )

    def snapshot(self) -> _Snapshot:
        states = self.endpoint_states
        watchers = self.watcher_count
        usage: dict[str, StateUsage] = {}
        for source in self.state_usage:
            usage.update(source())
        return _Snapshot(
            endpoints=tuple(states()) if states is not None else (),
            watchers=watchers() if watchers is not None else None,
            state=tuple(sorted(usage.items())),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families(_Snapshot((), 0))

    def collect(self) -> Iterable[Metric]:
        return self._families(self.pinned.get() or self.snapshot())

    def _families(self, snap: _Snapshot) -> list[Metric]:
        labels = ["endpoint_id", "model"]
        health = GaugeMetricFamily(
            MetricName.ENDPOINT_HEALTH,
            "Endpoint health: 1 for the current status, 0 for the others.",
            labels=[*labels, "status"],
        )
        breaker = GaugeMetricFamily(
            MetricName.ENDPOINT_BREAKER_STATE,
            "Circuit breaker: 1 for the current state, 0 for the others.",
            labels=[*labels, "state"],
        )
        in_flight = GaugeMetricFamily(
            MetricName.ENDPOINT_IN_FLIGHT,
            "Decisions sent to the endpoint with no outcome reported yet.",
            labels=labels,
        )
        latency = GaugeMetricFamily(
            MetricName.ENDPOINT_LATENCY_EWMA,
            "Moving average of reported request latency.",
            labels=labels,
        )
        queue = GaugeMetricFamily(
            MetricName.ENDPOINT_QUEUE_DEPTH,
            "Queue depth from the endpoint's last load report.",
            labels=labels,
        )
        kv_cache = GaugeMetricFamily(
            MetricName.ENDPOINT_KV_CACHE_UTILIZATION,
            "KV-cache utilisation (0 to 1) from the endpoint's last load report.",
            labels=labels,
        )
        for state in snap.endpoints:
            ids = [state.endpoint.id, state.endpoint.model]
            for status, name in _HEALTH_LABELS:
                health.add_metric([*ids, name], 1.0 if state.health is status else 0.0)
            for breaker_state, name in _BREAKER_LABELS:
                breaker.add_metric(
                    [*ids, name], 1.0 if state.breaker_state is breaker_state else 0.0
                )
            in_flight.add_metric(ids, state.in_flight)
            latency.add_metric(ids, state.latency_ewma_s)
            if state.load is not None:
                queue.add_metric(ids, state.load.queue_depth)
                kv_cache.add_metric(ids, state.load.kv_cache_utilization)
        families: list[Metric] = [health, breaker, in_flight, latency, queue, kv_cache]
        if snap.watchers is not None:
            watchers = GaugeMetricFamily(MetricName.WATCHERS, "Open WatchHealth streams.")
            watchers.add_metric([], snap.watchers)
            families.append(watchers)
        entries = GaugeMetricFamily(
            MetricName.STATE_ENTRIES,
            "Entries held by state that grows with traffic (pending_decisions, sessions, "
            "prefix_blocks, tenant_buckets, watch_events, span_queue).",
            labels=["state"],
        )
        limit = GaugeMetricFamily(
            MetricName.STATE_LIMIT,
            "The size bound of that state (its config key).",
            labels=["state"],
        )
        evictions = CounterMetricFamily(
            MetricName.STATE_EVICTIONS,
            "Entries dropped early because the state was at its bound.",
            labels=["state"],
        )
        for name, usage in snap.state:
            entries.add_metric([name], usage.entries)
            limit.add_metric([name], usage.limit)
            evictions.add_metric([name], usage.evicted)
        families += [entries, limit, evictions]
        build = GaugeMetricFamily(
            MetricName.BUILD_INFO, "Decider version; always 1.", labels=["version"]
        )
        build.add_metric([__version__], 1.0)
        families.append(build)
        return families


class Metrics:
    """Decider's metrics in their own CollectorRegistry (never the process-global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Bumped on every Decide and ReportOutcome: plain numbers, not prometheus_client's
        # locked Counter and Histogram (see plain_metrics).
        self._decisions = PlainCounter(
            MetricName.DECISIONS,
            "Decide calls by requested model, strategy used and result.",
            ["model", "strategy", "result"],
            registry=r,
        )
        self._decision_duration = PlainHistogram(
            MetricName.DECISION_DURATION,
            "Server-side time to decide (explain requests excluded).",
            ["strategy"],
            buckets=DECISION_BUCKETS_S,
            registry=r,
        )
        self._outcomes = PlainCounter(
            MetricName.OUTCOMES, "Reported outcomes by result.", ["result"], registry=r
        )
        self._outcomes_unmatched = PlainCounter(
            MetricName.OUTCOMES_UNMATCHED,
            "Reported outcomes whose decision_id was unknown or expired.",
            [],
            registry=r,
        )
        # Per endpoint, as Envoy keeps per host. Label values are registered endpoints only
        # (outcomes naming any other id are not counted here), and a deregistered endpoint's
        # series are dropped, so the series are bounded by the registry.
        self._endpoint_decisions = PlainCounter(
            MetricName.ENDPOINT_DECISIONS,
            "Decisions that chose the endpoint (explain requests excluded).",
            ["endpoint_id", "model"],
            registry=r,
        )
        self._endpoint_outcomes = PlainCounter(
            MetricName.ENDPOINT_OUTCOMES,
            "Outcomes reported for the endpoint, by result.",
            ["endpoint_id", "model", "result"],
            registry=r,
        )
        self._endpoint_duration = PlainHistogram(
            MetricName.ENDPOINT_REQUEST_DURATION,
            "Request latency gateways reported for the endpoint (cancelled requests excluded).",
            ["endpoint_id", "model"],
            buckets=REQUEST_BUCKETS_S,
            registry=r,
        )
        # Registered endpoint id -> model, kept by set_endpoints.
        self._models: dict[str, str] = {}
        self._quota_rejections = PlainCounter(
            MetricName.QUOTA_REJECTIONS,
            "Decide calls refused because the tenant was over quota.",
            ["model"],
            registry=r,
        )
        self._probes = Counter(
            MetricName.PROBES,
            "Prober checks by endpoint, check kind and result.",
            ["endpoint_id", "kind", "result"],
            registry=r,
        )
        self._probe_duration = Histogram(
            MetricName.PROBE_DURATION,
            "Time each prober check took.",
            ["kind"],
            buckets=PROBE_BUCKETS_S,
            registry=r,
        )
        self._scrape_errors = Counter(
            MetricName.PROBE_SCRAPE_ERRORS,
            "Load-metrics scrapes that failed, by endpoint and reason.",
            ["endpoint_id", "reason"],
            registry=r,
        )
        self._live = _LiveState()
        r.register(self._live)
        self._endpoint_series: dict[str, set[tuple[Counter, tuple[str, ...]]]] = {}

    # ---------------------------------------------------------------- live sources

    def bind_endpoint_states(self, source: Callable[[], Sequence[EndpointState]]) -> None:
        """Where endpoint gauges come from; called at scrape time on the event loop thread."""
        self._live.endpoint_states = source

    def bind_watcher_count(self, source: Callable[[], int]) -> None:
        self._live.watcher_count = source

    def add_state_usage(self, source: Callable[[], Mapping[str, StateUsage]]) -> None:
        """A source of bounded-state figures, read at scrape time on the event loop thread."""
        self._live.state_usage.append(source)

    # ---------------------------------------------------------------- hot path

    def record_decision(
        self, request: RouteRequest, result: Decision | Refusal, elapsed_s: float
    ) -> None:
        if isinstance(result, Decision):
            strategy = result.strategy
            if request.explain:
                self._decisions.inc((request.model, strategy, "explain"))
                return
            self._decisions.inc((request.model, strategy, "ok"))
            self._decision_duration.observe((strategy,), elapsed_s)
            endpoint = result.endpoint
            self._endpoint_decisions.inc((endpoint.id, endpoint.model))
            return
        # A model nobody serves is not a label value: clients could mint unbounded series.
        model = "" if result.kind is RefusalKind.MODEL_NOT_FOUND else request.model
        if result.kind is RefusalKind.QUOTA_EXHAUSTED:
            self._quota_rejections.inc((model,))
        self._decisions.inc((model, "", _REFUSAL_RESULT[result.kind]))
        if not request.explain:
            self._decision_duration.observe(("",), elapsed_s)

    def record_decision_error(self, result: str = "invalid_argument") -> None:
        """A Decide that failed before the engine answered (e.g. a malformed request)."""
        self._decisions.inc(("", "", result))

    def record_outcome(
        self,
        result: Result,
        *,
        decision_found: bool,
        endpoint_id: str = "",
        latency_s: float = 0.0,
    ) -> None:
        name = _OUTCOME_LABELS[result]
        self._outcomes.inc((name,))
        if not decision_found:
            self._outcomes_unmatched.inc()
        model = self._models.get(endpoint_id)
        if model is None:
            return
        self._endpoint_outcomes.inc((endpoint_id, model, name))
        if latency_s > 0.0 and result is not Result.CANCELLED:
            self._endpoint_duration.observe((endpoint_id, model), latency_s)

    def set_endpoints(self, models: dict[str, str]) -> None:
        """The registered endpoints (id -> model) whose per-endpoint series may exist; the
        series of any other id are dropped."""
        for endpoint_id, model in self._models.items():
            if models.get(endpoint_id) != model:
                self._forget_endpoint_series(endpoint_id, model)
        self._models = dict(models)

    # ---------------------------------------------------------------- prober

    def record_probe(self, endpoint_id: str, *, kind: str, healthy: bool, latency_s: float) -> None:
        """One prober check (kind: "http", "liveness", "metrics")."""
        labels = (endpoint_id, kind, "healthy" if healthy else "unhealthy")
        self._probes.labels(*labels).inc()
        self._probe_duration.labels(kind).observe(latency_s)
        self._endpoint_series.setdefault(endpoint_id, set()).add((self._probes, labels))

    def record_scrape_error(self, endpoint_id: str, *, reason: str) -> None:
        """A failed or unparsable load-metrics scrape; `reason` must be short and bounded."""
        labels = (endpoint_id, reason)
        self._scrape_errors.labels(*labels).inc()
        self._endpoint_series.setdefault(endpoint_id, set()).add((self._scrape_errors, labels))

    def record_probe_result(self, result: ProbeResultLike) -> None:
        """A prober result (probe.checks.ProbeResult): counted, timed, and for a failed
        load-metrics scrape also counted as a scrape error."""
        kind = result.kind.value
        self.record_probe(
            result.endpoint_id, kind=kind, healthy=result.healthy, latency_s=result.latency_s
        )
        if kind == "metrics" and not result.healthy:
            self.record_scrape_error(result.endpoint_id, reason=failure_label(result))

    def forget_endpoint(self, endpoint_id: str) -> None:
        """Drops a deregistered endpoint's series, so churn does not grow the output."""
        for counter, labels in self._endpoint_series.pop(endpoint_id, ()):
            counter.remove(*labels)
        model = self._models.pop(endpoint_id, None)
        if model is not None:
            self._forget_endpoint_series(endpoint_id, model)

    def _forget_endpoint_series(self, endpoint_id: str, model: str) -> None:
        self._endpoint_decisions.remove((endpoint_id, model))
        self._endpoint_duration.remove((endpoint_id, model))
        for name in _OUTCOME_LABELS.values():
            self._endpoint_outcomes.remove((endpoint_id, model, name))

    # ---------------------------------------------------------------- exposition

    def snapshot(self) -> _Snapshot:
        """Live state for one scrape; call on the thread that owns the engine."""
        return self._live.snapshot()

    def exposition(self) -> bytes:
        """The Prometheus text format, rendered on the calling thread."""
        return self.render(generate_latest)

    def collect(self, snapshot: _Snapshot) -> Iterable[Metric]:
        """Every family, with the live gauges read from `snapshot`; safe on any thread."""
        token = self._live.pinned.set(snapshot)
        try:
            yield from self.registry.collect()
        finally:
            self._live.pinned.reset(token)

    def render(
        self,
        encoder: Callable[[CollectorRegistry], bytes],
        snapshot: _Snapshot | None = None,
    ) -> bytes:
        """The exposition text; with a snapshot it is safe to call from any thread."""
        token = self._live.pinned.set(snapshot)
        try:
            return encoder(self.registry)
        finally:
            self._live.pinned.reset(token)


# --------------------------------------------------------------------------- HTTP server

# How long the HTTP thread waits for the event loop to read the engine before answering 500.
_SNAPSHOT_TIMEOUT_S: Final = 10.0


class _LoopSnapshotRegistry:
    """What prometheus_client renders on its HTTP thread: the live engine state is read on the
    event loop thread (the engine is not thread-safe) and pinned while the text is rendered."""

    def __init__(self, metrics: Metrics, loop: asyncio.AbstractEventLoop) -> None:
        self._metrics = metrics
        self._loop = loop

    async def _snapshot(self) -> _Snapshot:
        return self._metrics.snapshot()

    def collect(self) -> Iterable[Metric]:
        future = asyncio.run_coroutine_threadsafe(self._snapshot(), self._loop)
        snapshot = future.result(timeout=_SNAPSHOT_TIMEOUT_S)
        return self._metrics.collect(snapshot)


def _metrics_only(app: WSGIApp) -> WSGIApp:
    """prometheus_client's app answers every path and method; /metrics is GET or HEAD only, and
    a failed collection is a logged 500 rather than a traceback on stderr."""

    def route(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        if path not in ("/metrics", "/metrics/"):
            return _plain(start_response, "404 Not Found", b"not found: try /metrics\n")
        if method not in ("GET", "HEAD"):
            return _plain(
                start_response,
                "405 Method Not Allowed",
                b"method not allowed\n",
                ("Allow", "GET, HEAD"),
            )
        environ["QUERY_STRING"] = ""  # name[] filters are not offered: one snapshot per scrape
        environ["REQUEST_METHOD"] = "GET"  # HEAD is a GET without the body
        try:
            body = b"".join(app(environ, start_response))
        except Exception:
            log.exception("collecting metrics failed")
            return _plain(
                start_response,
                "500 Internal Server Error",
                b"collecting metrics failed\n",
                exc_info=sys.exc_info(),
            )
        return [] if method == "HEAD" else [body]

    return route


def _plain(
    start_response: StartResponse,
    status: str,
    body: bytes,
    *extra: tuple[str, str],
    exc_info: Any = None,
) -> list[bytes]:
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    start_response(status, [*headers, *extra], exc_info)
    return [body]


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape on stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


# A connection that sends nothing (or completes no TLS handshake) for this long is closed.
METRICS_CONNECTION_TIMEOUT_S: Final = 10.0
# Connections served at once (one thread each); more are closed at accept, so clients that
# hold the port open cannot pile up threads. Prometheus scrapes with one connection.
METRICS_MAX_CONNECTIONS: Final = 64


class _MetricsHTTPServer(ThreadingWSGIServer):
    """One thread per connection, at most `max_connections` of them, each with a read timeout;
    TLS, when on, is negotiated in the connection's thread (wrapping the listening socket
    would run every handshake in the accepting thread, where one silent client stalls all)."""

    ssl_context: ssl.SSLContext | None = None
    max_connections = METRICS_MAX_CONNECTIONS
    connection_timeout_s = METRICS_CONNECTION_TIMEOUT_S

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self._slots.acquire(blocking=False)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.connection_timeout_s)
            if self.ssl_context is not None:
                request = self.ssl_context.wrap_socket(
                    request, server_side=True, do_handshake_on_connect=False
                )
                try:
                    request.do_handshake()
                except OSError:  # ssl.SSLError included: no certificate, wrong CA, plaintext
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went quiet or away mid-request is not an error worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            log.exception("metrics connection from %s failed", client_address)


class MetricsServer:
    """GET /metrics on its own port, served by prometheus_client (its WSGI app: text or
    OpenMetrics by Accept, gzip by Accept-Encoding) on a threading HTTP server. Binds exactly the
    host given, supports port 0, serves TLS with `ssl_context`, bounds its connections, and
    closes with the server."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._ssl_context = ssl_context
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); valid after start()."""
        if self._httpd is None:
            raise RuntimeError("metrics server is not started")
        return int(self._httpd.server_port)

    async def start(self) -> int:
        registry = _LoopSnapshotRegistry(self._metrics, asyncio.get_running_loop())
        app = _metrics_only(make_wsgi_app(registry))
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        server_class = type(
            "MetricsHTTPServer",
            (_MetricsHTTPServer,),
            {"address_family": family, "ssl_context": self._ssl_context},
        )
        httpd: WSGIServer = make_server(
            self._host, self._port, app, server_class=server_class, handler_class=_QuietHandler
        )
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, name="decider-metrics", daemon=True
        )
        self._thread.start()
        return self.port

    async def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        # shutdown() waits for serve_forever to notice; the loop must stay free meanwhile, since
        # a scrape in progress may be waiting on it for a snapshot.
        await asyncio.to_thread(httpd.shutdown)
        httpd.server_close()

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
