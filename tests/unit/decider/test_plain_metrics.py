"""plain_metrics renders exactly what prometheus_client's own Counter and Histogram render."""

from __future__ import annotations

import re
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from decider.obs.plain_metrics import PlainCounter, PlainHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)
VALUES = (0.0, 0.0005, 0.001, 0.0011, 0.01, 0.5, 1.0, 7.0, 0.001)


def _without_created(text: bytes) -> str:
    # Creation times differ by the microseconds between the two registrations.
    return re.sub(r"(_created\{[^}]*\}|_created) \S+", r"\1 T", text.decode())


@pytest.mark.parametrize("render", [generate_latest, openmetrics_latest])
def test_same_text_as_prometheus_client(render):
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    counter = Counter("things_total", "Things.", ["kind", "result"], registry=theirs)
    histogram = Histogram("took_seconds", "Took.", ["kind"], buckets=BUCKETS, registry=theirs)
    unlabelled = Counter("misses_total", "Misses.", registry=theirs)
    plain_counter = PlainCounter("things_total", "Things.", ["kind", "result"], registry=ours)
    plain_histogram = PlainHistogram(
        "took_seconds", "Took.", ["kind"], buckets=BUCKETS, registry=ours
    )
    plain_unlabelled = PlainCounter("misses_total", "Misses.", [], registry=ours)
    for i, value in enumerate(VALUES):
        kind = "a" if i % 3 else "b"
        counter.labels(kind, "ok").inc()
        plain_counter.inc((kind, "ok"))
        histogram.labels(kind).observe(value)
        plain_histogram.observe((kind,), value)
    unlabelled.inc(2)
    plain_unlabelled.inc(amount=2)
    assert _without_created(render(ours)) == _without_created(render(theirs))
    assert plain_counter.value(("a", "ok")) == 6


def test_remove_and_label_count_checks():
    counter = PlainCounter("c_total", "C.", ["x"], registry=CollectorRegistry())
    counter.inc(("1",))
    counter.remove(("1",))
    assert counter.value(("1",)) == 0
    (family,) = counter.collect()
    assert family.samples == []
    with pytest.raises(ValueError, match="labels"):
        counter.inc(("1", "2"))
    histogram = PlainHistogram("h", "H.", ["x"], buckets=BUCKETS, registry=CollectorRegistry())
    with pytest.raises(ValueError, match="labels"):
        histogram.observe((), 1.0)


def test_scrape_from_another_thread_while_counting():
    registry = CollectorRegistry()
    counter = PlainCounter("c_total", "C.", ["x"], registry=registry)
    histogram = PlainHistogram("h", "H.", ["x"], buckets=BUCKETS, registry=registry)
    done = threading.Event()
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            while not done.is_set():
                generate_latest(registry)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for i in range(20_000):
            # New series keep appearing while the other thread copies the dicts.
            counter.inc((str(i % 500),))
            histogram.observe((str(i % 300),), i / 1e4)
    finally:
        done.set()
        scraper.join(timeout=30)
    assert not errors
    final = generate_latest(registry).decode()
    assert 'c_total{x="499"} 40.0' in final
    assert 'h_count{x="0"} 67.0' in final
