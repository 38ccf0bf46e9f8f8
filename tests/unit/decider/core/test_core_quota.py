"""Tenant quotas and endpoint capacity: token buckets, refusals with retry hints, actual tokens."""

from __future__ import annotations

import random

import pytest
from fakes import FakeClock, endpoint, endpoints, request

from decider.core.engine import Engine
from decider.core.model import Decision, Outcome, Refusal, RefusalKind, Result
from decider.core.quota import TokenBucket
from decider.core.settings import EngineSettings


def make(tables, eps=None):
    clock = FakeClock()
    engine = Engine(EngineSettings.parse(tables), rng=random.Random(1))
    engine.set_endpoints(eps or endpoints(("a", "b")), now=clock.now)
    return engine, clock


def test_bucket_refills_at_the_per_minute_rate_up_to_the_limit():
    bucket = TokenBucket(60, now=0.0)
    bucket.take(60, 0.0)
    assert bucket.wait_s(1, 0.0) == pytest.approx(1.0)
    assert bucket.refill(30.0) == pytest.approx(30.0)
    assert bucket.refill(600.0) == 60.0
    assert bucket.headroom(600.0) == 1.0
    # Asks above the capacity wait for a full bucket rather than forever.
    assert bucket.wait_s(1000, 600.0) == 0.0


def test_requests_per_minute_refuses_with_retry_after_and_the_violation():
    engine, clock = make({"quotas": {"tenants": {"acme": {"requests_per_minute": 2}}}})
    for _ in range(2):
        assert isinstance(engine.decide(request(tenant="acme"), now=clock.now), Decision)
    refused = engine.decide(request(tenant="acme"), now=clock.now)
    assert isinstance(refused, Refusal)
    assert refused.kind is RefusalKind.QUOTA_EXHAUSTED
    assert refused.retry_after_s == pytest.approx(30.0)
    (violation,) = refused.violations
    assert violation.subject == "tenant:acme"
    assert violation.description == "requests_per_minute: limit 2, 0 left"
    assert "tenant 'acme' is over quota" in refused.message
    # Other tenants have no limit; acme gets one back after 30 s.
    assert isinstance(engine.decide(request(tenant="other"), now=clock.now), Decision)
    assert isinstance(engine.decide(request(tenant="acme"), now=clock.advance(30)), Decision)


def test_default_quota_applies_to_every_tenant_without_its_own():
    engine, clock = make(
        {"quotas": {"requests_per_minute": 1, "tenants": {"big": {"requests_per_minute": 100}}}}
    )
    assert isinstance(engine.decide(request(tenant="x"), now=clock.now), Decision)
    assert isinstance(engine.decide(request(tenant="x"), now=clock.now), Refusal)
    assert isinstance(engine.decide(request(tenant=""), now=clock.now), Decision)
    for _ in range(50):
        assert isinstance(engine.decide(request(tenant="big"), now=clock.now), Decision)


def test_actual_tokens_replace_the_estimate():
    engine, clock = make({"quotas": {"tenants": {"acme": {"tokens_per_minute": 1000}}}})
    d = engine.decide(request(tenant="acme", estimated_input_tokens=900), now=clock.now)
    assert isinstance(d, Decision)
    refused = engine.decide(request(tenant="acme", estimated_input_tokens=200), now=clock.now)
    assert isinstance(refused, Refusal)
    assert refused.violations[0].description.startswith("tokens_per_minute: limit 1000, 100 left")
    engine.record_outcome(
        Outcome(
            decision_id=d.decision_id,
            endpoint_id=d.endpoint.id,
            result=Result.SUCCESS,
            input_tokens=80,
            output_tokens=20,
        ),
        now=clock.now,
    )
    assert isinstance(
        engine.decide(request(tenant="acme", estimated_input_tokens=200), now=clock.now), Decision
    )


def test_quota_refusal_changes_nothing_and_explain_charges_nothing():
    engine, clock = make({"quotas": {"tenants": {"acme": {"requests_per_minute": 1}}}})
    for _ in range(5):
        d = engine.decide(request(tenant="acme", explain=True), now=clock.now)
        assert isinstance(d, Decision)
    assert isinstance(engine.decide(request(tenant="acme"), now=clock.now), Decision)
    assert engine.in_flight("a") + engine.in_flight("b") == 1


def test_endpoint_max_in_flight():
    eps = [endpoint("a", max_in_flight=2), endpoint("b", max_in_flight=1)]
    engine, clock = make({}, eps)
    picks = [engine.decide(request(), now=clock.now) for _ in range(4)]
    assert [p.endpoint.id for p in picks[:3] if isinstance(p, Decision)].count("a") == 2
    refused = picks[3]
    assert isinstance(refused, Refusal)
    assert refused.kind is RefusalKind.NO_HEALTHY_ENDPOINT
    assert refused.skipped == {"at_capacity": 2}
    assert "a at capacity" in refused.message


def test_endpoint_requests_and_tokens_per_minute():
    eps = [endpoint("a", requests_per_minute=1), endpoint("b", tokens_per_minute=1000)]
    engine, clock = make({}, eps)
    first = engine.decide(
        request(strategy="round_robin", estimated_input_tokens=600), now=clock.now
    )
    second = engine.decide(
        request(strategy="round_robin", estimated_input_tokens=600), now=clock.now
    )
    assert isinstance(first, Decision) and isinstance(second, Decision)
    assert {first.endpoint.id, second.endpoint.id} == {"a", "b"}
    third = engine.decide(request(estimated_input_tokens=600), now=clock.now)
    assert isinstance(third, Refusal)
    assert third.skipped == {"at_capacity": 2}
    later = engine.decide(request(estimated_input_tokens=600), now=clock.advance(60))
    assert isinstance(later, Decision)


def test_actual_tokens_replace_the_estimate_in_the_endpoint_bucket():
    engine, clock = make({}, [endpoint("a", tokens_per_minute=1000)])
    d = engine.decide(request(estimated_input_tokens=900), now=clock.now)
    assert isinstance(d, Decision)
    assert isinstance(engine.decide(request(estimated_input_tokens=200), now=clock.now), Refusal)
    engine.record_outcome(
        Outcome(
            decision_id=d.decision_id,
            endpoint_id="a",
            result=Result.SUCCESS,
            input_tokens=50,
            output_tokens=50,
        ),
        now=clock.now,
    )
    assert isinstance(engine.decide(request(estimated_input_tokens=200), now=clock.now), Decision)
