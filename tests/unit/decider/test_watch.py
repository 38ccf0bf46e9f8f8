"""watch.py: snapshot first, then batched changes; overflow resyncs; close ends iteration."""

from __future__ import annotations

import asyncio

import pytest

from decider.core.model import BreakerState, HealthEvent, HealthStatus
from decider.errors import Overloaded
from decider.state.watch import WatchHub


def _event(id_: str, model: str = "m", status: HealthStatus = HealthStatus.HEALTHY) -> HealthEvent:
    return HealthEvent(
        endpoint_id=id_, model=model, status=status, breaker_state=BreakerState.CLOSED, reason=""
    )


class _State:
    def __init__(self) -> None:
        self.events = [_event("a"), _event("b"), _event("x", model="other")]
        self.snapshots = 0

    def snapshot(self, model: str) -> list[HealthEvent]:
        self.snapshots += 1
        return [e for e in self.events if not model or e.model == model]


async def test_snapshot_first_then_changes_filtered_by_model():
    state = _State()
    hub = WatchHub(state.snapshot)
    watcher = hub.open("m")
    first = await watcher.next_batch()
    assert first is not None and first.snapshot
    assert [e.endpoint_id for e in first.events] == ["a", "b"]
    hub.publish(_event("x", model="other"))
    hub.publish(_event("a", status=HealthStatus.UNHEALTHY))
    hub.publish(_event("b", status=HealthStatus.DEGRADED))
    batch = await watcher.next_batch()
    assert batch is not None and not batch.snapshot
    assert [(e.endpoint_id, e.status) for e in batch.events] == [
        ("a", HealthStatus.UNHEALTHY),
        ("b", HealthStatus.DEGRADED),
    ]


async def test_overflow_drops_the_backlog_for_a_fresh_snapshot():
    state = _State()
    hub = WatchHub(state.snapshot, queue_size=3)
    slow = hub.open("")
    fast = hub.open("")
    assert (await slow.next_batch()).snapshot
    assert (await fast.next_batch()).snapshot
    for i in range(10):
        hub.publish(_event("a", status=HealthStatus(i % 4)))
    batch = await slow.next_batch()
    assert batch is not None and batch.snapshot
    assert len(batch.events) == 3
    # Later changes flow again after the resync.
    hub.publish(_event("b", status=HealthStatus.UNHEALTHY))
    batch = await slow.next_batch()
    assert batch is not None and [e.endpoint_id for e in batch.events] == ["b"]
    # Both watchers overflowed once (3 queued events dropped each) and were resynced.
    usage = hub.usage()
    assert usage.evicted == 6
    assert usage.limit == 3 * 10_000
    assert usage.entries == 0  # the fast watcher is due a snapshot, which will include "b"


async def test_publish_never_waits_for_a_watcher():
    hub = WatchHub(_State().snapshot, queue_size=2)
    watchers = [hub.open("") for _ in range(100)]
    for _ in range(1000):
        hub.publish(_event("a"))
    assert hub.watcher_count == 100
    for watcher in watchers:
        hub.release(watcher)
    assert hub.watcher_count == 0


async def test_close_ends_every_iteration_and_refuses_new_watchers():
    hub = WatchHub(_State().snapshot)
    watcher = hub.open("")
    seen = []

    async def consume() -> None:
        async for batch in watcher:
            seen.append(batch)

    task = asyncio.create_task(consume())
    for _ in range(50):
        if seen:
            break
        await asyncio.sleep(0.01)
    hub.close()
    await asyncio.wait_for(task, 5)
    assert len(seen) == 1
    with pytest.raises(Overloaded):
        hub.open("")


def test_watcher_limit():
    hub = WatchHub(_State().snapshot, max_watchers=1)
    hub.open("")
    with pytest.raises(Overloaded, match="max_watchers"):
        hub.open("")
