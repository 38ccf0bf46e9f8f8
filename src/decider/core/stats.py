"""Per-endpoint live statistics: in-flight count, peak-EWMA latency and time to first token, the
latest load report, health, and the factor scores derived from them.

`EndpointStats` objects are mutable and long-lived (one per registered endpoint) so that a decision
reads plain attributes instead of building a candidate object per endpoint; only `Scorer` and the
functions here change them, and every change recomputes the derived scores of that one endpoint, so
scoring strategies rank with a C-level `max(..., key=attrgetter(...))`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from decider.core.model import Endpoint, HealthStatus, LoadReport
from decider.core.validation import allowed

# Health factor: UNKNOWN is usable but ranked after HEALTHY; DEGRADED only when nothing better.
HEALTH_SCORE: dict[HealthStatus, float] = {
    HealthStatus.HEALTHY: 1.0,
    HealthStatus.UNKNOWN: 0.75,
    HealthStatus.DEGRADED: 0.25,
    HealthStatus.UNHEALTHY: 0.0,
    HealthStatus.DRAINING: 0.0,
}


# Required "capabilities" that match endpoint labels (ab_split arms select endpoints by label):
# each endpoint's labels are indexed as tags next to its capabilities, so label selections reuse
# the per-capability pools.
LABEL_TAG = "\x00label:"


def label_tags(labels: Mapping[str, str]) -> frozenset[str]:
    return frozenset(f"{LABEL_TAG}{k}={v}" for k, v in labels.items())


def tags_of(endpoint: Endpoint) -> frozenset[str]:
    if not endpoint.labels:
        return endpoint.capabilities
    return endpoint.capabilities | label_tags(endpoint.labels)


# Decisions of about the last second add to an endpoint's load score on top of its in-flight
# count. Time to first token depends on the prefill queue, which fills with the newest requests,
# while in-flight counts are dominated by long decodes; the recent-pick term spreads arrivals the
# way round-robin does (in the simulator it brought the default's uniform-workload TTFT p90
# within 6% of round_robin's, from 25% behind).
RECENT_TAU_S = 1.0


class EndpointStats:
    """Everything a decision reads about one endpoint."""

    __slots__ = (
        "base_rank",
        "base_score",
        "cooldown_until",
        "cost",
        "cost_ref",
        "cost_score",
        "endpoint",
        "health",
        "health_reason",
        "health_score",
        "id",
        "in_flight",
        "latency_at",
        "latency_cost",
        "latency_ewma_s",
        "latency_metric",
        "latency_ref_s",
        "latency_score",
        "load",
        "load_at",
        "load_report",
        "load_score",
        "model",
        "quota_score",
        "recent",
        "recent_at",
        "static_score",
        "tags",
        "ttft_ewma_s",
        "weight",
    )

    def __init__(self, endpoint: Endpoint, *, health: HealthStatus) -> None:
        self.endpoint = endpoint
        self.id = endpoint.id
        self.model = endpoint.model
        self.weight = max(1, endpoint.weight)
        self.cost = endpoint.cost_per_1k_tokens
        self.tags = tags_of(endpoint)
        self.cost_ref = 0.0
        self.health = health
        self.health_reason = "no health_url: assumed healthy" if health else "not probed yet"
        self.in_flight = 0
        # Peak EWMAs in seconds; 0.0 until the first report.
        self.latency_ewma_s = 0.0
        self.ttft_ewma_s = 0.0
        self.latency_at = 0.0
        # The model's typical latency, used for endpoints with no reports yet.
        self.latency_ref_s = 0.0
        self.load_report: LoadReport | None = None
        self.load_at = -math.inf
        self.cooldown_until = 0.0
        # Decisions sent here recently, decaying over about a second.
        self.recent = 0.0
        self.recent_at = 0.0
        # Derived; see Scorer.rescore.
        self.load = 0
        self.load_score = 1.0
        self.latency_score = 0.5
        self.latency_cost = 0.0
        # The latency metric as of the last full rescore (decayed), and the weighted sum of the
        # factors that do not change with outstanding requests.
        self.latency_metric = 0.0
        self.static_score = 0.0
        self.health_score = HEALTH_SCORE[health]
        self.cost_score = 1.0
        self.quota_score = 1.0
        self.base_score = 0.0
        # -base_score, so that rank heaps (smallest first) read it with a C-level attrgetter.
        self.base_rank = 0.0

    def replace_endpoint(self, endpoint: Endpoint) -> None:
        """A re-registration with the same id keeps the live stats."""
        self.endpoint = endpoint
        self.model = endpoint.model
        self.weight = max(1, endpoint.weight)
        self.cost = endpoint.cost_per_1k_tokens
        self.tags = tags_of(endpoint)

    def latency_metric_s(self, ttft_weight: float) -> float:
        """The latency the latency factor ranks by: TTFT blended in when reported."""
        if self.latency_ewma_s <= 0.0:
            return self.latency_ref_s
        if self.ttft_ewma_s > 0.0:
            return ttft_weight * self.ttft_ewma_s + (1.0 - ttft_weight) * self.latency_ewma_s
        return self.latency_ewma_s

    def __repr__(self) -> str:
        return f"EndpointStats({self.id!r}, in_flight={self.in_flight}, health={self.health.name})"


@dataclass(frozen=True, slots=True, kw_only=True)
class FactorWeights:
    """Weights of the composite score's factors (they need not sum to 1)."""

    # Tuned with the cluster simulator (docs/SIMULATION.md): prefix-cache reuse matters most for
    # time to first token, load keeps a hot prefix from piling up, and latency (TTFT when
    # reported) only breaks near-ties, because a single slow answer is a noisy signal.
    load: float = field(default=0.3, metadata=allowed(ge=0))
    latency: float = field(default=0.02, metadata=allowed(ge=0))
    cache: float = field(default=0.7, metadata=allowed(ge=0))
    quota: float = field(default=0.05, metadata=allowed(ge=0))
    health: float = field(default=0.05, metadata=allowed(ge=0))
    cost: float = field(default=0.05, metadata=allowed(ge=0))

    @property
    def total(self) -> float:
        return self.load + self.latency + self.cache + self.quota + self.health + self.cost


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreParams:
    """What the strategies' options set in the shared scores (see strategies.base.ShapesScores)."""

    weights: FactorWeights = FactorWeights()
    # Share of time to first token in the latency metric where an endpoint reports it.
    ttft_weight: float = 1.0


def peak_ewma(previous_s: float, sample_s: float, *, elapsed_s: float, decay_s: float) -> float:
    """Finagle's peak EWMA: jump up to a worse sample at once, decay towards better ones with a
    weight that depends on the time since the last sample."""
    if previous_s <= 0.0 or sample_s >= previous_s:
        return sample_s
    w = math.exp(-max(elapsed_s, 0.0) / decay_s)
    return previous_s * w + sample_s * (1.0 - w)


class Scorer:
    """Recomputes one endpoint's factor scores after a change to it: `rescore` for everything,
    `rescore_load` (the hot path: a decision or an outcome without a latency sample) for the
    terms that depend on its outstanding requests. It changes only the derived scores; the rank
    heaps that order endpoints by them are updated by their owner (pool.Pools.reorder), which the
    caller asks next."""

    __slots__ = (
        "_decay_s",
        "_inv_load_reference",
        "_max_report_age_s",
        "_share_load",
        "_ttft_weight",
        "_w",
        "_wt",
        "cache_share",
    )

    def __init__(
        self,
        weights: FactorWeights,
        *,
        load_reference: float,
        max_report_age_s: float,
        ttft_weight: float,
        decay_s: float = 10.0,
    ) -> None:
        self._decay_s = decay_s
        self._w = weights
        self._wt = weights.total or 1.0
        self._share_load = weights.load / self._wt
        # The cache factor's weight as a share of all weights (added per request).
        self.cache_share = weights.cache / self._wt
        self._inv_load_reference = 1.0 / load_reference
        self._max_report_age_s = max_report_age_s
        self._ttft_weight = ttft_weight

    @property
    def weights(self) -> FactorWeights:
        return self._w

    def rescore(self, s: EndpointStats, now: float) -> None:
        metric = s.latency_metric_s(self._ttft_weight)
        if s.latency_ewma_s > 0.0 and now > s.latency_at:
            # As Finagle reads a peak EWMA: decay towards zero with the time since the last
            # sample, so an endpoint avoided after one slow answer is tried again rather than
            # starved of the samples that would clear it.
            metric *= math.exp((s.latency_at - now) / self._decay_s)
        s.latency_metric = metric
        ref = s.latency_ref_s
        s.latency_score = ref / (ref + metric) if metric > 0.0 and ref > 0.0 else 0.5
        s.health_score = HEALTH_SCORE[s.health]
        s.cost_score = s.cost_ref / s.cost if s.cost > s.cost_ref > 0.0 else 1.0
        w = self._w
        s.static_score = (
            w.latency * s.latency_score
            + w.quota * s.quota_score
            + w.health * s.health_score
            + w.cost * s.cost_score
        ) / self._wt
        self.rescore_load(s, now)

    def rescore_load(self, s: EndpointStats, now: float) -> None:
        load = s.in_flight
        report = s.load_report
        if report is not None and now - s.load_at <= self._max_report_age_s:
            load += report.queue_depth
        s.load = load
        recent = s.recent * math.exp((s.recent_at - now) / RECENT_TAU_S) if s.recent else 0.0
        s.load_score = score = 1.0 / (1.0 + (load + recent) * self._inv_load_reference)
        # Peak EWMA times outstanding work, as linkerd and Finagle rank by.
        s.latency_cost = s.latency_metric * (s.in_flight + 1)
        s.base_score = base = self._share_load * score + s.static_score
        s.base_rank = -base

    def factor_scores(self, s: EndpointStats, cache: float) -> dict[str, float]:
        return {
            "load": s.load_score,
            "latency": s.latency_score,
            "cache": cache,
            "quota": s.quota_score,
            "health": s.health_score,
            "cost": s.cost_score,
        }


def record_latency(
    s: EndpointStats, *, latency_s: float, ttft_s: float, now: float, decay_s: float
) -> None:
    elapsed = now - s.latency_at
    if latency_s > 0.0:
        s.latency_ewma_s = peak_ewma(
            s.latency_ewma_s, latency_s, elapsed_s=elapsed, decay_s=decay_s
        )
    if ttft_s > 0.0:
        s.ttft_ewma_s = peak_ewma(s.ttft_ewma_s, ttft_s, elapsed_s=elapsed, decay_s=decay_s)
    s.latency_at = now


def median(values: list[float]) -> float:
    if not values:
        return 0.0
    values.sort()
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2.0


# -- incremental ranking -------------------------------------------------------------------------


class RankHeap:
    """The usable endpoints of one pool ordered by one key (smallest first), kept current
    incrementally: after every rescore of a member its owner pushes a fresh entry, and entries
    that are not their member's latest are dropped lazily when they reach the top. A decision
    then costs O(log n) instead of a pass over every candidate. Among equal keys the member
    changed least recently comes first, which rotates ties instead of always answering with the
    same endpoint."""

    __slots__ = ("_heap", "_key", "_latest", "_limit", "_members", "_seq", "alive")

    def __init__(
        self, members: Sequence[EndpointStats], key: Callable[[EndpointStats], Any]
    ) -> None:
        self._key = key
        self._members = members
        self._limit = 4 * len(members) + 64
        self.alive = True
        # Each member's live entry, by sequence number (negative: from the initial build).
        n = len(members)
        self._latest: dict[EndpointStats, int] = {s: i - n for i, s in enumerate(members)}
        self._seq = 0
        self._heap: list[tuple[Any, int, EndpointStats]] = []
        self._rebuild()

    def _rebuild(self) -> None:
        key = self._key
        latest = self._latest
        heap = [(key(s), latest[s], s) for s in self._members]
        heapq.heapify(heap)
        self._heap = heap

    def push(self, s: EndpointStats) -> None:
        self._seq += 1
        self._latest[s] = self._seq
        entry = (self._key(s), self._seq, s)
        heap = self._heap
        if heap and heap[0][2] is s:
            # The member was just picked, so its entry, now stale, is the root: replace it in
            # one sift instead of pushing and popping it later.
            heapq.heapreplace(heap, entry)
            return
        heapq.heappush(heap, entry)
        if len(heap) > self._limit:
            self._rebuild()

    def first(self) -> EndpointStats:
        """The best member."""
        heap = self._heap
        latest = self._latest
        while True:
            entry = heap[0]
            if latest[entry[2]] == entry[1]:
                return entry[2]
            heapq.heappop(heap)

    def best(self, count: int) -> list[EndpointStats]:
        """Up to `count` distinct members, best first."""
        heap = self._heap
        latest = self._latest
        pop = heapq.heappop
        out: list[EndpointStats] = []
        kept: list[tuple[Any, int, EndpointStats]] = []
        while heap:
            entry = heap[0]
            if latest[entry[2]] != entry[1]:
                pop(heap)
                continue
            out.append(entry[2])
            if len(out) == count:
                break
            # Set the valid entry aside to see the next one; the last is only peeked at. Popping
            # also drops the stale entries met on the way (a best-first walk that left the heap
            # as it was measured slower once outcomes rescore endpoints between decisions).
            kept.append(pop(heap))
        for entry in kept:
            heapq.heappush(heap, entry)
        return out

    def close(self) -> None:
        """The pool is gone: stop receiving entries."""
        self.alive = False
        self._heap = []


# -- the owner -----------------------------------------------------------------------------------


class EndpointTable:
    """The LoadStats owner (core/state.py) of one engine: the live `EndpointStats` of every
    registered endpoint, by id and by model. Apart from the decision counts (in flight and recent:
    pending.py's) and the derived scores (Scorer's), every change to an endpoint's stats goes
    through it."""

    __slots__ = ("_by_model", "_decay_s", "_stats")

    def __init__(self, *, decay_s: float) -> None:
        self._decay_s = decay_s
        self._stats: dict[str, EndpointStats] = {}
        self._by_model: dict[str, list[EndpointStats]] = {}

    def get(self, endpoint_id: str) -> EndpointStats | None:
        return self._stats.get(endpoint_id)

    def group(self, model: str) -> list[EndpointStats] | None:
        return self._by_model.get(model)

    def groups(self) -> Iterable[list[EndpointStats]]:
        return self._by_model.values()

    def models(self) -> list[str]:
        return [model for model, group in self._by_model.items() if group]

    def values(self) -> Iterable[EndpointStats]:
        return self._stats.values()

    def is_live(self, s: EndpointStats) -> bool:
        return self._stats.get(s.id) is s

    def replace(
        self, endpoints: Sequence[Endpoint]
    ) -> tuple[list[EndpointStats], list[EndpointStats]]:
        old = self._stats
        new: dict[str, EndpointStats] = {}
        added: list[EndpointStats] = []
        for endpoint in endpoints:
            s = old.get(endpoint.id)
            if s is None:
                health = HealthStatus.UNKNOWN if endpoint.health_url else HealthStatus.HEALTHY
                s = EndpointStats(endpoint, health=health)
                s.health_reason = (
                    "not probed yet" if endpoint.health_url else "no health_url: assumed healthy"
                )
                added.append(s)
            elif s.endpoint != endpoint:
                s.replace_endpoint(endpoint)
            new[endpoint.id] = s
        removed = [s for endpoint_id, s in old.items() if endpoint_id not in new]
        self._stats = new
        by_model: dict[str, list[EndpointStats]] = {}
        for s in new.values():
            by_model.setdefault(s.model, []).append(s)
        self._by_model = by_model
        return added, removed

    def record_latency(
        self, s: EndpointStats, *, latency_s: float, ttft_s: float, now: float
    ) -> None:
        record_latency(s, latency_s=latency_s, ttft_s=ttft_s, now=now, decay_s=self._decay_s)

    def record_load(self, s: EndpointStats, load: LoadReport, now: float) -> None:
        s.load_report = load
        s.load_at = now

    def set_health(self, s: EndpointStats, status: HealthStatus, reason: str) -> bool:
        s.health_reason = reason
        if s.health is status:
            return False
        s.health = status
        return True

    def cool_down(self, s: EndpointStats, until: float) -> None:
        s.cooldown_until = until

    def set_quota_score(self, s: EndpointStats, headroom: float) -> None:
        s.quota_score = headroom

    def refresh_references(self, group: Sequence[EndpointStats], *, ttft_weight: float) -> None:
        known = [s.latency_metric_s(ttft_weight) for s in group if s.latency_ewma_s > 0.0]
        ref = median(known)
        costs = [s.cost for s in group if s.cost > 0.0]
        cost_ref = min(costs) if costs else 0.0
        for s in group:
            s.latency_ref_s = ref
            s.cost_ref = cost_ref
