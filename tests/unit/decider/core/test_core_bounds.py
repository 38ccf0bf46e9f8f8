"""Every piece of state that grows with traffic stops at its bound, says what it evicted, and
releases what the evicted entries held."""

from __future__ import annotations

import random

from decider.core.affinity import PrefixIndex, SessionTable
from decider.core.engine import Engine
from decider.core.model import Endpoint, HealthStatus, Outcome, Result, RouteRequest
from decider.core.pending import InMemoryPending
from decider.core.quota import QuotaLedger
from decider.core.settings import EngineSettings
from decider.core.stats import EndpointStats

ENDPOINTS = [Endpoint(id=f"e{i}", address=f"10.0.0.{i}:8000", model="m") for i in range(3)]


def engine(doc: dict) -> Engine:
    e = Engine(EngineSettings.parse(doc), rng=random.Random(7))
    e.set_endpoints(ENDPOINTS, now=0.0)
    return e


def test_the_oldest_pending_decision_is_forgotten_and_its_in_flight_slot_released():
    e = engine({"routing": {"max_pending_decisions": 10, "default_strategy": "round_robin"}})
    decisions = [e.decide(RouteRequest(model="m"), now=i * 0.001) for i in range(25)]
    usage = e.state_usage()["pending_decisions"]
    assert (usage.entries, usage.limit, usage.evicted) == (10, 10, 15)
    assert sum(e.in_flight(ep.id) for ep in ENDPOINTS) == 10
    oldest, newest = decisions[0], decisions[-1]
    outcome = Outcome(decision_id=oldest.decision_id, endpoint_id="e0", result=Result.SUCCESS)
    assert not e.record_outcome(outcome, now=1.0)
    outcome = Outcome(decision_id=newest.decision_id, endpoint_id="e0", result=Result.SUCCESS)
    assert e.record_outcome(outcome, now=1.0)
    assert sum(e.in_flight(ep.id) for ep in ENDPOINTS) == 9
    # Expiry still ends the rest on time.
    e.tick(now=400.0)
    assert e.state_usage()["pending_decisions"].entries == 0
    assert sum(e.in_flight(ep.id) for ep in ENDPOINTS) == 0


def test_a_bound_of_one_keeps_only_the_latest_decision():
    e = engine({"routing": {"max_pending_decisions": 1}})
    for i in range(5):
        e.decide(RouteRequest(model="m"), now=i * 0.01)
    assert e.pending_decisions == 1
    assert sum(e.in_flight(ep.id) for ep in ENDPOINTS) == 1


def test_pending_decisions_keep_only_the_prefix_blocks_the_index_records():
    e = engine({"cache": {"max_blocks_per_request": 4}, "routing": {"max_pending_decisions": 2}})
    d = e.decide(RouteRequest(model="m", prefix_hashes=tuple(range(1, 100))), now=0.0)
    e.record_outcome(
        Outcome(decision_id=d.decision_id, endpoint_id=d.endpoint.id, result=Result.SUCCESS),
        now=0.1,
    )
    assert e.state_usage()["prefix_blocks"].entries == 4


def test_open_decisions_keep_at_most_16_prefix_hashes_each_on_average():
    pending = InMemoryPending(timeout_s=300.0, rng=random.Random(1), max_entries=2)
    stats = EndpointStats(ENDPOINTS[0], health=HealthStatus.HEALTHY)
    long_prompt = tuple(range(1, 21))
    first = pending.record(stats, "", 0, long_prompt, 0.0)
    second = pending.record(stats, "", 0, long_prompt, 0.0)  # 40 > 32: keeps none
    assert pending.resolve(first)[3] == long_prompt
    assert pending.resolve(second)[3] == ()
    # Resolved decisions give their share back.
    assert pending.resolve(pending.record(stats, "", 0, long_prompt, 1.0))[3] == long_prompt


def test_sessions_past_the_bound_drop_the_least_recently_used_eighth():
    table = SessionTable(ttl_s=300.0, max_sessions=16)
    for i in range(16):
        table.bind(f"s{i}", "e0", now=float(i))
    table.bind("s0", "e1", now=20.0)  # renewed: now the most recent
    table.bind("s16", "e0", now=21.0)
    usage = table.usage()
    assert usage.entries == 14 and usage.evicted == 3 and usage.limit == 16
    assert table.get("s0", 22.0) == "e1"
    assert table.get("s1", 22.0) is None and table.get("s3", 22.0) is None
    assert table.get("s4", 22.0) == "e0"
    assert table.expire(22.0 + 300.0) == 14
    assert len(table) == 0


def test_the_prefix_index_stays_under_its_total_bound():
    index = PrefixIndex(blocks_per_endpoint=64, max_blocks_per_request=16, max_blocks=40)
    for round_ in range(20):
        for n, endpoint_id in enumerate(("e0", "e1", "e2")):
            index.record(endpoint_id, [round_ * 1000 + n * 100 + k for k in range(1, 9)])
            assert index.block_count <= 40
    usage = index.usage()
    assert usage.entries == index.block_count <= 40 and usage.evicted > 0
    # The most recent prompt is still found.
    assert index.matches([19200 + k for k in range(1, 9)]) == {"e2": 8}
    for endpoint_id in ("e0", "e1", "e2"):
        index.remove_endpoint(endpoint_id)
    assert index.block_count == 0


def test_when_the_biggest_holder_has_only_pending_blocks_another_gives_way():
    index = PrefixIndex(blocks_per_endpoint=64, max_blocks_per_request=16, max_blocks=6)
    index.add_pending("e0", [1, 2, 3, 4])
    index.record("e1", [11, 12, 13])
    # e0 holds the most, all pending (its decision is still open): e1's served blocks go.
    assert index.block_count <= 6
    assert index.matches([1, 2, 3, 4]) == {"e0": 4}
    index.confirm("e0", [1, 2, 3, 4])
    assert index.block_count <= 6


def test_tenant_buckets_are_bounded_and_refilled_ones_dropped():
    settings = EngineSettings.parse({"quotas": {"requests_per_minute": 60, "max_tenants": 8}})
    ledger = QuotaLedger(settings.quotas)
    for i in range(20):
        ledger.charge_tenant(f"t{i}", requests=40, tokens=0, now=0.0)
        assert ledger.usage().entries <= 8
    assert ledger.usage().evicted > 0
    # A minute later every bucket has refilled: the same as a new one, so it goes.
    kept = ledger.usage().entries
    assert ledger.expire_tenants(30.0) == 0
    assert ledger.expire_tenants(61.0) == kept
    assert ledger.usage().entries == 0
    # Tenants without a limit never get a bucket.
    free = QuotaLedger(EngineSettings.parse({"quotas": {"tenants": {"a": {}}}}).quotas)
    free.charge_tenant("anyone", requests=1, tokens=0, now=0.0)
    assert free.usage().entries == 0
