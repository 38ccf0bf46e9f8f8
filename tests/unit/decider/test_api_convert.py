"""api/convert.py: proto <-> core values keep every field."""

from __future__ import annotations

from types import MappingProxyType

from google.protobuf.duration_pb2 import Duration

from decider.api import convert
from decider.core.model import Endpoint, MetricsKind, Result
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
