"""cost: the cheapest usable endpoint (cost_per_1k_tokens), fewest outstanding requests among
equally cheap ones."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from decider.core.strategies.base import Choice, PickContext, Ranked, best_by, cost_key
from decider.core.validation import parse_table


@dataclass(frozen=True, slots=True)
class CostConfig:
    pass


class Cost:
    name: ClassVar[str] = "cost"

    def __init__(self, config: CostConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> CostConfig:
        return parse_table(CostConfig, options, path)

    def choose(self, ctx: PickContext) -> Choice:
        picked = best_by(ctx, "cost", cost_key, ctx.count)
        best = picked[0]
        detail = f"cost: {best.cost:g} per 1k tokens, {best.load} in flight"
        if len(picked) > 1:
            detail += f" vs {picked[1].cost:g} with {picked[1].load}"
        return Choice(picked, detail, {"cost": best.cost_score, "load": best.load_score})

    def rank(self, ctx: PickContext) -> list[Ranked]:
        order = sorted(ctx.items, key=cost_key)
        return [
            Ranked(s, {"cost": s.cost_score, "load": s.load_score}, s.cost_score) for s in order
        ]
