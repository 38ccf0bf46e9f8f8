"""Per-endpoint stats: factor scores and the incremental rank heaps."""

from __future__ import annotations

import random

import pytest
from fakes import endpoint

from decider.core.breaker import CircuitBreakers
from decider.core.model import HealthStatus, LoadReport
from decider.core.pool import Pools
from decider.core.quota import QuotaLedger
from decider.core.settings import BreakerSettings, QuotaSettings
from decider.core.stats import EndpointStats, FactorWeights, RankHeap, Scorer


def stats(n):
    return [EndpointStats(endpoint(f"e{i}"), health=HealthStatus.HEALTHY) for i in range(n)]


def scorer():
    return Scorer(FactorWeights(), load_reference=4.0, max_report_age_s=10.0, ttft_weight=1.0)


def test_rank_heap_follows_every_rescore():
    rng = random.Random(3)
    members = stats(50)
    sc = scorer()
    for s in members:
        sc.rescore(s, 0.0)
    heap = RankHeap(members, lambda s: s.load)
    for step in range(2000):
        s = rng.choice(members)
        s.in_flight = max(0, s.in_flight + rng.choice((-1, 1, 1)))
        sc.rescore(s, float(step))
        heap.push(s)  # what Pools.reorder does for every live heap ranking s
        expected = sorted(s.load for s in members)[:3]
        assert [s.load for s in heap.best(3)] == expected
        assert heap.first().load == expected[0]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 40])
def test_rank_heap_best_is_exactly_the_sorted_live_entries(n):
    # By key, ties by least recently changed; with the stale entries every rescore leaves.
    rng = random.Random(n)
    members = stats(n)
    sc = scorer()
    heap = RankHeap(members, lambda s: s.load)
    for step in range(3000):
        s = rng.choice(members)
        s.in_flight = max(0, min(4, s.in_flight + rng.choice((-1, 1))))
        sc.rescore(s, float(step))
        heap.push(s)
        ranked = sorted(members, key=lambda m: (m.load, heap._latest[m]))
        count = rng.randint(1, n + 1)
        assert heap.best(count) == ranked[:count]


def test_rank_heap_breaks_ties_by_least_recently_changed():
    members = stats(3)
    sc = scorer()
    heap = RankHeap(members, lambda s: s.load)
    order = []
    for _ in range(6):
        s = heap.first()
        order.append(s.id)
        s.in_flight += 1
        sc.rescore(s, 0.0)
        heap.push(s)
        s.in_flight -= 1
        sc.rescore(s, 0.0)  # back to the same load, but changed last: behind the others
        heap.push(s)
    assert order == ["e0", "e1", "e2", "e0", "e1", "e2"]


def pools():
    return Pools(
        breakers=CircuitBreakers(BreakerSettings()),
        budgets=QuotaLedger(QuotaSettings()),
        panic_threshold=0.0,
    )


def test_reorder_pushes_into_every_live_heap_of_the_endpoint():
    members = stats(3)
    sc = scorer()
    table = pools()
    pool = table.get("m", frozenset(), members, 0.0)
    by_load = pool.heap("load", lambda s: s.load)
    by_id = pool.heap("id", lambda s: s.id)
    assert table.heaps_of(members[0]) == [by_load, by_id]
    assert by_load.first() is members[0]
    members[0].in_flight = 3
    sc.rescore(members[0], 0.0)
    assert by_load.first() is members[0]  # rescoring alone reorders nothing
    table.reorder(members[0])
    assert by_load.first() is members[1]


def test_closed_heaps_stop_receiving_entries():
    members = stats(2)
    sc = scorer()
    table = pools()
    heap = table.get("m", frozenset(), members, 0.0).heap("load", lambda s: s.load)
    table.drop("m")
    assert not heap.alive
    sc.rescore(members[0], 0.0)
    table.reorder(members[0])
    assert table.heaps_of(members[0]) == []


def test_load_score_counts_reported_queue_and_recent_picks():
    (s,) = stats(1)
    sc = scorer()
    sc.rescore(s, 0.0)
    assert s.load_score == 1.0
    s.load_report, s.load_at = LoadReport(queue_depth=4), 0.0
    sc.rescore(s, 1.0)
    assert s.load == 4
    assert s.load_score == 0.5
    sc.rescore(s, 20.0)  # the report is stale
    assert s.load == 0


def test_factor_weights_total():
    assert FactorWeights().total == pytest.approx(1.17)
    assert FactorWeights(load=1, latency=0, cache=0, quota=0, health=0, cost=0).total == 1
