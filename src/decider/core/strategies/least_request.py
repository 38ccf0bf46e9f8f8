"""least_request: fewest outstanding requests (in flight plus reported queue), by the power of
`choice_count` random choices (Mitzenmacher; Envoy's default of 2), or by a full scan."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from decider.core.stats import EndpointStats
from decider.core.strategies.base import (
    Choice,
    PickContext,
    Ranked,
    best_by,
    draw_source,
    load_key,
    sample_best,
)
from decider.core.validation import allowed, parse_table


@dataclass(frozen=True, slots=True, kw_only=True)
class LeastRequestConfig:
    choice_count: int = field(default=2, metadata=allowed(ge=2))
    full_scan: bool = False


def describe(picked: Sequence[EndpointStats], *, sampled: int, total: int) -> str:
    """ "least_request: 2 in flight vs 5 and 7" (the others are the fallbacks / other samples)."""
    queued = any(s.load != s.in_flight for s in picked)
    unit = "outstanding" if queued else "in flight"
    head = f"least_request: {picked[0].load} {unit}"
    if len(picked) > 1:
        others = [str(s.load) for s in picked[1:]]
        tail = others[0] if len(others) == 1 else ", ".join(others[:-1]) + " and " + others[-1]
        head += f" vs {tail}"
    if sampled < total:
        head += f" (best of {sampled} sampled)"
    return head


class LeastRequest:
    name: ClassVar[str] = "least_request"

    def __init__(self, config: LeastRequestConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> LeastRequestConfig:
        return parse_table(LeastRequestConfig, options, path)

    def pick(self, ctx: PickContext) -> list[EndpointStats]:
        """The chosen endpoint and fallbacks, without the reason (affinity's fallback path)."""
        return self._pick(ctx)[0]

    def _pick(self, ctx: PickContext) -> tuple[list[EndpointStats], int]:
        items = ctx.items
        n = len(items)
        choices = self._config.choice_count
        if self._config.full_scan or n <= choices:
            return best_by(ctx, "load", load_key, ctx.count), n
        rand = draw_source(ctx, self._rng)
        picked = sample_best(items, choices, rand, load_key)
        sampled_count = len(picked)
        count = min(ctx.count, n)
        if len(picked) > count:
            del picked[count:]
        # Fallbacks beyond the samples: more random draws.
        tries = 4 * count
        while len(picked) < count and tries:
            s = items[int(rand() * n)]
            if s not in picked:
                picked.append(s)
            tries -= 1
        return picked, sampled_count

    def choose(self, ctx: PickContext) -> Choice:
        picked, sampled = self._pick(ctx)
        total = len(ctx.items)
        # load_score is kept current on every in-flight change (Scorer.rescore_load).
        scores = {"load": picked[0].load_score}
        return Choice(picked, describe(picked[:sampled], sampled=sampled, total=total), scores)

    def rank(self, ctx: PickContext) -> list[Ranked]:
        order = sorted(ctx.items, key=load_key)
        worst = max(1, order[-1].load)
        return [Ranked(s, {"load": 1.0 - s.load / (worst + 1)}, s.load_score) for s in order]
