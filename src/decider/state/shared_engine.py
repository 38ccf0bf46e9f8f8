"""The engine's state shared across replicas: breakers, sessions, the prefix index and budgets.

Each shared owner wraps the in-memory one (core/state.py's Protocols) and answers every call
from memory, so Decide never waits on Redis. What changes here is queued and `StateSync`
publishes it in one batch as soon as the event loop is free, at most one batch every 10 ms
(many decisions' changes coalesce under load); every other replica applies the batch to its
own copies:

    breakers   a breaker opened here opens on every replica for the same remaining time
               (half-open trials run on the replica that opened it)
    sessions   a new or changed binding, and a renewal at most every quarter TTL
    prefixes   blocks pending at decide time, confirmed or dropped by the outcome
    budgets    tenant and endpoint charges (requests, tokens), summed per batch
    load       each replica's own in-flight counts of the endpoints whose counts changed
               since the last batch (all of them every second while any are open), and its
               picks since the last batch; every replica adds the others' to its own in-flight
               counts and recent picks

While Redis is down each replica goes on from its own state (fail open). Budget charges made
meanwhile are kept (summed per tenant, a few numbers each) and sent when Redis returns, and
breakers still open are announced again. Session bindings and prefix-index changes made
meanwhile are kept too, the latest SESSIONS_KEPT_WHILE_DOWN and PREFIX_OPS_KEPT_WHILE_DOWN of
them (older ones are dropped and counted in the log line that reports the replay), and sent
in the order they were made when Redis returns. Load is not kept: it is sent afresh anyway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from decider.core.breaker import BreakerTransition, CircuitBreakers
from decider.core.model import BreakerState, StateUsage
from decider.core.pending import Pending
from decider.core.quota import QuotaCheck, QuotaLedger
from decider.core.state import EngineState, LoadStats, PendingDecisions, PrefixCache, Sessions
from decider.core.stats import RECENT_TAU_S, EndpointStats
from decider.state.redis_link import LINK_ERRORS, RedisLink

log = logging.getLogger("decider.state")

CHANNEL = "sync"
Clock = Callable[[], float]
# At most one batch per this long: under load the changes of many decisions share one PUBLISH
# (one Redis round trip and one JSON document), for at most this much more delay.
MIN_BATCH_GAP_S = 0.01
# Changes made while Redis is down, kept to be sent when it returns: bounded so a long outage
# costs a few MB at most (a session item is a key and an id; a prefix item up to max_blocks
# hashes).
SESSIONS_KEPT_WHILE_DOWN = 20_000
PREFIX_OPS_KEPT_WHILE_DOWN = 5_000


class StateSync:
    """One batch channel for every shared owner; `run()` sends, the link's subscription receives."""

    def __init__(self, link: RedisLink, *, clock: Clock) -> None:
        self._link = link
        self._clock = clock
        self._channel = link.key(CHANNEL)
        self._items: dict[str, list[Any]] = {}
        # (kind, subject) -> [requests, tokens]: charges summed until the next batch.
        self._charges: dict[tuple[str, str], list[int]] = {}
        self._wake = asyncio.Event()
        self._appliers: dict[str, Callable[[list[Any], float], None]] = {}
        self._resend: list[Callable[[], None]] = []
        self._providers: dict[str, Callable[[], Any]] = {}
        # topic -> items queued while Redis was down, the latest `keep_while_down` of them.
        self._held: dict[str, deque[Any]] = {}
        self._held_dropped: dict[str, int] = {}
        self._was_down = False
        self.batches_sent = 0
        link.subscribe(CHANNEL, self._on_batch)
        link.on_status(self._on_status)

    @property
    def interval_s(self) -> float:
        return self._link.settings.sync_interval_ms / 1000

    def register(
        self,
        topic: str,
        apply: Callable[[list[Any], float], None],
        *,
        resend: Callable[[], None] | None = None,
        keep_while_down: int = 0,
    ) -> None:
        """`apply(items, now)` gets the other replicas' items of `topic`; `resend()` queues
        again what must survive an outage (called when Redis returns); the latest
        `keep_while_down` items queued while Redis is down are sent, in order, when it returns."""
        self._appliers[topic] = apply
        if resend is not None:
            self._resend.append(resend)
        if keep_while_down:
            self._held[topic] = deque(maxlen=keep_while_down)
            self._held_dropped[topic] = 0

    def queue(self, topic: str, item: Any) -> None:
        self._items.setdefault(topic, []).append(item)
        self._wake.set()

    def provide(self, topic: str, provider: Callable[[], Any]) -> None:
        """`provider()` is asked for one item of `topic` at each batch (None: nothing new), so
        a value that changes on every decision is sent once per batch, as it stands then."""
        self._providers[topic] = provider

    def poke(self) -> None:
        """Something a provider gives changed: send a batch soon."""
        self._wake.set()

    def charge(self, kind: str, subject: str, requests: int, tokens: int) -> None:
        summed = self._charges.get((kind, subject))
        if summed is None:
            self._charges[(kind, subject)] = [requests, tokens]
        else:
            summed[0] += requests
            summed[1] += tokens
        self._wake.set()

    async def run(self) -> None:
        """Sends batches until cancelled."""
        sync_s = self._link.settings.sync_interval_ms / 1000
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._link.up:
                # Down: keep the charges (small) and the topics that keep items, drop the
                # rest, and wait for the link.
                self._hold(self._items)
                self._items = {}
                for provider in self._providers.values():
                    provider()
                await asyncio.sleep(sync_s)
                if self._charges:
                    self._wake.set()
                continue
            try:
                await self._flush()
            except LINK_ERRORS as exc:
                self._link.mark_down(exc)
                await asyncio.sleep(sync_s)
                continue
            await asyncio.sleep(MIN_BATCH_GAP_S)

    async def _flush(self) -> None:
        for topic, provider in self._providers.items():
            item = provider()
            if item is not None:
                self._items.setdefault(topic, []).append(item)
        if not self._items and not self._charges:
            return
        items, self._items = self._items, {}
        charges, self._charges = self._charges, {}
        batch: dict[str, Any] = {"from": self._link.replica_id, **items}
        if charges:
            batch["charges"] = [[k, s, r, t] for (k, s), (r, t) in charges.items()]
        try:
            await self._link.client.publish(self._channel, json.dumps(batch))
        except LINK_ERRORS:
            # Charges and the topics that keep items are sent again when Redis returns.
            for key, (r, t) in charges.items():
                self.charge(key[0], key[1], r, t)
            self._hold(items)
            raise
        self.batches_sent += 1

    def _hold(self, items: dict[str, list[Any]]) -> None:
        for topic, queued in items.items():
            held = self._held.get(topic)
            if held is None:
                continue
            assert held.maxlen is not None
            self._held_dropped[topic] += max(0, len(held) + len(queued) - held.maxlen)
            held.extend(queued)

    def _replay_held(self) -> None:
        counts = []
        for topic, held in self._held.items():
            if held:
                counts.append(f"{len(held)} {topic}")
                # Before anything queued since: the order of each replica's changes holds.
                self._items[topic] = [*held, *self._items.get(topic, ())]
                held.clear()
            if self._held_dropped[topic]:
                counts.append(f"{self._held_dropped[topic]} older {topic} dropped")
                self._held_dropped[topic] = 0
        if counts:
            log.info(
                "Redis is back: sending the changes made while it was down (%s)",
                ", ".join(counts),
            )

    def _on_status(self, up: bool, cause: str) -> None:
        if not up:
            self._was_down = True
            return
        if self._was_down:
            self._was_down = False
            self._replay_held()
            for resend in self._resend:
                resend()
        self._wake.set()

    def _on_batch(self, data: bytes) -> None:
        batch = json.loads(data)
        if batch.get("from") == self._link.replica_id:
            return
        now = self._clock()
        for topic, apply in self._appliers.items():
            items = batch.get(topic)
            if items:
                apply(items, now)


class SharedBreakers:
    """Breakers: this replica's own, plus breakers other replicas opened, for their open time."""

    def __init__(self, inner: CircuitBreakers, sync: StateSync, *, clock: Clock) -> None:
        self._inner = inner
        self._sync = sync
        self._clock = clock
        # endpoint id -> (open until, on this replica's clock; reason)
        self._remote: dict[str, tuple[float, str]] = {}
        self._remote_deadline = math.inf
        # Remote openings not yet reported through advance() (the engine drops pools there).
        self._arrived: list[BreakerTransition] = []
        # Opened here and still open: announced again when Redis returns.
        self._local_open: dict[str, tuple[float, str]] = {}
        sync.register("breakers", self._apply, resend=self._resend)

    @property
    def next_deadline(self) -> float:
        if self._arrived:
            return -math.inf
        inner = self._inner.next_deadline
        return inner if inner < self._remote_deadline else self._remote_deadline

    @property
    def half_open(self) -> int:
        return self._inner.half_open

    def add(self, endpoint_id: str, *, now: float) -> None:
        self._inner.add(endpoint_id, now=now)

    def remove(self, endpoint_id: str) -> None:
        self._inner.remove(endpoint_id)
        self._remote.pop(endpoint_id, None)
        self._local_open.pop(endpoint_id, None)

    def state(self, endpoint_id: str) -> BreakerState:
        if self._remote and endpoint_id in self._remote:
            return BreakerState.OPEN
        return self._inner.state(endpoint_id)

    def allows(self, endpoint_id: str, now: float) -> bool:
        if self._remote and endpoint_id in self._remote:
            return False
        return self._inner.allows(endpoint_id, now)

    def open_remaining_s(self, endpoint_id: str, now: float) -> float:
        remote = self._remote.get(endpoint_id)
        if remote is not None:
            return max(0.0, remote[0] - now)
        return self._inner.open_remaining_s(endpoint_id, now)

    def on_pick(self, endpoint_id: str) -> bool:
        return self._inner.on_pick(endpoint_id)

    def release_trial(self, endpoint_id: str) -> bool:
        return self._inner.release_trial(endpoint_id)

    def record(self, endpoint_id: str, *, ok: bool, now: float) -> BreakerTransition | None:
        transition = self._inner.record(endpoint_id, ok=ok, now=now)
        if transition is not None:
            if transition.state is BreakerState.OPEN:
                open_for_s = self._inner.open_remaining_s(endpoint_id, now)
                self._local_open[endpoint_id] = (now + open_for_s, transition.reason)
                self._sync.queue("breakers", [endpoint_id, open_for_s, transition.reason])
            else:
                self._local_open.pop(endpoint_id, None)
        return transition

    def advance(self, now: float) -> list[BreakerTransition]:
        moved = self._inner.advance(now)
        if self._arrived:
            moved.extend(self._arrived)
            self._arrived = []
        if now >= self._remote_deadline:
            for endpoint_id, (until, _) in list(self._remote.items()):
                if until <= now:
                    del self._remote[endpoint_id]
                    moved.append(
                        BreakerTransition(
                            endpoint_id=endpoint_id,
                            state=self._inner.state(endpoint_id),
                            reason="the open period set by another replica ended",
                        )
                    )
            self._remote_deadline = min((u for u, _ in self._remote.values()), default=math.inf)
        return moved

    def _apply(self, items: list[Any], now: float) -> None:
        for endpoint_id, open_for_s, reason in items:
            if self._inner.state(endpoint_id) in (BreakerState.UNKNOWN, BreakerState.OPEN):
                continue
            until = now + float(open_for_s)
            known = self._remote.get(endpoint_id)
            if known is not None and known[0] >= until:
                continue
            self._remote[endpoint_id] = (until, str(reason))
            self._remote_deadline = min(self._remote_deadline, until)
            if known is None:
                self._arrived.append(
                    BreakerTransition(
                        endpoint_id=endpoint_id,
                        state=BreakerState.OPEN,
                        reason=f"{reason} (seen by another replica)",
                    )
                )

    def _resend(self) -> None:
        now = self._clock()
        for endpoint_id, (until, reason) in list(self._local_open.items()):
            if until > now:
                self._sync.queue("breakers", [endpoint_id, until - now, reason])
            else:
                del self._local_open[endpoint_id]


class SharedSessions:
    """Session bindings: this replica's table, told of every other replica's bindings."""

    def __init__(self, inner: Sessions, sync: StateSync, *, ttl_s: float) -> None:
        self._inner = inner
        self._sync = sync
        self._renew_every_s = ttl_s / 4
        # key -> (endpoint id, when last sent or received): renewals are sent sparingly.
        self._sent: dict[str, tuple[str, float]] = {}
        sync.register("sessions", self._apply, keep_while_down=SESSIONS_KEPT_WHILE_DOWN)

    def __len__(self) -> int:
        return len(self._inner)

    def usage(self) -> StateUsage:
        return self._inner.usage()

    def get(self, key: str, now: float) -> str | None:
        return self._inner.get(key, now)

    def bind(self, key: str, endpoint_id: str, now: float) -> None:
        self._inner.bind(key, endpoint_id, now)
        sent = self._sent.get(key)
        if sent is None or sent[0] != endpoint_id or now - sent[1] >= self._renew_every_s:
            self._sent[key] = (endpoint_id, now)
            self._sync.queue("sessions", [key, endpoint_id])

    def expire(self, now: float) -> int:
        expired = self._inner.expire(now)
        if len(self._sent) > len(self._inner):
            # Forget what was sent for bindings the table no longer holds.
            horizon = now - 4 * self._renew_every_s
            self._sent = {k: v for k, v in self._sent.items() if v[1] > horizon}
        return expired

    def _apply(self, items: list[Any], now: float) -> None:
        for key, endpoint_id in items:
            self._inner.bind(key, endpoint_id, now)
            self._sent[key] = (endpoint_id, now)


class SharedPrefixes:
    """The prefix index: blocks recorded, pending, confirmed and dropped here, and the same
    changes from every other replica, applied in the order each replica made them."""

    def __init__(self, inner: PrefixCache, sync: StateSync) -> None:
        self._inner = inner
        self._sync = sync
        self._ops: dict[str, Callable[[str, Sequence[int]], None]] = {
            "r": inner.record,
            "p": inner.add_pending,
            "c": inner.confirm,
            "d": inner.drop,
        }
        sync.register("prefixes", self._apply, keep_while_down=PREFIX_OPS_KEPT_WHILE_DOWN)

    @property
    def max_blocks(self) -> int:
        return self._inner.max_blocks

    @property
    def block_count(self) -> int:
        return self._inner.block_count

    def record(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        self._inner.record(endpoint_id, hashes)
        self._share("r", endpoint_id, hashes)

    def add_pending(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        self._inner.add_pending(endpoint_id, hashes)
        self._share("p", endpoint_id, hashes)

    def confirm(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        self._inner.confirm(endpoint_id, hashes)
        self._share("c", endpoint_id, hashes)

    def drop(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        self._inner.drop(endpoint_id, hashes)
        self._share("d", endpoint_id, hashes)

    def remove_endpoint(self, endpoint_id: str) -> None:
        self._inner.remove_endpoint(endpoint_id)

    def matches(self, hashes: Sequence[int]) -> dict[str, int]:
        return self._inner.matches(hashes)

    def matched(self, endpoint_id: str, hashes: Sequence[int]) -> int:
        return self._inner.matched(endpoint_id, hashes)

    def usage(self) -> StateUsage:
        return self._inner.usage()

    def _share(self, op: str, endpoint_id: str, hashes: Sequence[int]) -> None:
        if hashes:
            self._sync.queue("prefixes", [op, endpoint_id, list(hashes[: self._inner.max_blocks])])

    def _apply(self, items: list[Any], now: float) -> None:
        for op, endpoint_id, hashes in items:
            apply = self._ops.get(str(op))
            if apply is not None:
                apply(str(endpoint_id), [int(h) for h in hashes])


class SharedBudgets:
    """Tenant and endpoint budgets: charged here and by every other replica, so each replica's
    buckets track the fleet's use (behind by one batch)."""

    def __init__(self, inner: QuotaLedger, sync: StateSync) -> None:
        self._inner = inner
        self._sync = sync
        sync.register("charges", self._apply)

    def check_tenant(self, tenant: str, tokens: int, now: float) -> QuotaCheck | None:
        return self._inner.check_tenant(tenant, tokens, now)

    def charge_tenant(self, tenant: str, *, requests: int, tokens: int, now: float) -> None:
        self._inner.charge_tenant(tenant, requests=requests, tokens=tokens, now=now)
        self._sync.charge("t", tenant, requests, tokens)

    def expire_tenants(self, now: float) -> int:
        return self._inner.expire_tenants(now)

    def usage(self) -> StateUsage:
        return self._inner.usage()

    def set_endpoint_limits(
        self, endpoint_id: str, *, requests_per_minute: int, tokens_per_minute: int, now: float
    ) -> None:
        self._inner.set_endpoint_limits(
            endpoint_id,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            now=now,
        )

    def remove_endpoint(self, endpoint_id: str) -> None:
        self._inner.remove_endpoint(endpoint_id)

    def endpoint_has_room(self, endpoint_id: str, tokens: int, now: float) -> bool:
        return self._inner.endpoint_has_room(endpoint_id, tokens, now)

    def charge_endpoint(self, endpoint_id: str, *, requests: int, tokens: int, now: float) -> None:
        self._inner.charge_endpoint(endpoint_id, requests=requests, tokens=tokens, now=now)
        self._sync.charge("e", endpoint_id, requests, tokens)

    def endpoint_headroom(self, endpoint_id: str, now: float) -> float:
        return self._inner.endpoint_headroom(endpoint_id, now)

    def _apply(self, items: list[Any], now: float) -> None:
        for kind, subject, requests, tokens in items:
            if kind == "t":
                self._inner.charge_tenant(str(subject), requests=requests, tokens=tokens, now=now)
            elif kind == "e":
                self._inner.charge_endpoint(str(subject), requests=requests, tokens=tokens, now=now)


class SharedLoad:
    """Open decisions stay this replica's; the in-flight counts it keeps become fleet-wide: its
    own plus every other replica's as of that replica's latest batch."""

    # A replica with open decisions says so at least this often...
    HEARTBEAT_S = 1.0
    # ...and one not heard from for this long is gone: its counts are dropped.
    FORGET_AFTER_S = 5.0

    def __init__(
        self,
        inner: PendingDecisions,
        stats: LoadStats,
        sync: StateSync,
        *,
        clock: Clock,
        replica_id: str,
        interval_s: float,
    ) -> None:
        self._inner = inner
        self._stats = stats
        self._sync = sync
        self._clock = clock
        self._replica_id = replica_id
        self._interval_s = interval_s
        # replica id -> (endpoint id -> in flight there, when received)
        self._others: dict[str, tuple[dict[str, int], float]] = {}
        # endpoint id -> (the stats the others' count was added to, that count)
        self._applied: dict[str, tuple[EndpointStats, int]] = {}
        self._dirty: set[str] = set()
        # endpoint id -> decisions for it here since the last batch (the others' recent picks).
        self._picks: dict[str, int] = {}
        self._last_full_at = -math.inf
        self._had_open = False
        # Told which endpoints' counts changed (Engine.rescore_load).
        self.on_change: Callable[[list[str], float], None] | None = None
        sync.register("load", self._apply)
        sync.provide("load", self._changed_counts)

    @property
    def next_expiry(self) -> float:
        return self._inner.next_expiry

    def __len__(self) -> int:
        return len(self._inner)

    def usage(self) -> StateUsage:
        return self._inner.usage()

    def keepable(self, hashes: tuple[int, ...]) -> tuple[int, ...]:
        return self._inner.keepable(hashes)

    def record(
        self, chosen: EndpointStats, tenant: str, tokens: int, hashes: tuple[int, ...], now: float
    ) -> str:
        self._dirty.add(chosen.id)
        self._picks[chosen.id] = self._picks.get(chosen.id, 0) + 1
        self._sync.poke()
        return self._inner.record(chosen, tenant, tokens, hashes, now)

    def resolve(self, decision_id: str) -> Pending | None:
        entry = self._inner.resolve(decision_id)
        if entry is not None:
            self._dirty.add(entry[0].id)
            self._sync.poke()
        return entry

    def expire(self, now: float) -> Iterator[tuple[EndpointStats, tuple[int, ...]]]:
        for expired in self._inner.expire(now):
            self._dirty.add(expired[0].id)
            yield expired

    def own(self, s: EndpointStats) -> int:
        """This replica's open decisions on `s` (the others' taken out)."""
        added = self._applied.get(s.id)
        return s.in_flight - (added[1] if added is not None and added[0] is s else 0)

    def own_counts(self) -> dict[str, int]:
        """This replica's open decisions per endpoint, where any are open."""
        out: dict[str, int] = {}
        for s in self._stats.values():
            if s.in_flight:
                own = self.own(s)
                if own > 0:
                    out[s.id] = own
        return out

    def _changed_counts(self) -> list[Any] | None:
        """The batch's item: counts of the endpoints that changed, as they stand now."""
        if not self._dirty:
            return None
        counts: dict[str, int] = {}
        for endpoint_id in self._dirty:
            s = self._stats.get(endpoint_id)
            counts[endpoint_id] = max(0, self.own(s)) if s is not None else 0
        self._dirty.clear()
        picks, self._picks = self._picks, {}
        return [self._replica_id, counts, False, picks]

    async def run(self) -> None:
        """`sync_once` every sync interval, until cancelled."""
        while True:
            await asyncio.sleep(self._interval_s)
            self.sync_once(self._clock())

    def sync_once(self, now: float) -> None:
        """Every second while decisions are open here, all this replica's counts (a receiver
        that missed a batch catches up); forgets replicas gone silent."""
        if now - self._last_full_at >= self.HEARTBEAT_S:
            own = self.own_counts()
            if own or self._had_open:
                self._sync.queue("load", [self._replica_id, own, True, {}])
                self._last_full_at = now
            self._had_open = bool(own)
        gone = [r for r, (_, at) in self._others.items() if now - at > self.FORGET_AFTER_S]
        if gone:
            for replica in gone:
                del self._others[replica]
            self._recount(now)

    def _apply(self, items: list[Any], now: float) -> None:
        picked: list[str] = []
        for replica, counts, full, picks in items:
            for endpoint_id, n in picks.items():
                s = self._stats.get(str(endpoint_id))
                if s is not None:
                    # The same decayed count the engine keeps of its own picks (pending.py).
                    recent = s.recent
                    s.recent = (
                        recent * math.exp((s.recent_at - now) / RECENT_TAU_S) + n if recent else n
                    )
                    s.recent_at = now
                    picked.append(s.id)
            known = {} if full else dict(self._others.get(str(replica), ({}, 0.0))[0])
            for endpoint_id, n in counts.items():
                if n:
                    known[str(endpoint_id)] = int(n)
                else:
                    known.pop(str(endpoint_id), None)
            self._others[str(replica)] = (known, now)
        self._recount(now, also=picked)

    def _recount(self, now: float, *, also: Sequence[str] = ()) -> None:
        totals: dict[str, int] = {}
        for counts, _ in self._others.values():
            for endpoint_id, n in counts.items():
                totals[endpoint_id] = totals.get(endpoint_id, 0) + n
        changed: list[str] = list(also)
        for endpoint_id in set(totals) | set(self._applied):
            new = totals.get(endpoint_id, 0)
            s = self._stats.get(endpoint_id)
            if s is None:
                self._applied.pop(endpoint_id, None)
                continue
            prev = self._applied.get(endpoint_id)
            old = prev[1] if prev is not None and prev[0] is s else 0
            if new == old:
                continue
            s.in_flight = max(0, s.in_flight + new - old)
            if new:
                self._applied[endpoint_id] = (s, new)
            else:
                self._applied.pop(endpoint_id, None)
            if endpoint_id not in also:
                changed.append(endpoint_id)
        if changed and self.on_change is not None:
            self.on_change(changed, now)


def shared_state(
    state: EngineState, sync: StateSync, *, clock: Clock, ttl_s: float, replica_id: str
) -> tuple[EngineState, SharedLoad]:
    """`state` (in memory) with its fleet-wide owners wrapped to share through `sync`; the
    SharedLoad is returned apart too (its `run()` and `on_change` need wiring)."""
    breakers = state.breakers
    budgets = state.tenant_budgets
    if not isinstance(breakers, CircuitBreakers) or not isinstance(budgets, QuotaLedger):
        raise TypeError("shared_state wraps the in-memory owners of EngineState.in_memory")
    shared_budgets = SharedBudgets(budgets, sync)
    load = SharedLoad(
        state.pending,
        state.stats,
        sync,
        clock=clock,
        replica_id=replica_id,
        interval_s=sync.interval_s,
    )
    shared = replace(
        state,
        pending=load,
        breakers=SharedBreakers(breakers, sync, clock=clock),
        tenant_budgets=shared_budgets,
        endpoint_budgets=shared_budgets,
        sessions=SharedSessions(state.sessions, sync, ttl_s=ttl_s),
        prefixes=SharedPrefixes(state.prefixes, sync),
    )
    return shared, load
