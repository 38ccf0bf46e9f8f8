"""weighted_random: a random usable endpoint with probability proportional to its weight; one
bisect over cumulative weights built once per pool."""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from decider.core.stats import EndpointStats
from decider.core.strategies.base import Choice, PickContext, Ranked
from decider.core.validation import parse_table


@dataclass(frozen=True, slots=True)
class WeightedRandomConfig:
    pass


class WeightedRandom:
    name: ClassVar[str] = "weighted_random"

    def __init__(self, config: WeightedRandomConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> WeightedRandomConfig:
        return parse_table(WeightedRandomConfig, options, path)

    def _cumulative(self, ctx: PickContext) -> list[int]:
        if ctx.filtered:
            return list(itertools.accumulate(s.weight for s in ctx.items))
        cumulative = ctx.pool.cumulative_weights
        if cumulative is None:
            cumulative = list(itertools.accumulate(s.weight for s in ctx.items))
            ctx.pool.cumulative_weights = cumulative
        return cumulative

    def pick(self, ctx: PickContext) -> list[EndpointStats]:
        items = ctx.items
        cumulative = self._cumulative(ctx)
        total = cumulative[-1]
        rng = self._rng if ctx.commit else random.Random(ctx.request.request_id)
        count = min(ctx.count, len(items))
        picked = [items[bisect.bisect_right(cumulative, rng.random() * total)]]
        tries = 4 * count
        while len(picked) < count and tries:
            s = items[bisect.bisect_right(cumulative, rng.random() * total)]
            if s not in picked:
                picked.append(s)
            tries -= 1
        if len(picked) < count:
            for s in sorted(items, key=lambda e: -e.weight):
                if s not in picked:
                    picked.append(s)
                    if len(picked) == count:
                        break
        return picked

    def choose(self, ctx: PickContext) -> Choice:
        picked = self.pick(ctx)
        total = self._cumulative(ctx)[-1]
        best = picked[0]
        share = best.weight / total
        return Choice(
            picked,
            f"weighted_random: weight {best.weight} of {total} ({share:.0%})",
            {"weight": share},
        )

    def rank(self, ctx: PickContext) -> list[Ranked]:
        total = sum(s.weight for s in ctx.items)
        order = sorted(ctx.items, key=lambda s: -s.weight)
        return [Ranked(s, {"weight": s.weight / total}, s.weight / total) for s in order]
