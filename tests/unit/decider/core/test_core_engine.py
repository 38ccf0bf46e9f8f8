"""Engine facade: membership, refusals, decision ids, in-flight accounting, events, explain."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest
from fakes import EventLog, FakeClock, endpoint, endpoints, request

from decider.core.affinity import SessionTable
from decider.core.engine import Engine, EngineState
from decider.core.model import (
    BreakerState,
    Decision,
    HealthStatus,
    LoadReport,
    Outcome,
    Refusal,
    RefusalKind,
    Result,
)
from decider.core.settings import EngineSettings
from decider.errors import InvalidArgument


def make(ids=("a", "b", "c"), settings=None, seed=7, **fields):
    clock = FakeClock()
    log = EventLog()
    engine = Engine(settings or EngineSettings(), rng=random.Random(seed), on_event=log)
    engine.set_endpoints(endpoints(ids, **fields), now=clock.now)
    return engine, clock, log


def decided(result: Decision | Refusal) -> Decision:
    assert isinstance(result, Decision), result
    return result


def test_default_settings_decide_with_the_default_strategy():
    engine, clock, _ = make()
    d = decided(engine.decide(request(), now=clock.now))
    assert d.strategy == "composite"
    assert d.endpoint.id in {"a", "b", "c"}
    assert len(d.fallbacks) == 2
    ids = [d.endpoint.id, *(f.id for f in d.fallbacks)]
    assert len(set(ids)) == 3
    assert d.candidate_count == 3
    assert d.retry.max_attempts == 3


def test_round_robin_splits_evenly():
    engine, clock, _ = make()
    counts = Counter(
        decided(engine.decide(request(strategy="round_robin"), now=clock.now)).endpoint.id
        for _ in range(300)
    )
    assert counts == {"a": 100, "b": 100, "c": 100}


def test_round_robin_fallbacks_are_the_next_in_turn():
    engine, clock, _ = make(ids=("a", "b", "c", "d"))
    first = decided(engine.decide(request(strategy="round_robin"), now=clock.now))
    second = decided(engine.decide(request(strategy="round_robin"), now=clock.now))
    assert first.fallbacks[0] == second.endpoint
    assert "round_robin: next in turn" in first.reason


def test_model_nobody_serves_is_model_not_found():
    engine, clock, _ = make()
    result = engine.decide(request(model="nope"), now=clock.now)
    assert isinstance(result, Refusal)
    assert result.kind is RefusalKind.MODEL_NOT_FOUND
    assert "'nope'" in result.message
    assert result.message.endswith("models served: 'm'")


def test_model_not_found_names_at_most_ten_served_models():
    engine, clock, _ = make()
    engine.set_endpoints([endpoint(f"e{i}", f"model-{i:02d}") for i in range(12)], now=clock.now)
    message = engine.decide(request(model="nope"), now=clock.now).message
    assert "'model-00'" in message and "'model-09'" in message
    assert "'model-10'" not in message
    assert message.endswith("and 2 more")


def test_model_not_found_with_no_endpoints_says_so():
    engine, clock, _ = make(ids=())
    message = engine.decide(request(model="nope"), now=clock.now).message
    assert message == "no endpoint serves model 'nope'; no endpoints are registered"


def test_unknown_strategy_is_invalid_argument_on_field_strategy():
    engine, clock, _ = make()
    with pytest.raises(InvalidArgument) as info:
        engine.decide(request(strategy="fastest"), now=clock.now)
    assert info.value.violations[0].field == "strategy"
    assert "'fastest'" in str(info.value)


def test_no_usable_endpoint_says_how_many_and_why():
    engine, clock, _ = make(ids=("a", "b", "c", "d"))
    engine.set_health(
        "a", HealthStatus.UNHEALTHY, reason="probe: connection refused", now=clock.now
    )
    engine.set_health("b", HealthStatus.DRAINING, reason="drain requested", now=clock.now)
    engine.set_health("c", HealthStatus.UNHEALTHY, reason="probe: HTTP 503", now=clock.now)
    for _ in range(5):
        engine.record_outcome(
            Outcome(decision_id="", endpoint_id="d", result=Result.ERROR), now=clock.now
        )
    result = engine.decide(request(), now=clock.now)
    assert isinstance(result, Refusal)
    assert result.kind is RefusalKind.NO_HEALTHY_ENDPOINT
    assert result.registered == 4
    assert result.skipped == {"unhealthy": 2, "draining": 1, "breaker_open": 1}
    assert "4 registered" in result.message
    assert "a unhealthy (probe: connection refused)" in result.message
    assert "b draining (drain requested)" in result.message
    assert "d breaker open (30.0 s left)" in result.message


def test_missing_capability_is_no_healthy_endpoint_with_the_capability_named():
    engine, clock, _ = make()
    result = engine.decide(request(required_capabilities={"vision"}), now=clock.now)
    assert isinstance(result, Refusal)
    assert result.kind is RefusalKind.NO_HEALTHY_ENDPOINT
    assert "vision" in result.message


def test_required_capabilities_and_exclusions_filter_candidates():
    engine, clock, _ = make(ids=())
    engine.set_endpoints(
        [
            endpoint("a", capabilities=frozenset({"tools"})),
            endpoint("b", capabilities=frozenset({"tools", "vision"})),
            endpoint("c"),
        ],
        now=clock.now,
    )
    for _ in range(10):
        d = decided(engine.decide(request(required_capabilities={"tools"}), now=clock.now))
        assert d.endpoint.id in {"a", "b"}
        assert d.candidate_count == 2
    d = decided(
        engine.decide(
            request(required_capabilities={"tools"}, exclude_endpoint_ids={"a"}), now=clock.now
        )
    )
    assert d.endpoint.id == "b"
    assert d.fallbacks == ()
    assert d.skipped == {"excluded": 1}
    assert "1 excluded by the request" in d.reason


def test_decision_ids_are_unique():
    engine, clock, _ = make()
    ids = {decided(engine.decide(request(), now=clock.now)).decision_id for _ in range(500)}
    assert len(ids) == 500


def test_in_flight_counts_decisions_until_their_outcome():
    engine, clock, _ = make(ids=("a",))
    d1 = decided(engine.decide(request(), now=clock.now))
    d2 = decided(engine.decide(request(), now=clock.now))
    assert engine.in_flight("a") == 2
    assert engine.record_outcome(
        Outcome(decision_id=d1.decision_id, endpoint_id="a", result=Result.SUCCESS, latency_s=0.2),
        now=clock.advance(0.2),
    )
    assert engine.in_flight("a") == 1
    # A second outcome for the same decision is unknown and changes no count.
    assert not engine.record_outcome(
        Outcome(decision_id=d1.decision_id, endpoint_id="a", result=Result.SUCCESS),
        now=clock.now,
    )
    assert engine.in_flight("a") == 1
    engine.record_outcome(
        Outcome(decision_id=d2.decision_id, endpoint_id="a", result=Result.ERROR),
        now=clock.now,
    )
    assert engine.in_flight("a") == 0


def test_in_flight_expires_when_no_outcome_comes():
    settings = EngineSettings.parse({"routing": {"in_flight_timeout_s": 30}})
    engine, clock, _ = make(ids=("a",), settings=settings)
    decision = decided(engine.decide(request(), now=clock.now))
    clock.advance(29)
    engine.tick(now=clock.now)
    assert engine.in_flight("a") == 1
    clock.advance(2)
    engine.tick(now=clock.now)
    assert engine.in_flight("a") == 0
    assert engine.pending_decisions == 0
    late = Outcome(decision_id=decision.decision_id, endpoint_id="a", result=Result.SUCCESS)
    assert not engine.record_outcome(late, now=clock.now)
    assert engine.in_flight("a") == 0


def test_unknown_decision_still_updates_the_endpoint():
    engine, clock, _ = make(ids=("a",))
    outcome = Outcome(decision_id="nope", endpoint_id="a", result=Result.SUCCESS, latency_s=0.4)
    assert not engine.record_outcome(outcome, now=clock.now)
    (state,) = engine.endpoint_states(now=clock.now)
    assert state.latency_ewma_s == pytest.approx(0.4)


def test_events_for_added_changed_and_removed_endpoints():
    engine, clock, log = make(ids=("a",), health_url="http://x/health")
    assert [(e.endpoint_id, e.status) for e in log.events] == [("a", HealthStatus.UNKNOWN)]
    engine.set_health("a", HealthStatus.HEALTHY, reason="probe ok", now=clock.now)
    engine.set_health("a", HealthStatus.HEALTHY, reason="probe ok again", now=clock.now)
    assert len(log.events) == 2
    assert log.events[-1].status is HealthStatus.HEALTHY
    assert log.events[-1].breaker_state is BreakerState.CLOSED
    assert log.events[-1].model == "m"
    engine.set_endpoints([], now=clock.now)
    assert log.events[-1].removed
    assert log.events[-1].endpoint_id == "a"


def test_endpoint_states_report_live_state():
    engine, clock, _ = make(ids=("a", "b"))
    engine.set_endpoints([*endpoints(("a", "b")), endpoint("x", model="other")], now=clock.now)
    engine.decide(request(strategy="round_robin", exclude_endpoint_ids={"b"}), now=clock.now)
    engine.record_load("b", LoadReport(queue_depth=3, kv_cache_utilization=0.5), now=clock.now)
    states = {s.endpoint.id: s for s in engine.endpoint_states(model="m", now=clock.now)}
    assert set(states) == {"a", "b"}
    assert states["a"].in_flight == 1
    assert states["b"].load == LoadReport(queue_depth=3, kv_cache_utilization=0.5)
    assert states["a"].health is HealthStatus.HEALTHY
    assert len(engine.endpoint_states(now=clock.now)) == 3


def test_reregistering_keeps_live_stats():
    engine, clock, _ = make(ids=("a",))
    engine.decide(request(), now=clock.now)
    engine.set_endpoints([endpoint("a", weight=5)], now=clock.now)
    assert engine.in_flight("a") == 1


def test_a_request_sets_how_many_fallbacks_it_wants():
    engine, clock, _ = make(ids=tuple("abcdefgh"))
    d = decided(engine.decide(request(strategy="round_robin", max_fallbacks=5), now=clock.now))
    assert len(d.fallbacks) == 5
    d = decided(engine.decide(request(strategy="round_robin", max_fallbacks=100), now=clock.now))
    assert len(d.fallbacks) == 7


def test_retry_advice_comes_from_the_routing_table():
    settings = EngineSettings.parse(
        {
            "routing": {
                "retry_max_attempts": 4,
                "retry_initial_backoff_s": 0.05,
                "retry_max_backoff_s": 1.5,
                "retry_backoff_multiplier": 3,
            }
        }
    )
    engine, clock, _ = make(settings=settings)
    d = decided(engine.decide(request(), now=clock.now))
    assert (
        d.retry.max_attempts,
        d.retry.initial_backoff_s,
        d.retry.max_backoff_s,
        d.retry.backoff_multiplier,
    ) == (4, 0.05, 1.5, 3.0)


def test_the_fast_decision_constructor_builds_the_same_frozen_value():
    from decider.core import model as model_module
    from decider.core.model import RetryAdvice

    assert model_module.FAST_DECISIONS
    retry = RetryAdvice(
        max_attempts=3, initial_backoff_s=0.1, max_backoff_s=2.0, backoff_multiplier=2.0
    )
    args = (
        "id-1",
        endpoint("a"),
        (endpoint("b"),),
        "round_robin",
        "why",
        {"load": 1.0},
        retry,
        True,
        3,
        {"unhealthy": 1},
    )
    fast = model_module.make_decision(*args)
    slow = Decision(
        decision_id="id-1",
        endpoint=args[1],
        fallbacks=args[2],
        strategy="round_robin",
        reason="why",
        scores={"load": 1.0},
        retry=retry,
        affinity_hit=True,
        candidate_count=3,
        skipped={"unhealthy": 1},
    )
    assert fast == slow
    assert fast.candidates == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.reason = "changed"  # type: ignore[misc]


def test_state_owners_slot_in_through_engine_state():
    # Another owner of one piece of state (here: sessions kept for one binding only) is used
    # as is; the engine reaches state only through the owners it was given.
    settings = EngineSettings()
    rng = random.Random(7)
    state = dataclasses.replace(
        EngineState.in_memory(settings, rng=rng),
        sessions=SessionTable(ttl_s=60.0, max_sessions=1),
    )
    engine = Engine(settings, rng=rng, state=state)
    clock = FakeClock()
    engine.set_endpoints(endpoints(("a", "b")), now=clock.now)
    for session in ("s1", "s2", "s3"):
        decided(engine.decide(request(strategy="affinity", session_id=session), now=clock.now))
    assert engine.session_count == len(state.sessions) == 1
    assert engine.pending_decisions == len(state.pending) == 3
    assert sum(s.in_flight for s in state.stats.values()) == 3


# -- decide-time prefix indexing -------------------------------------------------------------

SHARED = tuple(range(500, 530))


def outcome(d: Decision, result: Result, endpoint_id: str = "") -> Outcome:
    return Outcome(
        decision_id=d.decision_id, endpoint_id=endpoint_id or d.endpoint.id, result=result
    )


def test_a_burst_sharing_a_prefix_follows_the_first_decision_before_any_outcome():
    engine, clock, _ = make(ids=("a", "b", "c", "d"))
    first = decided(engine.decide(request(prefix_hashes=SHARED), now=clock.now))
    burst = [
        decided(engine.decide(request(prefix_hashes=(*SHARED, 900 + i)), now=clock.now))
        for i in range(3)
    ]
    assert {d.endpoint.id for d in burst} == {first.endpoint.id}
    assert all(d.scores["cache"] == pytest.approx(30 / 31) for d in burst)
    assert engine.indexed_blocks == 30 + 3


@pytest.mark.parametrize("result", [Result.ERROR, Result.TIMEOUT, Result.CANCELLED])
def test_an_outcome_that_is_not_a_success_drops_the_pending_blocks(result):
    engine, clock, _ = make()
    d = decided(engine.decide(request(prefix_hashes=SHARED), now=clock.now))
    assert engine.indexed_blocks == 30
    engine.record_outcome(outcome(d, result), now=clock.advance(0.5))
    assert engine.indexed_blocks == 0


def test_a_success_confirms_the_pending_blocks():
    engine, clock, _ = make()
    d = decided(engine.decide(request(prefix_hashes=SHARED), now=clock.now))
    engine.record_outcome(outcome(d, Result.SUCCESS), now=clock.advance(0.5))
    assert engine.indexed_blocks == 30
    again = decided(engine.decide(request(prefix_hashes=SHARED), now=clock.now))
    assert again.endpoint == d.endpoint and again.scores["cache"] == 1.0


def test_a_success_at_a_fallback_moves_the_blocks_there():
    engine, clock, _ = make()
    d = decided(engine.decide(request(prefix_hashes=SHARED), now=clock.now))
    fallback = d.fallbacks[0].id
    engine.record_outcome(outcome(d, Result.SUCCESS, fallback), now=clock.advance(0.5))
    assert engine.indexed_blocks == 30
    again = decided(engine.decide(request(prefix_hashes=SHARED), now=clock.now))
    assert again.endpoint.id == fallback


def test_a_decision_that_expires_without_an_outcome_drops_its_pending_blocks():
    settings = EngineSettings.parse({"routing": {"in_flight_timeout_s": 10.0}})
    engine, clock, _ = make(settings=settings)
    engine.decide(request(prefix_hashes=SHARED), now=clock.now)
    engine.tick(now=clock.advance(5.0))
    assert engine.indexed_blocks == 30
    engine.tick(now=clock.advance(6.0))
    assert engine.indexed_blocks == 0 and engine.pending_decisions == 0
