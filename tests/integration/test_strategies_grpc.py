"""Every strategy by wire name through the real server, and each family's behaviour on the wire."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from decider_support import endpoints_doc

from decider.core.strategies import STRATEGIES
from decider.v1 import decider_service_pb2 as dpb

MODEL = "m"
ARMS = {"control": 70, "candidate": 30}
# Strategies whose decisions carry no factor scores today (ENGINE.md: "which factors depends on
# the strategy"); every other one, new ones included, must report at least one.
WITHOUT_SCORES = {"round_robin", "random"}


def _fleet() -> dict[str, Any]:
    """Four endpoints with distinct prices and weights, two per ab_split arm (by label)."""
    doc = endpoints_doc(
        MODEL,
        4,
        routing={
            "ab_split": {
                "arms": [
                    {"name": name, "weight": weight, "labels": {"arm": name}}
                    for name, weight in ARMS.items()
                ]
            }
        },
    )
    for endpoint, cost, weight, arm in zip(
        doc["endpoints"],
        (3.0, 1.0, 2.0, 4.0),
        (1, 2, 3, 1),
        ("control", "control", "candidate", "candidate"),
        strict=True,
    ):
        endpoint.update(cost_per_1k_tokens=cost, weight=weight, labels={"arm": arm})
    return doc


def _arm_of(reply: dpb.DecideResponse) -> str:
    return reply.endpoint.labels["arm"]


async def _decide(srv, strategy: str, **fields: Any) -> dpb.DecideResponse:
    reply: dpb.DecideResponse = await srv.decider.Decide(
        dpb.DecideRequest(model=MODEL, strategy=strategy, **fields), timeout=10
    )
    return reply


async def _succeed(srv, reply: dpb.DecideResponse) -> None:
    done = await srv.decider.ReportOutcome(
        dpb.ReportOutcomeRequest(
            decision_id=reply.decision_id,
            endpoint_id=reply.endpoint.id,
            result=dpb.RESULT_SUCCESS,
        ),
        timeout=10,
    )
    assert done.decision_found


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
async def test_every_strategy_answers_by_name_with_a_full_decision(start_server, strategy):
    doc = _fleet()
    ids = {e["id"] for e in doc["endpoints"]}
    async with start_server(doc) as srv:
        for i in range(3):
            reply = await _decide(
                srv,
                strategy,
                session_id=f"session-{i}",
                prefix_hashes=[101, 202, 303],
                max_fallbacks=3,
            )
            assert reply.strategy == strategy
            assert reply.decision_id
            assert reply.endpoint.id in ids
            assert reply.endpoint.model == MODEL
            chain = [reply.endpoint.id, *(f.id for f in reply.fallbacks)]
            assert reply.fallbacks, reply
            assert len(chain) == len(set(chain)), chain
            assert set(chain) <= ids
            assert reply.reason.strip()
            assert reply.scores or strategy in WITHOUT_SCORES, reply
            assert all(0.0 <= v <= 1.0 for v in reply.scores.values()), dict(reply.scores)
            # ab_split counts the candidates of the session's arm.
            assert len(chain) <= reply.candidate_count <= 4
            assert reply.retry.max_attempts >= 1
            await _succeed(srv, reply)


async def test_weighted_round_robin_follows_the_weights_exactly_and_smoothly(start_server):
    doc = endpoints_doc(MODEL, 3)
    for endpoint, weight in zip(doc["endpoints"], (5, 1, 1), strict=True):
        endpoint["weight"] = weight
    async with start_server(doc) as srv:
        order = [(await _decide(srv, "weighted_round_robin")).endpoint.id for _ in range(70)]
        # Ten whole rounds of 5 + 1 + 1.
        assert Counter(order) == {"m-0": 50, "m-1": 10, "m-2": 10}
        # Smooth: the heavy endpoint never gets a whole round's share in a row (nginx's smooth
        # WRR gives 5:1:1 runs of at most 4; a plain WRR would give runs of 5).
        longest = run = 0
        for endpoint_id in order:
            run = run + 1 if endpoint_id == "m-0" else 0
            longest = max(longest, run)
        assert longest <= 4, order


async def test_least_request_prefers_the_endpoint_with_fewer_in_flight(start_server):
    async with start_server(endpoints_doc(MODEL, 2)) as srv:
        # Three decisions on m-0 with no outcome: three requests in flight there.
        for _ in range(3):
            busy = await _decide(srv, "least_request", exclude_endpoint_ids=["m-1"])
            assert busy.endpoint.id == "m-0"
        idle = []
        for _ in range(3):
            reply = await _decide(srv, "least_request")
            assert reply.endpoint.id == "m-1", reply.reason
            assert [f.id for f in reply.fallbacks] == ["m-0"]
            assert "in flight" in reply.reason
            idle.append(reply)
        # m-1 now has three in flight too; finishing them makes it the idle one again.
        for reply in idle:
            await _succeed(srv, reply)
        again = await _decide(srv, "least_request")
        assert again.endpoint.id == "m-1", again.reason
        assert again.reason.startswith("least_request: 0 in flight vs 3"), again.reason


async def test_cost_picks_the_cheapest_and_falls_back_by_price(start_server):
    async with start_server(_fleet()) as srv:
        for _ in range(10):
            # No outcomes: m-1 piles up in-flight requests, yet load only breaks price ties.
            reply = await _decide(srv, "cost", max_fallbacks=3)
            assert reply.endpoint.id == "m-1", reply.reason
            assert [f.id for f in reply.fallbacks] == ["m-2", "m-0", "m-3"]
            assert reply.scores["cost"] == pytest.approx(1.0)


async def test_affinity_keeps_each_session_on_its_endpoint(start_server):
    async with start_server(_fleet()) as srv:
        sessions = [f"user-{i}" for i in range(8)]
        bound = {s: (await _decide(srv, "affinity", session_id=s)).endpoint.id for s in sessions}
        for _ in range(3):
            for session in sessions:
                reply = await _decide(srv, "affinity", session_id=session)
                assert reply.endpoint.id == bound[session]
                assert reply.affinity_hit
        # The fallback (least_request) spread the new sessions over the fleet.
        assert len(set(bound.values())) > 1, bound


async def test_ab_split_keeps_a_session_on_one_arm(start_server):
    async with start_server(_fleet()) as srv:
        for i in range(20):
            session = f"visitor-{i}"
            arms = set()
            for _ in range(4):
                reply = await _decide(srv, "ab_split", session_id=session)
                arm = _arm_of(reply)
                assert reply.reason.startswith(f"ab_split: arm {arm} ("), reply.reason
                arms.add(arm)
            assert len(arms) == 1, (session, arms)


async def test_ab_split_splits_sessions_by_weight(start_server):
    sessions = [f"visitor-{i}" for i in range(600)]
    async with start_server(_fleet()) as srv:
        arms: Counter[str] = Counter()
        for start in range(0, len(sessions), 50):
            replies = await asyncio.gather(
                *(_decide(srv, "ab_split", session_id=s) for s in sessions[start : start + 50])
            )
            arms.update(_arm_of(r) for r in replies)
        share = arms["control"] / len(sessions)
        # 70/30 configured; a generous tolerance (CRC-32 of the session id spreads sessions).
        assert 0.6 <= share <= 0.8, arms


async def test_cache_aware_sends_a_served_prefix_back_to_its_endpoint(start_server):
    prompt = [9001, 9002, 9003, 9004]
    async with start_server(endpoints_doc(MODEL, 3)) as srv:
        first = await _decide(
            srv, "cache_aware", prefix_hashes=prompt, exclude_endpoint_ids=["m-0", "m-1"]
        )
        assert first.endpoint.id == "m-2"
        assert first.scores["cache"] == 0.0
        await _succeed(srv, first)
        # Two requests in flight on m-2: on load alone it is now the worst choice.
        for _ in range(2):
            await _decide(srv, "cache_aware", exclude_endpoint_ids=["m-0", "m-1"])
        unrelated = await _decide(srv, "cache_aware", prefix_hashes=[1, 2, 3, 4])
        assert unrelated.endpoint.id != "m-2", unrelated.reason
        # The same prompt with one more turn: its cached prefix wins over the load difference.
        for follow_up in (prompt, [*prompt, 9005]):
            reply = await _decide(srv, "cache_aware", prefix_hashes=follow_up)
            assert reply.endpoint.id == "m-2", reply.reason
            assert reply.scores["cache"] == pytest.approx(len(prompt) / len(follow_up))
            assert "cached" in reply.reason
