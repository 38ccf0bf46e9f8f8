"""What one run measured, and the arithmetic behind it (percentiles, imbalance)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of unsorted values; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class Imbalance:
    """Time-averaged max over mean in-flight, per group of interchangeable endpoints.

    Samples are taken at fixed simulated intervals; a group counts only while something is in
    flight in it. The ratio of the two time averages (not the average of ratios) keeps nearly
    idle moments, where one request makes max/mean jump to the group size, from dominating.
    """

    def __init__(self) -> None:
        self._max_sum: dict[str, float] = {}
        self._mean_sum: dict[str, float] = {}

    def sample(self, group: str, in_flight: Sequence[int]) -> None:
        if not in_flight:
            return
        total = sum(in_flight)
        if total == 0:
            return
        self._max_sum[group] = self._max_sum.get(group, 0.0) + max(in_flight)
        self._mean_sum[group] = self._mean_sum.get(group, 0.0) + total / len(in_flight)

    def by_group(self) -> dict[str, float]:
        return {g: self._max_sum[g] / self._mean_sum[g] for g in sorted(self._max_sum)}

    def worst(self) -> float:
        values = self.by_group().values()
        return max(values) if values else 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    workload: str
    strategy: str
    requests: int
    completed: int
    # Requests that never got a complete answer (refused, out of attempts, or cut mid-stream).
    failed: int
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    output_tokens_per_s: float
    cache_hit_rate: float
    imbalance: float
    # Attempts sent to an endpoint that was down, in total and after the prober reported it.
    sent_to_dead: int
    sent_to_dead_after_detection: int
    # Crash -> UNHEALTHY reported to the engine; NaN without a crash.
    detection_delay_s: float
    retries: int
    makespan_s: float
    events: int
