"""EventLoop: simulated time and the ordered queue of pending events."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

Action = Callable[..., None]


class EventLoop:
    """A heap of (time, sequence, action, args); equal times run in scheduling order.

    The sequence number makes the order total, so a run never depends on comparing
    callables or on anything but the order in which events were scheduled.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Action, tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._now = 0.0
        self.processed = 0

    @property
    def now(self) -> float:
        return self._now

    def at(self, time_s: float, action: Action, *args: Any) -> None:
        """Run action(*args, time_s) at time_s; times in the past run now."""
        when = max(time_s, self._now)
        heapq.heappush(self._heap, (when, next(self._seq), action, args))

    def after(self, delay_s: float, action: Action, *args: Any) -> None:
        self.at(self._now + delay_s, action, *args)

    def run(self, *, until_s: float = float("inf")) -> None:
        """Process events in time order until none is left or the next is after until_s."""
        heap = self._heap
        while heap and heap[0][0] <= until_s:
            when, _, action, args = heapq.heappop(heap)
            self._now = when
            self.processed += 1
            action(*args, when)

    def pending(self) -> int:
        return len(self._heap)
