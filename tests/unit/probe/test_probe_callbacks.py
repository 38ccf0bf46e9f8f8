"""The prober's optional callbacks, which the server wires to its metrics."""

import random

import httpx
from probe_fakes import FakeClock, FakeConnector, RecordingSink, ScriptedHTTP, endpoint, ok

from decider.core.model import MetricsKind
from decider.obs.metrics import Metrics
from probe import Prober, ProbeSettings
from probe.checks import CheckKind

URL = "http://127.0.0.1:8001/health"
METRICS = "http://127.0.0.1:8001/metrics"


async def test_every_result_and_each_unparsable_scrape_reach_the_callbacks():
    clock = FakeClock()
    http = ScriptedHTTP()
    http.set(URL, ok)
    # A gauge Decider reads, with a value the Prometheus parser rejects.
    broken = 'vllm:num_requests_waiting{model_name="m"} many\n'
    http.set(METRICS, lambda r: httpx.Response(200, text=broken))
    results = []
    scrape_errors = []
    prober = Prober(
        ProbeSettings(liveness="off"),
        RecordingSink(),
        clock=clock,
        transport=http.transport(),
        connect=FakeConnector(),
        rng=random.Random(1),
        on_result=results.append,
        on_scrape_error=lambda endpoint_id, reason: scrape_errors.append((endpoint_id, reason)),
    )
    prober.set_endpoints([endpoint(metrics_url=METRICS, metrics_kind=MetricsKind.VLLM)])
    for _ in range(20):
        due = prober.next_due()
        if due is None or {r.kind for r in results} >= {CheckKind.HTTP, CheckKind.METRICS}:
            break
        clock.now = max(clock.now, due)
        await prober.run_due()
    await prober.aclose()

    assert {r.kind for r in results} == {CheckKind.HTTP, CheckKind.METRICS}
    assert all(r.endpoint_id == "a" for r in results)
    metrics_checks = sum(1 for r in results if r.kind is CheckKind.METRICS)
    assert scrape_errors == [("a", "parse_error")] * metrics_checks

    metrics = Metrics()
    for result in results:
        metrics.record_probe_result(result)
    text = metrics.exposition().decode()
    assert 'decider_probes_total{endpoint_id="a",kind="http",result="healthy"}' in text
    assert 'decider_probes_total{endpoint_id="a",kind="metrics",result="healthy"}' in text
