"""WatchHealth fan-out: every watcher gets a snapshot first, then batches of changes.

The engine publishes through `WatchHub.publish`, which only appends to each watcher's bounded
buffer and never waits: a slow watcher cannot block the engine, the prober or other watchers.
A watcher whose buffer overflows drops it and is sent a fresh snapshot instead, so it never
misses the current state, only intermediate steps. All of this runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from decider.core.model import HealthEvent, StateUsage
from decider.errors import Overloaded

# Snapshot of every endpoint of a model ("" = all), taken when a watcher needs one.
SnapshotFn = Callable[[str], Sequence[HealthEvent]]


@dataclass(frozen=True, slots=True)
class WatchBatch:
    events: tuple[HealthEvent, ...]
    # True for the first batch and after an overflow: events is the full current state.
    snapshot: bool


class Watcher:
    """One stream's view of the hub; iterate it to get batches until the hub closes."""

    def __init__(self, hub: WatchHub, model: str, *, queue_size: int) -> None:
        self.model = model
        self._hub = hub
        self._queue_size = queue_size
        self._pending: deque[HealthEvent] = deque()
        self._resync = True
        self._closed = False
        self._wake = asyncio.Event()
        self._wake.set()

    def offer(self, event: HealthEvent) -> None:
        if self._closed or (self.model and event.model != self.model):
            return
        # A snapshot is already due and is taken when sent, so it will include this change.
        if self._resync:
            return
        if len(self._pending) >= self._queue_size:
            # Too far behind: its queued events are dropped and a fresh snapshot replaces them.
            self._hub.dropped += len(self._pending)
            self._pending.clear()
            self._resync = True
        else:
            self._pending.append(event)
        self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def next_batch(self) -> WatchBatch | None:
        """The next batch, waiting for one; None once the watcher or hub is closed."""
        while not self._closed:
            if self._resync:
                self._resync = False
                self._pending.clear()
                return WatchBatch(tuple(self._hub.snapshot(self.model)), snapshot=True)
            if self._pending:
                events = tuple(self._pending)
                self._pending.clear()
                return WatchBatch(events, snapshot=False)
            self._wake.clear()
            await self._wake.wait()
        return None

    async def __aiter__(self) -> AsyncIterator[WatchBatch]:
        while (batch := await self.next_batch()) is not None:
            yield batch


class WatchHub:
    def __init__(self, snapshot: SnapshotFn, *, queue_size: int = 256, max_watchers: int = 10_000):
        self.snapshot = snapshot
        self._queue_size = queue_size
        self._max_watchers = max_watchers
        self._watchers: set[Watcher] = set()
        self._closed = False
        # Events dropped from queues that overflowed (each such watcher got a snapshot instead).
        self.dropped = 0

    def usage(self) -> StateUsage:
        """Events queued over every watcher, the most that can be (queue_size per watcher, at
        most max_watchers of them) and the events dropped by overflows."""
        return StateUsage(
            entries=sum(w.queued for w in self._watchers),
            limit=self._queue_size * self._max_watchers,
            evicted=self.dropped,
        )

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    def publish(self, event: HealthEvent) -> None:
        """The engine's on_event: O(watchers), never awaits."""
        for watcher in self._watchers:
            watcher.offer(event)

    def open(self, model: str) -> Watcher:
        """A new watcher; its first batch is a snapshot. Call `release` when the stream ends."""
        if self._closed:
            raise Overloaded("the server is shutting down and accepts no new watchers")
        if len(self._watchers) >= self._max_watchers:
            raise Overloaded(
                f"the server already has {len(self._watchers)} WatchHealth streams, its limit "
                "(server.max_watchers); retry later or share a stream"
            )
        watcher = Watcher(self, model, queue_size=self._queue_size)
        self._watchers.add(watcher)
        return watcher

    def release(self, watcher: Watcher) -> None:
        watcher.close()
        self._watchers.discard(watcher)

    def close(self) -> None:
        """Ends every stream cleanly (their iterators stop) and refuses new ones."""
        self._closed = True
        for watcher in self._watchers:
            watcher.close()
