"""Engines sharing state through the shared owners (decider.state.shared_engine) over the
simulator's bus, and the simulator's replica dimension built on them."""

from __future__ import annotations

import math

from fakes import endpoints, request

from bench.sim.replicas import Replicas, ReplicaSpec, run_one
from decider.core.model import BreakerState, Decision, Outcome, Refusal, RefusalKind, Result

TABLES = {
    "breaker": {"consecutive_failures": 2, "open_s": 10.0},
    "quotas": {"tenants": {"acme": {"requests_per_minute": 10}}},
    "routing": {"default_strategy": "least_request"},
}


def fleet(shared: bool = True) -> Replicas:
    replicas = Replicas(TABLES, count=2, shared=shared, seed=1)
    replicas.set_endpoints(endpoints(["e0", "e1", "e2"]), now=0.0)
    return replicas


def decide_on(replicas: Replicas, index: int, now: float, **fields) -> Decision | Refusal:
    replicas._turn = index
    return replicas.decide(request(**fields), now=now)


def state_of(replicas: Replicas, index: int, endpoint_id: str, now: float):
    states = replicas.engines[index].endpoint_states(now=now)
    return next(s for s in states if s.endpoint.id == endpoint_id)


def test_a_breaker_opened_on_one_replica_opens_on_the_other_for_its_open_time():
    replicas = fleet()
    for t in (1.0, 1.1):
        d = decide_on(replicas, 0, t, exclude_endpoint_ids=["e1", "e2"])
        assert isinstance(d, Decision)
        replicas.record_outcome(
            Outcome(decision_id=d.decision_id, endpoint_id="e0", result=Result.ERROR), now=t
        )
    assert state_of(replicas, 0, "e0", 1.2).breaker_state is BreakerState.OPEN
    # Delivered on the bus, reported through the engine's own breaker housekeeping.
    replicas.tick(now=1.2)
    assert state_of(replicas, 1, "e0", 1.2).breaker_state is BreakerState.OPEN
    picks = {decide_on(replicas, 1, 1.3 + i / 100).endpoint.id for i in range(20)}
    assert "e0" not in picks
    replicas.tick(now=12.0)
    assert state_of(replicas, 1, "e0", 12.0).breaker_state is BreakerState.CLOSED


def test_without_sharing_the_other_replica_never_hears_of_it():
    replicas = fleet(shared=False)
    for t in (1.0, 1.1):
        d = decide_on(replicas, 0, t, exclude_endpoint_ids=["e1", "e2"])
        replicas.record_outcome(
            Outcome(decision_id=d.decision_id, endpoint_id="e0", result=Result.ERROR), now=t
        )
    replicas.tick(now=1.2)
    assert state_of(replicas, 1, "e0", 1.2).breaker_state is BreakerState.CLOSED


def test_in_flight_counts_and_recent_picks_are_fleet_wide():
    replicas = fleet()
    open_on_0 = [decide_on(replicas, 0, 1.0, exclude_endpoint_ids=["e1", "e2"]) for _ in range(3)]
    replicas.tick(now=1.01)
    assert state_of(replicas, 1, "e0", 1.01).in_flight == 3
    # least_request on replica 1 now avoids e0.
    assert decide_on(replicas, 1, 1.02, exclude_endpoint_ids=["e2"]).endpoint.id == "e1"
    for d in open_on_0:
        replicas.record_outcome(
            Outcome(decision_id=d.decision_id, endpoint_id="e0", result=Result.SUCCESS), now=1.1
        )
    replicas.tick(now=1.2)
    assert state_of(replicas, 1, "e0", 1.2).in_flight == 0
    assert state_of(replicas, 0, "e0", 1.2).in_flight == 0


def test_tenant_budget_is_spent_fleet_wide():
    replicas = fleet()
    admitted = 0
    # Calls further apart than the bus delay: each replica has heard of every earlier charge.
    for i in range(30):
        answer = decide_on(replicas, i % 2, 1.0 + i * 0.01, tenant="acme")
        if isinstance(answer, Decision):
            admitted += 1
        else:
            assert answer.kind is RefusalKind.QUOTA_EXHAUSTED
    assert admitted == 10


def test_sessions_bound_on_one_replica_are_followed_by_the_other():
    replicas = fleet()
    first = decide_on(replicas, 0, 1.0, session_id="s", strategy="affinity").endpoint.id
    for i in range(5):
        got = decide_on(replicas, 1, 1.1 + i, session_id="s", strategy="affinity")
        assert got.endpoint.id == first


def test_the_replica_dimension_runs_and_sharing_helps():
    one = run_one(ReplicaSpec(workload="multi_turn", replicas=1, shared=False, seed=5, scale=0.1))
    shared = run_one(ReplicaSpec(workload="multi_turn", replicas=4, shared=True, seed=5, scale=0.1))
    alone = run_one(ReplicaSpec(workload="multi_turn", replicas=4, shared=False, seed=5, scale=0.1))
    assert one.completed == one.requests > 0
    assert not math.isnan(shared.ttft_p90_s)
    assert shared.ttft_p90_s < alone.ttft_p90_s
