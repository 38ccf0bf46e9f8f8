"""round_robin: each usable endpoint in turn; fallbacks are the next ones in the rotation."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from decider.core.stats import EndpointStats
from decider.core.strategies.base import Choice, PickContext, Ranked, plain_ranking, rotated
from decider.core.validation import parse_table


@dataclass(frozen=True, slots=True)
class RoundRobinConfig:
    pass


class RoundRobin:
    name: ClassVar[str] = "round_robin"

    def __init__(self, config: RoundRobinConfig, rng: random.Random) -> None:
        self._config = config
        # Cursor per (model, capabilities), kept across pool rebuilds.
        self._next: dict[tuple[str, frozenset[str]], int] = {}
        self._rng = rng

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> RoundRobinConfig:
        return parse_table(RoundRobinConfig, options, path)

    def pick(self, ctx: PickContext) -> list[EndpointStats]:
        return self._pick(ctx)[0]

    def _pick(self, ctx: PickContext) -> tuple[list[EndpointStats], int]:
        items = ctx.items
        n = len(items)
        key = ctx.pool.key
        cursor = self._next.get(key)
        if cursor is None:
            # Start at a random offset, as grpc-go does, so many deciders do not march in step.
            cursor = self._rng.randrange(1 << 30) if ctx.commit else 0
        if ctx.commit:
            self._next[key] = cursor + 1
        start = cursor % n
        if ctx.count == 1 or n == 1:
            return [items[start]], start
        return [items[(start + i) % n] for i in range(min(ctx.count, n))], start

    def choose(self, ctx: PickContext) -> Choice:
        picked, start = self._pick(ctx)
        return Choice(picked, f"round_robin: next in turn ({start + 1} of {len(ctx.items)})")

    def rank(self, ctx: PickContext) -> list[Ranked]:
        cursor = self._next.get(ctx.pool.key, 0)
        return plain_ranking(ctx, rotated(ctx.items, cursor), "turn")
