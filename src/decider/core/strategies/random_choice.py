"""random: a uniformly random usable endpoint; fallbacks are further distinct draws."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from decider.core.stats import EndpointStats
from decider.core.strategies.base import (
    Choice,
    PickContext,
    Ranked,
    plain_ranking,
    sample_distinct,
)
from decider.core.validation import parse_table


@dataclass(frozen=True, slots=True)
class RandomConfig:
    pass


class Random:
    name: ClassVar[str] = "random"

    def __init__(self, config: RandomConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> RandomConfig:
        return parse_table(RandomConfig, options, path)

    def pick(self, ctx: PickContext) -> list[EndpointStats]:
        items = ctx.items
        # Explain mode must not consume the engine's random stream.
        rng = self._rng if ctx.commit else random.Random(ctx.request.request_id)
        first = items[int(rng.random() * len(items))]
        return sample_distinct(items, first, ctx.count, rng)

    def choose(self, ctx: PickContext) -> Choice:
        return Choice(self.pick(ctx), f"random: 1 of {len(ctx.items)} uniformly")

    def rank(self, ctx: PickContext) -> list[Ranked]:
        order = self.choose(ctx).picked
        chosen = set(order)
        order += [s for s in ctx.items if s not in chosen]
        return plain_ranking(ctx, order, "random")
