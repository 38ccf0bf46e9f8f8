"""Tracing: OTEL_* parsing, the server span (W3C parent, sampling, status), decision attributes,
and spans received over the wire by a real OTLP collector."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import threading
from typing import Any

import grpc
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode
from otlp_receiver import OtlpReceiver

from decider.core.model import (
    Decision,
    Endpoint,
    Outcome,
    Refusal,
    RefusalKind,
    Result,
    RetryAdvice,
    RouteRequest,
    StateUsage,
)
from decider.errors import ConfigError
from decider.obs.metrics import Metrics
from decider.obs.telemetry import (
    Attr,
    BoundedSpanProcessor,
    Rpc,
    TelemetryObserver,
    Tracing,
    TracingSettings,
    annotate_decision,
    annotate_outcome,
    extract_parent,
    traced,
    traced_stream,
)
from decider.v1 import decider_service_pb2, registry_service_pb2

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-01"
UNSAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-00"


class FakeContext:
    """The two methods of grpc.aio.ServicerContext a server span uses."""

    def __init__(self, *metadata: tuple[str, str], code: Any = None) -> None:
        self.metadata = (("user-agent", "grpc-go/1.70"), *metadata)
        self.status = code

    def invocation_metadata(self):
        return self.metadata

    def code(self):
        return self.status


class ExplodingContext:
    def invocation_metadata(self):
        raise AssertionError("metadata read with tracing off")

    def code(self):
        raise AssertionError("status read with tracing off")


class Exploding:
    def __getattr__(self, name):
        raise AssertionError(f"attribute work on an unsampled span ({name})")


def in_memory(env: dict[str, str] | None = None) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing = Tracing.from_env(env or {}, processor=SimpleSpanProcessor(exporter))
    return tracing, exporter


def endpoint(i: int, model: str = "llama") -> Endpoint:
    return Endpoint(id=f"e{i}", address=f"10.0.0.{i}:8000", model=model)


def decision() -> Decision:
    return Decision(
        decision_id="d-1",
        endpoint=endpoint(1),
        fallbacks=(endpoint(2), endpoint(3)),
        strategy="composite",
        reason="composite: e1 scored 0.91 vs 0.62 and 0.40; 3 of 5 candidates, 1 unhealthy",
        scores={"load": 0.8, "latency": 0.9, "cache": 1.0},
        retry=RetryAdvice(
            max_attempts=3, initial_backoff_s=0.05, max_backoff_s=1.0, backoff_multiplier=2.0
        ),
        affinity_hit=True,
        candidate_count=5,
        skipped={"unhealthy": 1, "breaker_open": 1},
    )


REQUEST = RouteRequest(
    model="llama",
    request_id="r-42",
    tenant="acme",
    session_id="s-secret",
    prefix_hashes=(11, 22, 33, 44),
    required_capabilities=frozenset({"tools", "json"}),
    estimated_input_tokens=1200,
)


def test_every_rpc_in_the_protos_has_a_span_name():
    methods = {
        f"{service.full_name}/{method.name}"
        for module in (decider_service_pb2, registry_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods == {value for key, value in vars(Rpc).items() if key.isupper()}


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("env", "exporters", "endpoint"),
    [
        ({}, (), ""),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ("otlp",), "http://c:4317"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4317",
            },
            ("otlp",),
            "http://t:4317",
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",), "http://localhost:4317"),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console",), ""),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ("otlp", "console"), "http://localhost:4317"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, (), ""),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, (), ""),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            ("otlp",),
            "http://localhost:4317",
        ),
    ],
)
def test_exporter_follows_otel_environment(env, exporters, endpoint):
    settings = TracingSettings.parse(env)
    assert settings.exporters == exporters
    assert settings.otlp_endpoint == endpoint
    assert settings.enabled == bool(exporters)


def test_defaults_are_decider_and_parent_based_always_on():
    settings = TracingSettings.parse({"OTEL_TRACES_EXPORTER": "console"})
    assert settings.service_name == "decider"
    assert settings.sampler == "parentbased_always_on"
    assert (
        settings.describe() == "tracing to console, sampler parentbased_always_on, service decider"
    )
    assert TracingSettings.parse({}).describe() == "tracing off"


def test_service_name_sampler_and_resource_attributes():
    settings = TracingSettings.parse(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=ml%20infra",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.01",
        }
    )
    assert settings.resource_attributes == {"deployment.environment": "prod", "team": "ml infra"}
    assert settings.sampler_arg == 0.01
    assert "sampler parentbased_traceidratio(0.01)" in settings.describe()
    named = TracingSettings.parse({"OTEL_RESOURCE_ATTRIBUTES": "service.name=router"})
    assert named.service_name == "router"
    both = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=router", "OTEL_SERVICE_NAME": "edge"}
    assert TracingSettings.parse(both).service_name == "edge"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"OTEL_TRACES_EXPORTER": "zipkin"},
            "OTEL_TRACES_EXPORTER: 'zipkin', must be one of otlp, console, none",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "OTEL_EXPORTER_OTLP_PROTOCOL: 'http/protobuf', only 'grpc' is supported",
        ),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER: 'sometimes', must be one of"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            "OTEL_TRACES_SAMPLER_ARG: '2', must be a number from 0 to 1",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"},
            "OTEL_TRACES_SAMPLER_ARG: 'x', must be a number from 0 to 1",
        ),
        (
            {"OTEL_RESOURCE_ATTRIBUTES": "team"},
            "OTEL_RESOURCE_ATTRIBUTES: 'team', must be key=value",
        ),
        ({"OTEL_EXPORTER_OTLP_INSECURE": "maybe"}, "OTEL_EXPORTER_OTLP_INSECURE: 'maybe'"),
        (
            {"OTEL_BSP_MAX_QUEUE_SIZE": "lots"},
            "OTEL_BSP_MAX_QUEUE_SIZE: 'lots', must be an integer from 1 to 1000000",
        ),
    ],
)
def test_bad_otel_values_name_the_variable_and_value(env, message):
    with pytest.raises(ConfigError) as info:
        TracingSettings.parse(env)
    assert message in str(info.value)


# --------------------------------------------------------------------------- propagation


def test_extract_parent_reads_traceparent_and_tracestate():
    parent = extract_parent((("traceparent", SAMPLED), ("tracestate", "gw=1,vendor=x")))
    assert parent is not None
    assert format(parent.trace_id, "032x") == TRACE_ID
    assert format(parent.span_id, "016x") == PARENT_ID
    assert parent.is_remote and parent.trace_flags.sampled
    assert parent.trace_state.to_header() == "gw=1,vendor=x"


@pytest.mark.parametrize(
    "traceparent",
    [
        "",
        "garbage",
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
        f"ff-{TRACE_ID}-{PARENT_ID}-01",
        f"00-{'0' * 32}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"00-{TRACE_ID}-{PARENT_ID}-01-extra",
        f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",
    ],
)
def test_invalid_traceparent_is_ignored(traceparent):
    assert extract_parent((("traceparent", traceparent),)) is None


def test_future_version_traceparent_keeps_the_known_fields():
    parent = extract_parent((("traceparent", f"01-{TRACE_ID}-{PARENT_ID}-01-more"),))
    assert parent is not None and format(parent.trace_id, "032x") == TRACE_ID


def test_repeated_traceparent_is_ignored():
    assert extract_parent((("traceparent", SAMPLED), ("traceparent", SAMPLED))) is None


# --------------------------------------------------------------------------- server spans


def test_disabled_tracing_reads_nothing_and_yields_the_invalid_span():
    tracing = Tracing.disabled()
    assert not tracing.enabled
    with tracing.server_span(Rpc.DECIDE, ExplodingContext()) as span:
        assert span is trace.INVALID_SPAN
        assert not span.is_recording()
        annotate_decision(span, Exploding(), Exploding())  # type: ignore[arg-type]
    assert tracing.force_flush()


def test_sampled_gateway_trace_gets_a_child_server_span():
    tracing, exporter = in_memory()
    context = FakeContext(("traceparent", SAMPLED), ("tracestate", "gw=1"))
    with tracing.server_span(Rpc.DECIDE, context) as span:
        assert span.is_recording()
        assert trace.get_current_span() is span
    assert trace.get_current_span() is trace.INVALID_SPAN
    (finished,) = exporter.get_finished_spans()
    assert finished.name == "decider.v1.DeciderService/Decide"
    assert finished.kind is SpanKind.SERVER
    assert format(finished.context.trace_id, "032x") == TRACE_ID
    assert finished.parent is not None and format(finished.parent.span_id, "016x") == PARENT_ID
    assert finished.context.trace_state.to_header() == "gw=1"
    assert dict(finished.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "decider.v1.DeciderService",
        "rpc.method": "Decide",
        "rpc.grpc.status_code": 0,
    }
    assert finished.status.status_code is StatusCode.UNSET


def test_unsampled_gateway_trace_records_nothing_but_keeps_the_trace_id_current():
    tracing, exporter = in_memory()
    with tracing.server_span(Rpc.DECIDE, FakeContext(("traceparent", UNSAMPLED))) as span:
        assert not span.is_recording()
        annotate_decision(span, Exploding(), Exploding())  # type: ignore[arg-type]
        current = trace.get_current_span().get_span_context()
        assert format(current.trace_id, "032x") == TRACE_ID
    assert exporter.get_finished_spans() == ()


def test_parent_based_ratio_always_follows_a_sampled_gateway():
    env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}
    tracing, exporter = in_memory(env)
    for _ in range(20):
        with tracing.server_span(Rpc.DECIDE, FakeContext()) as span:
            assert not span.is_recording()
    with tracing.server_span(Rpc.DECIDE, FakeContext(("traceparent", SAMPLED))) as span:
        assert span.is_recording()
    assert len(exporter.get_finished_spans()) == 1


def test_ratio_sampling_of_roots_agrees_with_the_trace_id():
    env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}
    tracing, exporter = in_memory(env)
    bound = TraceIdRatioBased.get_bound_for_rate(0.5)
    recorded = 0
    for _ in range(400):
        with tracing.server_span(Rpc.DECIDE, FakeContext()) as span:
            if span.is_recording():
                span_context = span.get_span_context()
                assert (span_context.trace_id & TraceIdRatioBased.TRACE_ID_LIMIT) < bound
                assert span_context.trace_flags.sampled
                assert trace.get_current_span() is span
                recorded += 1
            else:
                # A dropped root costs nothing: no ids, nothing made current.
                assert span is trace.INVALID_SPAN
                assert trace.get_current_span() is trace.INVALID_SPAN
    assert len(exporter.get_finished_spans()) == recorded
    assert 120 < recorded < 280


@pytest.mark.parametrize(
    "sampler",
    [
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    ],
)
def test_sampling_decisions_match_the_sdk_sampler(sampler):
    env = {"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": "0.3"}
    sdk_sampler = TracingSettings.parse(env).build_sampler()
    tracing, exporter = in_memory(env)
    rng = random.Random(11)
    recorded = 0
    for i in range(300):
        if i % 3 == 0:
            context = FakeContext()
        else:
            flags = "01" if i % 3 == 1 else "00"
            traceparent = f"00-{rng.getrandbits(128) | 1:032x}-{PARENT_ID}-{flags}"
            context = FakeContext(("traceparent", traceparent))
        with tracing.server_span(Rpc.DECIDE, context) as span:
            ours = span.is_recording()
            trace_id = span.get_span_context().trace_id
        parent = extract_parent(context.invocation_metadata())
        if parent is None and not ours:
            assert span is trace.INVALID_SPAN  # dropped root: its trace id was never kept
            continue
        parent_context = (
            trace.set_span_in_context(trace.NonRecordingSpan(parent), otel_context.Context())
            if parent is not None
            else otel_context.Context()
        )
        expected = sdk_sampler.should_sample(parent_context, trace_id, "x").decision.is_sampled()
        assert ours == expected, (i, sampler)
        recorded += ours
    assert len(exporter.get_finished_spans()) == recorded


def test_a_non_parent_based_sampler_may_drop_a_sampled_gateway_trace():
    env = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}
    tracing, exporter = in_memory(env)
    with tracing.server_span(Rpc.DECIDE, FakeContext(("traceparent", SAMPLED))) as span:
        assert not span.is_recording()
        assert format(span.get_span_context().trace_id, "032x") == TRACE_ID
        assert not span.get_span_context().trace_flags.sampled
    assert exporter.get_finished_spans() == ()


def test_no_traceparent_starts_a_new_root_trace():
    tracing, exporter = in_memory()
    with tracing.server_span(Rpc.REPORT_OUTCOME, FakeContext(("traceparent", "junk"))):
        pass
    (finished,) = exporter.get_finished_spans()
    assert finished.parent is None
    assert format(finished.context.trace_id, "032x") != TRACE_ID
    assert finished.attributes is not None and finished.attributes["rpc.method"] == "ReportOutcome"


@pytest.mark.parametrize(
    ("code", "raised", "expected_code", "error", "exception_event"),
    [
        (grpc.StatusCode.UNAVAILABLE, RuntimeError("abort"), 14, True, False),
        (grpc.StatusCode.NOT_FOUND, RuntimeError("abort"), 5, False, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, None, 8, False, False),
        (None, ValueError("bug"), 2, True, True),
        (None, asyncio.CancelledError(), 1, False, False),
    ],
)
def test_status_comes_from_the_servicer_context(
    code, raised, expected_code, error, exception_event
):
    tracing, exporter = in_memory()
    context = FakeContext(("traceparent", SAMPLED), code=code)
    expect = pytest.raises(BaseException) if raised else contextlib.nullcontext()
    with expect, tracing.server_span(Rpc.DECIDE, context):
        if raised is not None:
            raise raised
    (finished,) = exporter.get_finished_spans()
    assert finished.attributes is not None
    assert finished.attributes[Attr.RPC_GRPC_STATUS_CODE] == expected_code
    assert (finished.status.status_code is StatusCode.ERROR) == error
    assert any(e.name == "exception" for e in finished.events) == exception_event


# --------------------------------------------------------------------------- annotations


def test_decision_attributes_use_the_decider_namespace_and_no_prompt_content():
    tracing, exporter = in_memory()
    with tracing.server_span(Rpc.DECIDE, FakeContext(("traceparent", SAMPLED))) as span:
        annotate_decision(span, REQUEST, decision())
    (finished,) = exporter.get_finished_spans()
    attributes = dict(finished.attributes or {})
    decider = {k: v for k, v in attributes.items() if not k.startswith("rpc.")}
    assert all(k.startswith("decider.") for k in decider)
    assert decider == {
        "decider.model": "llama",
        "decider.request_id": "r-42",
        "decider.tenant": "acme",
        "decider.required_capabilities": ("json", "tools"),
        "decider.estimated_input_tokens": 1200,
        "decider.prefix_hash.count": 4,
        "decider.excluded.count": 0,
        "decider.explain": False,
        "decider.result": "ok",
        "decider.decision_id": "d-1",
        "decider.strategy": "composite",
        "decider.endpoint.id": "e1",
        "decider.endpoint.address": "10.0.0.1:8000",
        "decider.fallback.ids": ("e2", "e3"),
        "decider.fallback.count": 2,
        "decider.candidate.count": 5,
        "decider.affinity_hit": True,
        "decider.reason": decision().reason,
        "decider.score.load": 0.8,
        "decider.score.latency": 0.9,
        "decider.score.cache": 1.0,
        "decider.skipped.unhealthy": 1,
        "decider.skipped.breaker_open": 1,
        "decider.skipped.total": 2,
    }
    # Prefix hashes and the session id never reach a span.
    flat = repr(attributes)
    assert "s-secret" not in flat
    assert not any(str(h) in flat.split() for h in REQUEST.prefix_hashes)


def test_refusal_attributes():
    tracing, exporter = in_memory()
    refusal = Refusal(
        kind=RefusalKind.NO_HEALTHY_ENDPOINT,
        message="no usable endpoint for model llama: 3 registered, 2 unhealthy, 1 breaker open",
        model="llama",
        registered=3,
        skipped={"unhealthy": 2, "breaker_open": 1},
    )
    with tracing.server_span(Rpc.DECIDE, FakeContext(("traceparent", SAMPLED))) as span:
        annotate_decision(span, RouteRequest(model="llama"), refusal)
    attributes = dict(exporter.get_finished_spans()[0].attributes or {})
    assert attributes["decider.result"] == "no_healthy_endpoint"
    assert attributes["decider.reason"] == refusal.message
    assert attributes["decider.registered.count"] == 3
    assert attributes["decider.skipped.total"] == 3
    assert "decider.endpoint.id" not in attributes


def test_outcome_attributes():
    tracing, exporter = in_memory()
    outcome = Outcome(
        decision_id="d-1",
        endpoint_id="e1",
        result=Result.RATE_LIMITED,
        latency_s=0.25,
        ttft_s=0.05,
        input_tokens=10,
        output_tokens=20,
    )
    with tracing.server_span(Rpc.REPORT_OUTCOME, FakeContext(("traceparent", SAMPLED))) as span:
        annotate_outcome(span, outcome, decision_found=False)
    attributes = dict(exporter.get_finished_spans()[0].attributes or {})
    assert attributes["decider.outcome.result"] == "rate_limited"
    assert attributes["decider.outcome.ttft_s"] == 0.05
    assert attributes["decider.outcome.decision_found"] is False
    assert attributes["decider.endpoint.id"] == "e1"


def test_observer_annotates_the_current_span_and_counts():
    tracing, exporter = in_memory()
    metrics = Metrics()
    observer = TelemetryObserver(metrics)
    with tracing.server_span(Rpc.DECIDE, FakeContext(("traceparent", SAMPLED))):
        observer.decided(REQUEST, decision(), elapsed_s=0.0001)
    attributes = dict(exporter.get_finished_spans()[0].attributes or {})
    assert attributes["decider.endpoint.id"] == "e1"
    assert (
        metrics.registry.get_sample_value(
            "decider_decisions_total", {"model": "llama", "strategy": "composite", "result": "ok"}
        )
        == 1.0
    )
    observer.outcome_reported(
        Outcome(decision_id="d-1", endpoint_id="e1", result=Result.SUCCESS), decision_found=True
    )
    assert metrics.registry.get_sample_value("decider_outcomes_total", {"result": "success"}) == 1


def test_console_exporter_prints_the_span():
    out = io.StringIO()
    tracing = Tracing.from_env({"OTEL_TRACES_EXPORTER": "console"}, console_out=out)
    with tracing.server_span(Rpc.DECIDE, FakeContext(("traceparent", SAMPLED))) as span:
        annotate_decision(span, REQUEST, decision())
    tracing.shutdown()
    assert '"decider.endpoint.id": "e1"' in out.getvalue()
    assert TRACE_ID in out.getvalue()


# --------------------------------------------------------------------------- over the wire


def test_spans_reach_a_real_otlp_collector_with_the_gateway_trace_id():
    with OtlpReceiver() as receiver:
        tracing = Tracing.from_env(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_HEADERS": "x-collector-tenant=decider-tests",
                "OTEL_SERVICE_NAME": "decider-test",
                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci",
            }
        )
        try:
            with tracing.server_span(Rpc.DECIDE, FakeContext(("traceparent", UNSAMPLED))):
                pass
            context = FakeContext(("traceparent", SAMPLED), code=None)
            with tracing.server_span(Rpc.DECIDE, context) as span:
                annotate_decision(span, REQUEST, decision())
            assert tracing.force_flush(10.0)
            (received,) = receiver.wait_for_spans(1, timeout_s=10.0)
        finally:
            tracing.shutdown()
    assert received.trace_id == TRACE_ID
    assert received.parent_span_id == PARENT_ID
    assert received.name == "decider.v1.DeciderService/Decide"
    assert received.kind == 2  # SPAN_KIND_SERVER
    assert received.scope == "decider"
    assert received.resource["service.name"] == "decider-test"
    assert received.resource["deployment.environment"] == "ci"
    attributes = received.attributes
    assert attributes["decider.endpoint.id"] == "e1"
    assert attributes["decider.fallback.ids"] == ["e2", "e3"]
    assert attributes["decider.skipped.unhealthy"] == 1
    assert attributes["decider.score.cache"] == 1.0
    assert attributes["decider.prefix_hash.count"] == 4
    assert attributes["decider.affinity_hit"] is True
    assert attributes["rpc.grpc.status_code"] == 0
    assert receiver.export_metadata[0]["x-collector-tenant"] == "decider-tests"


# --------------------------------------------------------------------------- real grpc.aio


class _Servicer:
    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    @traced(Rpc.DECIDE)
    async def ok(self, request, context):
        annotate_decision(trace.get_current_span(), REQUEST, decision())
        return b"ok"

    @traced(Rpc.REPORT_OUTCOME)
    async def refuse(self, request, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy endpoint")

    @traced_stream(Rpc.WATCH_HEALTH)
    async def watch(self, request, context):
        for i in range(3):
            yield b"%d" % i


async def test_traced_methods_on_a_real_aio_server():
    tracing, exporter = in_memory()
    servicer = _Servicer(tracing)
    handler = grpc.method_handlers_generic_handler(
        "t.Test",
        {
            "Ok": grpc.unary_unary_rpc_method_handler(servicer.ok),
            "Refuse": grpc.unary_unary_rpc_method_handler(servicer.refuse),
            "Watch": grpc.unary_stream_rpc_method_handler(servicer.watch),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            metadata = (("traceparent", SAMPLED),)
            ok_call: Any = channel.unary_unary("/t.Test/Ok")
            refuse_call: Any = channel.unary_unary("/t.Test/Refuse")
            assert await ok_call(b"", metadata=metadata) == b"ok"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await refuse_call(b"", metadata=metadata)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            watch_call: Any = channel.unary_stream("/t.Test/Watch")
            assert [m async for m in watch_call(b"", metadata=metadata)] == [b"0", b"1", b"2"]
            for _ in range(100):  # the server ends the stream's span just after the last message
                if len(exporter.get_finished_spans()) == 3:
                    break
                await asyncio.sleep(0.02)
    finally:
        await server.stop(None)
    ok, refused, watch = exporter.get_finished_spans()
    assert watch.name == "decider.v1.DeciderService/WatchHealth"
    assert watch.attributes is not None and watch.attributes["rpc.grpc.status_code"] == 0
    assert format(watch.context.trace_id, "032x") == TRACE_ID
    assert format(ok.context.trace_id, "032x") == TRACE_ID
    assert ok.attributes is not None and ok.attributes["decider.endpoint.id"] == "e1"
    assert ok.attributes["rpc.grpc.status_code"] == 0
    assert refused.attributes is not None and refused.attributes["rpc.grpc.status_code"] == 14
    assert refused.status.status_code is StatusCode.ERROR
    assert not any(e.name == "exception" for e in refused.events)


class _StreamServicer:
    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    @traced_stream(Rpc.WATCH_HEALTH)
    async def watch(self, request, context):
        assert trace.get_current_span() is trace.INVALID_SPAN  # streams are not made current
        for i in range(10):
            yield i


async def test_a_stream_closed_early_is_not_an_error():
    tracing, exporter = in_memory()
    stream = _StreamServicer(tracing).watch(None, FakeContext(("traceparent", SAMPLED)))
    assert [await anext(stream), await anext(stream)] == [0, 1]
    await stream.aclose()
    (finished,) = exporter.get_finished_spans()
    assert finished.attributes is not None and finished.attributes["rpc.grpc.status_code"] == 0
    assert finished.status.status_code is StatusCode.UNSET
    assert not finished.events


def test_the_export_queue_is_bounded_and_counts_what_it_drops():
    release = threading.Event()

    class StuckExporter(SpanExporter):
        def __init__(self) -> None:
            self.exported = 0

        def export(self, spans):
            release.wait(10)
            self.exported += len(spans)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            release.set()

    exporter = StuckExporter()
    processor = BoundedSpanProcessor(exporter, max_queue_size=4)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    for _ in range(10):
        tracer.start_span("s").end()
    usage = processor.usage()
    assert usage.limit == 4 and usage.entries == 4 and usage.evicted == 6
    release.set()
    processor.force_flush()
    assert exporter.exported == 4
    assert processor.usage().entries == 0
    provider.shutdown()


def test_otlp_export_goes_through_the_bounded_processor():
    tracing = Tracing.from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_BSP_MAX_QUEUE_SIZE": "16"}
    )
    try:
        assert tracing.state_usage() == {"span_queue": StateUsage(entries=0, limit=16, evicted=0)}
    finally:
        tracing.shutdown()
