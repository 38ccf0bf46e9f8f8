"""Prompt content as segments, its chained block hashes, and a server's LRU prefix cache."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

# A prompt is a sequence of segments: (content key, token count). Two prompts share a
# prefix exactly when they start with the same segments; keys are plain ints so that hashes
# never depend on PYTHONHASHSEED.
Segment = tuple[int, int]

_MASK = (1 << 64) - 1
_SEED = 0x9E3779B97F4A7C15


def _mix(h: int, x: int) -> int:
    # splitmix64's finaliser over h ^ x: cheap, deterministic and well spread.
    z = ((h ^ (x & _MASK)) + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def block_hashes(segments: Sequence[Segment], block_tokens: int) -> tuple[int, ...]:
    """Hashes of the prompt's full blocks, each chained to everything before it.

    As in vLLM's prefix caching, block i's hash covers tokens [0, (i + 1) * block_tokens), so
    equal hashes mean equal prefixes; a trailing partial block has no hash and is never cached.
    """
    out: list[int] = []
    h = _SEED
    filled = 0
    for key, count in segments:
        offset = 0
        while offset < count:
            take = min(count - offset, block_tokens - filled)
            h = _mix(_mix(_mix(h, key), offset), take)
            offset += take
            filled += take
            if filled == block_tokens:
                out.append(h)
                filled = 0
    return tuple(out)


def token_count(segments: Sequence[Segment]) -> int:
    return sum(count for _, count in segments)


class PrefixCache:
    """A fixed number of KV blocks, keyed by block hash, evicted least recently used first.

    Only the longest run of leading blocks counts as a hit: a block is usable only when every
    block before it is cached too.
    """

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks: {capacity_blocks}, must be >= 0")
        self._capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0

    @property
    def capacity_blocks(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._blocks

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of hashes are cached; changes no recency."""
        blocks = self._blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        """Cache (or refresh) every block of a sequence, evicting the least recent beyond capacity.

        Blocks are touched last to first so a chain's head ends up most recent and its tail is
        evicted first, as vLLM frees a sequence's blocks in reverse: evicting a head block
        would make every block after it unreachable.
        """
        if self._capacity == 0:
            return
        blocks = self._blocks
        for h in reversed(hashes):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self._capacity:
            blocks.popitem(last=False)
            self.evictions += 1

    def resize(self, capacity_blocks: int) -> None:
        """Change the capacity, evicting the least recent blocks beyond it."""
        self._capacity = max(0, capacity_blocks)
        blocks = self._blocks
        while len(blocks) > self._capacity:
            blocks.popitem(last=False)
            self.evictions += 1

    def clear(self) -> None:
        self._blocks.clear()
