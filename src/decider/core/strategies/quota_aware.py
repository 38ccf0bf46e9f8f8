"""quota_aware: the endpoint with the most requests/min and tokens/min headroom left (its tighter
budget's remaining share), fewest outstanding requests among equals. Endpoints with no limits have
full headroom."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from decider.core.strategies.base import Choice, PickContext, Ranked, best_by, quota_key
from decider.core.validation import parse_table


@dataclass(frozen=True, slots=True)
class QuotaAwareConfig:
    pass


class QuotaAware:
    name: ClassVar[str] = "quota_aware"

    def __init__(self, config: QuotaAwareConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> QuotaAwareConfig:
        return parse_table(QuotaAwareConfig, options, path)

    def choose(self, ctx: PickContext) -> Choice:
        picked = best_by(ctx, "quota", quota_key, ctx.count)
        best = picked[0]
        detail = f"quota_aware: {best.quota_score:.0%} of budget left"
        if len(picked) > 1:
            others = " and ".join(f"{s.quota_score:.0%}" for s in picked[1:3])
            detail += f" vs {others}"
        return Choice(picked, detail, {"quota": best.quota_score, "load": best.load_score})

    def rank(self, ctx: PickContext) -> list[Ranked]:
        order = sorted(ctx.items, key=quota_key)
        return [
            Ranked(s, {"quota": s.quota_score, "load": s.load_score}, s.quota_score) for s in order
        ]
