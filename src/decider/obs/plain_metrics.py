"""Prometheus counters and histograms for code that runs on every RPC.

prometheus_client's Counter.inc and Histogram.observe take a lock and check observability on
every call, and observe walks the buckets in Python: together about a tenth of the Python work
of a Decide. The series here are plain numbers in dicts, bumped without a lock because every
caller runs on the event loop thread, and turned into metric families only when scraped. A
scrape may render on another thread: it copies each dict in one step (a dict copy is atomic
under the GIL), so it sees a consistent set of series, each one a value it really had.

The text they render is the same as prometheus_client's own Counter and Histogram
(tests/unit/decider/test_plain_metrics.py compares the two).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]
# How prometheus_client writes a bucket's `le` (untyped there).
_go_float: Callable[[float], str] = floatToGoString


class PlainCounter:
    """A labelled counter: `inc(("model-a", "ok"))` adds one to that series."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        registry: CollectorRegistry,
    ) -> None:
        # As prometheus_client names the family: without the "_total" the sample carries.
        self._name = name.removesuffix("_total")
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._values: dict[Labels, float] = {}
        self._created: dict[Labels, float] = {}
        registry.register(self)

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        values = self._values
        value = values.get(labels)
        if value is None:
            if len(labels) != len(self._labelnames):
                raise ValueError(f"{self._name}: labels {labels} do not match {self._labelnames}")
            self._created[labels] = time.time()
            value = 0.0
        values[labels] = value + amount

    def value(self, labels: Labels = ()) -> float:
        return self._values.get(labels, 0.0)

    def remove(self, labels: Labels) -> None:
        self._values.pop(labels, None)
        self._created.pop(labels, None)

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        values, created = dict(self._values), dict(self._created)
        for labels, value in values.items():
            family.add_metric(labels, value, created=created.get(labels))
        return [family]


class PlainHistogram:
    """A labelled histogram with fixed bucket bounds: `observe(("composite",), 0.00012)`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))
        self._le = [*(_go_float(b) for b in self._bounds), "+Inf"]
        # labels -> [count per bucket (not cumulative; the last one is +Inf)..., sum]
        self._series: dict[Labels, list[float]] = {}
        self._created: dict[Labels, float] = {}
        registry.register(self)

    def observe(self, labels: Labels, value: float) -> None:
        series = self._series.get(labels)
        if series is None:
            if len(labels) != len(self._labelnames):
                raise ValueError(f"{self._name}: labels {labels} do not match {self._labelnames}")
            series = self._series[labels] = [0.0] * (len(self._bounds) + 2)
            self._created[labels] = time.time()
        # bisect_left: the first bound >= value, so each bucket counts values <= its `le`.
        series[bisect_left(self._bounds, value)] += 1
        series[-1] += value

    def remove(self, labels: Labels) -> None:
        self._series.pop(labels, None)
        self._created.pop(labels, None)

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        series, created = dict(self._series), dict(self._created)
        for labels, counts in series.items():
            counts = counts[:]
            cumulative, buckets = 0.0, []
            for le, count in zip(self._le, counts[:-1], strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(labels), buckets, counts[-1])
            when = created.get(labels)
            if when is not None:
                family.add_sample(
                    self._name + "_created", dict(zip(self._labelnames, labels, strict=True)), when
                )
        return [family]
