"""ExtProcService.Process over a fake stream: one span per HTTP request carrying the decision
and the outcome, the same metrics as Decide, and never the prompt in spans, logs or errors."""

from __future__ import annotations

import json
import logging
import random

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from decider.api.decide_path import DecidePath
from decider.api.extproc.service import SPAN_NAME, ExtProcService
from decider.config.extproc import ExtProcSettings
from decider.core.engine import Engine
from decider.core.model import Endpoint
from decider.core.settings import EngineSettings
from decider.obs import logs
from decider.obs.metrics import Metrics
from decider.obs.telemetry import TelemetryObserver, Tracing

SECRET = "the launch code is 0000"
Mode = processing_mode_pb2.ProcessingMode


class FakeContext:
    """The part of grpc.aio's servicer context Process uses: read, write, metadata, code."""

    def __init__(
        self, messages: list[pb.ProcessingRequest], metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._messages = list(messages)
        self._metadata = metadata
        self.written: list[pb.ProcessingResponse] = []

    async def read(self):
        return self._messages.pop(0) if self._messages else grpc.aio.EOF

    def invocation_metadata(self):
        return self._metadata

    def code(self):
        return None

    async def write(self, message: pb.ProcessingResponse) -> None:
        self.written.append(message)


async def no_iterator():
    raise AssertionError("Process reads with context.read()")
    yield


def header_map(values: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
    )


def exchange(body: bytes) -> list[pb.ProcessingRequest]:
    return [
        pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(headers=header_map({"x-request-id": "r-1"})),
            protocol_config=pb.ProtocolConfiguration(
                request_body_mode=Mode.BUFFERED, response_body_mode=Mode.STREAMED
            ),
        ),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
        pb.ProcessingRequest(
            response_headers=pb.HttpHeaders(
                headers=header_map({":status": "200", "content-type": "application/json"})
            )
        ),
        pb.ProcessingRequest(
            response_body=pb.HttpBody(
                body=b'{"usage": {"prompt_tokens": 9, "completion_tokens": 2}}',
                end_of_stream=True,
            )
        ),
    ]


def decisions(metrics: Metrics, **labels: str) -> float:
    total = 0.0
    for family in metrics.registry.collect():
        if family.name == "decider_decisions":
            for sample in family.samples:
                if sample.name.endswith("_total") and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
    return total


def service() -> tuple[ExtProcService, InMemorySpanExporter, Metrics]:
    exporter = InMemorySpanExporter()
    tracing = Tracing.from_env({}, processor=SimpleSpanProcessor(exporter))
    engine = Engine(EngineSettings.parse({}), rng=random.Random(3))
    engine.set_endpoints([Endpoint(id="e0", address="10.0.0.1:8000", model="m")], now=0.0)
    metrics = Metrics()
    path = DecidePath(engine, clock=lambda: 1.0, observer=TelemetryObserver(metrics))
    return ExtProcService(path, ExtProcSettings(), tracing=tracing), exporter, metrics


async def test_one_span_per_request_with_decision_and_outcome_and_no_prompt(caplog):
    handler = logs.configure_logging(level="debug", log_decisions=True)
    try:
        svc, exporter, metrics = service()
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": SECRET}]})
        context = FakeContext(exchange(body.encode()))
        with caplog.at_level(logging.DEBUG):
            await svc.Process(no_iterator(), context)
    finally:
        logging.getLogger().removeHandler(handler)
    [span] = exporter.get_finished_spans()
    assert span.name == SPAN_NAME
    attributes = dict(span.attributes or {})
    assert attributes["decider.endpoint.id"] == "e0"
    assert attributes["decider.request_id"] == "r-1"
    assert attributes["decider.outcome.result"] == "success"
    assert attributes["decider.outcome.input_tokens"] == 9
    assert attributes["decider.prefix_hash.count"] == 0
    assert not any(SECRET in str(v) for v in attributes.values())
    assert any(r.name == "decider.decisions" for r in caplog.records)
    assert not any(SECRET in r.getMessage() or SECRET in str(r.__dict__) for r in caplog.records)
    assert decisions(metrics, model="m", result="ok") == 1
    assert [m.WhichOneof("response") for m in context.written] == [
        "request_headers",
        "request_body",
        "response_headers",
        "response_body",
    ]


async def test_a_malformed_request_is_answered_without_echoing_its_prompt(caplog):
    svc, exporter, metrics = service()
    body = json.dumps({"messages": [{"role": "user", "content": SECRET}]}).encode()
    context = FakeContext(exchange(body))
    with caplog.at_level(logging.DEBUG):
        await svc.Process(no_iterator(), context)
    answer = context.written[-1].immediate_response
    assert answer.status.code == 400
    assert SECRET.encode() not in answer.body
    assert not any(SECRET in r.getMessage() for r in caplog.records)
    [span] = exporter.get_finished_spans()
    assert not any(SECRET in str(v) for v in (span.attributes or {}).values())
    assert decisions(metrics, model="", result="invalid_argument") == 1


async def test_with_an_observer_filter_the_picker_answers_the_request_and_the_observer_nothing():
    svc, exporter, _ = service()
    body = json.dumps({"model": "m", "prompt": "hi"}).encode()
    request_side, response_side = exchange(body)[:2], exchange(body)[2:]
    picker = FakeContext(request_side, metadata=(("x-decider-outcome", "observer"),))
    await svc.Process(no_iterator(), picker)
    [_, answer] = picker.written
    decision = answer.dynamic_metadata.fields["decider"].struct_value.fields
    observed = []
    for message in [request_side[0], *response_side]:
        message = pb.ProcessingRequest.FromString(message.SerializeToString())
        message.ClearField("protocol_config")
        message.observability_mode = True
        for key in ("decision_id", "model", "endpoint"):
            named = message.metadata_context.filter_metadata["decider"].fields[key]
            named.string_value = decision[key].string_value
        observed.append(message)
    # A message after the response's end is never read: the stream is already over.
    observer = FakeContext([*observed, observed[-1]])
    await svc.Process(no_iterator(), observer)
    assert observer.written == []
    assert observer._messages == [observed[-1]]
    picker_span, observer_span = exporter.get_finished_spans()
    assert "decider.outcome.result" not in dict(picker_span.attributes or {})
    assert dict(observer_span.attributes or {})["decider.outcome.input_tokens"] == 9
