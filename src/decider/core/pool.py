"""Pools: the usable endpoints of each (model, required capabilities) pair, in health tiers, and
the rank heaps strategies keep over them. `Pools` owns every pool of an engine: it builds one on
first use, keeps it until health, a breaker, a cooldown or membership changes (the engine then
drops the model's pools), applies the per-request filters, and pushes a rescored endpoint into the
heaps that rank it (`reorder`, which the engine calls right after every rescore).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from decider.core.model import BreakerState, HealthStatus, RouteRequest
from decider.core.reasons import summary
from decider.core.stats import EndpointStats, RankHeap

if TYPE_CHECKING:
    from decider.core.state import Breakers, EndpointBudgets
    from decider.core.strategies.weighted_round_robin import Schedule

# A pool's usable endpoints by health tier, best first, with the skip key a tier is counted under
# while it is standby ("" for the chosen tier).
Tiers = list[tuple[str, list[EndpointStats]]]

# Rank heaps by the endpoint they rank (the pools' side of the old per-endpoint back-pointers).
_Ranked = dict[EndpointStats, list[RankHeap]]


class Pool:
    """The usable endpoints of one (model, required capabilities) pair at one time. Each user of
    a pool's derived structures has its own slot; a rebuild starts with all of them empty."""

    __slots__ = (
        "_ranked",
        "candidates",
        "cumulative_weights",
        "has_limits",
        "heaps",
        "items",
        "key",
        "members",
        "model",
        "panic",
        "registered",
        "schedule",
        "skipped",
        "standby",
        "summary",
        "tiers",
        "valid_until",
    )

    def __init__(
        self,
        *,
        key: tuple[str, frozenset[str]],
        items: list[EndpointStats],
        standby: list[EndpointStats],
        registered: int,
        candidates: list[EndpointStats],
        skipped: dict[str, int],
        valid_until: float,
        panic: bool,
        has_limits: bool,
        summary: str = "",
        ranked: _Ranked | None = None,
    ) -> None:
        self.key = key
        # The filters' part of a reason, e.g. "3 of 5 candidates, 1 unhealthy, 1 breaker open".
        self.summary = summary
        self.model = key[0]
        # Usable now, best health tier only (HEALTHY, else UNKNOWN, else DEGRADED).
        self.items = items
        # The items by endpoint id.
        self.members: dict[str, EndpointStats] = {s.id: s for s in items}
        # Usable but in a worse health tier: only ever fallbacks.
        self.standby = standby
        # Endpoints serving the model, and those of them with the required capabilities.
        self.registered = registered
        self.candidates = candidates
        # Candidates left out before picking, by reason wire name (standby tiers included).
        self.skipped = skipped
        # The pool must be rebuilt at this time (a cooldown or open breaker ends).
        self.valid_until = valid_until
        self.panic = panic
        # Some item has a max_in_flight, requests_per_minute or tokens_per_minute limit.
        self.has_limits = has_limits
        # Pools' per-request filters: the tiers, built on first use.
        self.tiers: Tiers | None = None
        # Rank heaps over the items by key name, shared by strategies ranking alike (heap()).
        self.heaps: dict[str, RankHeap] = {}
        # weighted_round_robin's schedule and weighted_random's cumulative weights.
        self.schedule: Schedule | None = None
        self.cumulative_weights: list[int] | None = None
        self._ranked = ranked

    def heap(self, name: str, key: Callable[[EndpointStats], Any]) -> RankHeap:
        """The pool's items ranked by `key` (smallest first), built on first use and kept
        current by Pools.reorder as their stats change; shared by strategies through `name`."""
        heap = self.heaps.get(name)
        if heap is None:
            heap = self.heaps[name] = RankHeap(self.items, key)
            ranked = self._ranked
            if ranked is not None:
                for s in self.items:
                    heaps = ranked.get(s)
                    if heaps is None:
                        ranked[s] = [heap]
                    else:
                        heaps.append(heap)
        return heap

    def close(self) -> None:
        for heap in self.heaps.values():
            heap.close()


EMPTY_POOL = Pool(
    key=("", frozenset()),
    items=[],
    standby=[],
    registered=0,
    candidates=[],
    skipped={},
    valid_until=0.0,
    panic=False,
    has_limits=False,
)


class Pools:
    """Every pool of one engine, by model and required capabilities."""

    __slots__ = ("_breakers", "_budgets", "_panic_threshold", "_pools", "ranked")

    def __init__(
        self, *, breakers: Breakers, budgets: EndpointBudgets, panic_threshold: float
    ) -> None:
        self._breakers = breakers
        self._budgets = budgets
        self._panic_threshold = panic_threshold
        # model -> required capabilities -> Pool
        self._pools: dict[str, dict[frozenset[str], Pool]] = {}
        # Every live rank heap by the endpoints it ranks; read-only outside this class.
        self.ranked: _Ranked = {}

    def get(self, model: str, caps: frozenset[str], group: list[EndpointStats], now: float) -> Pool:
        """The current pool of (model, caps); `group` is every endpoint serving the model."""
        pools = self._pools.get(model)
        pool = pools.get(caps) if pools is not None else None
        if pool is None or now >= pool.valid_until:
            pool = self._build(model, caps, group, now)
        return pool

    def drop(self, model: str) -> None:
        """Health, breaker or membership of the model changed: rebuild its pools when next used."""
        pools = self._pools.pop(model, None)
        if pools:
            for pool in pools.values():
                pool.close()

    def drop_all(self, removed: Sequence[EndpointStats]) -> None:
        """Membership changed: every pool goes, and the removed endpoints' heaps with them."""
        for model in list(self._pools):
            self.drop(model)
        for s in removed:
            self.ranked.pop(s, None)

    def reorder(self, s: EndpointStats) -> None:
        """`s` was rescored: give it a fresh entry in every live heap that ranks it."""
        heaps = self.ranked.get(s)
        if not heaps:
            return
        dead = False
        for h in heaps:
            if h.alive:
                h.push(s)
            else:
                dead = True
        if dead:
            live = [h for h in heaps if h.alive]
            if live:
                self.ranked[s] = live
            else:
                del self.ranked[s]

    def heaps_of(self, s: EndpointStats) -> list[RankHeap]:
        """The live heaps ranking `s`."""
        return [h for h in self.ranked.get(s, ()) if h.alive]

    # -- per-request filters ---------------------------------------------------------------------

    def filter(
        self, pool: Pool, request: RouteRequest, now: float
    ) -> tuple[list[EndpointStats], dict[str, int], int]:
        """Per-request filters: exclusions and endpoint capacity. Falls to a worse health tier
        when every endpoint of the better one is filtered out."""
        skipped = dict(pool.skipped)
        tiers = pool.tiers
        if tiers is None:
            tiers = pool.tiers = _tiers(pool)
        for tier, (key, members) in enumerate(tiers):
            kept = self._usable_now(members, request, skipped, now)
            if kept:
                if key:
                    skipped[key] = skipped.get(key, 0) - len(members)
                    if skipped[key] <= 0:
                        del skipped[key]
                return kept, skipped, tier
        return [], skipped, 0

    def _usable_now(
        self,
        members: Sequence[EndpointStats],
        request: RouteRequest,
        skipped: dict[str, int],
        now: float,
    ) -> list[EndpointStats]:
        excluded = request.exclude_endpoint_ids
        tokens = request.estimated_input_tokens
        kept = []
        for s in members:
            if s.id in excluded:
                skipped["excluded"] = skipped.get("excluded", 0) + 1
                continue
            if not self.has_room(s, tokens, now):
                skipped["at_capacity"] = skipped.get("at_capacity", 0) + 1
                continue
            kept.append(s)
        return kept

    def has_room(self, s: EndpointStats, tokens: int, now: float) -> bool:
        """Below its max_in_flight, with requests and tokens per minute left for `tokens`."""
        endpoint = s.endpoint
        if endpoint.max_in_flight and s.in_flight >= endpoint.max_in_flight:
            return False
        if endpoint.requests_per_minute or endpoint.tokens_per_minute:
            return self._budgets.endpoint_has_room(s.id, tokens, now)
        return True

    def fill_standby(
        self,
        picked: list[EndpointStats],
        pool: Pool,
        tier: int,
        request: RouteRequest,
        count: int,
        now: float,
    ) -> None:
        """Fallbacks beyond the chosen tier: worse health tiers, ranked after it."""
        tiers = pool.tiers
        if tiers is None:
            tiers = pool.tiers = _tiers(pool)
        for _, members in tiers[tier + 1 :]:
            for s in members:
                if len(picked) >= count:
                    return
                if (
                    s not in picked
                    and s.id not in request.exclude_endpoint_ids
                    and self.has_room(s, request.estimated_input_tokens, now)
                ):
                    picked.append(s)

    # -- building --------------------------------------------------------------------------------

    def _build(
        self, model: str, caps: frozenset[str], group: list[EndpointStats], now: float
    ) -> Pool:
        candidates = [s for s in group if caps <= s.tags] if caps else group
        healthy: list[EndpointStats] = []
        unknown: list[EndpointStats] = []
        degraded: list[EndpointStats] = []
        skipped: dict[str, int] = {}
        valid_until = math.inf
        breakers = self._breakers
        for s in candidates:
            health = s.health
            why = ""
            if health is HealthStatus.UNHEALTHY:
                why = "unhealthy"
            elif health is HealthStatus.DRAINING:
                why = "draining"
            elif s.cooldown_until > now:
                why = "cooling_down"
                valid_until = min(valid_until, s.cooldown_until)
            elif not breakers.allows(s.id, now):
                open_ = breakers.state(s.id) is BreakerState.OPEN
                why = "breaker_open" if open_ else "breaker_half_open"
            if why:
                skipped[why] = skipped.get(why, 0) + 1
            elif health is HealthStatus.HEALTHY:
                healthy.append(s)
            elif health is HealthStatus.UNKNOWN:
                unknown.append(s)
            else:
                degraded.append(s)
        tiers = [t for t in (healthy, unknown, degraded) if t]
        items = tiers[0] if tiers else []
        standby = [s for t in tiers[1:] for s in t]
        for key, tier in (("unknown_health", unknown), ("degraded", degraded)):
            if tier and tier is not items:
                skipped[key] = len(tier)
        usable = len(items) + len(standby)
        threshold = self._panic_threshold
        panic = bool(candidates) and threshold > 0.0 and usable < threshold * len(candidates)
        if panic:
            # Envoy's panic mode: too few usable endpoints to carry the load, so spread it over
            # all of them rather than overload the few (except draining ones: an operator asked
            # for those to get nothing new).
            items = [s for s in candidates if s.health is not HealthStatus.DRAINING]
            standby = []
            skipped = (
                {"draining": len(candidates) - len(items)} if len(items) < len(candidates) else {}
            )
        text = summary(len(items), len(candidates), skipped)
        if panic:
            text = "panic mode, health ignored: " + text
        pool = Pool(
            key=(model, caps),
            summary=text,
            items=items,
            standby=standby,
            registered=len(group),
            candidates=candidates,
            skipped=skipped,
            valid_until=valid_until,
            panic=panic,
            has_limits=any(
                s.endpoint.max_in_flight
                or s.endpoint.requests_per_minute
                or s.endpoint.tokens_per_minute
                for s in candidates
            ),
            ranked=self.ranked,
        )
        pools = self._pools.setdefault(model, {})
        old = pools.get(caps)
        if old is not None:
            old.close()
        pools[caps] = pool
        return pool


def _tiers(pool: Pool) -> Tiers:
    tiers: Tiers = [("", pool.items)] if pool.items else []
    by_health: dict[HealthStatus, list[EndpointStats]] = {}
    for s in pool.standby:
        by_health.setdefault(s.health, []).append(s)
    for health, key in (
        (HealthStatus.UNKNOWN, "unknown_health"),
        (HealthStatus.DEGRADED, "degraded"),
    ):
        members = by_health.get(health)
        if members:
            tiers.append((key, members))
    return tiers
