"""The engine's mutable state, one owner per piece, each behind a small Protocol.

The engine holds these owners and calls only the methods below, so a second implementation of
one (a backend sharing the state across replicas, say) slots in through `EngineState` without a
change to the decide path. Whatever the backend, every method here answers from memory: the
decide path never waits on the network, so a shared backend serves local copies and syncs them
in the background.

    owner               in-memory implementation         state
    PendingDecisions    pending.InMemoryPending          open decisions, in-flight and recent counts
    Breakers            breaker.CircuitBreakers          circuit breaker per endpoint
    TenantBudgets       quota.QuotaLedger                tenants' requests/tokens per minute
    EndpointBudgets     quota.QuotaLedger                endpoints' requests/tokens per minute
    Sessions            affinity.SessionTable            session -> endpoint bindings
    PrefixCache         affinity.PrefixIndex             which endpoint holds which prefix blocks
    LoadStats           stats.EndpointTable              per-endpoint load, latency, health

Pools (pool.Pools) are derived from these, not state of their own: rebuilt from them on change.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from decider.core.affinity import PrefixIndex, SessionTable
from decider.core.breaker import BreakerTransition, CircuitBreakers
from decider.core.model import BreakerState, Endpoint, HealthStatus, LoadReport, StateUsage
from decider.core.pending import InMemoryPending, Pending
from decider.core.quota import QuotaCheck, QuotaLedger
from decider.core.settings import EngineSettings
from decider.core.stats import EndpointStats, EndpointTable


class PendingDecisions(Protocol):
    """Decisions waiting for their outcome; the only writer of the decision counts an endpoint's
    load score reads: `EndpointStats.in_flight` and `EndpointStats.recent`."""

    @property
    def next_expiry(self) -> float:
        """When the oldest open decision expires (inf when none is open): `expire` before that
        time finds nothing, so the decide path compares instead of calling."""
        ...

    def __len__(self) -> int:
        """Open decisions."""
        ...

    def usage(self) -> StateUsage:
        """Open decisions, the most that may wait at once, and how many were evicted for it."""
        ...

    def record(
        self, chosen: EndpointStats, tenant: str, tokens: int, hashes: tuple[int, ...], now: float
    ) -> str:
        """A decision for `chosen` was made: count it (in flight and recent) and return its new
        decision id.
        `tokens` is the estimate charged to the budgets; `hashes` are indexed on success."""
        ...

    def keepable(self, hashes: tuple[int, ...]) -> tuple[int, ...]:
        """The prefix hashes `record` would keep with a new decision: all of them, or none once
        the open decisions hold their budget of hashes."""
        ...

    def resolve(self, decision_id: str) -> Pending | None:
        """The outcome of a decision arrived: forget it and release its in-flight count. None
        when the id is unknown, already resolved or expired."""
        ...

    def expire(self, now: float) -> Iterator[tuple[EndpointStats, tuple[int, ...]]]:
        """Forget the decisions older than the in-flight timeout, releasing their counts; yields
        each one's endpoint and prefix hashes (in issue order) before going on to the next. Also
        yields those of decisions evicted by the size bound since the last call (their counts
        are released when evicted; `next_expiry` is -inf while any wait)."""
        ...


class Breakers(Protocol):
    """One circuit breaker per endpoint: closed, open or half-open with trial slots."""

    @property
    def next_deadline(self) -> float:
        """The earliest time an open breaker turns half-open (inf when none is open)."""
        ...

    @property
    def half_open(self) -> int:
        """Breakers now half-open (0 lets a decision skip `on_pick`)."""
        ...

    def add(self, endpoint_id: str, *, now: float) -> None: ...

    def remove(self, endpoint_id: str) -> None: ...

    def state(self, endpoint_id: str) -> BreakerState: ...

    def allows(self, endpoint_id: str, now: float) -> bool:
        """Whether the endpoint may take a new request (closed, or a free half-open slot)."""
        ...

    def open_remaining_s(self, endpoint_id: str, now: float) -> float: ...

    def on_pick(self, endpoint_id: str) -> bool:
        """A decision chose the endpoint. True when that took its last free trial slot."""
        ...

    def release_trial(self, endpoint_id: str) -> bool:
        """A trial ended with no verdict. True when that freed the only free slot."""
        ...

    def record(self, endpoint_id: str, *, ok: bool, now: float) -> BreakerTransition | None:
        """Count one outcome; the transition it caused, if any."""
        ...

    def advance(self, now: float) -> list[BreakerTransition]:
        """Move open breakers whose time is up to half-open."""
        ...


class TenantBudgets(Protocol):
    """Tenants' requests and tokens per minute ([quotas])."""

    def check_tenant(self, tenant: str, tokens: int, now: float) -> QuotaCheck | None:
        """None when the tenant may make a request estimated at `tokens`; else why not."""
        ...

    def charge_tenant(self, tenant: str, *, requests: int, tokens: int, now: float) -> None:
        """Take (or, negative, give back) requests and tokens from the tenant's budget."""
        ...

    def expire_tenants(self, now: float) -> int:
        """Drop the buckets of tenants whose budgets have refilled (the same as new ones); how
        many."""
        ...

    def usage(self) -> StateUsage:
        """Tenant buckets kept, their bound ([quotas] max_tenants) and evictions for it."""
        ...


class EndpointBudgets(Protocol):
    """Endpoints' own requests and tokens per minute (their registration's limits)."""

    def set_endpoint_limits(
        self, endpoint_id: str, *, requests_per_minute: int, tokens_per_minute: int, now: float
    ) -> None: ...

    def remove_endpoint(self, endpoint_id: str) -> None: ...

    def endpoint_has_room(self, endpoint_id: str, tokens: int, now: float) -> bool: ...

    def charge_endpoint(
        self, endpoint_id: str, *, requests: int, tokens: int, now: float
    ) -> None: ...

    def endpoint_headroom(self, endpoint_id: str, now: float) -> float:
        """Share of the tighter budget left, 0.0 to 1.0 (1.0 without limits)."""
        ...


class Sessions(Protocol):
    """Session bindings with a sliding TTL (the affinity strategy)."""

    def __len__(self) -> int: ...

    def get(self, key: str, now: float) -> str | None:
        """The bound endpoint id, None when unbound or expired."""
        ...

    def bind(self, key: str, endpoint_id: str, now: float) -> None:
        """Bind or renew."""
        ...

    def expire(self, now: float) -> int:
        """Drop expired bindings; how many."""
        ...

    def usage(self) -> StateUsage:
        """Bindings, their bound ([affinity] max_sessions) and evictions for it."""
        ...


class PrefixCache(Protocol):
    """Which endpoints hold which prefix blocks (chained hashes), approximately."""

    @property
    def max_blocks(self) -> int:
        """Blocks of one request looked at and recorded."""
        ...

    @property
    def block_count(self) -> int: ...

    def record(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        """The endpoint served a prompt with these blocks."""
        ...

    def add_pending(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        """A decision just sent a prompt with these blocks to the endpoint: they match from now
        on, as pending, until `confirm` or `drop` settles them."""
        ...

    def confirm(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        """The pending decision succeeded on its endpoint: the blocks are held, as `record`."""
        ...

    def drop(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        """The pending decision failed, timed out, was cancelled or was served elsewhere."""
        ...

    def remove_endpoint(self, endpoint_id: str) -> None: ...

    def matches(self, hashes: Sequence[int]) -> dict[str, int]:
        """Endpoint id -> leading blocks it holds, for a few endpoints, deepest first."""
        ...

    def matched(self, endpoint_id: str, hashes: Sequence[int]) -> int: ...

    def usage(self) -> StateUsage:
        """Blocks held, their bound ([cache] max_blocks) and blocks evicted for it."""
        ...


class LoadStats(Protocol):
    """The live `EndpointStats` of every registered endpoint: membership, load reports, latency
    EWMAs, health, cooldowns and per-model references. Derived scores are the Scorer's."""

    def get(self, endpoint_id: str) -> EndpointStats | None: ...

    def group(self, model: str) -> list[EndpointStats] | None:
        """The endpoints serving the model (None or empty when none do)."""
        ...

    def groups(self) -> Iterable[list[EndpointStats]]: ...

    def models(self) -> list[str]:
        """The models some endpoint serves."""
        ...

    def values(self) -> Iterable[EndpointStats]: ...

    def is_live(self, s: EndpointStats) -> bool:
        """Whether `s` is still the registered stats of its endpoint (not removed or replaced)."""
        ...

    def replace(
        self, endpoints: Sequence[Endpoint]
    ) -> tuple[list[EndpointStats], list[EndpointStats]]:
        """A full membership snapshot: the stats added and removed (ids that stay keep theirs)."""
        ...

    def record_latency(
        self, s: EndpointStats, *, latency_s: float, ttft_s: float, now: float
    ) -> None: ...

    def record_load(self, s: EndpointStats, load: LoadReport, now: float) -> None: ...

    def set_health(self, s: EndpointStats, status: HealthStatus, reason: str) -> bool:
        """True when the status changed (the reason is kept either way)."""
        ...

    def cool_down(self, s: EndpointStats, until: float) -> None: ...

    def set_quota_score(self, s: EndpointStats, headroom: float) -> None: ...

    def refresh_references(self, group: Sequence[EndpointStats], *, ttft_weight: float) -> None:
        """The model's latency reference (median EWMA) and cheapest cost, for every member."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineState:
    """The state owners an engine is built with."""

    pending: PendingDecisions
    breakers: Breakers
    tenant_budgets: TenantBudgets
    endpoint_budgets: EndpointBudgets
    sessions: Sessions
    prefixes: PrefixCache
    stats: LoadStats

    @classmethod
    def in_memory(cls, settings: EngineSettings, *, rng: random.Random) -> EngineState:
        """Every owner in this process's memory (draws the decision-id prefix from `rng`)."""
        ledger = QuotaLedger(settings.quotas)
        routing = settings.routing
        return cls(
            pending=InMemoryPending(
                timeout_s=routing.in_flight_timeout_s,
                rng=rng,
                max_entries=routing.max_pending_decisions,
            ),
            breakers=CircuitBreakers(settings.breaker),
            tenant_budgets=ledger,
            endpoint_budgets=ledger,
            sessions=SessionTable(
                ttl_s=settings.affinity.ttl_s, max_sessions=settings.affinity.max_sessions
            ),
            prefixes=PrefixIndex(
                blocks_per_endpoint=settings.cache.blocks_per_endpoint,
                max_blocks_per_request=settings.cache.max_blocks_per_request,
                max_matches=settings.cache.max_matches,
                max_blocks=settings.cache.max_blocks,
            ),
            stats=EndpointTable(decay_s=routing.latency_decay_s),
        )
