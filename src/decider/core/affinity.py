"""Sticky sessions with a sliding TTL, and the approximate prefix-cache index.

Prefix hashes are chained, as vLLM and SGLang compute them: the hash of block k covers blocks
0..k, so an endpoint that holds block k most likely holds the whole prefix up to it. The index
keeps, per endpoint, the blocks it recently served in two live generations (a cheap approximation of
LRU: a block survives while touched within the last `blocks_per_endpoint` insertions), plus a
reverse map from a few anchor blocks of each served prompt (depths 1, 2, 4, 8, ...) to the
endpoints holding them, so matching looks at a handful of endpoints instead of every candidate.
A prompt counts from the moment it is sent (pending), not only once its outcome arrives, so a
burst sharing a prefix lands together before the first request finishes.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice

from decider.core.model import StateUsage


class SessionTable:
    """session key -> (endpoint id, expiry), least recently used first.

    A plain dict kept in use order (a renewal deletes and re-inserts the key) costs less than half
    the memory of an OrderedDict per session. Past `max_sessions` the least recently used eighth
    is dropped at once, by rebuilding the dict: dropping one key at a time from the front of a
    dict makes every later `next(iter())` walk the dead slots, about 300 us per new session at
    100,000 (a rebuild costs about 8 slot copies per session admitted)."""

    def __init__(self, *, ttl_s: float, max_sessions: int) -> None:
        self._ttl_s = ttl_s
        self._max = max_sessions
        self._entries: dict[str, tuple[str, float]] = {}
        # Sessions dropped by the size bound (not by their TTL).
        self.evicted = 0

    def usage(self) -> StateUsage:
        return StateUsage(entries=len(self._entries), limit=self._max, evicted=self.evicted)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> str | None:
        """The bound endpoint id, or None when unbound or expired (reads change nothing)."""
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def bind(self, key: str, endpoint_id: str, now: float) -> None:
        """Bind or renew; renewing moves the session to the most recently used end."""
        entries = self._entries
        entries.pop(key, None)
        entries[key] = (endpoint_id, now + self._ttl_s)
        if len(entries) > self._max:
            drop = len(entries) - self._max + self._max // 8
            self._entries = dict(islice(entries.items(), drop, None))
            self.evicted += drop

    def expire(self, now: float) -> int:
        """Drop expired sessions; the TTL is the same for all, so they are at the front."""
        entries = self._entries
        expired = 0
        for _, expires_at in entries.values():
            if expires_at > now:
                break
            expired += 1
        if expired:
            # One rebuild rather than deletions from the front (see the class docstring).
            self._entries = dict(islice(entries.items(), expired, None))
        return expired


# The generation of a block only open decisions gave the endpoint (generations proper are 0 to
# 3): it survives rotations until the outcomes confirm or drop it.
_PENDING = 4


class _Blocks:
    """One endpoint's blocks: hash -> generation (0 to 3, cached small ints, so values cost
    nothing). A block lives while its generation is the current or the previous one; when the
    current one has taken `half` blocks, the one before the previous is dropped. One dict, so a
    lookup is one probe; pending blocks are in it too, so matching does not tell them apart."""

    __slots__ = ("current", "fresh", "gen", "pending")

    def __init__(self) -> None:
        self.gen: dict[int, int] = {}
        self.current = 0
        # Blocks stamped with the current generation.
        self.fresh = 0
        # Pending block -> open decisions that gave it; exactly the blocks whose generation is
        # _PENDING (a block served already needs no count: the server holds it). Replaced
        # once emptied: CPython never shrinks a dict's table on deletion, and with one prompt
        # in flight per endpoint the empty table of its last prompt would outweigh its blocks.
        self.pending: dict[int, int] = {}


class PrefixIndex:
    def __init__(
        self,
        *,
        blocks_per_endpoint: int,
        max_blocks_per_request: int,
        max_matches: int = 4,
        max_blocks: int = 500_000,
    ) -> None:
        self._half = max(1, blocks_per_endpoint // 2)
        # Over every endpoint: past it, the endpoint holding the most blocks drops its older
        # generation (the least recently served blocks of the biggest holder).
        self._max_total = max_blocks
        self._total = 0
        # Blocks dropped by max_blocks (not by an endpoint's own rotation).
        self.evicted = 0
        self._max_blocks = max_blocks_per_request
        self.max_blocks = max_blocks_per_request
        self._max_matches = max_matches
        self._blocks: dict[str, _Blocks] = {}
        # Anchor block (the block at depth 1, 2, 4, 8, ... of a served prompt) -> endpoints that
        # hold it, least recently recorded first.
        self._anchors: dict[int, str | dict[str, None]] = {}

    @property
    def block_count(self) -> int:
        return self._total

    def usage(self) -> StateUsage:
        return StateUsage(entries=self._total, limit=self._max_total, evicted=self.evicted)

    def record(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        """The endpoint served a prompt with these prefix blocks; it now holds them (pending ones
        among them become served)."""
        if not hashes:
            return
        blocks = self._blocks.get(endpoint_id)
        if blocks is None:
            blocks = self._blocks[endpoint_id] = _Blocks()
        hashes = hashes[: self._max_blocks]
        gen = blocks.gen
        pending = blocks.pending
        current = blocks.current
        fresh = added = 0
        settled = False
        for h in hashes:
            g = gen.get(h)
            if g != current:
                if g == _PENDING:
                    del pending[h]
                    settled = True
                elif g is None:
                    added += 1
                gen[h] = current
                fresh += 1
        if settled and not pending:
            blocks.pending = {}
        blocks.fresh += fresh
        self._total += added
        self._anchor(endpoint_id, hashes)
        if blocks.fresh >= self._half:
            self._rotate(endpoint_id, blocks)
        self._evict()

    def add_pending(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        """A decision just sent a prompt with these blocks to the endpoint. The server caches
        them when the prefill starts, long before the outcome arrives, so they match from now
        on: the next request with the same prefix follows this one instead of missing the
        cache elsewhere. `confirm` or `drop` settles them when the outcome comes.

        Blocks the endpoint already holds are left as they are (one lookup each, the common
        case): only new ones are counted, so a drop forgets exactly what open decisions alone
        gave. The one approximation: a held block that rotates out while a decision for it is
        open is forgotten at once, as if that decision had not sent it."""
        if not hashes:
            return
        blocks = self._blocks.get(endpoint_id)
        if blocks is None:
            blocks = self._blocks[endpoint_id] = _Blocks()
        hashes = hashes[: self._max_blocks]
        gen = blocks.gen
        pending = blocks.pending
        self._evict()
        # Pending blocks cannot be evicted: with max_blocks reached, the rest of the prompt waits
        # for its outcome to be indexed (confirm records it; drop skips blocks never added).
        room = self._max_total - self._total
        added = 0
        for i, h in enumerate(hashes):
            g = gen.get(h)
            if g is None:
                if added == room:
                    hashes = hashes[:i]
                    break
                gen[h] = _PENDING
                pending[h] = 1
                added += 1
            elif g == _PENDING:
                pending[h] += 1
        self._total += added
        self._anchor(endpoint_id, hashes)

    def confirm(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        """The pending decision succeeded on its endpoint: the blocks are served, as `record`."""
        self.record(endpoint_id, hashes)

    def drop(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        """The pending decision failed, timed out or was cancelled (or went elsewhere): blocks
        no other open decision or served prompt gives the endpoint are forgotten."""
        blocks = self._blocks.get(endpoint_id)
        if blocks is None or not blocks.pending or not hashes:
            return
        gen = blocks.gen
        pending = blocks.pending
        for h in hashes[: self._max_blocks]:
            if gen.get(h) == _PENDING:
                count = pending[h]
                if count > 1:
                    pending[h] = count - 1
                else:
                    del pending[h]
                    del gen[h]
                    self._total -= 1
                    self._unanchor(h, endpoint_id)
        if not pending:
            blocks.pending = {}

    def _anchor(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        anchors = self._anchors
        d, n = 1, len(hashes)
        while d <= n:
            h = hashes[d - 1]
            holders = anchors.get(h)
            if holders is None or holders == endpoint_id:
                # Most anchors have one holder: store its id itself, not a container.
                anchors[h] = endpoint_id
            elif isinstance(holders, str):
                anchors[h] = {holders: None, endpoint_id: None}
            else:
                # Re-inserting moves the endpoint to the most recent end.
                holders.pop(endpoint_id, None)
                holders[endpoint_id] = None
            d *= 2

    def _evict(self) -> None:
        """Past max_blocks, the endpoint holding the most drops its older generation."""
        while self._total > self._max_total:
            before = self._total
            biggest = max(self._blocks.items(), key=lambda item: len(item[1].gen))
            if not self._drop_older(*biggest):
                # The biggest holds pending blocks only: the next biggest that holds served
                # ones gives way. add_pending keeps pending blocks within max_blocks, so one
                # does while the total is over it.
                others = sorted(
                    (item for item in self._blocks.items() if item[0] != biggest[0]),
                    key=lambda item: -len(item[1].gen),
                )
                if not any(self._drop_older(eid, blocks) for eid, blocks in others):
                    return
            self.evicted += before - self._total

    def _drop_older(self, endpoint_id: str, blocks: _Blocks) -> bool:
        """Drops the endpoint's older generation (both, when every block it serves is in the
        current one); False when it holds pending blocks only."""
        before = self._total
        self._rotate(endpoint_id, blocks)
        if self._total == before:
            self._rotate(endpoint_id, blocks)
        return self._total < before

    def _rotate(self, endpoint_id: str, blocks: _Blocks) -> None:
        previous = blocks.current
        blocks.current = (previous + 1) % 4
        blocks.fresh = 0
        gen = blocks.gen
        # Blocks older than the generation just closed leave, and their anchors with them;
        # pending ones stay until their decisions settle.
        dropped = [h for h, g in gen.items() if g != previous and g != _PENDING]
        for h in dropped:
            del gen[h]
            self._unanchor(h, endpoint_id)
        self._total -= len(dropped)

    def _unanchor(self, h: int, endpoint_id: str) -> None:
        anchors = self._anchors
        holders = anchors.get(h)
        if holders is None:
            return
        if isinstance(holders, str):
            if holders == endpoint_id:
                del anchors[h]
        elif endpoint_id in holders:
            del holders[endpoint_id]
            if len(holders) == 1:
                anchors[h] = next(iter(holders))

    def remove_endpoint(self, endpoint_id: str) -> None:
        blocks = self._blocks.pop(endpoint_id, None)
        if blocks is None:
            return
        self._total -= len(blocks.gen)
        for h in blocks.gen:
            self._unanchor(h, endpoint_id)

    def matches(self, hashes: Sequence[int]) -> dict[str, int]:
        """Endpoint id -> number of leading blocks of `hashes` it holds, for at most
        `max_matches` endpoints, deepest matches first.

        Walks the request's anchors from the deepest: holders of the anchor at depth d match at
        least d blocks, and a search over (d, 2d) refines that (holding block k implies 0..k).
        It tries the two deepest depths first, because the common request is a prompt the
        endpoint served plus one new block, and stops descending once the remaining anchors can
        only find matches under half the best one. Deep anchors are held by few endpoints, so this
        costs about log2(blocks) lookups plus a few per match, whatever the number of
        endpoints."""
        n = min(len(hashes), self._max_blocks)
        if n == 0:
            return {}
        anchors = self._anchors
        blocks_of = self._blocks
        found: dict[str, int] = {}
        left = self._max_matches
        deepest = 0
        d = 1 << (n.bit_length() - 1)
        while d >= 1:
            holders = anchors.get(hashes[d - 1])
            if holders:
                top = 2 * d - 1 if 2 * d - 1 < n else n
                last = hashes[top - 1]
                second = hashes[top - 2] if top - 1 > d else None
                for endpoint_id in (holders,) if isinstance(holders, str) else reversed(holders):
                    if endpoint_id in found:
                        continue
                    blocks = blocks_of.get(endpoint_id)
                    if blocks is None:
                        continue
                    gen = blocks.gen
                    if last in gen:
                        found[endpoint_id] = top
                    elif second is None or second in gen:
                        found[endpoint_id] = top - 1
                    else:
                        # Largest depth m in [d, top - 2] whose block the endpoint holds.
                        lo, hi = d, top - 2
                        while lo < hi:
                            mid = (lo + hi + 1) // 2
                            if hashes[mid - 1] in gen:
                                lo = mid
                            else:
                                hi = mid - 1
                        found[endpoint_id] = lo
                    left -= 1
                    if not left:
                        return found
                    if found[endpoint_id] > deepest:
                        deepest = found[endpoint_id]
            # Shallower anchors can only find matches under half the deepest one: not worth a
            # probe per level when a good match is already in hand.
            if 2 * d <= deepest:
                return found
            d //= 2
        return found

    def matched(self, endpoint_id: str, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` one endpoint holds (explain mode and reason strings)."""
        blocks = self._blocks.get(endpoint_id)
        if blocks is None:
            return 0
        count = 0
        gen = blocks.gen
        for h in hashes[: self._max_blocks]:
            if h not in gen:
                break
            count += 1
        return count
