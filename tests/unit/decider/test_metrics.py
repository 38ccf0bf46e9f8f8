"""Metrics: counters per decision and outcome, live gauges read at scrape time, and /metrics
scraped over HTTP from a real listener on 127.0.0.1."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from decider.config.listen import parse_listen
from decider.core.model import (
    BreakerState,
    Decision,
    Endpoint,
    EndpointState,
    HealthStatus,
    LoadReport,
    Refusal,
    RefusalKind,
    Result,
    RetryAdvice,
    RouteRequest,
)
from decider.errors import ConfigError
from decider.obs.metrics import Metrics, MetricsServer
from probe.checks import CheckKind, ProbeResult

RETRY = RetryAdvice(max_attempts=2, initial_backoff_s=0.1, max_backoff_s=1.0, backoff_multiplier=2)


def endpoint(i: int, model: str = "llama") -> Endpoint:
    return Endpoint(id=f"e{i}", address=f"10.0.0.{i}:8000", model=model)


def decision(strategy: str = "least_request") -> Decision:
    return Decision(
        decision_id="d",
        endpoint=endpoint(1),
        fallbacks=(),
        strategy=strategy,
        reason="",
        scores={},
        retry=RETRY,
        affinity_hit=False,
        candidate_count=1,
        skipped={},
    )


def refusal(kind: RefusalKind, model: str = "llama") -> Refusal:
    return Refusal(kind=kind, message="no", model=model)


def state(i: int, health: HealthStatus, breaker: BreakerState, **kw: Any) -> EndpointState:
    return EndpointState(
        endpoint=endpoint(i),
        health=health,
        breaker_state=breaker,
        in_flight=kw.get("in_flight", 0),
        latency_ewma_s=kw.get("latency_ewma_s", 0.0),
        health_reason="",
        load=kw.get("load"),
    )


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_decisions_by_model_strategy_and_result():
    metrics = Metrics()
    llama = RouteRequest(model="llama")
    for _ in range(3):
        metrics.record_decision(llama, decision(), 0.00005)
    metrics.record_decision(RouteRequest(model="llama", explain=True), decision(), 0.002)
    metrics.record_decision(llama, refusal(RefusalKind.NO_HEALTHY_ENDPOINT), 0.00003)
    metrics.record_decision(llama, refusal(RefusalKind.QUOTA_EXHAUSTED), 0.00001)
    metrics.record_decision(
        RouteRequest(model="made-up-name"), refusal(RefusalKind.MODEL_NOT_FOUND, "made-up-name"), 0
    )
    metrics.record_decision_error()

    def decisions(model: str, strategy: str, result: str) -> float | None:
        return sample(
            metrics, "decider_decisions_total", model=model, strategy=strategy, result=result
        )

    assert decisions("llama", "least_request", "ok") == 3
    assert decisions("llama", "least_request", "explain") == 1
    assert decisions("llama", "", "no_healthy_endpoint") == 1
    assert decisions("llama", "", "quota_exhausted") == 1
    # Unknown model names never become label values.
    assert decisions("", "", "model_not_found") == 1
    assert decisions("", "", "invalid_argument") == 1
    assert "made-up-name" not in metrics.exposition().decode()
    assert sample(metrics, "decider_quota_rejections_total", model="llama") == 1
    # Explain requests stay out of the latency histogram.
    assert sample(metrics, "decider_decision_duration_seconds_count", strategy="least_request") == 3
    assert (
        sample(
            metrics,
            "decider_decision_duration_seconds_bucket",
            strategy="least_request",
            le="5e-05",
        )
        == 3
    )


def test_outcomes_by_result_and_unmatched():
    metrics = Metrics()
    metrics.record_outcome(Result.SUCCESS, decision_found=True)
    metrics.record_outcome(Result.SUCCESS, decision_found=False)
    metrics.record_outcome(Result.RATE_LIMITED, decision_found=True)
    assert sample(metrics, "decider_outcomes_total", result="success") == 2
    assert sample(metrics, "decider_outcomes_total", result="rate_limited") == 1
    assert sample(metrics, "decider_outcomes_unmatched_total") == 1


def test_per_endpoint_decisions_outcomes_and_latency_for_registered_endpoints_only():
    metrics = Metrics()
    metrics.set_endpoints({"e1": "llama", "e2": "llama"})
    for _ in range(2):
        metrics.record_decision(RouteRequest(model="llama"), decision(), 0.0001)
    metrics.record_decision(RouteRequest(model="llama", explain=True), decision(), 0.0001)
    metrics.record_outcome(Result.SUCCESS, decision_found=True, endpoint_id="e1", latency_s=0.7)
    metrics.record_outcome(Result.TIMEOUT, decision_found=True, endpoint_id="e1", latency_s=30.0)
    metrics.record_outcome(Result.CANCELLED, decision_found=True, endpoint_id="e1", latency_s=9.0)
    # A client can name any endpoint id: only registered ones become label values.
    metrics.record_outcome(Result.ERROR, decision_found=False, endpoint_id="made-up", latency_s=1)
    ids = {"endpoint_id": "e1", "model": "llama"}
    assert sample(metrics, "decider_endpoint_decisions_total", **ids) == 2
    outcomes = "decider_endpoint_outcomes_total"
    assert sample(metrics, outcomes, **ids, result="success") == 1
    assert sample(metrics, outcomes, **ids, result="timeout") == 1
    assert sample(metrics, outcomes, **ids, result="cancelled") == 1
    duration = "decider_endpoint_request_duration_seconds"
    assert sample(metrics, f"{duration}_count", **ids) == 2
    assert sample(metrics, f"{duration}_bucket", **ids, le="1.0") == 1
    assert sample(metrics, f"{duration}_sum", **ids) == 30.7
    assert "made-up" not in metrics.exposition().decode()

    metrics.set_endpoints({"e2": "llama"})
    text = metrics.exposition().decode()
    assert 'endpoint_id="e1"' not in text
    metrics.record_outcome(Result.SUCCESS, decision_found=False, endpoint_id="e2", latency_s=1)
    metrics.forget_endpoint("e2")
    assert 'endpoint_id="e2"' not in metrics.exposition().decode()


def test_probe_results_latency_scrape_errors_and_forgetting_an_endpoint():
    metrics = Metrics()
    metrics.record_probe("e1", kind="http", healthy=True, latency_s=0.02)
    metrics.record_probe("e1", kind="http", healthy=False, latency_s=3.0)
    metrics.record_probe("e2", kind="liveness", healthy=True, latency_s=0.001)
    metrics.record_scrape_error("e1", reason="HTTP 503")
    assert (
        sample(metrics, "decider_probes_total", endpoint_id="e1", kind="http", result="healthy")
        == 1
    )
    assert (
        sample(metrics, "decider_probes_total", endpoint_id="e1", kind="http", result="unhealthy")
        == 1
    )
    assert sample(metrics, "decider_probe_duration_seconds_count", kind="http") == 2
    assert (
        sample(metrics, "decider_probe_scrape_errors_total", endpoint_id="e1", reason="HTTP 503")
        == 1
    )
    metrics.forget_endpoint("e1")
    text = metrics.exposition().decode()
    assert 'endpoint_id="e1"' not in text
    assert 'endpoint_id="e2"' in text


def test_endpoint_gauges_are_read_from_the_source_at_scrape_time():
    metrics = Metrics()
    live = [
        state(1, HealthStatus.HEALTHY, BreakerState.CLOSED, in_flight=4, latency_ewma_s=0.2),
        state(
            2,
            HealthStatus.UNHEALTHY,
            BreakerState.OPEN,
            load=LoadReport(queue_depth=7, kv_cache_utilization=0.5),
        ),
    ]
    metrics.bind_endpoint_states(lambda: live)
    watchers = [3]
    metrics.bind_watcher_count(lambda: watchers[0])
    ids = {"model": "llama"}
    assert (
        sample(metrics, "decider_endpoint_health", endpoint_id="e1", status="healthy", **ids) == 1
    )
    assert (
        sample(metrics, "decider_endpoint_health", endpoint_id="e1", status="unhealthy", **ids) == 0
    )
    assert (
        sample(metrics, "decider_endpoint_health", endpoint_id="e2", status="unhealthy", **ids) == 1
    )
    assert (
        sample(metrics, "decider_endpoint_breaker_state", endpoint_id="e2", state="open", **ids)
        == 1
    )
    assert (
        sample(metrics, "decider_endpoint_breaker_state", endpoint_id="e1", state="open", **ids)
        == 0
    )
    assert sample(metrics, "decider_endpoint_in_flight", endpoint_id="e1", **ids) == 4
    assert sample(metrics, "decider_endpoint_latency_ewma_seconds", endpoint_id="e1", **ids) == 0.2
    assert sample(metrics, "decider_endpoint_queue_depth", endpoint_id="e2", **ids) == 7
    assert sample(metrics, "decider_endpoint_queue_depth", endpoint_id="e1", **ids) is None
    assert sample(metrics, "decider_watchers") == 3
    live.pop()
    watchers[0] = 0
    assert sample(metrics, "decider_endpoint_in_flight", endpoint_id="e2", **ids) is None
    assert sample(metrics, "decider_watchers") == 0
    assert sample(metrics, "decider_build_info", version="0.1.0") == 1


def test_unbound_sources_export_no_endpoint_series():
    metrics = Metrics()
    assert sample(metrics, "decider_watchers") is None
    assert "decider_endpoint_health{" not in metrics.exposition().decode()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:9464", ("::1", 9464)),
        (":9464", ("", 9464)),
        ("metrics.local:80", ("metrics.local", 80)),
    ],
)
def test_parse_listen(value, expected):
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["9464", "host:", "host:port", "::1:9464", "h:65536", ""])
def test_parse_listen_errors_name_the_flag_and_value(value):
    with pytest.raises(ConfigError) as info:
        parse_listen(value)
    assert str(info.value) == (
        f"--metrics-listen: {value!r}, must be HOST:PORT (e.g. 127.0.0.1:9464)"
    )


# --------------------------------------------------------------------------- over HTTP


async def test_metrics_endpoint_serves_every_series_over_http():
    metrics = Metrics()
    loop_thread = threading.get_ident()
    source_threads: list[int] = []

    def states() -> list[EndpointState]:
        source_threads.append(threading.get_ident())
        return [state(1, HealthStatus.DEGRADED, BreakerState.HALF_OPEN, in_flight=2)]

    metrics.bind_endpoint_states(states)
    metrics.bind_watcher_count(lambda: 1)
    metrics.record_decision(RouteRequest(model="llama"), decision(), 0.0001)
    metrics.record_outcome(Result.ERROR, decision_found=True)
    metrics.record_decision(RouteRequest(model="llama"), refusal(RefusalKind.QUOTA_EXHAUSTED), 0)
    metrics.record_probe("e1", kind="http", healthy=True, latency_s=0.01)
    metrics.record_scrape_error("e1", reason="parse")

    server = MetricsServer(metrics, host="127.0.0.1", port=0)
    async with server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        response = await client.get("/metrics", timeout=10)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert response.headers["content-encoding"] == "gzip"
        families = {f.name: f for f in text_string_to_metric_families(response.text)}

        head = await client.head("/metrics", timeout=10)
        assert head.status_code == 200 and head.content == b""

        openmetrics = await client.get(
            "/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
            timeout=10,
        )
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.endswith("# EOF\n")

        assert (await client.get("/", timeout=10)).status_code == 404
        assert (await client.post("/metrics", timeout=10)).status_code == 405

    assert {
        "decider_decisions",
        "decider_decision_duration_seconds",
        "decider_outcomes",
        "decider_outcomes_unmatched",
        "decider_quota_rejections",
        "decider_probes",
        "decider_probe_duration_seconds",
        "decider_probe_scrape_errors",
        "decider_endpoint_health",
        "decider_endpoint_breaker_state",
        "decider_endpoint_in_flight",
        "decider_endpoint_latency_ewma_seconds",
        "decider_watchers",
        "decider_build_info",
    } <= set(families)
    health = {s.labels["status"]: s.value for s in families["decider_endpoint_health"].samples}
    assert health["degraded"] == 1 and health["healthy"] == 0
    # The engine is read on the event loop thread, never from the rendering thread.
    assert source_threads and set(source_threads) == {loop_thread}


async def test_stopped_server_releases_the_port():
    server = MetricsServer(Metrics(), host="127.0.0.1", port=0)
    port = await server.start()
    await server.stop()
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


async def test_a_failing_source_is_a_500_not_a_crash():
    metrics = Metrics()

    def broken() -> list[EndpointState]:
        raise RuntimeError("engine bug")

    metrics.bind_endpoint_states(broken)
    async with MetricsServer(metrics, host="127.0.0.1", port=0) as server, httpx.AsyncClient() as c:
        response = await c.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
    assert response.status_code == 500


@pytest.mark.parametrize(
    ("healthy", "reason", "status_code", "label"),
    [
        (False, "HTTP 503 in 12 ms", 503, "http_503"),
        (False, "timeout after 2 s", 0, "timeout"),
        (False, "connection refused", 0, "connection_refused"),
        (False, "ReadError", 0, "readerror"),
        (True, "HTTP 200 in 3 ms", 200, None),
    ],
)
def test_probe_results_from_the_prober(healthy, reason, status_code, label):
    metrics = Metrics()
    result = ProbeResult(
        endpoint_id="e1",
        kind=CheckKind.METRICS,
        healthy=healthy,
        latency_s=0.012,
        reason=reason,
        status_code=status_code,
    )
    metrics.record_probe_result(result)
    outcome = "healthy" if healthy else "unhealthy"
    assert sample(metrics, "decider_probes_total", endpoint_id="e1", kind="metrics", result=outcome)
    errors = [
        s.labels["reason"]
        for f in metrics.registry.collect()
        if f.name == "decider_probe_scrape_errors"
        for s in f.samples
        if s.name.endswith("_total")
    ]
    assert errors == ([label] if label else [])
