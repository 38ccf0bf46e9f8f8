"""Decide end to end: distribution, affinity, fallbacks, exclusions, outcomes."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
from decider_support import endpoints_doc
from google.protobuf.duration_pb2 import Duration

from decider.v1 import decider_service_pb2 as dpb

ROUND_ROBIN = {"default_strategy": "round_robin"}


async def test_round_robin_splits_300_decisions_100_100_100(start_server):
    async with start_server(endpoints_doc("m", 3, routing=ROUND_ROBIN)) as srv:
        counts: Counter[str] = Counter()
        for _ in range(300):
            reply = await srv.decider.Decide(dpb.DecideRequest(model="m"), timeout=5)
            assert reply.strategy == "round_robin"
            counts[reply.endpoint.id] += 1
        assert counts == {"m-0": 100, "m-1": 100, "m-2": 100}


async def test_round_robin_by_request_field_when_default_differs(start_server):
    async with start_server(endpoints_doc("m", 3)) as srv:
        replies = await asyncio.gather(
            *(
                srv.decider.Decide(dpb.DecideRequest(model="m", strategy="round_robin"), timeout=5)
                for _ in range(30)
            )
        )
        counts = Counter(r.endpoint.id for r in replies)
        assert counts == {"m-0": 10, "m-1": 10, "m-2": 10}


AFFINITY = {"default_strategy": "affinity", "affinity": {"fallback": "round_robin"}}


async def test_session_affinity_keeps_a_session_on_one_endpoint(start_server):
    async with start_server(endpoints_doc("m", 3, routing=AFFINITY)) as srv:
        chosen: dict[str, set[str]] = {}
        for round_ in range(5):
            for session in ("alice", "bob", "carol", "dave", "erin", "frank"):
                reply = await srv.decider.Decide(
                    dpb.DecideRequest(model="m", session_id=session), timeout=5
                )
                chosen.setdefault(session, set()).add(reply.endpoint.id)
                if round_:
                    assert reply.affinity_hit
        assert all(len(ids) == 1 for ids in chosen.values()), chosen
        # Sessions still spread: round robin placed them on every endpoint.
        assert len(set().union(*chosen.values())) == 3


async def test_a_session_moves_when_its_endpoint_is_excluded_and_sticks_again(start_server):
    async with start_server(endpoints_doc("m", 3, routing=AFFINITY)) as srv:
        first = await srv.decider.Decide(dpb.DecideRequest(model="m", session_id="s"))
        moved = await srv.decider.Decide(
            dpb.DecideRequest(model="m", session_id="s", exclude_endpoint_ids=[first.endpoint.id])
        )
        assert moved.endpoint.id != first.endpoint.id
        again = await srv.decider.Decide(dpb.DecideRequest(model="m", session_id="s"))
        assert again.endpoint.id in {first.endpoint.id, moved.endpoint.id}
        assert again.strategy == "affinity"


async def test_fallbacks_are_ordered_distinct_and_exclude_the_choice(start_server):
    async with start_server(endpoints_doc("m", 4, routing=ROUND_ROBIN)) as srv:
        reply = await srv.decider.Decide(dpb.DecideRequest(model="m", max_fallbacks=3))
        ids = [reply.endpoint.id, *(e.id for e in reply.fallbacks)]
        assert len(ids) == len(set(ids)) == 4
        assert reply.decision_id
        assert reply.reason
        assert reply.candidate_count == 4
        assert reply.retry.max_attempts >= 1


async def test_excluded_endpoints_are_never_chosen(start_server):
    async with start_server(endpoints_doc("m", 3, routing=ROUND_ROBIN)) as srv:
        for _ in range(9):
            reply = await srv.decider.Decide(
                dpb.DecideRequest(model="m", exclude_endpoint_ids=["m-0", "m-2"])
            )
            assert reply.endpoint.id == "m-1"
            assert not reply.fallbacks


async def test_required_capabilities_filter_candidates(start_server):
    doc = endpoints_doc("m", 3, routing=ROUND_ROBIN)
    doc["endpoints"][1]["capabilities"] = ["vision"]
    async with start_server(doc) as srv:
        for _ in range(6):
            reply = await srv.decider.Decide(
                dpb.DecideRequest(model="m", required_capabilities=["vision"])
            )
            assert reply.endpoint.id == "m-1"


@pytest.mark.parametrize("result", [dpb.RESULT_SUCCESS, dpb.RESULT_ERROR, dpb.RESULT_TIMEOUT])
async def test_report_outcome_for_a_decision(start_server, result):
    async with start_server(endpoints_doc("m", 2)) as srv:
        decision = await srv.decider.Decide(dpb.DecideRequest(model="m"))
        reply = await srv.decider.ReportOutcome(
            dpb.ReportOutcomeRequest(
                decision_id=decision.decision_id,
                endpoint_id=decision.endpoint.id,
                result=result,
                latency=Duration(nanos=250_000_000),
                input_tokens=100,
                output_tokens=20,
            )
        )
        assert reply.decision_found


async def test_report_outcome_with_unknown_decision_is_accepted(start_server):
    async with start_server(endpoints_doc("m", 2)) as srv:
        reply = await srv.decider.ReportOutcome(
            dpb.ReportOutcomeRequest(
                decision_id="never-issued", endpoint_id="m-0", result=dpb.RESULT_SUCCESS
            )
        )
        assert not reply.decision_found
        # Even an endpoint nobody registered is accepted: the report is just dropped.
        reply = await srv.decider.ReportOutcome(
            dpb.ReportOutcomeRequest(endpoint_id="ghost", result=dpb.RESULT_ERROR)
        )
        assert not reply.decision_found


async def test_concurrent_decisions_all_answer(start_server):
    async with start_server(endpoints_doc("m", 3, routing=ROUND_ROBIN)) as srv:
        replies = await asyncio.gather(
            *(srv.decider.Decide(dpb.DecideRequest(model="m"), timeout=10) for _ in range(200)),
            return_exceptions=True,
        )
        errors = [r for r in replies if isinstance(r, grpc.aio.AioRpcError)]
        assert not errors
        assert Counter(r.endpoint.id for r in replies) == {"m-0": 67, "m-1": 67, "m-2": 66} or (
            sorted(Counter(r.endpoint.id for r in replies).values()) == [66, 67, 67]
        )


async def test_explain_lists_every_candidate_and_changes_nothing(start_server):
    async with start_server(endpoints_doc("m", 3, routing=ROUND_ROBIN)) as srv:
        explained = await srv.decider.Decide(dpb.DecideRequest(model="m", explain=True))
        assert sorted(c.endpoint_id for c in explained.candidates) == ["m-0", "m-1", "m-2"]
        assert {c.rank for c in explained.candidates} == {1, 2, 3}
        # Explain changes no state: the round robin goes on from where it was.
        ids = ["m-0", "m-1", "m-2"]
        first = await srv.decider.Decide(dpb.DecideRequest(model="m"))
        for _ in range(4):
            await srv.decider.Decide(dpb.DecideRequest(model="m", explain=True))
        second = await srv.decider.Decide(dpb.DecideRequest(model="m"))
        assert second.endpoint.id == ids[(ids.index(first.endpoint.id) + 1) % 3]
