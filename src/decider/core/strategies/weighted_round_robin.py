"""weighted_round_robin: smooth weighted rotation. Earliest-deadline-first over virtual times, as
Envoy does: endpoint i is due every 1/weight_i, so weights 5:1:1 give a a b a c a a, interleaved
rather than in bursts; each pick is one heap pop and push."""

from __future__ import annotations

import heapq
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from decider.core.stats import EndpointStats
from decider.core.strategies.base import Choice, PickContext, Ranked
from decider.core.validation import parse_table

# (deadline, position, stats): position breaks ties in a stable order.
_Entry = tuple[float, int, EndpointStats]


@dataclass(frozen=True, slots=True)
class WeightedRoundRobinConfig:
    pass


class Schedule:
    """The rotation over one pool's items (kept in the pool's `schedule` slot)."""

    __slots__ = ("heap", "total")

    def __init__(self, items: list[EndpointStats] | tuple[EndpointStats, ...]) -> None:
        # Stagger the first deadlines by position so that endpoints of equal weight do not come
        # due together and leave the heavy one a long run (this matches or beats nginx's smooth
        # WRR on run length: 5:1:1 gives runs of at most 4, like nginx).
        n = len(items)
        self.heap: list[_Entry] = [((i + 0.5) / n / s.weight, i, s) for i, s in enumerate(items)]
        heapq.heapify(self.heap)
        self.total = sum(s.weight for s in items)


class WeightedRoundRobin:
    name: ClassVar[str] = "weighted_round_robin"

    def __init__(self, config: WeightedRoundRobinConfig, rng: random.Random) -> None:
        self._config = config

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> WeightedRoundRobinConfig:
        return parse_table(WeightedRoundRobinConfig, options, path)

    def _schedule(self, ctx: PickContext) -> Schedule:
        schedule = ctx.pool.schedule
        if schedule is None:
            schedule = ctx.pool.schedule = Schedule(ctx.pool.items)
        return schedule

    def pick(self, ctx: PickContext) -> list[EndpointStats]:
        return self._pick(ctx)[0]

    def _pick(self, ctx: PickContext) -> tuple[list[EndpointStats], Schedule]:
        schedule = self._schedule(ctx)
        allowed = set(ctx.items) if ctx.filtered else None
        if allowed is not None and allowed.isdisjoint(ctx.pool.items):
            # The request fell to a worse health tier: a one-off schedule over it.
            schedule, allowed = Schedule(list(ctx.items)), None
        heap = schedule.heap if ctx.commit else list(schedule.heap)
        skipped: list[_Entry] = []
        entry = heapq.heappop(heap)
        while allowed is not None and entry[2] not in allowed:
            skipped.append(entry)
            entry = heapq.heappop(heap)
        deadline, position, chosen = entry
        heapq.heappush(heap, (deadline + 1.0 / chosen.weight, position, chosen))
        for e in skipped:
            heapq.heappush(heap, e)
        picked = [chosen]
        count = ctx.count
        if count > 1:
            # The k next due are within the heap's first 2^k - 1 slots: sort only those.
            head = sorted(heap[: (1 << min(count + len(skipped), 12)) - 1])
            for _, _, s in head:
                if len(picked) >= count:
                    break
                if s not in picked and (allowed is None or s in allowed):
                    picked.append(s)
        return picked, schedule

    def choose(self, ctx: PickContext) -> Choice:
        picked, schedule = self._pick(ctx)
        chosen = picked[0]
        share = chosen.weight / schedule.total
        return Choice(
            picked,
            f"weighted_round_robin: weight {chosen.weight} of {schedule.total} ({share:.0%})",
            {"weight": share},
        )

    def rank(self, ctx: PickContext) -> list[Ranked]:
        heap = list(self._schedule(ctx).heap)
        allowed = set(ctx.items)
        order = [e[2] for e in sorted(heap) if e[2] in allowed]
        total = sum(s.weight for s in order)
        return [
            Ranked(s, {"weight": s.weight / total}, 1.0 - i / len(order))
            for i, s in enumerate(order)
        ]
