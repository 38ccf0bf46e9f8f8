"""Prometheus text from model servers -> LoadReport, one name table per MetricsKind.

Parsing is prometheus_client's; this module only chooses which gauges mean what.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from decider.core.model import LoadReport, MetricsKind


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadNames:
    """Metric names for one server kind; each tuple is tried in order, the first present wins."""

    waiting: tuple[str, ...]
    running: tuple[str, ...]
    kv_cache: tuple[str, ...]


LOAD_NAMES: Mapping[MetricsKind, LoadNames] = {
    # vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc (v0.10); both are 0..1 fractions.
    MetricsKind.VLLM: LoadNames(
        waiting=("vllm:num_requests_waiting",),
        running=("vllm:num_requests_running",),
        kv_cache=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    # SGLang's token_usage is the fraction of KV-cache tokens in use.
    MetricsKind.SGLANG: LoadNames(
        waiting=("sglang:num_queue_reqs",),
        running=("sglang:num_running_reqs",),
        kv_cache=("sglang:token_usage",),
    ),
    # llama.cpp server (--metrics): deferred requests wait for a free slot.
    MetricsKind.LLAMACPP: LoadNames(
        waiting=("llamacpp:requests_deferred",),
        running=("llamacpp:requests_processing",),
        kv_cache=("llamacpp:kv_cache_usage_ratio",),
    ),
    # Any other server: export these three gauges (names documented in docs/PROBER.md).
    MetricsKind.GENERIC: LoadNames(
        waiting=("decider_queue_depth",),
        running=("decider_running_requests",),
        kv_cache=("decider_kv_cache_utilization",),
    ),
}


def parse_load(text: str, kind: MetricsKind) -> LoadReport | None:
    """The load in one scrape, or None when the text names none of the kind's gauges.

    Raises ValueError on text the Prometheus parser rejects. Several series of one gauge
    (several engines behind one port, told apart by labels) add up for request counts and
    take the maximum for KV-cache use: the fullest engine is the one that starts queueing.
    """
    names = LOAD_NAMES[MetricsKind.GENERIC if kind == MetricsKind.UNSPECIFIED else kind]
    wanted = {*names.waiting, *names.running, *names.kv_cache}
    sums: dict[str, float] = {}
    maxima: dict[str, float] = {}
    for family in text_string_to_metric_families(_only(text, _prefixes(wanted))):
        for sample in family.samples:
            if sample.name not in wanted:
                continue
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
            maxima[sample.name] = max(maxima.get(sample.name, 0.0), sample.value)
    waiting = _first(names.waiting, sums)
    running = _first(names.running, sums)
    kv_cache = _first(names.kv_cache, maxima)
    if waiting is None and running is None and kv_cache is None:
        return None
    return LoadReport(
        queue_depth=_count(waiting),
        running=_count(running),
        kv_cache_utilization=min(max(kv_cache or 0.0, 0.0), 1.0),
    )


def _prefixes(wanted: set[str]) -> tuple[str, ...]:
    return tuple(
        sorted({*wanted, *(f"# TYPE {n}" for n in wanted), *(f"# HELP {n}" for n in wanted)})
    )


def _only(text: str, prefixes: tuple[str, ...]) -> str:
    """The lines about the wanted gauges. A vLLM /metrics page is mostly histograms; handing
    the parser only these few lines makes a scrape about a hundred times cheaper."""
    return "\n".join(line for line in text.splitlines() if line.startswith(prefixes)) + "\n"


def _first(candidates: tuple[str, ...], values: Mapping[str, float]) -> float | None:
    for name in candidates:
        if name in values:
            return values[name]
    return None


def _count(value: float | None) -> int:
    # NaN (a server with no data yet) and negatives count as zero.
    if value is None or not value > 0:
        return 0
    return round(value)
