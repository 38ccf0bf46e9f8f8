"""round_robin: each usable endpoint in turn; fallbacks are the next ones in the rotation."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from decider.core.settings import check_keys
from decider.core.strategies.base import Choice, PickContext, Ranked, plain_ranking, rotated


@dataclass(frozen=True, slots=True)
class RoundRobinConfig:
    pass


class RoundRobin:
    name: ClassVar[str] = "round_robin"

    def __init__(self, config: Mapping[str, Any], rng: random.Random) -> None:
        self._config = self.parse_config(config, f"routing.{self.name}")
        # Cursor per (model, capabilities), kept across pool rebuilds. Starting at a random
        # offset spreads the first requests of many deciders, as grpc-go does.
        self._next: dict[tuple[str, frozenset[str]], int] = {}
        self._rng = rng

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> RoundRobinConfig:
        check_keys(options, set(), path)
        return RoundRobinConfig()

    def _cursor(self, ctx: PickContext) -> int:
        key = ctx.pool.key
        cursor = self._next.get(key)
        if cursor is None:
            cursor = self._rng.randrange(1 << 30) if ctx.commit else 0
            if ctx.commit:
                self._next[key] = cursor
        return cursor

    def choose(self, ctx: PickContext) -> Choice:
        items = ctx.items
        n = len(items)
        cursor = self._cursor(ctx)
        if ctx.commit:
            self._next[ctx.pool.key] = cursor + 1
        start = cursor % n
        count = min(ctx.count, n)
        picked = [items[(start + i) % n] for i in range(count)]
        return Choice(picked, f"round_robin: next in turn ({start + 1} of {n})")

    def rank(self, ctx: PickContext) -> list[Ranked]:
        return plain_ranking(ctx, rotated(ctx.items, self._cursor(ctx)), "turn")
