"""Explain mode ranks every candidate and changes no state; panic mode."""

from __future__ import annotations

import random

import pytest
from fakes import FakeClock, endpoints, request

from decider.core.engine import Engine
from decider.core.model import Decision, HealthStatus, Outcome, Refusal, Result
from decider.core.settings import EngineSettings
from decider.core.strategies import STRATEGIES


def make(tables=None, ids=("a", "b", "c", "d")):
    clock = FakeClock()
    engine = Engine(EngineSettings.parse(tables or {}), rng=random.Random(9))
    engine.set_endpoints(endpoints(ids), now=clock.now)
    return engine, clock


def snapshot(engine, clock):
    return (
        [
            (s.endpoint.id, s.in_flight, s.health, s.breaker_state)
            for s in engine.endpoint_states(now=clock.now)
        ],
        engine.pending_decisions,
        engine.session_count,
    )


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_explain_ranks_every_candidate_and_changes_nothing(strategy):
    tables = {"quotas": {"tenants": {"t": {"requests_per_minute": 2}}}}
    engine, clock = make(tables)
    engine.set_health("d", HealthStatus.UNHEALTHY, reason="probe failed", now=clock.now)
    before = snapshot(engine, clock)
    explained = []
    for _ in range(5):
        d = engine.decide(
            request(
                strategy=strategy,
                explain=True,
                session_id="s",
                tenant="t",
                prefix_hashes=[1, 2, 3],
                exclude_endpoint_ids={"c"},
            ),
            now=clock.now,
        )
        assert isinstance(d, Decision)
        explained.append(d)
    assert snapshot(engine, clock) == before
    d = explained[0]
    assert d.decision_id == ""
    # The same answer every time: no rotation advanced, no random draw consumed.
    assert len({e.endpoint.id for e in explained}) == 1
    by_id = {c.endpoint_id: c for c in d.candidates}
    assert set(by_id) == {"a", "b", "c", "d"}
    assert sorted(c.rank for c in d.candidates if c.rank) == [1, 2]
    assert by_id[d.endpoint.id].rank == 1
    assert by_id["c"].rank == 0 and by_id["c"].skip_reason == "excluded by the request"
    assert by_id["d"].skip_reason == "unhealthy (probe failed)"
    assert d.reason.startswith("explain: ") or d.reason.startswith("ab_split")
    # The tenant's quota was not charged: two real decisions still fit.
    for _ in range(2):
        assert isinstance(
            engine.decide(request(strategy=strategy, tenant="t"), now=clock.now), Decision
        )


def test_explain_then_decide_agree_for_round_robin():
    engine, clock = make()
    explained = engine.decide(request(strategy="round_robin", explain=True), now=clock.now)
    actual = engine.decide(request(strategy="round_robin"), now=clock.now)
    assert isinstance(explained, Decision) and isinstance(actual, Decision)
    assert explained.endpoint.id == actual.endpoint.id
    assert [f.id for f in explained.fallbacks] == [f.id for f in actual.fallbacks]


def test_panic_is_off_by_default():
    engine, clock = make()
    for endpoint_id in ("a", "b", "c", "d"):
        engine.set_health(endpoint_id, HealthStatus.UNHEALTHY, reason="down", now=clock.now)
    refused = engine.decide(request(), now=clock.now)
    assert isinstance(refused, Refusal)


def test_panic_threshold_routes_across_all_endpoints():
    engine, clock = make({"routing": {"panic_threshold": 0.5}})
    for endpoint_id in ("a", "b", "c"):
        engine.set_health(endpoint_id, HealthStatus.UNHEALTHY, reason="down", now=clock.now)
    seen = set()
    for _ in range(40):
        d = engine.decide(request(strategy="round_robin"), now=clock.now)
        assert isinstance(d, Decision)
        assert "panic mode, health ignored" in d.reason
        seen.add(d.endpoint.id)
    assert seen == {"a", "b", "c", "d"}
    engine.set_health("a", HealthStatus.HEALTHY, reason="up", now=clock.now)
    d = engine.decide(request(strategy="round_robin"), now=clock.now)
    assert isinstance(d, Decision) and "panic" not in d.reason


def test_outcome_load_report_keeps_load_fresh():
    from decider.core.model import LoadReport

    engine, clock = make({"routing": {"least_request": {"full_scan": True}}}, ids=("a", "b"))
    d = engine.decide(request(strategy="least_request"), now=clock.now)
    assert isinstance(d, Decision)
    engine.record_outcome(
        Outcome(
            decision_id=d.decision_id,
            endpoint_id=d.endpoint.id,
            result=Result.SUCCESS,
            load=LoadReport(queue_depth=20, running=8, kv_cache_utilization=0.9),
        ),
        now=clock.now,
    )
    other = engine.decide(request(strategy="least_request"), now=clock.now)
    assert isinstance(other, Decision) and other.endpoint.id != d.endpoint.id
    (state,) = [s for s in engine.endpoint_states(now=clock.now) if s.endpoint.id == d.endpoint.id]
    assert state.load is not None and state.load.queue_depth == 20
