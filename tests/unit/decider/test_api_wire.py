"""api/wire.py: the hand-written DecideResponse bytes parse to exactly what upb would build."""

from __future__ import annotations

import math
from types import MappingProxyType

import pytest

from decider.api import decider_service, wire
from decider.codec import convert
from decider.core.model import (
    BreakerState,
    CandidateExplanation,
    Decision,
    Endpoint,
    HealthStatus,
    RetryAdvice,
)
from decider.v1 import decider_service_pb2 as dpb

RETRY = RetryAdvice(
    max_attempts=3, initial_backoff_s=0.1, max_backoff_s=1.5, backoff_multiplier=2.0
)


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


def _decision(endpoints: list[Endpoint], **fields: object) -> Decision:
    values: dict[str, object] = {
        "decision_id": "d-1",
        "endpoint": endpoints[0],
        "fallbacks": tuple(endpoints[1:]),
        "strategy": "composite",
        "reason": "least loaded",
        "scores": MappingProxyType({"load": 1.0, "latency": 0.5}),
        "retry": RETRY,
        "affinity_hit": True,
        "candidate_count": 7,
        "skipped": MappingProxyType({"unhealthy": 2}),
    }
    values.update(fields)
    return Decision(**values)  # type: ignore[arg-type]


def _parsed(encoder: wire.DecisionEncoder, decision: Decision) -> dpb.DecideResponse:
    return dpb.DecideResponse.FromString(encoder.encode(decision))


def test_every_field_of_decide_response_is_written():
    # A field added to the proto must be added to wire.py too (and to this test's cases).
    assert set(dpb.DecideResponse.DESCRIPTOR.fields_by_name) == wire.WRITTEN_FIELDS


EXPLANATION = CandidateExplanation(
    endpoint_id="ep-0",
    rank=1,
    scores=MappingProxyType({"load": 1.0}),
    skip_reason="",
    health=HealthStatus.HEALTHY,
    breaker_state=BreakerState.CLOSED,
    in_flight=2,
    total_score=0.9,
)

CASES = {
    "typical": {},
    "defaults left out": {
        "decision_id": "",
        "reason": "",
        "strategy": "",
        "scores": MappingProxyType({}),
        "affinity_hit": False,
        "candidate_count": 0,
        "skipped": MappingProxyType({}),
    },
    "long and non-ascii strings": {
        "decision_id": "d-" + "9" * 300,
        "reason": "composite: pondération élevée; " + "x" * 20_000,
        "strategy": "coût",
    },
    "score values": {
        "scores": MappingProxyType(
            {"load": 0.0, "latency": -0.0, "cache": math.inf, "quota": -1e-300, "ключ": 1e300}
        ),
    },
    "large counts": {
        "candidate_count": 2**32 - 1,
        "skipped": MappingProxyType({"unhealthy": 0, "excluded": 127, "degraded": 128, "k": 2**31}),
    },
    "explain candidates": {"candidates": (EXPLANATION, EXPLANATION)},
    "zero retry": {
        "retry": RetryAdvice(
            max_attempts=0, initial_backoff_s=0.0, max_backoff_s=0.0, backoff_multiplier=0.0
        )
    },
}


@pytest.mark.parametrize("name", CASES)
def test_encoding_parses_to_the_reference_message(name: str):
    encoder = wire.DecisionEncoder()
    endpoints = [_endpoint(i) for i in range(4)]
    for order in (endpoints, endpoints[::-1], endpoints[1:3], endpoints[:1]):
        decision = _decision(order, **CASES[name])
        # Twice: the second answer comes from the caches.
        for _ in range(2):
            parsed = _parsed(encoder, decision)
            assert parsed == convert.decision_to_proto(decision)
            assert [e.id for e in parsed.fallbacks] == [e.id for e in order[1:]]
    assert parsed.endpoint.probe_headers["authorization"] == convert.REDACTED


def test_bytes_equal_upb_serialization_for_a_single_entry_map():
    # With at most one entry per map, upb's field order is fully determined: byte-identical.
    decision = _decision([_endpoint(0), _endpoint(1)], scores=MappingProxyType({"load": 0.25}))
    expected = convert.decision_to_proto(decision).SerializeToString(deterministic=True)
    assert wire.DecisionEncoder().encode(decision) == expected


def test_stream_answer_carries_the_correlation_id():
    encoder = wire.DecisionEncoder()
    decision = _decision([_endpoint(0), _endpoint(1)])
    for correlation_id in (0, 1, 300, 2**64 - 1):
        parsed = dpb.DecideStreamResponse.FromString(
            encoder.encode_stream(correlation_id, decision)
        )
        assert parsed.correlation_id == correlation_id
        assert parsed.WhichOneof("result") == "decide"
        assert parsed.decide == convert.decision_to_proto(decision)


def test_a_new_endpoint_value_is_encoded_afresh_and_caches_stay_bounded():
    encoder = wire.DecisionEncoder(max_entries=2)
    before = _endpoint(0, address="old:1")
    assert _parsed(encoder, _decision([before])).endpoint.address == "old:1"
    # A new registry snapshot: same id, new value.
    after = _endpoint(0, address="new:1")
    assert _parsed(encoder, _decision([after])).endpoint.address == "new:1"
    for i in range(1, 6):
        decision = _decision(
            [_endpoint(i), after],
            strategy=f"s{i}",
            scores=MappingProxyType({f"k{i}": 0.5}),
            skipped=MappingProxyType({f"r{i}": i}),
        )
        assert _parsed(encoder, decision) == convert.decision_to_proto(decision)
    caches = (encoder._endpoints, encoder._strategies, encoder._score_keys, encoder._skip_keys)
    assert all(len(cache) <= 2 for cache in caches)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32 - 1, 2**64 - 1])
def test_varint(value: int):
    # uint64 field 1 of DecideStreamResponse: tag 0x08 then the varint.
    assert dpb.DecideStreamResponse.FromString(b"\x08" + wire.varint(value)).correlation_id == value


def test_add_to_server_registers_every_rpc_of_the_service():
    registered: dict[str, object] = {}

    class Capture:
        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
            registered.update(handlers)
            assert service == "decider.v1.DeciderService"

    servicer = decider_service.DeciderService.__new__(decider_service.DeciderService)
    decider_service.add_to_server(servicer, Capture())
    service = dpb.DESCRIPTOR.services_by_name["DeciderService"]
    assert set(registered) == {m.name for m in service.methods}
