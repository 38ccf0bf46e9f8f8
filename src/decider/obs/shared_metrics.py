"""/metrics series for the shared state link: whether Redis answers, and how often it did not."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from decider.state.redis_link import RedisLink

SHARED_STATE_UP = "decider_shared_state_up"
SHARED_STATE_FAILURES = "decider_shared_state_failures"


class SharedStateCollector(Collector):
    """Reads the link's two plain attributes: safe from the /metrics thread."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            SHARED_STATE_UP,
            "1 while the shared state (Redis) answers; 0 while decisions use local state only.",
            labels=["backend"],
        )
        up.add_metric(["redis"], 1.0 if self._link.up else 0.0)
        failures = CounterMetricFamily(
            SHARED_STATE_FAILURES,
            "Shared state operations that failed because Redis did not answer.",
            labels=["backend"],
        )
        failures.add_metric(["redis"], self._link.failures)
        return [up, failures]
