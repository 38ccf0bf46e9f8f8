"""cache_aware: prefix-cache affinity blended with load. score = cache_weight * matched/total
blocks + load_weight * load score; an endpoint more than `max_load_gap` requests busier than the
least loaded gets no cache credit (SGLang's balance guard), so a hot prefix cannot pile onto it."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, ClassVar

from decider.core.strategies.base import Choice, PickContext, Ranked, best_by, load_key
from decider.core.strategies.composite import best_with_credit, cache_credits
from decider.core.validation import allowed, parse_table

_LOAD_SCORE = attrgetter("load_score")


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheAwareConfig:
    cache_weight: float = field(default=0.7, metadata=allowed(ge=0))
    load_weight: float = field(
        default=0.3,
        metadata=allowed(gt=0, what="a number > 0 (cache_aware always blends load)"),
    )
    max_load_gap: float = field(default=16.0, metadata=allowed(ge=0))


class CacheAware:
    name: ClassVar[str] = "cache_aware"

    def __init__(self, config: CacheAwareConfig, rng: random.Random) -> None:
        self._config = config

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> CacheAwareConfig:
        return parse_table(CacheAwareConfig, options, path)

    def choose(self, ctx: PickContext) -> Choice:
        c = self._config
        total_weight = c.cache_weight + c.load_weight
        top = best_by(ctx, "load", load_key, ctx.count)
        credits, blocks = cache_credits(ctx, c.cache_weight, c.max_load_gap, top[0].load)
        if not credits:
            picked = top
            best = picked[0]
            detail = f"cache_aware: no endpoint holds this prefix; least loaded ({best.load})"
            return Choice(picked, detail, {"cache": 0.0, "load": best.load_score})
        # Rank by load_weight * load + cache_weight * credit (dividing by the weight sum is
        # monotonic, so it is applied to the reported score only).
        picked, _ = best_with_credit(ctx, top, _LOAD_SCORE, credits, c.cache_weight / c.load_weight)
        best = picked[0]
        cache = credits.get(best, 0.0)
        detail = (
            f"cache_aware: {int(cache * 100 + 0.5)}% of {blocks} prefix blocks cached,"
            f" {best.load} in flight"
        )
        score = (c.cache_weight * cache + c.load_weight * best.load_score) / total_weight
        return Choice(picked, detail, {"cache": cache, "load": best.load_score, "total": score})

    def rank(self, ctx: PickContext) -> list[Ranked]:
        c = self._config
        total_weight = c.cache_weight + c.load_weight
        credits, _ = cache_credits(ctx, c.cache_weight, c.max_load_gap)
        out = []
        for s in ctx.items:
            cache = credits.get(s, 0.0)
            total = (c.cache_weight * cache + c.load_weight * s.load_score) / total_weight
            out.append(Ranked(s, {"cache": cache, "load": s.load_score}, total))
        out.sort(key=lambda r: -r.total)
        return out
