"""api/convert.py: proto <-> core values keep every field."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
from google.protobuf.duration_pb2 import Duration

from decider.codec import convert, validate
from decider.core.model import (
    Endpoint,
    MetricsKind,
    Result,
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
