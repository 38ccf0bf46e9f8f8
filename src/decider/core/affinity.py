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


class SessionTable:
    """session key -> (endpoint id, expiry), least recently used first.

    A plain dict kept in use order (a renewal deletes and re-inserts the key) costs less than half
    the memory of an OrderedDict per session."""

    def __init__(self, *, ttl_s: float, max_sessions: int) -> None:
        self._ttl_s = ttl_s
        self._max = max_sessions
        self._entries: dict[str, tuple[str, float]] = {}

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
            del entries[next(iter(entries))]

    def expire(self, now: float) -> int:
        """Drop expired sessions; the TTL is the same for all, so they are at the front."""
        entries = self._entries
        expired = []
        for key, (_, expires_at) in entries.items():
            if expires_at > now:
                break
            expired.append(key)
        for key in expired:
            del entries[key]
        return len(expired)


# The generation of a block only decisions still waiting for their outcome hold (generations
# proper are 0 to 3): it survives rotations until the outcomes confirm or drop it.
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
        # Block -> number of open decisions that sent it here.
        self.pending: dict[int, int] = {}


class PrefixIndex:
    def __init__(
        self, *, blocks_per_endpoint: int, max_blocks_per_request: int, max_matches: int = 4
    ) -> None:
        self._half = max(1, blocks_per_endpoint // 2)
        self._max_blocks = max_blocks_per_request
        self.max_blocks = max_blocks_per_request
        self._max_matches = max_matches
        self._blocks: dict[str, _Blocks] = {}
        # Anchor block (the block at depth 1, 2, 4, 8, ... of a served prompt) -> endpoints that
        # hold it, least recently recorded first.
        self._anchors: dict[int, str | dict[str, None]] = {}

    @property
    def block_count(self) -> int:
        return sum(len(b.gen) for b in self._blocks.values())

    def record(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        """The endpoint served a prompt with these prefix blocks; it now holds them."""
        if not hashes:
            return
        blocks = self._blocks.get(endpoint_id)
        if blocks is None:
            blocks = self._blocks[endpoint_id] = _Blocks()
        hashes = hashes[: self._max_blocks]
        gen = blocks.gen
        current = blocks.current
        fresh = 0
        for h in hashes:
            if gen.get(h) != current:
                gen[h] = current
                fresh += 1
        blocks.fresh += fresh
        self._anchor(endpoint_id, hashes)
        if blocks.fresh >= self._half:
            self._rotate(endpoint_id, blocks)

    def add_pending(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        """A decision just sent a prompt with these blocks to the endpoint. The server caches
        them when the prefill starts, long before the outcome arrives, so they match from now
        on: the next request with the same prefix follows this one instead of missing the
        cache elsewhere. `confirm` or `drop` settles them when the outcome comes."""
        if not hashes:
            return
        blocks = self._blocks.get(endpoint_id)
        if blocks is None:
            blocks = self._blocks[endpoint_id] = _Blocks()
        hashes = hashes[: self._max_blocks]
        gen = blocks.gen
        pending = blocks.pending
        for h in hashes:
            pending[h] = pending.get(h, 0) + 1
            if h not in gen:
                gen[h] = _PENDING
        self._anchor(endpoint_id, hashes)

    def confirm(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        """The pending decision succeeded on its endpoint: the blocks are held, as `record`."""
        self._settle(endpoint_id, hashes)
        self.record(endpoint_id, hashes)

    def drop(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        """The pending decision failed, timed out or was cancelled (or went elsewhere): blocks
        no other open decision or served prompt gives the endpoint are forgotten."""
        self._settle(endpoint_id, hashes)

    def _settle(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        blocks = self._blocks.get(endpoint_id)
        if blocks is None or not hashes:
            return
        gen = blocks.gen
        pending = blocks.pending
        for h in hashes[: self._max_blocks]:
            count = pending.get(h)
            if count is None:
                continue
            if count > 1:
                pending[h] = count - 1
                continue
            del pending[h]
            if gen.get(h) == _PENDING:
                del gen[h]
                self._unanchor(h, endpoint_id)

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

    def _rotate(self, endpoint_id: str, blocks: _Blocks) -> None:
        previous = blocks.current
        blocks.current = (previous + 1) % 4
        blocks.fresh = 0
        gen = blocks.gen
        # Blocks older than the generation just closed leave, and their anchors with them;
        # those an open decision sent here stay, as pending.
        pending = blocks.pending
        dropped = [h for h, g in gen.items() if g != previous and g != _PENDING]
        for h in dropped:
            if h in pending:
                gen[h] = _PENDING
            else:
                del gen[h]
                self._unanchor(h, endpoint_id)

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
