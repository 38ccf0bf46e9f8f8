"""The scenarios of the seed report (issue 3, Proof), as tests."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from fakes import FakeClock, endpoints, request

from decider.core.engine import Engine
from decider.core.model import Decision, HealthStatus, Outcome, Result
from decider.core.settings import EngineSettings


def decided(result):
    assert isinstance(result, Decision), result
    return result


@pytest.mark.parametrize(
    "strategy",
    [
        "round_robin",
        "least_request",
        "random",
        "composite",
        "latency",
        "cost",
        "weighted_random",
        "weighted_round_robin",
        "quota_aware",
        "cache_aware",
        "affinity",
        "ab_split",
    ],
)
def test_health_filter_uses_only_the_healthy_endpoints(strategy):
    # Seed scenario 3: A healthy, B unhealthy, C healthy, D degraded; 200 requests.
    clock = FakeClock()
    engine = Engine(EngineSettings(), rng=random.Random(3))
    engine.set_endpoints(endpoints(("A", "B", "C", "D")), now=clock.now)
    engine.set_health("B", HealthStatus.UNHEALTHY, reason="probe failed", now=clock.now)
    engine.set_health("D", HealthStatus.DEGRADED, reason="queue deep", now=clock.now)
    counts: Counter[str] = Counter()
    for i in range(200):
        d = decided(engine.decide(request(strategy=strategy, session_id=f"s{i}"), now=clock.now))
        counts[d.endpoint.id] += 1
        engine.record_outcome(
            Outcome(
                decision_id=d.decision_id,
                endpoint_id=d.endpoint.id,
                result=Result.SUCCESS,
                latency_s=0.1,
            ),
            now=clock.advance(0.01),
        )
    assert set(counts) <= {"A", "C"}
    assert counts["A"] + counts["C"] == 200


def test_health_filter_reason_counts_the_skips():
    clock = FakeClock()
    engine = Engine(EngineSettings(), rng=random.Random(3))
    engine.set_endpoints(endpoints(("A", "B", "C", "D")), now=clock.now)
    engine.set_health("B", HealthStatus.UNHEALTHY, reason="probe failed", now=clock.now)
    engine.set_health("D", HealthStatus.DEGRADED, reason="queue deep", now=clock.now)
    d = decided(engine.decide(request(strategy="round_robin"), now=clock.now))
    assert d.reason.endswith("; 2 of 4 candidates, 1 unhealthy, 1 degraded (standby)")
    assert d.skipped == {"unhealthy": 1, "degraded": 1}
    # The degraded endpoint is still a fallback, after the healthy one.
    assert [f.id for f in d.fallbacks][-1] == "D"


def test_round_robin_spreads_evenly_over_the_two_healthy():
    clock = FakeClock()
    engine = Engine(EngineSettings(), rng=random.Random(3))
    engine.set_endpoints(endpoints(("A", "B", "C", "D")), now=clock.now)
    engine.set_health("B", HealthStatus.UNHEALTHY, reason="probe failed", now=clock.now)
    engine.set_health("D", HealthStatus.DEGRADED, reason="queue deep", now=clock.now)
    counts = Counter(
        decided(engine.decide(request(strategy="round_robin"), now=clock.now)).endpoint.id
        for _ in range(200)
    )
    assert counts == {"A": 100, "C": 100}


def test_degraded_is_used_when_no_healthy_one_remains():
    clock = FakeClock()
    engine = Engine(EngineSettings(), rng=random.Random(3))
    engine.set_endpoints(endpoints(("A", "D")), now=clock.now)
    engine.set_health("A", HealthStatus.UNHEALTHY, reason="probe failed", now=clock.now)
    engine.set_health("D", HealthStatus.DEGRADED, reason="queue deep", now=clock.now)
    d = decided(engine.decide(request(), now=clock.now))
    assert d.endpoint.id == "D"


def test_affinity_holds_for_ten_requests_and_rebinds_after_expiry():
    # Seed scenario 4: 3 endpoints, session user123; 10 requests stay; after 5 minutes, rebind.
    clock = FakeClock()
    engine = Engine(EngineSettings(), rng=random.Random(11))
    engine.set_endpoints(endpoints(("A", "B", "C")), now=clock.now)
    first = decided(
        engine.decide(request(strategy="affinity", session_id="user123"), now=clock.now)
    )
    assert not first.affinity_hit
    assert "new session bound" in first.reason
    bound = first.endpoint.id
    for _ in range(9):
        # Load elsewhere must not move a bound session.
        d = decided(
            engine.decide(
                request(strategy="affinity", session_id="user123"), now=clock.advance(1.0)
            )
        )
        assert d.endpoint.id == bound
        assert d.affinity_hit
    clock.advance(301.0)
    engine.tick(now=clock.now)
    assert engine.session_count == 0
    d = decided(engine.decide(request(strategy="affinity", session_id="user123"), now=clock.now))
    assert not d.affinity_hit
    assert "new session bound" in d.reason


def test_affinity_rebinds_when_the_bound_endpoint_becomes_unusable():
    clock = FakeClock()
    engine = Engine(EngineSettings(), rng=random.Random(11))
    engine.set_endpoints(endpoints(("A", "B", "C")), now=clock.now)
    bound = decided(
        engine.decide(request(strategy="affinity", session_id="s"), now=clock.now)
    ).endpoint.id
    engine.set_health(bound, HealthStatus.UNHEALTHY, reason="probe failed", now=clock.now)
    d = decided(engine.decide(request(strategy="affinity", session_id="s"), now=clock.now))
    assert d.endpoint.id != bound
    assert f"rebound from {bound} (no longer usable) to {d.endpoint.id}" in d.reason
    engine.set_health(bound, HealthStatus.HEALTHY, reason="probe ok", now=clock.now)
    again = decided(engine.decide(request(strategy="affinity", session_id="s"), now=clock.now))
    assert again.endpoint.id == d.endpoint.id
    assert again.affinity_hit
