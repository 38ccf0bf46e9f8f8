"""OpenTelemetry tracing: setup from the standard OTEL_* environment, the one server span per
RPC, and the `decider.*` span attribute names (defined here, documented in docs/OBSERVABILITY.md).

The hot path is `Tracing.server_span`: with tracing off it returns a shared no-op scope; with
tracing on but the span not sampled it builds no attributes. `annotate_*` return at once for a
span that is not recording. Nothing here imports grpc: the servicer context is a Protocol.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import sys
import threading
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Protocol, TextIO, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    INVALID_SPAN,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from decider.core.model import Decision, Outcome, Refusal, RouteRequest, StateUsage
from decider.errors import ConfigError
from decider.obs.logs import log_decision
from decider.obs.metrics import Metrics

__all__ = [
    "Attr",
    "Rpc",
    "ServerContext",
    "TelemetryObserver",
    "Tracing",
    "TracingSettings",
    "annotate_decision",
    "annotate_endpoint",
    "annotate_outcome",
    "extract_parent",
    "traced",
    "traced_stream",
]

SCOPE_NAME: Final = "decider"


class Rpc:
    """Span names: the full gRPC method name without the leading slash (OpenTelemetry RPC
    conventions: `$package.$service/$method`)."""

    DECIDE: Final = "decider.v1.DeciderService/Decide"
    # One span per stream (not per message): its decisions show in the metrics.
    DECIDE_STREAM: Final = "decider.v1.DeciderService/DecideStream"
    REPORT_OUTCOME: Final = "decider.v1.DeciderService/ReportOutcome"
    WATCH_HEALTH: Final = "decider.v1.DeciderService/WatchHealth"
    REGISTER_ENDPOINT: Final = "decider.v1.RegistryService/RegisterEndpoint"
    DEREGISTER_ENDPOINT: Final = "decider.v1.RegistryService/DeregisterEndpoint"
    LIST_ENDPOINTS: Final = "decider.v1.RegistryService/ListEndpoints"
    REPORT_PROBE_RESULTS: Final = "decider.v1.RegistryService/ReportProbeResults"


class Attr:
    """Every span attribute Decider sets. Standard `rpc.*` names follow the OpenTelemetry RPC
    conventions; everything Decider-specific lives under `decider.`."""

    RPC_SYSTEM: Final = "rpc.system"
    RPC_SERVICE: Final = "rpc.service"
    RPC_METHOD: Final = "rpc.method"
    RPC_GRPC_STATUS_CODE: Final = "rpc.grpc.status_code"

    REQUEST_ID: Final = "decider.request_id"
    MODEL: Final = "decider.model"
    TENANT: Final = "decider.tenant"
    STRATEGY_REQUESTED: Final = "decider.strategy.requested"
    STRATEGY: Final = "decider.strategy"
    EXPLAIN: Final = "decider.explain"
    REQUIRED_CAPABILITIES: Final = "decider.required_capabilities"
    ESTIMATED_INPUT_TOKENS: Final = "decider.estimated_input_tokens"
    # Prompt prefix hashes are counted, never recorded.
    PREFIX_HASH_COUNT: Final = "decider.prefix_hash.count"
    EXCLUDED_COUNT: Final = "decider.excluded.count"

    RESULT: Final = "decider.result"
    DECISION_ID: Final = "decider.decision_id"
    ENDPOINT_ID: Final = "decider.endpoint.id"
    ENDPOINT_ADDRESS: Final = "decider.endpoint.address"
    ENDPOINT_MODEL: Final = "decider.endpoint.model"
    FALLBACK_IDS: Final = "decider.fallback.ids"
    FALLBACK_COUNT: Final = "decider.fallback.count"
    CANDIDATE_COUNT: Final = "decider.candidate.count"
    REGISTERED_COUNT: Final = "decider.registered.count"
    SKIPPED_TOTAL: Final = "decider.skipped.total"
    # One attribute per skip reason: decider.skipped.unhealthy, decider.skipped.breaker_open, ...
    SKIPPED_PREFIX: Final = "decider.skipped."
    # One attribute per scoring factor: decider.score.load, decider.score.latency, ...
    SCORE_PREFIX: Final = "decider.score."
    AFFINITY_HIT: Final = "decider.affinity_hit"
    REASON: Final = "decider.reason"
    RETRY_AFTER_S: Final = "decider.retry_after_s"
    QUOTA_SUBJECTS: Final = "decider.quota.subjects"

    OUTCOME_RESULT: Final = "decider.outcome.result"
    OUTCOME_LATENCY_S: Final = "decider.outcome.latency_s"
    OUTCOME_TTFT_S: Final = "decider.outcome.ttft_s"
    OUTCOME_INPUT_TOKENS: Final = "decider.outcome.input_tokens"
    OUTCOME_OUTPUT_TOKENS: Final = "decider.outcome.output_tokens"
    OUTCOME_DECISION_FOUND: Final = "decider.outcome.decision_found"


# Result values for decider.result (and the metrics' result label).
RESULT_OK: Final = "ok"
RESULT_EXPLAIN: Final = "explain"

# Server span status per the OpenTelemetry gRPC conventions: only these codes are errors.
_SERVER_ERROR_CODES: Final = frozenset({2, 4, 12, 13, 14, 15})
_GRPC_OK: Final = 0
_GRPC_CANCELLED: Final = 1
_GRPC_UNKNOWN: Final = 2


class ServerContext(Protocol):
    """The part of grpc.aio.ServicerContext a server span needs."""

    def invocation_metadata(self) -> Any: ...

    def code(self) -> Any: ...


# --------------------------------------------------------------------------- configuration

_EXPORTERS: Final = ("otlp", "console", "none")
_SAMPLERS: Final = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
_DEFAULT_SAMPLER: Final = "parentbased_always_on"
_DEFAULT_OTLP_ENDPOINT: Final = "http://localhost:4317"
# TraceIdRatioBased compares the low 64 bits of the trace id (OpenTelemetry SDK spec).
_TRACE_ID_LIMIT: Final = TraceIdRatioBased.TRACE_ID_LIMIT


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingSettings:
    """Tracing settings read from OTEL_* variables; `parse` validates every value once."""

    service_name: str = "decider"
    resource_attributes: Mapping[str, str] = field(default_factory=dict)
    exporters: tuple[str, ...] = ()
    otlp_endpoint: str = ""
    otlp_insecure: bool | None = None
    otlp_headers: str = ""
    sampler: str = _DEFAULT_SAMPLER
    sampler_arg: float = 1.0
    # Ended spans waiting for export (OTEL_BSP_MAX_QUEUE_SIZE); past it new spans are dropped,
    # and counted, until the exporter catches up.
    max_queue_size: int = 2048

    @property
    def enabled(self) -> bool:
        return bool(self.exporters)

    @classmethod
    def parse(cls, env: Mapping[str, str]) -> TracingSettings:
        def get(name: str) -> str:
            return env.get(name, "").strip()

        if get("OTEL_SDK_DISABLED").lower() == "true":
            return cls(service_name=get("OTEL_SERVICE_NAME") or "decider")

        endpoint = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or get("OTEL_EXPORTER_OTLP_ENDPOINT")
        raw_exporters = get("OTEL_TRACES_EXPORTER").lower()
        if raw_exporters:
            names = [n.strip() for n in raw_exporters.split(",") if n.strip()]
            for name in names:
                if name not in _EXPORTERS:
                    raise ConfigError(
                        f"OTEL_TRACES_EXPORTER: {name!r}, must be one of {', '.join(_EXPORTERS)}"
                    )
            exporters = () if "none" in names else tuple(dict.fromkeys(names))
        else:
            # Unlike the SDK default (otlp to localhost), export only when told where to.
            exporters = ("otlp",) if endpoint else ()

        if "otlp" in exporters:
            for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
                protocol = get(var)
                if protocol:
                    if protocol != "grpc":
                        raise ConfigError(f"{var}: {protocol!r}, only 'grpc' is supported")
                    break
            endpoint = endpoint or _DEFAULT_OTLP_ENDPOINT

        insecure: bool | None = None
        for var in ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"):
            value = get(var).lower()
            if value:
                if value not in ("true", "false"):
                    raise ConfigError(f"{var}: {value!r}, must be true or false")
                insecure = value == "true"
                break

        sampler = get("OTEL_TRACES_SAMPLER").lower() or _DEFAULT_SAMPLER
        if sampler not in _SAMPLERS:
            raise ConfigError(
                f"OTEL_TRACES_SAMPLER: {sampler!r}, must be one of {', '.join(_SAMPLERS)}"
            )
        sampler_arg = 1.0
        raw_arg = get("OTEL_TRACES_SAMPLER_ARG")
        if raw_arg and sampler.endswith("traceidratio"):
            try:
                sampler_arg = float(raw_arg)
            except ValueError:
                sampler_arg = -1.0
            if not 0.0 <= sampler_arg <= 1.0:
                raise ConfigError(
                    f"OTEL_TRACES_SAMPLER_ARG: {raw_arg!r}, must be a number from 0 to 1"
                )

        max_queue_size = 2048
        raw_queue = get("OTEL_BSP_MAX_QUEUE_SIZE")
        if raw_queue:
            try:
                max_queue_size = int(raw_queue)
            except ValueError:
                max_queue_size = 0
            if not 1 <= max_queue_size <= 1_000_000:
                raise ConfigError(
                    f"OTEL_BSP_MAX_QUEUE_SIZE: {raw_queue!r}, must be an integer from 1 to 1000000"
                )

        resource = _parse_resource_attributes(get("OTEL_RESOURCE_ATTRIBUTES"))
        service_name = get("OTEL_SERVICE_NAME") or resource.get("service.name") or "decider"
        return cls(
            service_name=service_name,
            resource_attributes=resource,
            exporters=exporters,
            otlp_endpoint=endpoint if "otlp" in exporters else "",
            otlp_insecure=insecure,
            otlp_headers=get("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            or get("OTEL_EXPORTER_OTLP_HEADERS"),
            sampler=sampler,
            max_queue_size=max_queue_size,
            sampler_arg=sampler_arg,
        )

    def build_sampler(self) -> Sampler:
        ratio = TraceIdRatioBased(self.sampler_arg)
        table: dict[str, Sampler] = {
            "always_on": ALWAYS_ON,
            "always_off": ALWAYS_OFF,
            "traceidratio": ratio,
            "parentbased_always_on": ParentBased(ALWAYS_ON),
            "parentbased_always_off": ParentBased(ALWAYS_OFF),
            "parentbased_traceidratio": ParentBased(ratio),
        }
        return table[self.sampler]

    def sample_bound(self) -> int:
        """Root spans are sampled when the low 64 bits of the trace id are below this."""
        if self.sampler.endswith("always_on"):
            return _TRACE_ID_LIMIT + 1
        if self.sampler.endswith("always_off"):
            return 0
        return TraceIdRatioBased.get_bound_for_rate(self.sampler_arg)

    def describe(self) -> str:
        """One line for the startup log."""
        if not self.enabled:
            return "tracing off"
        sinks = [f"otlp {self.otlp_endpoint}" if e == "otlp" else e for e in self.exporters]
        sampler = self.sampler
        if sampler.endswith("traceidratio"):
            sampler += f"({self.sampler_arg:g})"
        return f"tracing to {', '.join(sinks)}, sampler {sampler}, service {self.service_name}"


def _parse_resource_attributes(raw: str) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES: comma-separated key=value pairs, values percent-encoded."""
    attributes: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"OTEL_RESOURCE_ATTRIBUTES: {item!r}, must be key=value")
        attributes[key.strip()] = urllib.parse.unquote(value.strip())
    return attributes


# --------------------------------------------------------------------------- propagation

_EMPTY_CONTEXT: Final = otel_context.Context()
_W3C: Final = TraceContextTextMapPropagator()
_NOT_SAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)


class _MetadataGetter(Getter[Iterable[tuple[str, Any]]]):
    """gRPC metadata as a carrier. A repeated traceparent reads as absent: the W3C specification
    says to start a new trace then, where the propagator alone would take the first."""

    def get(self, carrier: Iterable[tuple[str, Any]], key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        if key == "traceparent" and len(values) != 1:
            return None
        return values or None

    def keys(self, carrier: Iterable[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


_METADATA_GETTER: Final = _MetadataGetter()


def extract_parent(metadata: Sequence[tuple[str, Any]] | None) -> SpanContext | None:
    """The caller's span context from W3C `traceparent`/`tracestate` gRPC metadata, or None
    (opentelemetry's TraceContextTextMapPropagator reads it). An invalid or repeated traceparent
    is ignored, so the span starts a new trace."""
    if not metadata:
        return None
    context = _W3C.extract(metadata, _EMPTY_CONTEXT, getter=_METADATA_GETTER)
    parent = trace.get_current_span(context).get_span_context()
    return parent if parent.is_valid else None


# --------------------------------------------------------------------------- server spans


def _status_int(code: object) -> int | None:
    """grpc.StatusCode (value `(int, str)`), a plain int, or None when no status was set."""
    if code is None:
        return None
    value = getattr(code, "value", code)
    if isinstance(value, tuple):
        value = value[0]
    return value if isinstance(value, int) else None


class _NoopScope:
    """Returned when tracing is off (nothing read) or for an unsampled call with no caller
    trace: no context change, no allocation."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


_NOOP_SCOPE: Final = _NoopScope()


class _ServerScope:
    """Makes the span current for the call, then records the gRPC status and ends it."""

    __slots__ = ("_activate", "_context", "_span", "_token")

    def __init__(self, span: Span, context: ServerContext, *, activate: bool) -> None:
        self._span = span
        self._context = context
        self._activate = activate
        self._token: contextvars.Token[otel_context.Context] | None = None

    def __enter__(self) -> Span:
        if self._activate:
            self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
        span = self._span
        if not span.is_recording():
            return
        # Whatever set the status (context.abort, set_code) is the truth; an exception with
        # no status set is what grpc reports as UNKNOWN.
        code = _status_int(self._context.code())
        if exc is not None and code is None:
            if isinstance(exc, asyncio.CancelledError):
                code = _GRPC_CANCELLED
            elif isinstance(exc, GeneratorExit):
                # A stream closed by its consumer (server shutdown): not a failure.
                pass
            else:
                span.record_exception(exc)
                code = _GRPC_UNKNOWN
        if code is None:
            code = _GRPC_OK
        span.set_attribute(Attr.RPC_GRPC_STATUS_CODE, code)
        if code in _SERVER_ERROR_CODES:
            span.set_status(Status(StatusCode.ERROR))
        span.end()


class _PresetIdGenerator(RandomIdGenerator):
    """Random ids, except that the next trace id can be chosen (per thread) before a span
    starts, so the SDK's sampler sees the trace id Decider's pre-check already sampled."""

    def __init__(self) -> None:
        self._next = threading.local()

    def preset(self, trace_id: int) -> None:
        self._next.trace_id = trace_id

    def generate_trace_id(self) -> int:
        trace_id: int = getattr(self._next, "trace_id", 0)
        if trace_id:
            self._next.trace_id = 0
            return trace_id
        return super().generate_trace_id()


class Tracing:
    """The process's tracer provider and the server-span factory the servicers call.

    Build it once at startup with `Tracing.from_env()`; `Tracing.disabled()` costs nothing.
    """

    __slots__ = (
        "_base_attributes",
        "_bound",
        "_bounded",
        "_ids",
        "_parent_based",
        "_provider",
        "_settings",
        "_tracer",
    )

    def __init__(self, settings: TracingSettings, provider: TracerProvider | None) -> None:
        """`provider` must be built with a `_PresetIdGenerator`; from_env does that."""
        self._settings = settings
        self._provider = provider
        self._bounded: tuple[BoundedSpanProcessor, ...] = ()
        self._tracer: trace.Tracer | None = None
        self._ids = _PresetIdGenerator()
        if provider is not None:
            if not isinstance(provider.id_generator, _PresetIdGenerator):
                raise TypeError("the TracerProvider must use decider's id generator")
            self._tracer = provider.get_tracer(SCOPE_NAME)
            self._ids = provider.id_generator
        # What settings.build_sampler() decides, as data: parent-based samplers follow the
        # caller's sampled flag; otherwise (and for roots) trace ids below the bound are kept.
        self._parent_based = settings.sampler.startswith("parentbased_")
        self._bound = settings.sample_bound()
        self._base_attributes: dict[str, dict[str, str]] = {}

    @classmethod
    def disabled(cls) -> Tracing:
        return cls(TracingSettings(), None)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        processor: SpanProcessor | None = None,
        console_out: TextIO | None = None,
        install_global: bool = False,
    ) -> Tracing:
        """Reads OTEL_* from `env` (default os.environ); raises ConfigError on a bad value.

        `processor`, when given, replaces the exporters OTEL_TRACES_EXPORTER names (tests,
        benchmarks); sampler and resource still come from `env`. `install_global` makes the
        provider the process-wide one, so libraries that trace join Decider's traces.
        """
        settings = TracingSettings.parse(os.environ if env is None else env)
        processors: list[SpanProcessor] = []
        if processor is not None:
            processors.append(processor)
        else:
            for name in settings.exporters:
                processors.append(_processor_for(name, settings, console_out))
        if not processors:
            return cls(settings, None)
        resource = Resource.create(
            {**settings.resource_attributes, "service.name": settings.service_name}
        )
        provider = TracerProvider(
            sampler=settings.build_sampler(), resource=resource, id_generator=_PresetIdGenerator()
        )
        for p in processors:
            provider.add_span_processor(p)
        if install_global:
            trace.set_tracer_provider(provider)
        tracing = cls(settings, provider)
        tracing._bounded = tuple(p for p in processors if isinstance(p, BoundedSpanProcessor))
        return tracing

    def state_usage(self) -> dict[str, StateUsage]:
        """The export queue's fill, bound and dropped spans (empty when nothing is exported)."""
        if not self._bounded:
            return {}
        usages = [p.usage() for p in self._bounded]
        return {
            "span_queue": StateUsage(
                entries=sum(u.entries for u in usages),
                limit=sum(u.limit for u in usages),
                evicted=sum(u.evicted for u in usages),
            )
        }

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @property
    def settings(self) -> TracingSettings:
        return self._settings

    def server_span(
        self, rpc: str, context: ServerContext, *, activate: bool = True
    ) -> _ServerScope | _NoopScope:
        """A context manager around one RPC: `with tracing.server_span(Rpc.DECIDE, context)
        as span:`. It continues the caller's W3C trace, makes the span current (so
        `trace.get_current_span()` and the logs see it) unless `activate` is false, and on exit
        sets `rpc.grpc.status_code` from `context.code()` and ends the span.
        """
        tracer = self._tracer
        if tracer is None:
            return _NOOP_SCOPE
        # The sampling decision is made here, from the trace id and the caller's flag exactly
        # as the configured built-in sampler makes it, so an unsampled call never enters the
        # SDK's start_span. For a sampled root the trace id
        # is preset, so the SDK's own sampler sees the same id and agrees.
        parent = extract_parent(context.invocation_metadata())
        if parent is None:
            trace_id = self._ids.generate_trace_id()
            if (trace_id & _TRACE_ID_LIMIT) >= self._bound:
                # No caller trace and not sampled: there is no trace to correlate with, so
                # nothing is made current (logs of this call carry no trace id).
                return _NOOP_SCOPE
            self._ids.preset(trace_id)
            parent_context = _EMPTY_CONTEXT
        else:
            if self._parent_based:
                sampled = parent.trace_flags.sampled
            else:
                sampled = (parent.trace_id & _TRACE_ID_LIMIT) < self._bound
            if not sampled:
                if parent.trace_flags.sampled:
                    parent = SpanContext(
                        parent.trace_id,
                        parent.span_id,
                        is_remote=True,
                        trace_flags=_NOT_SAMPLED,
                        trace_state=parent.trace_state,
                    )
                return _ServerScope(NonRecordingSpan(parent), context, activate=activate)
            parent_context = trace.set_span_in_context(NonRecordingSpan(parent), _EMPTY_CONTEXT)
        attributes = self._base_attributes.get(rpc)
        if attributes is None:
            attributes = self._base_attributes[rpc] = _rpc_attributes(rpc)
        span = tracer.start_span(
            rpc, context=parent_context, kind=SpanKind.SERVER, attributes=attributes
        )
        return _ServerScope(span, context, activate=activate)

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        if self._provider is None:
            return True
        return self._provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Flushes and stops the exporters; call once, at the end of server shutdown."""
        if self._provider is not None:
            self._provider.shutdown()


def _rpc_attributes(rpc: str) -> dict[str, str]:
    service, _, method = rpc.rpartition("/")
    return {Attr.RPC_SYSTEM: "grpc", Attr.RPC_SERVICE: service, Attr.RPC_METHOD: method}


def _processor_for(name: str, settings: TracingSettings, out: TextIO | None) -> SpanProcessor:
    if name == "console":
        # Synchronous on purpose: local debugging wants each span printed as it ends.
        return SimpleSpanProcessor(ConsoleSpanExporter(out=out or sys.stdout))
    # Imported here so a process that never exports over OTLP never loads its gRPC client.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    exporter: SpanExporter = OTLPSpanExporter(
        endpoint=settings.otlp_endpoint,
        insecure=settings.otlp_insecure,
        headers=settings.otlp_headers or None,
    )
    return BoundedSpanProcessor(exporter, max_queue_size=settings.max_queue_size)


class _CountingExporter(SpanExporter):
    """Counts the spans handed to the exporter, exported or not (they have left the queue)."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner
        self.done = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            return self._inner.export(spans)
        finally:
            self.done += len(spans)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class BoundedSpanProcessor(SpanProcessor):
    """The SDK's BatchSpanProcessor, with its queue bound kept here so that what it drops is
    counted: a sampled span that ends while `max_queue_size` spans wait for export is dropped
    (the newest, where the SDK drops silently). The batch exporter empties the queue every
    OTEL_BSP_SCHEDULE_DELAY (5 s) or when a batch is full: the bound in time."""

    def __init__(self, exporter: SpanExporter, *, max_queue_size: int) -> None:
        self._exporter = _CountingExporter(exporter)
        # The SDK wants a batch no bigger than the queue (its default batch is 512 spans).
        self._inner = BatchSpanProcessor(
            self._exporter,
            max_queue_size=max_queue_size,
            max_export_batch_size=max_queue_size if max_queue_size < 512 else None,
        )
        self._max = max_queue_size
        # on_end runs on the event loop; `done` moves on the exporter's thread (plain ints).
        self._accepted = 0
        self.evicted = 0

    def on_start(self, span: SdkSpan, parent_context: otel_context.Context | None = None) -> None:
        self._inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        if self._accepted - self._exporter.done >= self._max:
            self.evicted += 1
            return
        self._accepted += 1
        self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def usage(self) -> StateUsage:
        waiting = max(0, self._accepted - self._exporter.done)
        return StateUsage(entries=waiting, limit=self._max, evicted=self.evicted)


_M = TypeVar("_M", bound=Callable[..., Awaitable[Any]])


def traced(rpc: str) -> Callable[[_M], _M]:
    """Decorates a unary servicer method `(self, request, context)` with a server span.

    The servicer provides `self.tracing: Tracing`. Put it outermost (above any decorator that
    turns exceptions into statuses) so the span sees the final status.
    """

    def decorate(method: _M) -> _M:
        @functools.wraps(method)
        async def wrapper(self: Any, request: Any, context: ServerContext) -> Any:
            tracing: Tracing = self.tracing
            if tracing._tracer is None:
                # Tracing off: not even a no-op scope (this runs on every Decide).
                return await method(self, request, context)
            with tracing.server_span(rpc, context):
                return await method(self, request, context)

        return wrapper  # type: ignore[return-value]

    return decorate


_G = TypeVar("_G", bound=Callable[..., AsyncIterator[Any]])


def traced_stream(rpc: str) -> Callable[[_G], _G]:
    """`traced` for a server-streaming method (an async generator), such as WatchHealth.

    The span covers the whole stream but is not made current: an async generator resumes in
    whatever context its consumer runs in, so attaching across yields is unsafe.
    """

    def decorate(method: _G) -> _G:
        @functools.wraps(method)
        async def wrapper(self: Any, request: Any, context: ServerContext) -> AsyncIterator[Any]:
            with self.tracing.server_span(rpc, context, activate=False):
                async for item in method(self, request, context):
                    yield item

        return wrapper  # type: ignore[return-value]

    return decorate


# --------------------------------------------------------------------------- annotations

_AttributeValue = str | bool | int | float | list[str]


def annotate_decision(span: Span, request: RouteRequest, result: Decision | Refusal) -> None:
    """Sets the decision's `decider.*` attributes; does nothing for an unsampled span."""
    if not span.is_recording():
        return
    attributes: dict[str, _AttributeValue] = {
        Attr.MODEL: request.model,
        Attr.PREFIX_HASH_COUNT: len(request.prefix_hashes),
        Attr.EXCLUDED_COUNT: len(request.exclude_endpoint_ids),
        Attr.ESTIMATED_INPUT_TOKENS: request.estimated_input_tokens,
        Attr.EXPLAIN: request.explain,
    }
    if request.request_id:
        attributes[Attr.REQUEST_ID] = request.request_id
    if request.tenant:
        attributes[Attr.TENANT] = request.tenant
    if request.strategy:
        attributes[Attr.STRATEGY_REQUESTED] = request.strategy
    if request.required_capabilities:
        attributes[Attr.REQUIRED_CAPABILITIES] = sorted(request.required_capabilities)
    if isinstance(result, Decision):
        attributes[Attr.RESULT] = RESULT_EXPLAIN if request.explain else RESULT_OK
        attributes[Attr.DECISION_ID] = result.decision_id
        attributes[Attr.STRATEGY] = result.strategy
        attributes[Attr.ENDPOINT_ID] = result.endpoint.id
        attributes[Attr.ENDPOINT_ADDRESS] = result.endpoint.address
        if result.endpoint.model != request.model:
            attributes[Attr.ENDPOINT_MODEL] = result.endpoint.model
        attributes[Attr.FALLBACK_IDS] = [e.id for e in result.fallbacks]
        attributes[Attr.FALLBACK_COUNT] = len(result.fallbacks)
        attributes[Attr.CANDIDATE_COUNT] = result.candidate_count
        attributes[Attr.AFFINITY_HIT] = result.affinity_hit
        attributes[Attr.REASON] = result.reason
        for factor, score in result.scores.items():
            attributes[Attr.SCORE_PREFIX + factor] = float(score)
    else:
        attributes[Attr.RESULT] = result.kind.value.lower()
        attributes[Attr.REASON] = result.message
        attributes[Attr.REGISTERED_COUNT] = result.registered
        if result.retry_after_s > 0:
            attributes[Attr.RETRY_AFTER_S] = result.retry_after_s
        if result.violations:
            attributes[Attr.QUOTA_SUBJECTS] = [v.subject for v in result.violations]
    skipped = result.skipped
    for reason, count in skipped.items():
        attributes[Attr.SKIPPED_PREFIX + reason] = count
    attributes[Attr.SKIPPED_TOTAL] = sum(skipped.values())
    span.set_attributes(attributes)


def annotate_outcome(span: Span, outcome: Outcome, *, decision_found: bool) -> None:
    """Sets the reported outcome's `decider.*` attributes; nothing for an unsampled span."""
    if not span.is_recording():
        return
    attributes: dict[str, _AttributeValue] = {
        Attr.DECISION_ID: outcome.decision_id,
        Attr.ENDPOINT_ID: outcome.endpoint_id,
        Attr.OUTCOME_RESULT: outcome.result.name.lower(),
        Attr.OUTCOME_LATENCY_S: outcome.latency_s,
        Attr.OUTCOME_INPUT_TOKENS: outcome.input_tokens,
        Attr.OUTCOME_OUTPUT_TOKENS: outcome.output_tokens,
        Attr.OUTCOME_DECISION_FOUND: decision_found,
    }
    if outcome.ttft_s > 0:
        attributes[Attr.OUTCOME_TTFT_S] = outcome.ttft_s
    span.set_attributes(attributes)


def annotate_endpoint(span: Span, endpoint_id: str, *, model: str = "") -> None:
    """For admin calls: the endpoint registered, deregistered or listed (model only)."""
    if not span.is_recording():
        return
    if endpoint_id:
        span.set_attribute(Attr.ENDPOINT_ID, endpoint_id)
    if model:
        span.set_attribute(Attr.MODEL, model)


# --------------------------------------------------------------------------- observer


class TelemetryObserver:
    """The servicers' Observer (decider.api.ports): annotates the current server span, bumps
    the metrics and, when asked for, logs the decision. Cheap and never raises on purpose."""

    __slots__ = ("_annotate", "_metrics")

    def __init__(self, metrics: Metrics | None = None, *, annotate_spans: bool = True) -> None:
        self._metrics = metrics
        # False when tracing is off: there is never a span to annotate, so skip looking.
        self._annotate = annotate_spans

    def decided(
        self, request: RouteRequest, result: Decision | Refusal, *, elapsed_s: float
    ) -> None:
        if self._annotate:
            annotate_decision(trace.get_current_span(), request, result)
        if self._metrics is not None:
            self._metrics.record_decision(request, result, elapsed_s)
        log_decision(request, result, elapsed_s=elapsed_s)

    def decide_rejected(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.record_decision_error(reason)

    def outcome_reported(self, outcome: Outcome, *, decision_found: bool) -> None:
        if self._annotate:
            annotate_outcome(trace.get_current_span(), outcome, decision_found=decision_found)
        if self._metrics is not None:
            self._metrics.record_outcome(
                outcome.result,
                decision_found=decision_found,
                endpoint_id=outcome.endpoint_id,
                latency_s=outcome.latency_s,
            )
