"""Circuit breakers: the state machine on a fake clock, and what decisions see of it."""

from __future__ import annotations

import random

import pytest
from fakes import EventLog, FakeClock, endpoints, request

from decider.core.breaker import CircuitBreakers
from decider.core.engine import Engine
from decider.core.model import BreakerState, Decision, Outcome, Refusal, Result
from decider.core.settings import BreakerSettings, EngineSettings


def fail(breakers, endpoint_id, clock, times=1):
    out = None
    for _ in range(times):
        out = breakers.record(endpoint_id, ok=False, now=clock.now) or out
    return out


def test_opens_after_consecutive_failures_and_a_success_resets_the_count():
    clock = FakeClock()
    b = CircuitBreakers(BreakerSettings())
    b.add("a", now=clock.now)
    fail(b, "a", clock, 4)
    b.record("a", ok=True, now=clock.now)
    assert fail(b, "a", clock, 4) is None
    assert b.state("a") is BreakerState.CLOSED
    t = fail(b, "a", clock)
    assert t is not None and t.state is BreakerState.OPEN
    assert "5 consecutive failures" in t.reason
    assert not b.allows("a", clock.now)
    assert b.open_remaining_s("a", clock.now) == 30.0


def test_half_open_admits_bounded_trials_and_closes_after_successes():
    clock = FakeClock()
    b = CircuitBreakers(BreakerSettings(half_open_trials=3, half_open_successes=2))
    b.add("a", now=clock.now)
    fail(b, "a", clock, 5)
    assert b.advance(clock.advance(29.9)) == []
    (moved,) = b.advance(clock.advance(0.1))
    assert moved.state is BreakerState.HALF_OPEN
    for _ in range(3):
        assert b.allows("a", clock.now)
        b.on_pick("a")
    assert not b.allows("a", clock.now)
    assert b.record("a", ok=True, now=clock.now) is None
    assert b.allows("a", clock.now)  # a finished trial frees its slot
    closed = b.record("a", ok=True, now=clock.now)
    assert closed is not None and closed.state is BreakerState.CLOSED


def test_open_time_multiplies_with_consecutive_ejections_and_is_capped():
    clock = FakeClock()
    b = CircuitBreakers(BreakerSettings(open_s=30, max_open_s=100))
    b.add("a", now=clock.now)
    fail(b, "a", clock, 5)
    opened = []
    for _ in range(4):
        opened.append(b.open_remaining_s("a", clock.now))
        b.advance(clock.advance(opened[-1]))
        assert b.state("a") is BreakerState.HALF_OPEN
        b.on_pick("a")
        t = b.record("a", ok=False, now=clock.now)
        assert t is not None and t.state is BreakerState.OPEN
    assert opened == [30.0, 60.0, 90.0, 100.0]


def test_ejections_decay_while_closed():
    clock = FakeClock()
    b = CircuitBreakers(BreakerSettings(open_s=30, max_open_s=300, half_open_successes=1))
    b.add("a", now=clock.now)
    fail(b, "a", clock, 5)
    b.advance(clock.advance(30))
    b.on_pick("a")
    b.record("a", ok=False, now=clock.now)  # ejection 2: 60 s
    b.advance(clock.advance(60))
    b.on_pick("a")
    b.record("a", ok=True, now=clock.now)  # closed
    clock.advance(30)  # one open_s of good behaviour earns one step back
    fail(b, "a", clock, 5)
    assert b.open_remaining_s("a", clock.now) == 60.0


def test_opens_on_failure_rate_over_the_window():
    clock = FakeClock()
    b = CircuitBreakers(BreakerSettings(failure_rate=0.5, min_requests=20, window_s=30))
    b.add("a", now=clock.now)
    transition = None
    for i in range(20):
        transition = b.record("a", ok=i % 2 == 0, now=clock.advance(0.5))
    assert transition is not None and transition.state is BreakerState.OPEN
    assert "failure rate 50%" in transition.reason


def test_disabled_breakers_never_open():
    clock = FakeClock()
    b = CircuitBreakers(BreakerSettings(enabled=False))
    b.add("a", now=clock.now)
    assert fail(b, "a", clock, 50) is None
    assert b.allows("a", clock.now)


def test_the_engine_skips_open_breakers_and_publishes_every_transition():
    clock = FakeClock()
    log = EventLog()
    engine = Engine(EngineSettings(), rng=random.Random(1), on_event=log)
    engine.set_endpoints(endpoints(("a", "b")), now=clock.now)
    for _ in range(5):
        d = engine.decide(
            request(strategy="round_robin", exclude_endpoint_ids={"b"}), now=clock.now
        )
        assert isinstance(d, Decision)
        engine.record_outcome(
            Outcome(
                decision_id=d.decision_id, endpoint_id="a", result=Result.TIMEOUT, latency_s=30.0
            ),
            now=clock.now,
        )
    assert log.for_endpoint("a")[-1].breaker_state is BreakerState.OPEN
    for _ in range(10):
        d = engine.decide(request(strategy="round_robin"), now=clock.now)
        assert isinstance(d, Decision) and d.endpoint.id == "b"
        assert d.skipped == {"breaker_open": 1}
        assert d.reason.endswith("1 of 2 candidates, 1 breaker open")

    clock.advance(30)
    engine.tick(now=clock.now)
    assert log.for_endpoint("a")[-1].breaker_state is BreakerState.HALF_OPEN
    # Half-open admits three trials; with b excluded, the fourth request finds nothing usable.
    trials = []
    for _ in range(3):
        d = engine.decide(request(exclude_endpoint_ids={"b"}), now=clock.now)
        assert isinstance(d, Decision) and d.endpoint.id == "a"
        trials.append(d)
    refused = engine.decide(request(exclude_endpoint_ids={"b"}), now=clock.now)
    assert isinstance(refused, Refusal)
    assert refused.skipped == {"breaker_half_open": 1, "excluded": 1}
    assert "a breaker half-open, every trial slot taken" in refused.message
    for d in trials[:2]:
        engine.record_outcome(
            Outcome(decision_id=d.decision_id, endpoint_id="a", result=Result.SUCCESS),
            now=clock.now,
        )
    assert log.for_endpoint("a")[-1].breaker_state is BreakerState.CLOSED
    states = [e.breaker_state for e in log.for_endpoint("a")]
    assert states == [
        BreakerState.CLOSED,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_half_open_moves_on_decide_without_waiting_for_tick():
    clock = FakeClock()
    log = EventLog()
    engine = Engine(EngineSettings(), rng=random.Random(1), on_event=log)
    engine.set_endpoints(endpoints(("a",)), now=clock.now)
    for _ in range(5):
        engine.record_outcome(
            Outcome(decision_id="", endpoint_id="a", result=Result.ERROR), now=clock.now
        )
    assert isinstance(engine.decide(request(), now=clock.now), Refusal)
    d = engine.decide(request(), now=clock.advance(30))
    assert isinstance(d, Decision)
    assert log.events[-1].breaker_state is BreakerState.HALF_OPEN


def test_an_expired_trial_frees_its_slot():
    clock = FakeClock()
    settings = EngineSettings.parse(
        {"breaker": {"half_open_trials": 1}, "routing": {"in_flight_timeout_s": 5}}
    )
    engine = Engine(settings, rng=random.Random(1))
    engine.set_endpoints(endpoints(("a",)), now=clock.now)
    for _ in range(5):
        engine.record_outcome(
            Outcome(decision_id="", endpoint_id="a", result=Result.ERROR), now=clock.now
        )
    clock.advance(30)
    assert isinstance(engine.decide(request(), now=clock.now), Decision)
    assert isinstance(engine.decide(request(), now=clock.now), Refusal)
    engine.tick(now=clock.advance(6))
    assert isinstance(engine.decide(request(), now=clock.now), Decision)


@pytest.mark.parametrize("result", [Result.RATE_LIMITED])
def test_rate_limited_cools_down_without_counting_as_a_failure(result):
    clock = FakeClock()
    log = EventLog()
    engine = Engine(EngineSettings(), rng=random.Random(1), on_event=log)
    engine.set_endpoints(endpoints(("a", "b")), now=clock.now)
    for _ in range(10):
        engine.record_outcome(
            Outcome(decision_id="", endpoint_id="a", result=result), now=clock.now
        )
    assert all(e.breaker_state is BreakerState.CLOSED for e in log.for_endpoint("a"))
    d = engine.decide(request(), now=clock.now)
    assert isinstance(d, Decision) and d.endpoint.id == "b"
    assert d.skipped == {"cooling_down": 1}
    assert "1 cooling down after rate limiting" in d.reason
    d = engine.decide(request(strategy="round_robin"), now=clock.advance(5.0))
    ids = {d.endpoint.id, *(f.id for f in d.fallbacks)} if isinstance(d, Decision) else set()
    assert ids == {"a", "b"}


def test_the_half_open_count_follows_every_transition():
    clock = FakeClock()
    b = CircuitBreakers(BreakerSettings(half_open_successes=1))
    for endpoint_id in ("a", "b", "c"):
        b.add(endpoint_id, now=clock.now)
        fail(b, endpoint_id, clock, 5)
    assert b.half_open == 0
    b.advance(clock.advance(30))
    assert b.half_open == 3
    b.record("a", ok=True, now=clock.now)  # closes
    b.record("b", ok=False, now=clock.now)  # opens again
    b.remove("c")
    assert b.half_open == 0
