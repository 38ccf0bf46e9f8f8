"""Decisions waiting for their outcome, and the counts of decisions each endpoint has: the only
writer of `EndpointStats.in_flight` (open decisions) and `EndpointStats.recent` (decisions of about
the last second, see stats.RECENT_TAU_S).

A decision is recorded when it is made (its endpoint's in-flight count goes up), resolved when its
outcome arrives, or expired `in_flight_timeout_s` later (the count goes down either way, so load
never leaks when a gateway never reports). At most `max_entries` wait at once: past that the
oldest is evicted as if it had expired, so a gateway that never reports cannot grow memory
however fast it asks.

Per open decision: a dict slot keyed by a small int, a 4-tuple, and the request's prefix hashes
(cut to what the prefix index records); tenant names are interned, so one string serves every
decision of a tenant. About 160 bytes, plus about 50 bytes per prefix hash kept (measured with
tracemalloc: 157 and 549 bytes with 0 and 8 hashes); the hashes kept over all open decisions
are capped at 16 per entry on average, about 45 MB at the default bound.
"""

from __future__ import annotations

import math
import random
import sys
from collections import deque
from collections.abc import Iterator

from decider.core.model import StateUsage
from decider.core.stats import RECENT_TAU_S, EndpointStats

# A decision waiting for its outcome: (chosen endpoint, tenant, estimated tokens, prefix hashes).
# A plain tuple: one is built per decision, and a tuple costs a seventh of a slotted object.
Pending = tuple[EndpointStats, str, int, tuple[int, ...]]

# Prefix hashes kept per open decision on average, at most (see InMemoryPending._max_hashes).
HASHES_PER_ENTRY = 16
# Expiry resolution: a decision expires between the timeout and this much later.
EXPIRY_BUCKET_S = 0.1


class InMemoryPending:
    """The PendingDecisions owner of one engine (see core/state.py).

    Decision ids are `<12 hex digits>-<sequence>`; entries are keyed by the sequence number (an
    int costs less than half the id string) and grouped for expiry by 0.1 s of issue time, in
    issue order (the timeout is constant, so also expiry order): one small list per group rather
    than one entry per decision keeps expiry memory flat however many decisions are open."""

    __slots__ = (
        "_bucket_end",
        "_entries",
        "_evicted_stats",
        "_expiry",
        "_hashes",
        "_max_entries",
        "_max_hashes",
        "_prefix",
        "_prefix_len",
        "_seq",
        "_timeout_s",
        "evicted",
        "next_expiry",
    )

    def __init__(self, *, timeout_s: float, rng: random.Random, max_entries: int = 50_000) -> None:
        self._timeout_s = timeout_s
        self._max_entries = max_entries
        # Prefix hashes kept over every open decision, and the most that may be: past it a new
        # decision keeps none (its blocks are not indexed when it succeeds), so long prompts
        # cannot multiply the footprint the entry bound allows.
        self._hashes = 0
        self._max_hashes = HASHES_PER_ENTRY * max_entries
        # Decisions forgotten early because max_entries were waiting.
        self.evicted = 0
        # Their endpoints, until expire() hands them to the engine.
        self._evicted_stats: list[tuple[EndpointStats, tuple[int, ...]]] = []
        self._prefix = f"{rng.getrandbits(48):012x}-"
        self._prefix_len = len(self._prefix)
        self._seq = 0
        self._entries: dict[int, Pending] = {}
        # [expires_at, first_seq, last_seq] per group.
        self._expiry: deque[list[float]] = deque()
        self._bucket_end = -math.inf
        self.next_expiry = math.inf

    def __len__(self) -> int:
        return len(self._entries)

    def usage(self) -> StateUsage:
        return StateUsage(entries=len(self._entries), limit=self._max_entries, evicted=self.evicted)

    def record(
        self, chosen: EndpointStats, tenant: str, tokens: int, hashes: tuple[int, ...], now: float
    ) -> str:
        chosen.in_flight += 1
        # One more recent pick, the older ones decayed.
        recent = chosen.recent
        chosen.recent = (
            recent * math.exp((chosen.recent_at - now) / RECENT_TAU_S) + 1.0 if recent else 1.0
        )
        chosen.recent_at = now
        self._seq = seq = self._seq + 1
        hashes = self.keepable(hashes)
        self._hashes += len(hashes)
        entries = self._entries
        entries[seq] = (chosen, sys.intern(tenant) if tenant else "", tokens, hashes)
        if now < self._bucket_end and self._expiry:
            self._expiry[-1][2] = seq
        else:
            self._bucket_end = now + EXPIRY_BUCKET_S
            expires_at = self._bucket_end + self._timeout_s
            if not self._expiry:
                self.next_expiry = expires_at
            self._expiry.append([expires_at, seq, seq])
        if len(entries) > self._max_entries:
            self._evict_oldest()
        return self._prefix + str(seq)

    def keepable(self, hashes: tuple[int, ...]) -> tuple[int, ...]:
        """`hashes`, or () when keeping them would pass the open decisions' hash budget."""
        return hashes if self._hashes + len(hashes) <= self._max_hashes else ()

    def _evict_oldest(self) -> None:
        """Forget the oldest open decision; its in-flight slot is released now, and its endpoint
        handed to the engine by the next expire() (made due at once)."""
        expiry = self._expiry
        entries = self._entries
        while expiry:
            group = expiry[0]
            seq = int(group[1])
            if seq >= group[2]:
                expiry.popleft()
            else:
                # Each sequence number is passed once: the cursor moves past it.
                group[1] = seq + 1
            entry = entries.pop(seq, None)
            if entry is not None:
                self._hashes -= len(entry[3])
                self.evicted += 1
                s = entry[0]
                if s.in_flight > 0:
                    s.in_flight -= 1
                self._evicted_stats.append((s, entry[3]))
                self.next_expiry = -math.inf
                return
        self.next_expiry = math.inf

    def resolve(self, decision_id: str) -> Pending | None:
        seq = self._seq_of(decision_id)
        entry = self._entries.pop(seq, None) if seq else None
        if entry is not None:
            self._hashes -= len(entry[3])
            chosen = entry[0]
            if chosen.in_flight > 0:
                chosen.in_flight -= 1
        return entry

    def _seq_of(self, decision_id: str) -> int:
        """The sequence number of one of this engine's ids, else 0 (no decision has it). Only the
        exact spelling counts: int() alone would also read '0012', '1_2' or non-ASCII digits."""
        if not decision_id.startswith(self._prefix):
            return 0
        digits = decision_id[self._prefix_len :]
        if not (digits.isascii() and digits.isdigit()) or digits[0] == "0":
            return 0
        return int(digits)

    def expire(self, now: float) -> Iterator[tuple[EndpointStats, tuple[int, ...]]]:
        """Drop the decisions whose time is up, releasing their in-flight counts; yields each
        one's endpoint and prefix hashes as it goes, so the caller can follow up on it (release
        a breaker trial, drop the pending blocks) before the next."""
        expiry = self._expiry
        entries = self._entries
        if self._evicted_stats:
            evicted, self._evicted_stats = self._evicted_stats, []
            yield from evicted
        self.next_expiry = expiry[0][0] if expiry else math.inf
        while expiry and expiry[0][0] <= now:
            _, first, last = expiry.popleft()
            self.next_expiry = expiry[0][0] if expiry else math.inf
            for seq in range(int(first), int(last) + 1):
                entry = entries.pop(seq, None)
                if entry is None:
                    continue
                self._hashes -= len(entry[3])
                s = entry[0]
                if s.in_flight > 0:
                    s.in_flight -= 1
                yield s, entry[3]
