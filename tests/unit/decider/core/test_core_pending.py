"""Pending decisions: ids, in-flight counts, resolution and expiry in issue order."""

from __future__ import annotations

import random

import pytest
from fakes import endpoint

from decider.core.model import HealthStatus
from decider.core.pending import InMemoryPending
from decider.core.stats import EndpointStats


def make(timeout_s=10.0):
    return InMemoryPending(timeout_s=timeout_s, rng=random.Random(1))


def stats(name):
    return EndpointStats(endpoint(name), health=HealthStatus.HEALTHY)


def test_record_counts_in_flight_and_resolve_releases_it_once():
    pending = make()
    a = stats("a")
    first = pending.record(a, "acme", 100, (1, 2), 0.0)
    second = pending.record(a, "", 0, (), 0.0)
    assert first != second
    assert a.in_flight == 2
    assert len(pending) == 2
    assert pending.resolve(first) == (a, "acme", 100, (1, 2))
    assert a.in_flight == 1
    assert pending.resolve(first) is None
    assert a.in_flight == 1
    assert len(pending) == 1


@pytest.mark.parametrize("suffix", ["", "0", "01", "1_0", "\uff11", "+1", " 1", "1 ", "x"])
def test_only_the_exact_id_spelling_resolves(suffix):
    pending = make()
    a = stats("a")
    for _ in range(10):
        decision_id = pending.record(a, "", 0, (), 0.0)
    prefix = decision_id.rsplit("-", 1)[0] + "-"
    assert pending.resolve(prefix + suffix) is None
    assert pending.resolve("other-1") is None
    assert a.in_flight == 10
    assert pending.resolve(prefix + "10") is not None


def test_expiry_in_issue_order_after_the_timeout():
    pending = make(timeout_s=10.0)
    a, b = stats("a"), stats("b")
    pending.record(a, "", 0, (1, 2), 0.0)
    kept = pending.record(b, "", 0, (), 0.05)
    pending.resolve(kept)
    pending.record(b, "", 0, (), 1.0)
    assert pending.next_expiry == pytest.approx(10.1)
    assert list(pending.expire(10.0)) == []
    assert list(pending.expire(10.1)) == [(a, (1, 2))]
    assert (a.in_flight, b.in_flight) == (0, 1)
    assert pending.next_expiry == pytest.approx(11.1)
    assert list(pending.expire(11.1)) == [(b, ())]
    assert pending.next_expiry == float("inf")
    assert len(pending) == 0
