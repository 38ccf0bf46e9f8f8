"""api/convert.py: proto <-> core values keep every field."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
from google.protobuf.duration_pb2 import Duration

from decider.api import convert, validate
from decider.core.model import (
    BreakerState,
    CandidateExplanation,
    Decision,
    Endpoint,
    HealthStatus,
    MetricsKind,
    Result,
    RetryAdvice,
    RouteRequest,
)
from decider.errors import InvalidArgument
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb


def test_endpoint_round_trip():
    endpoint = Endpoint(
        id="a",
        address="h:1",
        model="m",
        health_url="http://h/health",
        weight=3,
        capabilities=frozenset({"b", "a"}),
        cost_per_1k_tokens=0.5,
        labels=MappingProxyType({"zone": "x"}),
        metrics_url="http://h/metrics",
        metrics_kind=MetricsKind.VLLM,
        probe_headers=MappingProxyType({"k": "v"}),
        max_in_flight=2,
        requests_per_minute=3,
        tokens_per_minute=4,
    )
    proto = convert.endpoint_to_proto(endpoint, redact_headers=False)
    assert list(proto.capabilities) == ["a", "b"]
    assert convert.endpoint_from_proto(proto) == endpoint
    assert convert.endpoint_to_proto(endpoint).probe_headers["k"] == convert.REDACTED


def test_zero_weight_means_one_and_unknown_enums_fall_back():
    proto = epb.Endpoint(id="a", address="h:1", model="m", metrics_kind=42)
    endpoint = convert.endpoint_from_proto(proto)
    assert endpoint.weight == 1
    assert endpoint.metrics_kind is MetricsKind.UNSPECIFIED


def test_route_request_and_outcome():
    request = convert.route_request_from_proto(
        dpb.DecideRequest(
            model="m",
            session_id="s",
            prefix_hashes=[1, 2, 2**64 - 1],
            exclude_endpoint_ids=["x"],
            required_capabilities=["tools"],
        )
    )
    assert request.prefix_hashes == (1, 2, 2**64 - 1)
    assert request.exclude_endpoint_ids == frozenset({"x"})
    outcome = convert.outcome_from_proto(
        dpb.ReportOutcomeRequest(
            decision_id="d",
            endpoint_id="e",
            result=dpb.RESULT_TIMEOUT,
            latency=Duration(seconds=1, nanos=500_000_000),
        )
    )
    assert outcome.result is Result.TIMEOUT
    assert outcome.latency_s == 1.5
    assert outcome.load is None


def test_durations():
    assert convert.duration_s(convert.to_duration(2.25)) == 2.25


def _decision(endpoints: list[Endpoint], **fields: object) -> Decision:
    values: dict[str, object] = {
        "decision_id": "d-1",
        "endpoint": endpoints[0],
        "fallbacks": tuple(endpoints[1:]),
        "strategy": "composite",
        "reason": "least loaded",
        "scores": MappingProxyType({"load": 1.0, "latency": 0.5}),
        "retry": RetryAdvice(
            max_attempts=3, initial_backoff_s=0.1, max_backoff_s=1.5, backoff_multiplier=2.0
        ),
        "affinity_hit": True,
        "candidate_count": 7,
        "skipped": MappingProxyType({"unhealthy": 2}),
    }
    values.update(fields)
    return Decision(**values)  # type: ignore[arg-type]


def _endpoint(i: int, **fields: object) -> Endpoint:
    values: dict[str, object] = {
        "id": f"ep-{i}",
        "address": f"h:{i}",
        "model": "m",
        "labels": MappingProxyType({"zone": "x"}),
        "probe_headers": MappingProxyType({"authorization": "secret"}),
        "capabilities": frozenset({"tools"}),
    }
    values.update(fields)
    return Endpoint(**values)  # type: ignore[arg-type]


def test_decision_encoder_matches_decision_to_proto():
    encoder = convert.DecisionEncoder()
    endpoints = [_endpoint(i) for i in range(4)]
    for order in (endpoints, endpoints[::-1], endpoints[1:3]):
        decision = _decision(order)
        encoded = encoder.decide_response(decision)
        assert encoded == convert.decision_to_proto(decision)
        assert [e.id for e in encoded.fallbacks] == [e.id for e in order[1:]]
    assert encoded.endpoint.probe_headers["authorization"] == convert.REDACTED


def test_decision_encoder_explain_mode_keeps_candidates():
    explanation = CandidateExplanation(
        endpoint_id="ep-0",
        rank=1,
        scores=MappingProxyType({"load": 1.0}),
        skip_reason="",
        health=HealthStatus.HEALTHY,
        breaker_state=BreakerState.CLOSED,
        in_flight=2,
        total_score=0.9,
    )
    decision = _decision([_endpoint(0)], candidates=(explanation,))
    encoded = convert.DecisionEncoder().decide_response(decision)
    assert encoded == convert.decision_to_proto(decision)
    assert encoded.candidates[0].endpoint_id == "ep-0"


def test_decision_encoder_rebuilds_when_an_endpoint_changes():
    encoder = convert.DecisionEncoder(max_entries=2)
    before = _endpoint(0, address="old:1")
    assert encoder.decide_response(_decision([before])).endpoint.address == "old:1"
    # A new snapshot: same id, new value.
    after = _endpoint(0, address="new:1")
    assert encoder.decide_response(_decision([after])).endpoint.address == "new:1"
    # Past max_entries the cache starts over instead of growing.
    for i in range(1, 6):
        decision = _decision([_endpoint(i), after])
        assert encoder.decide_response(decision) == convert.decision_to_proto(decision)


_ROUTE_REQUESTS = [
    dpb.DecideRequest(model="m"),
    dpb.DecideRequest(
        model="m",
        request_id="r",
        session_id="s",
        tenant="t",
        required_capabilities=["b", "a"],
        estimated_input_tokens=800,
        prefix_hashes=[3, 1, 2**64 - 1],
        exclude_endpoint_ids=["x", "y"],
        strategy="composite",
        explain=True,
        max_fallbacks=4,
    ),
    dpb.DecideRequest(
        model="m" * 512,
        request_id="r" * 512,
        required_capabilities=["c" * 512] * 64,
        exclude_endpoint_ids=["e"] * 256,
        prefix_hashes=[7] * 8192,
        max_fallbacks=64,
    ),
]


def test_checked_route_request_equals_validate_then_convert():
    assert convert.FAST_ROUTES
    for request in _ROUTE_REQUESTS:
        validate.decide_request(request)
        slow = convert.route_request_from_proto(request)
        fast = convert.checked_route_request(request)
        assert fast == slow
        assert type(fast) is RouteRequest
        assert hash(fast) == hash(slow)
        with pytest.raises(dataclasses.FrozenInstanceError):
            fast.model = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "request_",
    [
        dpb.DecideRequest(),
        dpb.DecideRequest(model="m" * 513),
        dpb.DecideRequest(model="m", request_id="r" * 513),
        dpb.DecideRequest(model="m", session_id="s" * 513),
        dpb.DecideRequest(model="m", tenant="t" * 513),
        dpb.DecideRequest(model="m", strategy="x" * 513),
        dpb.DecideRequest(model="m", required_capabilities=["c" * 513]),
        dpb.DecideRequest(model="m", required_capabilities=["c"] * 65),
        dpb.DecideRequest(model="m", exclude_endpoint_ids=["e" * 513]),
        dpb.DecideRequest(model="m", exclude_endpoint_ids=["e"] * 257),
        dpb.DecideRequest(model="m", prefix_hashes=[1] * 8193),
        dpb.DecideRequest(model="m", max_fallbacks=65),
    ],
)
def test_checked_route_request_refuses_what_validate_refuses(request_):
    with pytest.raises(InvalidArgument) as slow:
        validate.decide_request(request_)
    with pytest.raises(InvalidArgument) as fast:
        convert.checked_route_request(request_)
    assert fast.value.violations == slow.value.violations
