"""latency: lowest peak-EWMA latency times outstanding requests (Finagle's and linkerd's cost),
by the power of two choices as linkerd does, or by a full scan. Time to first token is used where
endpoints report it. Endpoints with no reports yet count at the model's median, so they get tried
without being favoured, and an EWMA decays while no samples come, so one slow answer does not
starve an endpoint of the traffic that would clear it.

Latency reports arrive with outcomes, after the whole generation; sampling two candidates
instead of always taking the single best keeps that lag from sending every request to the
endpoint that looked fastest a few seconds ago."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from decider.core.stats import EndpointStats, ScoreParams
from decider.core.strategies.base import (
    Choice,
    PickContext,
    Ranked,
    best_by,
    draw_source,
    latency_key,
    sample_best,
)
from decider.core.validation import allowed, parse_table


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencyConfig:
    # Share of time to first token in the latency metric when an endpoint reports it. TTFT alone
    # by default: end-to-end latency mostly measures how many tokens were asked for.
    ttft_weight: float = field(default=1.0, metadata=allowed(ge=0, le=1))
    choice_count: int = field(default=2, metadata=allowed(ge=2))
    full_scan: bool = False


class Latency:
    name: ClassVar[str] = "latency"

    def __init__(self, config: LatencyConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> LatencyConfig:
        return parse_table(LatencyConfig, options, path)

    def shape_scores(self, params: ScoreParams) -> ScoreParams:
        """The ShapesScores hook: every endpoint's latency metric blends TTFT by ttft_weight."""
        return dataclasses.replace(params, ttft_weight=self._config.ttft_weight)

    def choose(self, ctx: PickContext) -> Choice:
        items = ctx.items
        n = len(items)
        choices = self._config.choice_count
        if self._config.full_scan or n <= choices:
            picked = best_by(ctx, "latency", latency_key, ctx.count)
        else:
            picked = sample_best(items, choices, draw_source(ctx, self._rng), latency_key)
            del picked[ctx.count :]
            if len(picked) < min(ctx.count, n):
                for s in best_by(ctx, "latency", latency_key, ctx.count + len(picked)):
                    if s not in picked:
                        picked.append(s)
                        if len(picked) == ctx.count:
                            break
        return Choice(
            picked,
            self._describe(picked),
            {"latency": picked[0].latency_score, "load": picked[0].load_score},
        )

    def _describe(self, picked: list[EndpointStats]) -> str:
        best = picked[0]
        metric_ms = best.latency_metric_s(self._config.ttft_weight) * 1000.0
        detail = f"latency: {metric_ms:.0f} ms EWMA x {best.in_flight + 1} outstanding"
        if len(picked) > 1:
            other = picked[1]
            detail += f" vs {other.latency_metric_s(self._config.ttft_weight) * 1000.0:.0f} ms"
            detail += f" x {other.in_flight + 1}"
        return detail

    def rank(self, ctx: PickContext) -> list[Ranked]:
        order = sorted(ctx.items, key=latency_key)
        return [
            Ranked(s, {"latency": s.latency_score, "load": s.load_score}, s.latency_score)
            for s in order
        ]
