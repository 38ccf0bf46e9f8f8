"""What a strategy is, sees and returns.

A strategy ranks the usable candidates of one request: `choose` returns the chosen endpoint and up
to `count - 1` ordered fallbacks, `rank` returns every candidate with its scores for explain mode.
Neither reads the clock (the engine passes `now`) nor draws randomness except from the `rng` it was
built with; with `ctx.commit` False (explain mode) neither changes any state.

A strategy plugs in as grpc-go's balancers do: its class is listed in the STRATEGIES table
(strategies/__init__.py), `parse_config` turns its `[routing.<name>]` table into its typed config
once, at load time (core/settings.py keeps it), and the class is called with that config to build
it. What the engine needs from a strategy beyond picking, it asks through a hook Protocol found
once when the engine is built: `Splitter` (route over several targets, as ab_split's arms do) and
`ShapesScores` (set parameters of the shared endpoint scores, as composite's weights do).

Candidates are the engine's long-lived `EndpointStats` objects, not per-decision copies: picking
reads their attributes and builds nothing per candidate.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from decider.core.model import RouteRequest
from decider.core.stats import EndpointStats, ScoreParams, Scorer

if TYPE_CHECKING:
    from decider.core.pool import Pool
    from decider.core.state import PrefixCache, Sessions

NO_SCORES: Mapping[str, float] = MappingProxyType({})


class PickContext:
    """A decision's inputs for the strategy. The engine reuses one object, resetting the
    per-decision fields, so a decision allocates none."""

    __slots__ = (
        "commit",
        "count",
        "filtered",
        "index",
        "items",
        "now",
        "pool",
        "request",
        "scorer",
        "sessions",
        "strategies",
    )

    def __init__(
        self,
        *,
        scorer: Scorer,
        index: PrefixCache,
        sessions: Sessions,
        strategies: Mapping[str, Strategy],
        pool: Pool,
        request: RouteRequest | None = None,
        items: Sequence[EndpointStats] = (),
        count: int = 1,
        commit: bool = True,
        now: float = 0.0,
    ) -> None:
        # The engine's long-lived parts.
        self.scorer = scorer
        self.index = index
        self.sessions = sessions
        self.strategies = strategies
        # Per decision: the engine sets these before each pick.
        self.request: RouteRequest = request if request is not None else RouteRequest(model="")
        self.pool = pool
        # Non-empty. pool.items itself unless this request filtered some out (then `filtered`).
        self.items = items
        self.filtered = items is not self.pool.items
        # Endpoints wanted: the chosen one plus fallbacks.
        self.count = count
        # False in explain mode: change no state.
        self.commit = commit
        self.now = now


class Choice:
    """The strategy's answer: `picked[0]` is chosen, the rest are fallbacks (distinct)."""

    __slots__ = ("affinity_hit", "detail", "picked", "scores")

    def __init__(
        self,
        picked: list[EndpointStats],
        detail: str,
        scores: Mapping[str, float] = NO_SCORES,
        affinity_hit: bool = False,
    ) -> None:
        self.picked = picked
        # The strategy's part of the reason, e.g. "least_request: 2 in flight vs 5 and 7".
        self.detail = detail
        # Per-factor scores of the chosen endpoint, 0.0 to 1.0.
        self.scores = scores
        self.affinity_hit = affinity_hit


@dataclass(frozen=True, slots=True)
class Ranked:
    stats: EndpointStats
    scores: Mapping[str, float]
    total: float


class Strategy(Protocol):
    name: ClassVar[str]

    def choose(self, ctx: PickContext) -> Choice: ...

    def rank(self, ctx: PickContext) -> list[Ranked]: ...


class StrategyConfig(Protocol):
    """A strategy's parsed options: a frozen value of the strategy's own config class (for example
    `LeastRequestConfig`), built once by its `parse_config`. Nothing beyond that is required."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """One target a `Splitter` sends the request to: the model and required capabilities whose
    pool the engine picks from, and the words the reason starts with."""

    model: str
    capabilities: frozenset[str]
    note: str


@runtime_checkable
class Splitter(Protocol):
    """Hook: a strategy that routes a request over several targets in turn (ab_split's arms).

    The engine tries the routes in order, picking inside each with the strategy named `within`,
    and answers with the first decision (or quota refusal); otherwise with the first refusal."""

    @property
    def within(self) -> str: ...

    def routes(self, request: RouteRequest) -> Sequence[Route]: ...


@runtime_checkable
class ShapesScores(Protocol):
    """Hook: a strategy whose options set parameters of the per-endpoint scores every strategy
    reads (composite's factor weights, latency's TTFT share). The engine asks each such strategy,
    in table order, once when it is built, and builds its one Scorer from the result."""

    def shape_scores(self, params: ScoreParams) -> ScoreParams: ...


@runtime_checkable
class Picker(Strategy, Protocol):
    """A strategy that can pick without explaining itself (affinity's fallbacks)."""

    def pick(self, ctx: PickContext) -> list[EndpointStats]: ...


class StrategyFactory(Protocol):
    """A strategy class as the STRATEGIES table lists it (its `name` is the wire name)."""

    @property
    def name(self) -> str: ...

    # `config` is what this class's own parse_config returned (typed per strategy, hence Any).
    def __call__(self, config: Any, rng: random.Random) -> Strategy: ...

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> StrategyConfig:
        """Validate a `[routing.<name>]` table (path is its key path, for messages): the typed
        config, or ConfigError naming the key, the value and what is allowed."""
        ...


# -- helpers shared by strategies ---------------------------------------------------------------


def draw_source(ctx: PickContext, rng: random.Random) -> Callable[[], float]:
    """The strategy's rng when the decision commits; in explain mode a generator seeded by the
    request id, so explaining leaves the shared rng (and later decisions) untouched."""
    return rng.random if ctx.commit else random.Random(ctx.request.request_id).random


def sample_best(
    items: Sequence[EndpointStats],
    choices: int,
    rand: Callable[[], float],
    key: Callable[[EndpointStats], Any],
) -> list[EndpointStats]:
    """Power of `choices` random choices (Mitzenmacher): up to `choices` distinct samples, best
    first by `key`. Needs len(items) > choices; callers scan fully otherwise."""
    n = len(items)
    # Distinct samples: drawing the same endpoint twice would waste a choice.
    first = int(rand() * n)
    a = items[first]
    if choices == 2:
        b = items[(first + 1 + int(rand() * (n - 1))) % n]
        return [a, b] if key(a) <= key(b) else [b, a]
    sampled = [a]
    for _ in range(choices - 1):
        candidate = items[(first + 1 + int(rand() * (n - 1))) % n]
        if candidate not in sampled:
            sampled.append(candidate)
    return sorted(sampled, key=key)


# Rank keys (smallest is best), shared so that strategies ranking alike share one heap; C-level
# attrgetters where one attribute will do, since heaps call them on every stats change.
load_key: Callable[[EndpointStats], int] = attrgetter("load")
latency_key: Callable[[EndpointStats], float] = attrgetter("latency_cost")
cost_key: Callable[[EndpointStats], tuple[float, int]] = attrgetter("cost", "load")
composite_key: Callable[[EndpointStats], float] = attrgetter("base_rank")


def quota_key(s: EndpointStats) -> tuple[float, float]:
    return (-s.quota_score, -s.load_score)


def best_by(
    ctx: PickContext, name: str, key: Callable[[EndpointStats], Any], count: int
) -> list[EndpointStats]:
    """The `count` candidates with the smallest key, best first: from the pool's rank heap in
    O(count log n), or by scanning when this request filtered the candidates."""
    if not ctx.filtered:
        return ctx.pool.heap(name, key).best(count)
    return bottom_k(ctx.items, count, key)


def bottom_k(
    items: Sequence[EndpointStats], count: int, key: Callable[[EndpointStats], Any]
) -> list[EndpointStats]:
    """The `count` items with the smallest key, best first."""
    best = min(items, key=key)
    if count == 1 or len(items) == 1:
        return [best]
    rest = list(items)
    rest.remove(best)
    out = [best]
    while len(out) < count and rest:
        nxt = min(rest, key=key)
        rest.remove(nxt)
        out.append(nxt)
    return out


def rotated(items: Sequence[EndpointStats], start: int) -> list[EndpointStats]:
    start %= len(items)
    return [*items[start:], *items[:start]]


def sample_distinct(
    items: Sequence[EndpointStats], first: EndpointStats, count: int, rng: random.Random
) -> list[EndpointStats]:
    """`first` then up to count - 1 other distinct items drawn at random."""
    out = [first]
    n = len(items)
    if count == 1 or n == 1:
        return out
    want = min(count, n)
    # A few rejection draws are cheap while the pool is much larger than what is wanted.
    tries = 4 * want
    while len(out) < want and tries:
        candidate = items[int(rng.random() * n)]
        if candidate not in out:
            out.append(candidate)
        tries -= 1
    if len(out) < want:
        for candidate in items:
            if candidate not in out:
                out.append(candidate)
                if len(out) == want:
                    break
    return out


def plain_ranking(ctx: PickContext, order: Sequence[EndpointStats], score: str) -> list[Ranked]:
    """Explain ranking for strategies without factor scores: position order, 1.0 down to 0."""
    n = len(order)
    return [Ranked(s, {score: 1.0 - i / n}, 1.0 - i / n) for i, s in enumerate(order)]
