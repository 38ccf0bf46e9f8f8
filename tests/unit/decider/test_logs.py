"""JSON logs: one object per line, state-change events, trace ids, decisions only on request."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from decider.core.model import (
    BreakerState,
    Decision,
    Endpoint,
    HealthEvent,
    HealthStatus,
    Refusal,
    RefusalKind,
    RetryAdvice,
    RouteRequest,
)
from decider.errors import ConfigError
from decider.obs import logs
from decider.obs.telemetry import Rpc, Tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SAMPLED = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
UNSAMPLED = f"00-{TRACE_ID}-00f067aa0ba902b7-00"


class FakeContext:
    def __init__(self, traceparent: str) -> None:
        self.traceparent = traceparent

    def invocation_metadata(self):
        return (("traceparent", self.traceparent),)

    def code(self):
        return None


class Captured:
    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


@pytest.fixture
def captured() -> Iterator[Captured]:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = logs.configure_logging(level="info", stream=stream)
    try:
        yield Captured(stream)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        logging.getLogger(logs.DECISIONS).setLevel(logging.NOTSET)
        logging.getLogger("httpx").setLevel(logging.NOTSET)


def endpoint() -> Endpoint:
    return Endpoint(id="e1", address="10.0.0.1:8000", model="llama", source="config")


def test_health_transition_is_one_json_line_with_fields(captured):
    logs.log_health_event(
        HealthEvent(
            endpoint_id="e1",
            model="llama",
            status=HealthStatus.UNHEALTHY,
            breaker_state=BreakerState.CLOSED,
            reason="3 probes failed: HTTP 503",
        )
    )
    (line,) = captured.lines()
    assert line["level"] == "warning"
    assert line["logger"] == "decider.health"
    assert line["event"] == "endpoint_state"
    assert line["message"] == "endpoint e1 is unhealthy, breaker closed: 3 probes failed: HTTP 503"
    assert line["endpoint_id"] == "e1" and line["model"] == "llama"
    assert line["health"] == "unhealthy" and line["breaker_state"] == "closed"
    assert line["time"].endswith("Z") and "T" in line["time"]
    assert "trace_id" not in line


@pytest.mark.parametrize(
    ("status", "breaker", "level"),
    [
        (HealthStatus.HEALTHY, BreakerState.CLOSED, "info"),
        (HealthStatus.HEALTHY, BreakerState.OPEN, "warning"),
        (HealthStatus.DEGRADED, BreakerState.HALF_OPEN, "info"),
    ],
)
def test_bad_transitions_are_warnings(captured, status, breaker, level):
    logs.log_health_event(
        HealthEvent(endpoint_id="e1", model="m", status=status, breaker_state=breaker, reason="")
    )
    assert captured.lines()[0]["level"] == level


def test_removed_endpoint(captured):
    logs.log_health_event(
        HealthEvent(
            endpoint_id="e1",
            model="m",
            status=HealthStatus.UNKNOWN,
            breaker_state=BreakerState.UNKNOWN,
            reason="",
            removed=True,
        )
    )
    assert captured.lines()[0]["event"] == "endpoint_removed"


def test_registry_and_config_events(captured):
    logs.log_registry_change("registered", endpoint())
    logs.log_registry_change("deregistered", "e1")
    logs.log_config_loaded("/etc/decider.toml", fields={"endpoints": 3, "strategy": "composite"})
    registered, deregistered, config = captured.lines()
    assert registered["logger"] == "decider.registry"
    assert registered["event"] == "endpoint_registered"
    assert registered["address"] == "10.0.0.1:8000" and registered["source"] == "config"
    assert deregistered["message"] == "endpoint e1 deregistered"
    assert config["logger"] == "decider.config" and config["event"] == "config_loaded"
    assert config["path"] == "/etc/decider.toml" and config["endpoints"] == 3


@pytest.mark.parametrize("traceparent", [SAMPLED, UNSAMPLED])
def test_lines_inside_a_server_span_carry_the_trace_id(captured, traceparent):
    exporter = InMemorySpanExporter()
    tracing = Tracing.from_env({}, processor=SimpleSpanProcessor(exporter))
    with tracing.server_span(Rpc.REPORT_OUTCOME, FakeContext(traceparent)) as span:
        logs.log_registry_change("deregistered", "e1")
        span_id = format(span.get_span_context().span_id, "016x")
    (line,) = captured.lines()
    assert line["trace_id"] == TRACE_ID
    assert line["span_id"] == span_id


def test_per_request_http_client_lines_stay_quiet(captured):
    logging.getLogger("httpx").info("HTTP Request: GET http://10.0.0.1:8000/health")
    logging.getLogger("httpx").warning("connection pool is full")
    assert [line["message"] for line in captured.lines()] == ["connection pool is full"]


def test_exceptions_are_included(captured):
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("decider.server").exception("tick failed")
    (line,) = captured.lines()
    assert line["level"] == "error"
    assert "ValueError: boom" in line["exception"]


def decision() -> Decision:
    return Decision(
        decision_id="d-1",
        endpoint=endpoint(),
        fallbacks=(),
        strategy="round_robin",
        reason="round_robin: next of 3",
        scores={},
        retry=RetryAdvice(
            max_attempts=1, initial_backoff_s=0, max_backoff_s=0, backoff_multiplier=1
        ),
        affinity_hit=False,
        candidate_count=3,
        skipped={},
    )


def test_no_decision_lines_by_default(captured):
    logs.log_decision(RouteRequest(model="llama"), decision(), elapsed_s=0.00002)
    assert captured.lines() == []


def test_decision_lines_when_asked_for_even_at_warning_level():
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = logs.configure_logging(level="warning", stream=stream, log_decisions=True)
    try:
        logs.log_decision(
            RouteRequest(model="llama", request_id="r-1", prefix_hashes=(1, 2)),
            decision(),
            elapsed_s=0.00002,
        )
        refusal = Refusal(kind=RefusalKind.MODEL_NOT_FOUND, message="nobody serves x", model="x")
        logs.log_decision(RouteRequest(model="x"), refusal, elapsed_s=0.00001)
        logging.getLogger("decider.health").info("not at warning level")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        logging.getLogger(logs.DECISIONS).setLevel(logging.NOTSET)
        logging.getLogger("httpx").setLevel(logging.NOTSET)
    ok, refused = (json.loads(line) for line in stream.getvalue().splitlines())
    assert ok["event"] == "decision" and ok["endpoint_id"] == "e1"
    assert ok["request_id"] == "r-1" and ok["elapsed_us"] == 20.0
    assert "prefix_hashes" not in ok
    assert refused["result"] == "model_not_found"


def test_configure_twice_replaces_the_handler():
    root = logging.getLogger()
    level = root.level
    first = logs.configure_logging(stream=io.StringIO())
    second = logs.configure_logging(stream=io.StringIO(), json_format=False)
    try:
        assert first not in root.handlers and second in root.handlers
    finally:
        root.removeHandler(second)
        root.setLevel(level)
        logging.getLogger(logs.DECISIONS).setLevel(logging.NOTSET)
        logging.getLogger("httpx").setLevel(logging.NOTSET)


@pytest.mark.parametrize(
    ("value", "level"), [("debug", 10), ("INFO", 20), ("Warning", 30), (40, 40)]
)
def test_parse_level(value, level):
    assert logs.parse_level(value) == level


def test_parse_level_error_names_the_value():
    with pytest.raises(ConfigError) as info:
        logs.parse_level("loud", name="server.log_level")
    assert str(info.value) == (
        "server.log_level: 'loud', must be one of debug, info, warning, error, critical"
    )
