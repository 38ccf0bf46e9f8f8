"""One HTTP request's ext_proc messages in, the processor's answers out, over a real Engine."""

from __future__ import annotations

import json
import random

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from fakes import FakeClock

from decider.api.decide_path import DecidePath
from decider.api.extproc.service import _Exchange, _Observation
from decider.config.extproc import ExtProcSettings
from decider.core.engine import Engine
from decider.core.model import Endpoint, Outcome, Result
from decider.core.settings import EngineSettings

Mode = processing_mode_pb2.ProcessingMode
ADDRESSES = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]


class Recorder:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.rejected = 0

    def decided(self, request, result, *, elapsed_s) -> None:
        pass

    def decide_rejected(self, reason) -> None:
        self.rejected += 1

    def outcome_reported(self, outcome, *, decision_found) -> None:
        self.outcomes.append(outcome)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def path(clock, recorder):
    settings = EngineSettings.parse(
        {
            "routing": {"default_strategy": "round_robin", "max_fallbacks": 2},
            "quotas": {"tenants": {"tight": {"requests_per_minute": 1}}},
        }
    )
    engine = Engine(settings, rng=random.Random(1))
    engine.set_endpoints(
        [Endpoint(id=f"e{i}", address=a, model="m") for i, a in enumerate(ADDRESSES)],
        now=clock(),
    )
    return DecidePath(engine, clock=clock, observer=recorder)


def headers(*, end: bool = False, mode: int = Mode.BUFFERED, **values: str) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()
                ]
            ),
            end_of_stream=end,
        ),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=mode, response_body_mode=mode),
    )


def body(data: bytes, *, end: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=end))


def response_headers(status: int, served: str, content_type: str = "application/json"):
    values = {":status": str(status), "content-type": content_type}
    if served:
        values["x-gateway-destination-endpoint-served"] = served
    return pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()
                ]
            )
        )
    )


def set_headers(common: pb.CommonResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def destination(answer: pb.ProcessingResponse) -> str:
    return (
        answer.dynamic_metadata.fields["envoy.lb"]
        .struct_value.fields["x-gateway-destination-endpoint"]
        .string_value
    )


CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def test_buffered_mode_answers_the_headers_at_once_and_the_pick_on_the_body(path):
    exchange = _Exchange(path, ExtProcSettings())
    [first] = exchange.handle(headers())
    assert first.WhichOneof("response") == "request_headers"
    assert not first.request_headers.HasField("response")
    [answer] = exchange.handle(body(CHAT, end=True))
    assert answer.WhichOneof("response") == "request_body"
    common = answer.request_body.response
    listed = set_headers(common)["x-gateway-destination-endpoint"]
    assert listed == destination(answer)
    assert len(listed.split(",")) == 3 and set(listed.split(",")) == set(ADDRESSES)
    assert common.clear_route_cache


def test_single_endpoint_mode_names_one_address(path):
    exchange = _Exchange(path, ExtProcSettings(fallbacks=False))
    list(exchange.handle(headers()))
    [answer] = exchange.handle(body(CHAT, end=True))
    assert destination(answer) in ADDRESSES


def test_duplex_mode_answers_after_the_last_chunk_headers_first_then_the_body_back(path):
    exchange = _Exchange(path, ExtProcSettings())
    prompt = json.dumps({"model": "m", "prompt": "z" * 700_000}).encode()
    assert list(exchange.handle(headers(mode=Mode.FULL_DUPLEX_STREAMED))) == []
    assert list(exchange.handle(body(prompt[:1000], end=False))) == []
    answers = list(exchange.handle(body(prompt[1000:], end=True)))
    assert answers[0].WhichOneof("response") == "request_headers"
    assert (
        destination(answers[0])
        == set_headers(answers[0].request_headers.response)["x-gateway-destination-endpoint"]
    )
    pieces = [a.request_body.response.body_mutation.streamed_response for a in answers[1:]]
    assert b"".join(p.body for p in pieces) == prompt
    assert [p.end_of_stream for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert len(pieces) == 3


def test_duplex_mode_echoes_every_response_chunk(path, clock, recorder):
    exchange = _Exchange(path, ExtProcSettings())
    list(exchange.handle(headers(mode=Mode.FULL_DUPLEX_STREAMED)))
    list(exchange.handle(body(CHAT, end=True)))
    list(exchange.handle(response_headers(200, ADDRESSES[1], "text/event-stream")))
    clock.advance(0.2)
    chunks = [b"data: {}\n\n", b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n']
    echoed = []
    for i, chunk in enumerate(chunks):
        [answer] = exchange.handle(
            pb.ProcessingRequest(
                response_body=pb.HttpBody(body=chunk, end_of_stream=i == len(chunks) - 1)
            )
        )
        echoed.append(answer.response_body.response.body_mutation.streamed_response)
    assert [e.body for e in echoed] == chunks
    [outcome] = recorder.outcomes
    assert outcome.endpoint_id == "e1"
    assert (outcome.input_tokens, outcome.output_tokens) == (3, 1)
    assert outcome.ttft_s == pytest.approx(0.2)


def test_the_outcome_is_charged_to_the_endpoint_that_served(path, clock, recorder):
    exchange = _Exchange(path, ExtProcSettings())
    list(exchange.handle(headers()))
    [answer] = exchange.handle(body(CHAT, end=True))
    fallback = destination(answer).split(",")[1]
    clock.advance(0.5)
    [added] = exchange.handle(response_headers(200, fallback))
    served = set_headers(added.response_headers.response)["x-decider-endpoint"]
    assert served == f"e{ADDRESSES.index(fallback)}"
    list(
        exchange.handle(
            pb.ProcessingRequest(response_body=pb.HttpBody(body=b"{}", end_of_stream=True))
        )
    )
    [outcome] = recorder.outcomes
    assert outcome.endpoint_id == served
    assert outcome.result is Result.SUCCESS and outcome.latency_s == 0.5


def test_a_stream_that_ends_before_the_response_is_a_cancelled_outcome(path, recorder):
    exchange = _Exchange(path, ExtProcSettings())
    list(exchange.handle(headers()))
    list(exchange.handle(body(CHAT, end=True)))
    exchange.close()
    [outcome] = recorder.outcomes
    assert outcome.result is Result.CANCELLED


def test_the_subset_hint_limits_the_pick_to_the_addresses_it_lists(path):
    for _ in range(3):
        exchange = _Exchange(path, ExtProcSettings())
        message = headers()
        subset = message.metadata_context.filter_metadata["envoy.lb.subset_hint"]
        subset.fields["x-gateway-destination-endpoint-subset"].list_value.values.add(
            string_value=ADDRESSES[2]
        )
        list(exchange.handle(message))
        [answer] = exchange.handle(body(CHAT, end=True))
        assert destination(answer) == ADDRESSES[2]


def test_a_tenant_over_quota_is_an_immediate_429_with_retry_after(path):
    answers = []
    for _ in range(2):
        exchange = _Exchange(path, ExtProcSettings())
        list(exchange.handle(headers(**{"x-tenant-id": "tight"})))
        [answer] = exchange.handle(body(CHAT, end=True))
        answers.append(answer)
    refused = answers[1].immediate_response
    assert refused.status.code == 429
    values = set_headers(pb.CommonResponse(header_mutation=refused.headers))
    assert int(values["retry-after"]) >= 1
    assert json.loads(refused.body)["error"]["code"] == "quota_exhausted"


def test_streamed_request_bodies_are_refused_naming_the_modes_that_work(path):
    exchange = _Exchange(path, ExtProcSettings())
    [answer] = exchange.handle(headers(mode=Mode.STREAMED))
    assert answer.immediate_response.status.code == 500
    assert b"FULL_DUPLEX_STREAMED" in answer.immediate_response.body
    assert exchange.done


def test_a_bodyless_request_is_decided_from_its_headers(path):
    exchange = _Exchange(path, ExtProcSettings())
    [answer] = exchange.handle(headers(end=True, **{"x-decider-model": "m"}))
    assert destination(answer)
    assert set_headers(answer.request_headers.response)["x-gateway-destination-endpoint"]


def test_a_body_over_the_limit_is_413(path, recorder):
    exchange = _Exchange(path, ExtProcSettings(max_body_bytes=1024))
    list(exchange.handle(headers(mode=Mode.FULL_DUPLEX_STREAMED)))
    [answer] = exchange.handle(body(b"x" * 2000, end=False))
    assert answer.immediate_response.status.code == 413


def test_in_duplex_mode_trailers_can_end_the_request_instead_of_the_body(path):
    exchange = _Exchange(path, ExtProcSettings())
    list(exchange.handle(headers(mode=Mode.FULL_DUPLEX_STREAMED)))
    assert list(exchange.handle(body(CHAT, end=False))) == []
    answers = list(exchange.handle(pb.ProcessingRequest(request_trailers=pb.HttpTrailers())))
    assert [a.WhichOneof("response") for a in answers] == [
        "request_headers",
        "request_body",
        "request_trailers",
    ]
    piece = answers[1].request_body.response.body_mutation.streamed_response
    assert (piece.body, piece.end_of_stream) == (CHAT, False)
    assert destination(answers[0])


def named(answer: pb.ProcessingResponse) -> dict[str, str]:
    fields = answer.dynamic_metadata.fields["decider"].struct_value.fields
    return {k: v.string_value for k, v in fields.items()}


def observed(message: pb.ProcessingRequest, decision: dict[str, str]) -> pb.ProcessingRequest:
    for key, value in decision.items():
        message.metadata_context.filter_metadata["decider"].fields[key].string_value = value
    message.observability_mode = True
    return message


def test_a_picker_whose_outcome_an_observer_reports_names_its_decision_and_reports_nothing(
    path, recorder
):
    exchange = _Exchange(path, ExtProcSettings(), observed=True)
    list(exchange.handle(headers()))
    [answer] = exchange.handle(body(CHAT, end=True))
    decision = named(answer)
    assert decision["model"] == "m" and decision["decision_id"]
    assert decision["endpoint"] == f"e{ADDRESSES.index(destination(answer).split(',')[0])}"
    assert decision["reason"].startswith("round_robin")
    exchange.close()
    assert recorder.outcomes == []
    # Without the marker the same exchange names nothing extra.
    plain = _Exchange(path, ExtProcSettings())
    list(plain.handle(headers()))
    [answer] = plain.handle(body(CHAT, end=True))
    assert "decider" not in answer.dynamic_metadata.fields


def test_an_observation_reports_the_outcome_on_the_endpoint_that_served(path, clock, recorder):
    exchange = _Exchange(path, ExtProcSettings(), observed=True)
    list(exchange.handle(headers()))
    [answer] = exchange.handle(body(CHAT, end=True))
    decision = named(answer)
    fallback = destination(answer).split(",")[1]
    watch = _Observation(path, ExtProcSettings())
    watch.handle(observed(headers(), decision))
    clock.advance(0.5)
    watch.handle(observed(response_headers(200, fallback, "text/event-stream"), decision))
    clock.advance(0.25)
    usage = b'data: {"usage": {"prompt_tokens": 4, "completion_tokens": 2}}\n\n'
    watch.handle(observed(pb.ProcessingRequest(response_body=pb.HttpBody(body=usage)), decision))
    assert not watch.done
    end = pb.ProcessingRequest(response_body=pb.HttpBody(body=b"", end_of_stream=True))
    watch.handle(observed(end, decision))
    assert watch.done
    watch.close()
    [outcome] = recorder.outcomes
    assert outcome.decision_id == decision["decision_id"]
    assert outcome.endpoint_id == f"e{ADDRESSES.index(fallback)}"
    assert outcome.result is Result.SUCCESS
    assert (outcome.latency_s, outcome.ttft_s) == (0.75, 0.75)
    assert (outcome.input_tokens, outcome.output_tokens) == (4, 2)


def test_an_observation_cut_short_is_cancelled_and_one_without_a_decision_reports_nothing(
    path, recorder
):
    exchange = _Exchange(path, ExtProcSettings(), observed=True)
    list(exchange.handle(headers()))
    decision = named(next(iter(exchange.handle(body(CHAT, end=True)))))
    watch = _Observation(path, ExtProcSettings())
    watch.handle(observed(headers(), decision))
    watch.handle(observed(response_headers(200, ADDRESSES[0], "text/event-stream"), decision))
    watch.close()
    [outcome] = recorder.outcomes
    assert outcome.result is Result.CANCELLED
    assert outcome.endpoint_id == decision["endpoint"]
    bypassed = _Observation(path, ExtProcSettings())
    bypassed.handle(observed(headers(), {}))
    bypassed.handle(observed(response_headers(200, ADDRESSES[0]), {}))
    bypassed.handle(
        observed(pb.ProcessingRequest(response_body=pb.HttpBody(end_of_stream=True)), {})
    )
    assert bypassed.done
    assert len(recorder.outcomes) == 1
