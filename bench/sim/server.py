"""SimServer: one simulated continuous-batching model server (vLLM-like) and its jobs.

Timing model, per server:
- at most `max_batch` requests run (prefill or decode); the rest wait in FIFO order;
- prefills run one at a time and take `prefill_overhead_s + uncached_tokens / rate`;
- every decoding request gains one token per decode step, and a step takes
  `decode_base_s + decode_per_seq_s * batch`, so a bigger batch means more tokens per second
  overall but slower tokens for each request; while a prefill runs, decode gets only
  `decode_share_during_prefill` of the steps (chunked prefill shares each step);
- all times are multiplied by the server's slow factor;
- the KV cache has `cache_blocks` blocks: a running request holds the blocks of its prompt
  and output, a waiting request is admitted only when its blocks fit (as vLLM's scheduler
  does), and the prefix cache keeps finished sequences in whatever is not held.
Decode is simulated as a fluid: the batch advances together, so one counter of "tokens each
decoding request has produced" (virtual tokens) replaces per-token events.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .cache import PrefixCache
from .events import EventLoop

# Completion within this many virtual tokens counts as done (float rounding).
_EPS = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerParams:
    max_batch: int = 32
    prefill_tokens_per_s: float = 8000.0
    prefill_overhead_s: float = 0.01
    decode_base_s: float = 0.012
    decode_per_seq_s: float = 0.0006
    decode_share_during_prefill: float = 0.5
    block_tokens: int = 256
    # About 460k tokens: the KV cache of an 80 GB GPU serving an 8B model.
    cache_blocks: int = 1800

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch: {self.max_batch}, must be >= 1")
        if self.prefill_tokens_per_s <= 0 or self.decode_base_s <= 0:
            raise ValueError("prefill_tokens_per_s and decode_base_s must be > 0")
        if not 0.0 < self.decode_share_during_prefill <= 1.0:
            raise ValueError(
                "decode_share_during_prefill: "
                f"{self.decode_share_during_prefill}, must be in (0, 1]"
            )
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens: {self.block_tokens}, must be >= 1")


class Job:
    """One request as a server sees it; the timestamps are filled in as it runs."""

    __slots__ = (
        "cached_tokens",
        "finished_s",
        "first_token_s",
        "held_blocks",
        "output_tokens",
        "owner",
        "prompt_blocks",
        "prompt_tokens",
        "sequence_blocks",
        "started_s",
        "submitted_s",
    )

    def __init__(
        self,
        *,
        prompt_tokens: int,
        output_tokens: int,
        prompt_blocks: tuple[int, ...] = (),
        sequence_blocks: tuple[int, ...] = (),
        owner: Any = None,
    ) -> None:
        if prompt_tokens < 1 or output_tokens < 1:
            raise ValueError("a job needs at least one prompt token and one output token")
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.prompt_blocks = prompt_blocks
        # Prompt plus response: cached when the job finishes, so the next turn can hit it.
        self.sequence_blocks = sequence_blocks
        self.owner = owner
        self.cached_tokens = 0
        self.held_blocks = 0
        self.submitted_s = 0.0
        self.started_s = -1.0
        self.first_token_s = -1.0
        self.finished_s = -1.0


def _leading(hashes: Sequence[int], cache: PrefixCache, ahead: set[int]) -> int:
    """Leading blocks of `hashes` that are cached or will be by the prefills ahead."""
    n = 0
    for h in hashes:
        if h not in cache and h not in ahead:
            break
        n += 1
    return n


class ServerListener(Protocol):
    def on_first_token(self, job: Job, now: float) -> None: ...
    def on_complete(self, job: Job, now: float) -> None: ...
    def on_fail(self, job: Job, now: float) -> None: ...


class SimServer:
    """Queue, batch, prefix cache and liveness of one endpoint."""

    def __init__(
        self,
        endpoint_id: str,
        params: ServerParams,
        loop: EventLoop,
        listener: ServerListener,
        *,
        slow_factor: float = 1.0,
    ) -> None:
        self.endpoint_id = endpoint_id
        self.params = params
        self.cache = PrefixCache(params.cache_blocks)
        self._loop = loop
        self._listener = listener
        self._slow = slow_factor
        self._alive = True
        self._waiting: deque[Job] = deque()
        self._prefill_queue: deque[Job] = deque()
        self._prefilling: Job | None = None
        self._prefill_end_s = 0.0
        # (virtual token count at which the job is done, tie-break, job)
        self._decoding: list[tuple[float, int, Job]] = []
        self._tie = itertools.count()
        self._virtual = 0.0
        self._last_s = 0.0
        # A crash bumps the epoch; events scheduled before it are then ignored.
        self._epoch = 0
        self._decode_version = 0
        # KV blocks held by running requests; the prefix cache gets the rest.
        self._held = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.output_tokens = 0
        self.completed = 0

    # -- state seen by the prober and the metrics ------------------------------------------

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def slow_factor(self) -> float:
        return self._slow

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._prefill_queue) + (self._prefilling is not None) + len(self._decoding)

    @property
    def in_flight(self) -> int:
        return self.waiting + self.running

    def kv_cache_utilization(self) -> float:
        """Share of KV blocks held by running requests (what vLLM reports as cache usage)."""
        if self.params.cache_blocks == 0:
            return 1.0
        return min(1.0, self._held / self.params.cache_blocks)

    def _blocks_for(self, job: Job) -> int:
        return -(-(job.prompt_tokens + job.output_tokens) // self.params.block_tokens)

    def predict_ttft(
        self, prompt_tokens: int, prompt_blocks: Sequence[int], now: float
    ) -> tuple[float, float]:
        """Time to first token of a job submitted now, read from the true queue and cache, as
        (wait before its prefill starts, its prefill); the sum is the TTFT.

        The oracle's estimate: the prefills ahead of it (the one running, then the admitted and
        the waiting ones, each at its own cache hit), a wait for a batch slot when the batch is
        full (the decoding requests closest to done free them), then its own prefill. Its cache
        hit counts the blocks cached now and those the prefills ahead will cache first. It
        leaves out evictions and changes of decode speed, so it is an estimate, not the future.
        """
        p = self.params
        slow = self._slow
        rate = p.prefill_tokens_per_s
        cache = self.cache
        t = max(now, self._prefill_end_s) if self._prefilling is not None else now
        ahead: set[int] = set()
        for job in itertools.chain(self._prefill_queue, self._waiting):
            hit = _leading(job.prompt_blocks, cache, ahead) * p.block_tokens
            uncached = job.prompt_tokens - min(hit, job.prompt_tokens - 1)
            t += (p.prefill_overhead_s + uncached / rate) * slow
            ahead.update(job.prompt_blocks)
        # Batch slots: every request ahead, running or waiting, holds one until it finishes.
        short = self.running + len(self._waiting) + 1 - p.max_batch
        if short > 0 and self._decoding:
            rate_now = self._rate()
            virtual = self._virtual + (now - self._last_s) * rate_now
            left = sorted(v - virtual for v, _, _ in self._decoding)
            k = min(short, len(left)) - 1
            t = max(t, now + max(0.0, left[k]) / rate_now)
        hit = _leading(prompt_blocks, cache, ahead) * p.block_tokens
        uncached = prompt_tokens - min(hit, prompt_tokens - 1)
        return t - now, (p.prefill_overhead_s + uncached / rate) * slow

    # -- requests --------------------------------------------------------------------------

    def submit(self, job: Job, now: float) -> None:
        """Accept a job; the caller checks `alive` first (a dead server refuses connections)."""
        if not self._alive:
            raise RuntimeError(f"{self.endpoint_id} is down")
        job.submitted_s = now
        self._waiting.append(job)
        self._admit(now)

    def _admit(self, now: float) -> None:
        p = self.params
        while self._waiting and self.running < p.max_batch:
            job = self._waiting[0]
            need = self._blocks_for(job)
            # Out of KV blocks: wait for a running request to finish (one that can never fit
            # runs alone rather than blocking the queue forever).
            if self._held + need > p.cache_blocks and self.running > 0:
                break
            self._waiting.popleft()
            job.held_blocks = need
            self._held += need
            self._prefill_queue.append(job)
        self.cache.resize(p.cache_blocks - self._held)
        self._start_prefill(now)

    def _start_prefill(self, now: float) -> None:
        if self._prefilling is not None or not self._prefill_queue:
            return
        job = self._prefill_queue.popleft()
        p = self.params
        # The last prompt token is always computed, even on a full hit (as in vLLM).
        hit_tokens = self.cache.match(job.prompt_blocks) * p.block_tokens
        job.cached_tokens = min(hit_tokens, job.prompt_tokens - 1)
        self.cache.insert(job.prompt_blocks)
        job.started_s = now
        uncached = job.prompt_tokens - job.cached_tokens
        duration = (p.prefill_overhead_s + uncached / p.prefill_tokens_per_s) * self._slow
        self._advance(now)
        self._prefilling = job
        self._prefill_end_s = now + duration
        self._reschedule_decode(now)
        self._loop.at(now + duration, self._prefill_done, job, self._epoch)

    def _prefill_done(self, job: Job, epoch: int, now: float) -> None:
        if epoch != self._epoch or job is not self._prefilling:
            return
        self._advance(now)
        self._prefilling = None
        self.prompt_tokens += job.prompt_tokens
        self.cached_tokens += job.cached_tokens
        job.first_token_s = now
        self._listener.on_first_token(job, now)
        if job.output_tokens <= 1:
            self._finish(job, now)
        else:
            heapq.heappush(
                self._decoding, (self._virtual + job.output_tokens - 1, next(self._tie), job)
            )
        self._admit(now)
        self._reschedule_decode(now)

    # -- decode as a fluid -----------------------------------------------------------------

    def _rate(self) -> float:
        """Tokens per second each decoding request gains right now."""
        p = self.params
        step_s = (p.decode_base_s + p.decode_per_seq_s * len(self._decoding)) * self._slow
        share = p.decode_share_during_prefill if self._prefilling is not None else 1.0
        return share / step_s

    def _advance(self, now: float) -> None:
        # Must run before anything that changes the rate: batch size, prefill, slow factor.
        if self._decoding:
            self._virtual += (now - self._last_s) * self._rate()
        self._last_s = now

    def _reschedule_decode(self, now: float) -> None:
        self._decode_version += 1
        if self._decoding:
            left = max(0.0, self._decoding[0][0] - self._virtual)
            self._loop.at(
                now + left / self._rate(), self._decode_due, self._decode_version, self._epoch
            )

    def _decode_due(self, version: int, epoch: int, now: float) -> None:
        if version != self._decode_version or epoch != self._epoch:
            return
        self._advance(now)
        done: list[Job] = []
        while self._decoding and self._decoding[0][0] <= self._virtual + _EPS:
            done.append(heapq.heappop(self._decoding)[2])
        for job in done:
            self._finish(job, now)
        self._admit(now)
        self._reschedule_decode(now)

    def _finish(self, job: Job, now: float) -> None:
        job.finished_s = now
        self._held -= job.held_blocks
        self.cache.resize(self.params.cache_blocks - self._held)
        self.cache.insert(job.sequence_blocks or job.prompt_blocks)
        self.output_tokens += job.output_tokens
        self.completed += 1
        self._listener.on_complete(job, now)

    # -- faults ----------------------------------------------------------------------------

    def crash(self, now: float) -> None:
        """The process dies: every job fails now and the cache is lost."""
        if not self._alive:
            return
        self._alive = False
        self._epoch += 1
        lost = list(self._waiting) + list(self._prefill_queue)
        if self._prefilling is not None:
            lost.append(self._prefilling)
        lost.extend(j for _, _, j in sorted(self._decoding, key=lambda e: e[1]))
        self._waiting.clear()
        self._prefill_queue.clear()
        self._prefilling = None
        self._decoding.clear()
        self._virtual = 0.0
        self._held = 0
        self.cache.clear()
        self.cache.resize(self.params.cache_blocks)
        for job in lost:
            self._listener.on_fail(job, now)

    def recover(self, now: float) -> None:
        """Back up, empty and cold."""
        if self._alive:
            return
        self._alive = True
        self._last_s = now

    def set_slow_factor(self, factor: float, now: float) -> None:
        """Slow but alive: later prefills and every decode step take `factor` times as long.

        A prefill already running keeps the duration it started with.
        """
        if factor <= 0:
            raise ValueError(f"slow factor: {factor}, must be > 0")
        self._advance(now)
        self._slow = factor
        self._reschedule_decode(now)
