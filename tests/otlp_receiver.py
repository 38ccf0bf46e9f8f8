"""A real OTLP/gRPC trace collector for tests: spans arrive over the wire and are kept in order.

with OtlpReceiver() as receiver:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    ...
    spans = receiver.wait_for_spans(1, timeout_s=10)
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


def any_value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    status_code: int
    resource: dict[str, Any]
    scope: str
    trace_state: str
    events: list[str] = field(default_factory=list)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request, context):
        spans = []
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes=attributes(span.attributes),
                            status_code=span.status.code,
                            resource=resource,
                            scope=scope_spans.scope.name,
                            trace_state=span.trace_state,
                            events=[e.name for e in span.events],
                        )
                    )
        self._receiver._add(spans, dict(context.invocation_metadata()))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Serves opentelemetry.proto.collector.trace.v1.TraceService on 127.0.0.1, any free port."""

    def __init__(self) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self), self._server
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._spans: list[ReceivedSpan] = []
        self._metadata: list[dict[str, str]] = []
        self._changed = threading.Condition()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait(5)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _add(self, spans: list[ReceivedSpan], metadata: dict[str, str]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self._metadata.append(metadata)
            self._changed.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    @property
    def export_metadata(self) -> list[dict[str, str]]:
        """gRPC metadata of each Export call (to check OTEL_EXPORTER_OTLP_HEADERS)."""
        with self._changed:
            return list(self._metadata)

    def wait_for_spans(self, count: int, *, timeout_s: float = 10.0) -> list[ReceivedSpan]:
        """Blocks until at least `count` spans arrived; raises TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self._spans) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._spans)} of {count} spans within {timeout_s}s")
                self._changed.wait(left)
            return list(self._spans)
