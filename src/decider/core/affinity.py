"""Sticky sessions with a sliding TTL, and the approximate prefix-cache index.

Prefix hashes are chained, as vLLM and SGLang compute them: the hash of block k covers blocks
0..k, so an endpoint that holds block k most likely holds the whole prefix up to it. The index
keeps, per endpoint, the blocks it recently served in two generations (a cheap approximation of
LRU: a block survives while touched within the last `blocks_per_endpoint` insertions), plus a
reverse map from a prefix's first block to the endpoints holding it, so matching only looks at
endpoints that share the first block instead of every candidate.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class SessionTable:
    """session key -> (endpoint id, expiry), least recently used first."""

    def __init__(self, *, ttl_s: float, max_sessions: int) -> None:
        self._ttl_s = ttl_s
        self._max = max_sessions
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

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
        entries[key] = (endpoint_id, now + self._ttl_s)
        entries.move_to_end(key)
        if len(entries) > self._max:
            entries.popitem(last=False)

    def expire(self, now: float) -> int:
        """Drop expired sessions; the TTL is the same for all, so they are at the front."""
        entries = self._entries
        dropped = 0
        while entries:
            key, (_, expires_at) = next(iter(entries.items()))
            if expires_at > now:
                break
            del entries[key]
            dropped += 1
        return dropped


class _Blocks:
    __slots__ = ("old", "young")

    def __init__(self) -> None:
        self.young: dict[int, None] = {}
        self.old: dict[int, None] = {}

    def __contains__(self, block: int) -> bool:
        return block in self.young or block in self.old


class PrefixIndex:
    def __init__(self, *, blocks_per_endpoint: int, max_blocks_per_request: int) -> None:
        self._half = max(1, blocks_per_endpoint // 2)
        self._max_blocks = max_blocks_per_request
        self._blocks: dict[str, _Blocks] = {}
        self._by_first: dict[int, dict[str, None]] = {}

    @property
    def max_blocks(self) -> int:
        return self._max_blocks

    @property
    def block_count(self) -> int:
        return sum(len(b.young) + len(b.old) for b in self._blocks.values())

    def record(self, endpoint_id: str, hashes: Sequence[int]) -> None:
        """The endpoint served a prompt with these prefix blocks; it now holds them."""
        if not hashes:
            return
        blocks = self._blocks.get(endpoint_id)
        if blocks is None:
            blocks = self._blocks[endpoint_id] = _Blocks()
        young = blocks.young
        for h in hashes[: self._max_blocks]:
            young[h] = None
        first = hashes[0]
        holders = self._by_first.get(first)
        if holders is None:
            self._by_first[first] = {endpoint_id: None}
        else:
            holders[endpoint_id] = None
        if len(young) >= self._half:
            self._rotate(endpoint_id, blocks)

    def _rotate(self, endpoint_id: str, blocks: _Blocks) -> None:
        dropped = blocks.old
        blocks.old = blocks.young
        blocks.young = {}
        # First blocks that fell out with the old generation leave the reverse map.
        by_first = self._by_first
        for h in dropped:
            if h in blocks.old:
                continue
            holders = by_first.get(h)
            if holders is not None and endpoint_id in holders:
                del holders[endpoint_id]
                if not holders:
                    del by_first[h]

    def remove_endpoint(self, endpoint_id: str) -> None:
        blocks = self._blocks.pop(endpoint_id, None)
        if blocks is None:
            return
        for generation in (blocks.young, blocks.old):
            for h in generation:
                holders = self._by_first.get(h)
                if holders is not None and holders.pop(endpoint_id, 0) is None and not holders:
                    del self._by_first[h]

    def matches(self, hashes: Sequence[int]) -> dict[str, int]:
        """Endpoint id -> number of leading blocks of `hashes` it holds, for endpoints holding at
        least the first block. Binary search over the depth: holding block k implies 0..k."""
        if not hashes:
            return {}
        holders = self._by_first.get(hashes[0])
        if not holders:
            return {}
        n = min(len(hashes), self._max_blocks)
        last = hashes[n - 1]
        found: dict[str, int] = {}
        blocks_of = self._blocks
        for endpoint_id in holders:
            blocks = blocks_of.get(endpoint_id)
            if blocks is None:
                continue
            if last in blocks:
                found[endpoint_id] = n
                continue
            lo, hi = 1, n - 1  # block 0 is held, block n-1 is not
            while lo < hi:
                mid = (lo + hi) // 2
                if hashes[mid] in blocks:
                    lo = mid + 1
                else:
                    hi = mid
            found[endpoint_id] = lo
        return found

    def matched(self, endpoint_id: str, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` one endpoint holds (explain mode and reason strings)."""
        blocks = self._blocks.get(endpoint_id)
        if blocks is None:
            return 0
        count = 0
        for h in hashes[: self._max_blocks]:
            if h not in blocks:
                break
            count += 1
        return count
