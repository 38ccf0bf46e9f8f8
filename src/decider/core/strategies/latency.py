"""latency: lowest peak-EWMA latency times outstanding requests (Finagle's and linkerd's cost
function), with time to first token blended in where endpoints report it. Endpoints with no
reports yet count at the model's median, so they get tried without being favoured."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from decider.core.settings import check_keys, get_float
from decider.core.strategies.base import Choice, PickContext, Ranked, best_by, latency_key


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencyConfig:
    # Share of time to first token in the latency metric when an endpoint reports it.
    ttft_weight: float = 0.5


class Latency:
    name: ClassVar[str] = "latency"

    def __init__(self, config: Mapping[str, Any], rng: random.Random) -> None:
        self._config = self.parse_config(config, f"routing.{self.name}")
        self._rng = rng

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> LatencyConfig:
        check_keys(options, {"ttft_weight"}, path)
        return LatencyConfig(ttft_weight=get_float(options, "ttft_weight", 0.5, path, maximum=1.0))

    def choose(self, ctx: PickContext) -> Choice:
        picked = best_by(ctx, "latency", latency_key, ctx.count)
        best = picked[0]
        metric_ms = best.latency_metric_s(self._config.ttft_weight) * 1000.0
        detail = f"latency: {metric_ms:.0f} ms EWMA x {best.in_flight + 1} outstanding"
        if len(picked) > 1:
            other = picked[1]
            detail += f" vs {other.latency_metric_s(self._config.ttft_weight) * 1000.0:.0f} ms"
            detail += f" x {other.in_flight + 1}"
        return Choice(picked, detail, {"latency": best.latency_score, "load": best.load_score})

    def rank(self, ctx: PickContext) -> list[Ranked]:
        order = sorted(ctx.items, key=latency_key)
        return [
            Ranked(s, {"latency": s.latency_score, "load": s.load_score}, s.latency_score)
            for s in order
        ]
