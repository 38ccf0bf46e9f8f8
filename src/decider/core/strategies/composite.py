"""composite (the default): a weighted sum of load, latency, cache, quota, health and cost scores.

Every factor but cache depends only on the endpoint, so the engine keeps each endpoint's weighted
sum of those (`base_score`) up to date as its stats change, in a rank heap; a decision takes the
best few from the heap, adds the request's prefix-cache match for the few endpoints the prefix
index finds, and takes the best of both. As in
SGLang's router, an endpoint more than `max_load_gap` requests busier than the best-ranked one
gets no cache credit, so a hot prefix cannot pile onto one endpoint.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, ClassVar

from decider.core.stats import EndpointStats, FactorWeights, ScoreParams
from decider.core.strategies.base import (
    Choice,
    PickContext,
    Ranked,
    best_by,
    composite_key,
    load_key,
)
from decider.core.validation import Problems, allowed, schema

_BASE = attrgetter("base_score")


# 14 rather than cache_aware's 16, tuned with the simulator over seeds 7, 11, 23, 31, 43, 59 now
# that prefixes are indexed at decide time (a burst follows its first request): at 16 the
# imbalance of multi_turn reached 1.98; at 12 shared_prefix's TTFT p90 fell 18% behind
# cache_aware's on one seed; at 8 multi_turn's rose 30%. A gap relative to the least loaded
# endpoint (min(16, 6 + min_load)) lowered imbalance but cost multi_turn 15-40%: chat sessions
# need their cache even on a busier endpoint, so the gap stays absolute.
MAX_LOAD_GAP = 14.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CompositeConfig:
    weights: FactorWeights = field(default_factory=FactorWeights)
    max_load_gap: float = field(default=MAX_LOAD_GAP, metadata=allowed(ge=0))


def cache_credits(
    ctx: PickContext, share: float, gap: float, min_load: float | None = None
) -> tuple[dict[EndpointStats, float], int]:
    """Cache score (matched / total blocks) of the usable endpoints holding the request's prefix,
    leaving out those more than `gap` busier than the least loaded candidate (`min_load`, looked
    up when not given); and the number of blocks looked at."""
    hashes = ctx.request.prefix_hashes
    if not hashes or share <= 0.0:
        return {}, 0
    matches = ctx.index.matches(hashes)
    if not matches:
        return {}, 0
    total = min(len(hashes), ctx.index.max_blocks)
    members = {s.id: s for s in ctx.items} if ctx.filtered else ctx.pool.members
    if min_load is None:
        if ctx.filtered:
            min_load = min(s.load for s in ctx.items)
        else:
            min_load = ctx.pool.heap("load", load_key).first().load
    limit = min_load + gap
    credits: dict[EndpointStats, float] = {}
    for endpoint_id, depth in matches.items():
        s = members.get(endpoint_id)
        if s is not None and s.load <= limit:
            credits[s] = depth / total
    return credits, total


def best_with_credit(
    ctx: PickContext,
    top: list[EndpointStats],
    value: Callable[[EndpointStats], float],
    credits: dict[EndpointStats, float],
    weight: float,
) -> tuple[list[EndpointStats], dict[EndpointStats, float]]:
    """Top `ctx.count` by value + weight * credit, best first, and their totals: `top` (the
    best by value alone) merged with the few credited endpoints."""
    totals: dict[EndpointStats, float] = {s: value(s) for s in top}
    for s, credit in credits.items():
        totals[s] = value(s) + weight * credit
    picked = sorted(totals, key=totals.__getitem__, reverse=True)
    del picked[ctx.count :]
    return picked, totals


class Composite:
    name: ClassVar[str] = "composite"

    def __init__(self, config: CompositeConfig, rng: random.Random) -> None:
        self._config = config

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> CompositeConfig:
        # One flat table: the factor weights and max_load_gap side by side.
        problems = Problems()
        weights = schema(FactorWeights).validate(options, path, problems, skip=("max_load_gap",))
        rest = schema(CompositeConfig, exclude=("weights",)).validate(
            options, path, problems, skip=[k for k in options if k != "max_load_gap"]
        )
        if weights is not None and FactorWeights(**weights).total <= 0.0:
            problems.add((), f"{path}: every weight is 0, at least one must be > 0")
        problems.raise_any()
        assert weights is not None and rest is not None
        return CompositeConfig(weights=FactorWeights(**weights), **rest)

    def shape_scores(self, params: ScoreParams) -> ScoreParams:
        """The ShapesScores hook: the factor weights are the shared scores' weights."""
        return dataclasses.replace(params, weights=self._config.weights)

    def choose(self, ctx: PickContext) -> Choice:
        share = ctx.scorer.cache_share
        top = best_by(ctx, "composite", composite_key, ctx.count)
        # The balance guard measures against the best endpoint without cache credit (usually
        # among the least loaded), which spares a second heap on every stats change.
        credits, _ = cache_credits(ctx, share, self._config.max_load_gap, top[0].load)
        if not credits:
            picked = top
            best = picked[0]
            total, cache = best.base_score, 0.0
        else:
            picked, totals = best_with_credit(ctx, top, _BASE, credits, share)
            best = picked[0]
            total, cache = totals[best], credits.get(best, 0.0)
        # Integer percentages: formatting floats is a measurable share of a decision.
        detail = (
            f"composite: score {int(total * 100 + 0.5)}%, cache {int(cache * 100 + 0.5)}%,"
            f" {best.load} in flight"
        )
        return Choice(picked, detail, ctx.scorer.factor_scores(best, cache))

    def rank(self, ctx: PickContext) -> list[Ranked]:
        share = ctx.scorer.cache_share
        credits, _ = cache_credits(ctx, share, self._config.max_load_gap)
        out = []
        for s in ctx.items:
            cache = credits.get(s, 0.0)
            out.append(Ranked(s, ctx.scorer.factor_scores(s, cache), s.base_score + share * cache))
        out.sort(key=lambda r: -r.total)
        return out
