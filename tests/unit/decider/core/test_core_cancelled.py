"""Result.CANCELLED: the caller gave up, so the decision's in-flight slot is freed and the
endpoint is neither charged a failure nor given a latency sample."""

from __future__ import annotations

import random

from fakes import EventLog, FakeClock, endpoints, request

from decider.core.engine import Engine
from decider.core.model import BreakerState, Decision, Outcome, Refusal, Result
from decider.core.settings import EngineSettings


def test_cancelled_frees_in_flight_without_a_breaker_failure_or_latency_sample():
    clock = FakeClock()
    log = EventLog()
    settings = EngineSettings.parse({"breaker": {"consecutive_failures": 2}})
    engine = Engine(settings, rng=random.Random(1), on_event=log)
    engine.set_endpoints(endpoints(("a",)), now=clock.now)
    for _ in range(20):
        decision = engine.decide(request(), now=clock.now)
        assert isinstance(decision, Decision)
        assert engine.in_flight("a") == 1
        cancelled = Outcome(
            decision_id=decision.decision_id,
            endpoint_id="a",
            result=Result.CANCELLED,
            latency_s=9.0,
        )
        assert engine.record_outcome(cancelled, now=clock.advance(9.0))
        assert engine.in_flight("a") == 0
    (state,) = engine.endpoint_states(now=clock.now)
    assert state.breaker_state is BreakerState.CLOSED
    assert state.latency_ewma_s == 0.0
    assert all(e.breaker_state is BreakerState.CLOSED for e in log.for_endpoint("a"))


def test_cancelled_trial_hands_the_half_open_slot_back():
    clock = FakeClock()
    settings = EngineSettings.parse({"breaker": {"half_open_trials": 1}})
    engine = Engine(settings, rng=random.Random(1))
    engine.set_endpoints(endpoints(("a",)), now=clock.now)
    for _ in range(5):
        engine.record_outcome(
            Outcome(decision_id="", endpoint_id="a", result=Result.ERROR), now=clock.now
        )
    clock.advance(30)
    trial = engine.decide(request(), now=clock.now)
    assert isinstance(trial, Decision)
    assert isinstance(engine.decide(request(), now=clock.now), Refusal)
    engine.record_outcome(
        Outcome(decision_id=trial.decision_id, endpoint_id="a", result=Result.CANCELLED),
        now=clock.now,
    )
    assert isinstance(engine.decide(request(), now=clock.now), Decision)
