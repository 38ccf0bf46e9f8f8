"""affinity: sticky sessions. A session stays on its endpoint while the binding is fresh (TTL from
[affinity], renewed by every request) and the endpoint is usable; otherwise `fallback` picks a new
one and the session is rebound, which the reason says."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from decider.core.stats import EndpointStats
from decider.core.strategies.base import Choice, PickContext, Picker, Ranked
from decider.core.validation import allowed, parse_table

_FALLBACKS = frozenset(
    {"round_robin", "random", "least_request", "weighted_round_robin", "weighted_random"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class AffinityConfig:
    # How an unbound (or rebound) session is placed.
    fallback: str = field(
        default="least_request", metadata=allowed(choices=tuple(sorted(_FALLBACKS)))
    )


_BOUND: Mapping[str, float] = MappingProxyType({"affinity": 1.0})


def session_key(model: str, session_id: str) -> str:
    return f"{model}\x00{session_id}"


class Affinity:
    name: ClassVar[str] = "affinity"

    def __init__(self, config: AffinityConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng
        self._fallback: Picker | None = None

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> AffinityConfig:
        return parse_table(AffinityConfig, options, path)

    def _members(self, ctx: PickContext) -> dict[str, EndpointStats]:
        if ctx.filtered:
            return {s.id: s for s in ctx.items}
        return ctx.pool.members

    def choose(self, ctx: PickContext) -> Choice:
        fallback = self._fallback
        if fallback is None:
            # Resolved once: a runtime Protocol check costs more than a whole decision.
            found = ctx.strategies[self._config.fallback]
            if not isinstance(found, Picker):  # pragma: no cover - parse_config allows pickers
                raise TypeError(f"{self._config.fallback} cannot be an affinity fallback")
            fallback = self._fallback = found
        session_id = ctx.request.session_id
        if not session_id:
            choice = fallback.choose(ctx)
            choice.detail = f"affinity: no session_id, {choice.detail}"
            return choice
        key = session_key(ctx.request.model, session_id)
        bound_id = ctx.sessions.get(key, ctx.now)
        bound = self._members(ctx).get(bound_id) if bound_id is not None else None
        if bound is not None:
            picked = [bound]
            if ctx.count > 1:
                for s in fallback.pick(ctx):
                    if s is not bound and len(picked) < ctx.count:
                        picked.append(s)
            if ctx.commit:
                ctx.sessions.bind(key, bound.id, ctx.now)
            return Choice(picked, f"affinity: session bound to {bound.id}", {"affinity": 1.0}, True)
        choice = fallback.choose(ctx)
        chosen = choice.picked[0]
        if ctx.commit:
            ctx.sessions.bind(key, chosen.id, ctx.now)
        if bound_id is None:
            choice.detail = f"affinity: new session bound to {chosen.id} by {choice.detail}"
        else:
            choice.detail = (
                f"affinity: rebound from {bound_id} (no longer usable) to {chosen.id}"
                f" by {choice.detail}"
            )
        choice.scores = {"affinity": 0.0}
        return choice

    def rank(self, ctx: PickContext) -> list[Ranked]:
        fallback = ctx.strategies[self._config.fallback]
        ranking = fallback.rank(ctx)
        bound_id = (
            ctx.sessions.get(session_key(ctx.request.model, ctx.request.session_id), ctx.now)
            if ctx.request.session_id
            else None
        )
        for i, r in enumerate(ranking):
            if r.stats.id == bound_id:
                ranking.insert(0, Ranked(r.stats, {"affinity": 1.0, **r.scores}, 1.0))
                del ranking[i + 1]
                break
        return ranking
