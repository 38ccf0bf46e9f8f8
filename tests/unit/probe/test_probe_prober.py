import asyncio
import itertools
import random

import httpx
import pytest
from probe_fakes import (
    FakeClock,
    FakeConnector,
    RecordingSink,
    ScriptedHTTP,
    endpoint,
    ok,
    refused,
    status,
    timeout,
)

from decider.core.model import HealthStatus, LoadReport, MetricsKind
from decider.errors import ConfigError
from probe import Prober, ProbeSettings

H = HealthStatus
URL = "http://127.0.0.1:8001/health"


def make(settings=None, seed=1, *, sink=None, connect=None):
    clock = FakeClock()
    sink = sink or RecordingSink()
    http = ScriptedHTTP()
    connector = FakeConnector()
    prober = Prober(
        settings or ProbeSettings(),
        sink,
        clock=clock,
        transport=http.transport(),
        connect=connect or connector,
        rng=random.Random(seed),
    )
    return prober, clock, sink, http, connector


async def run_until(prober, clock, until):
    """Advance the fake clock from one due check to the next, running each, up to `until`."""
    while (due := prober.next_due()) is not None and due <= until:
        clock.now = max(clock.now, due)
        await prober.run_due()
    clock.now = max(clock.now, until)


async def step_until(prober, clock, condition):
    while not condition():
        clock.now = max(clock.now, prober.next_due())
        await prober.run_due()


async def test_first_success_is_healthy_at_once_and_published_once():
    prober, clock, sink, http, _ = make()
    http.set(URL, ok)
    prober.set_endpoints([endpoint()])
    await run_until(prober, clock, clock.now + 100)
    assert sink.statuses("a") == [H.HEALTHY]
    assert "HTTP 200" in sink.health[0][2]
    # 100 s at a 30 s interval (shortened by up to 10 % jitter): 4 or 5 checks.
    assert 4 <= http.count(URL) <= 5
    await prober.aclose()


async def test_full_check_intervals_stay_within_jitter_bounds():
    prober, clock, _, http, _ = make(seed=7)
    times = []

    def record(request):
        times.append(clock.now)
        return httpx.Response(200)

    http.set(URL, record)
    prober.set_endpoints([endpoint()])
    await run_until(prober, clock, clock.now + 3000)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) > 90
    assert all(27.0 <= g <= 30.0 for g in gaps)
    # Jitter really varies the gaps.
    assert max(gaps) - min(gaps) > 1.0
    await prober.aclose()


async def test_http_checks_share_the_concurrency_cap():
    clock = FakeClock()
    running, peak = [0], [0]

    async def slow(request):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.01)
        running[0] -= 1
        return httpx.Response(200)

    prober = Prober(
        ProbeSettings(max_concurrent_http=2, liveness="off"),
        RecordingSink(),
        clock=clock,
        transport=httpx.MockTransport(slow),
    )
    prober.set_endpoints([endpoint(f"e{i}", 9000 + i) for i in range(10)])
    clock.advance(10)
    await prober.run_due()
    assert peak[0] == 2
    await prober.aclose()


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        (refused, "connection refused"),
        (status(503), "HTTP 503"),
        (status(500), "HTTP 500"),
        (status(302), "HTTP 302"),
        (status(404), "HTTP 404"),
        (timeout, "timeout after 2 s"),
    ],
)
async def test_failures_confirmed_at_unhealthy_interval(behaviour, reason):
    prober, clock, sink, http, _ = make(ProbeSettings(liveness="off"))
    http.set(URL, ok)
    prober.set_endpoints([endpoint()])
    await run_until(prober, clock, clock.now + 5)
    assert sink.statuses("a") == [H.HEALTHY]
    http.set(URL, behaviour)
    # The next full check is <= 30 s away; then two re-probes 1 s apart confirm.
    count, switched_at = http.count(URL), clock.now
    await step_until(prober, clock, lambda: http.count(URL) > count)
    assert clock.now - switched_at <= 30
    assert sink.statuses("a") == [H.HEALTHY]  # one failure is not enough
    failed_at = clock.now
    await run_until(prober, clock, clock.now + 2.0)
    assert sink.statuses("a") == [H.HEALTHY, H.UNHEALTHY]
    _, _, why, at = sink.health[-1]
    assert reason in why and "3 consecutive failed probes" in why
    assert at - failed_at <= 2.0 + 1e-9
    await prober.aclose()


async def test_hung_probe_counts_as_timeout_failure():
    prober, clock, sink, http, _ = make(ProbeSettings(liveness="off", unhealthy_threshold=1))

    def slow(request):
        # The handler "takes" 3 s of the fake clock, past the 2 s timeout...
        clock.advance(3.0)
        raise httpx.ReadTimeout("timed out", request=request)

    http.set(URL, slow)
    prober.set_endpoints([endpoint()])
    await run_until(prober, clock, clock.now + 2)
    assert sink.statuses("a") == [H.UNHEALTHY]
    assert "timeout" in sink.health[0][2]
    await prober.aclose()


async def test_revival_needs_healthy_threshold_successes():
    prober, clock, sink, http, _ = make(ProbeSettings(liveness="off", healthy_threshold=3))
    http.set(URL, refused)
    prober.set_endpoints([endpoint()])
    await run_until(prober, clock, clock.now + 10)
    assert sink.statuses("a") == [H.UNHEALTHY]
    http.set(URL, ok)
    before = http.count(URL)
    await run_until(prober, clock, clock.now + 1.0)
    await run_until(prober, clock, clock.now + 1.0)
    assert sink.statuses("a") == [H.UNHEALTHY]  # two successes of three
    assert "recovering (2/3" in prober.status("a")[1]
    await run_until(prober, clock, clock.now + 1.0)
    assert sink.statuses("a") == [H.UNHEALTHY, H.HEALTHY]
    assert http.count(URL) - before == 3
    # Back to the normal interval once healthy.
    before = http.count(URL)
    await run_until(prober, clock, clock.now + 20)
    assert http.count(URL) == before
    await prober.aclose()


async def test_flapping_endpoint_changes_no_faster_than_thresholds():
    prober, clock, sink, http, _ = make(ProbeSettings(liveness="off"))
    answers = iter([True, False, True, False, False, True, False, True, True] * 20)
    http.set(URL, lambda r: httpx.Response(200 if next(answers) else 503))
    prober.set_endpoints([endpoint()])
    await run_until(prober, clock, clock.now + 200)
    # Never three failures in a row: once HEALTHY it stays HEALTHY.
    assert sink.statuses("a") == [H.HEALTHY]
    await prober.aclose()


async def test_liveness_detects_a_killed_backend_within_5_s_with_defaults():
    # Kill at many offsets into the liveness/full-check cycle; the worst case must stay < 5 s.
    worst = 0.0
    for offset in [x * 0.37 for x in range(90)]:
        prober, clock, sink, http, connector = make(seed=int(offset * 100))
        http.set(URL, ok)
        prober.set_endpoints([endpoint()])
        await run_until(prober, clock, clock.now + 40 + offset)
        assert sink.statuses("a") == [H.HEALTHY]
        killed_at = clock.now
        http.set(URL, refused)
        connector.down.add(8001)
        await run_until(prober, clock, killed_at + 10)
        assert sink.statuses("a") == [H.HEALTHY, H.UNHEALTHY]
        worst = max(worst, sink.health[-1][3] - killed_at)
        await prober.aclose()
    assert worst <= 4.0 + 1e-9


async def test_liveness_success_does_not_count_as_health():
    prober, clock, sink, http, connector = make()
    http.set(URL, status(503))
    prober.set_endpoints([endpoint()])
    await run_until(prober, clock, clock.now + 60)
    # The port accepts connections, but the health URL fails: UNHEALTHY stays.
    assert sink.statuses("a") == [H.UNHEALTHY]
    assert connector.calls == []  # liveness pauses while HTTP checks run every second
    await prober.aclose()


async def test_liveness_connects_to_health_url_host_and_port():
    prober, clock, _, http, connector = make()
    http.set("https://example.test/healthz", ok)
    ep = endpoint().__class__(
        id="x", address="x:1", model="m", health_url="https://example.test/healthz"
    )
    prober.set_endpoints([ep])
    await run_until(prober, clock, clock.now + 5)
    assert connector.calls and set(connector.calls) == {("example.test", 443)}
    await prober.aclose()


async def test_liveness_http_mode_uses_a_get():
    prober, clock, _sink, http, connector = make(ProbeSettings(liveness="http"))
    http.set(URL, ok)
    prober.set_endpoints([endpoint()])
    await run_until(prober, clock, clock.now + 10)
    assert connector.calls == []
    assert http.count(URL) >= 5
    await prober.aclose()


async def test_slow_probe_is_degraded():
    prober, clock, sink, http, _ = make(ProbeSettings(liveness="off", degraded_latency_s=0.5))
    delay = [1.2]

    def slow_ok(request):
        clock.advance(delay[0])
        return httpx.Response(200)

    http.set(URL, slow_ok)
    prober.set_endpoints([endpoint()])
    await run_until(prober, clock, clock.now + 2)
    assert sink.statuses("a") == [H.DEGRADED]
    assert "slow probe: HTTP 200 in 1200 ms" in sink.health[-1][2]
    delay[0] = 0.01
    await run_until(prober, clock, clock.now + 31)
    assert sink.statuses("a") == [H.DEGRADED, H.HEALTHY]
    await prober.aclose()


async def test_probe_headers_are_sent_and_never_in_reasons():
    settings = ProbeSettings(liveness="off", headers={"a": {"X-Extra": "from-config"}})
    prober, clock, sink, http, _ = make(settings)
    seen = []

    def check(request):
        seen.append(dict(request.headers))
        return httpx.Response(401)

    http.set(URL, check)
    prober.set_endpoints([endpoint(probe_headers={"Authorization": "Bearer s3cret"})])
    await run_until(prober, clock, clock.now + 5)
    assert seen[0]["authorization"] == "Bearer s3cret"
    assert seen[0]["x-extra"] == "from-config"
    assert all("s3cret" not in reason for _, _, reason, _ in sink.health)
    assert "s3cret" not in prober.status("a")[1]
    await prober.aclose()


async def test_probe_soon_probes_at_once_and_coalesces():
    prober, clock, sink, http, _ = make(ProbeSettings(liveness="off"))
    http.set(URL, ok)
    prober.set_endpoints([endpoint()])
    await run_until(prober, clock, clock.now + 5)
    count = http.count(URL)
    http.set(URL, refused)
    for _ in range(100):
        prober.probe_soon("a")
    prober.probe_soon("unknown-id")
    await prober.run_due()
    assert http.count(URL) == count + 1
    for _ in range(100):
        prober.probe_soon("a")
    await prober.run_due()
    # At most one probe per unhealthy_interval however many failures are reported.
    assert http.count(URL) == count + 1
    await run_until(prober, clock, clock.now + 2.0)
    assert sink.statuses("a") == [H.HEALTHY, H.UNHEALTHY]
    await prober.aclose()


async def test_startup_snapshot_is_spread_and_later_newcomers_are_checked_at_once():
    settings = ProbeSettings(liveness="off", first_check_spread_s=5.0)
    prober, clock, sink, http, _ = make(settings, seed=3)
    fleet = [endpoint(f"e{i}", 9000 + i) for i in range(50)]
    for ep in fleet:
        http.set(ep.health_url, ok)
    start = clock.now
    prober.set_endpoints(fleet)
    first_due = prober.next_due()
    assert first_due is not None and first_due > start
    await run_until(prober, clock, start + 5.0)
    # Every start-up check ran within the spread, not all at its start.
    assert all(sink.statuses(ep.id) == [H.HEALTHY] for ep in fleet)

    # Later: a new endpoint and a re-registered one (new health_url) are due now.
    http.set(URL, ok)
    http.set("http://127.0.0.1:9100/health", ok)
    moved = endpoint("e0", 9100)
    prober.set_endpoints([moved, *fleet[1:], endpoint()])
    assert prober.next_due() == clock.now
    await prober.run_due()
    assert http.count(URL) == 1
    assert http.count("http://127.0.0.1:9100/health") == 1
    assert sink.statuses("a") == [H.HEALTHY]
    await prober.aclose()


@pytest.mark.parametrize("value", [-1, 3601, "soon"])
def test_first_check_spread_must_be_a_number_from_0_to_3600(value):
    with pytest.raises(ConfigError, match=r"probe\.first_check_spread_s"):
        ProbeSettings.parse({"first_check_spread_s": value})


async def test_removed_endpoint_is_no_longer_probed():
    prober, clock, _sink, http, _ = make()
    http.set(URL, ok)
    http.set("http://127.0.0.1:8002/health", ok)
    prober.set_endpoints([endpoint(), endpoint("b", 8002)])
    await run_until(prober, clock, clock.now + 5)
    prober.set_endpoints([endpoint("b", 8002)])
    count = http.count(URL)
    await run_until(prober, clock, clock.now + 100)
    assert http.count(URL) == count
    assert prober.next_due() is not None
    prober.set_endpoints([])
    assert prober.next_due() is None
    await prober.aclose()


async def test_endpoint_without_health_url_is_not_probed():
    prober, _clock, _sink, _http, _connector = make()
    ep = endpoint().__class__(id="n", address="127.0.0.1:1", model="m")
    prober.set_endpoints([ep])
    assert prober.next_due() is None
    await prober.aclose()


VLLM_TEXT = """\
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} %d
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 2
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.5
"""
METRICS = "http://127.0.0.1:8001/metrics"


def metrics_endpoint():
    return endpoint(metrics_url=METRICS, metrics_kind=MetricsKind.VLLM)


async def test_scraped_load_reaches_sink_at_metrics_interval():
    prober, clock, sink, http, _ = make()
    http.set(URL, ok)
    http.set(METRICS, lambda r: httpx.Response(200, text=VLLM_TEXT % 3))
    prober.set_endpoints([metrics_endpoint()])
    await run_until(prober, clock, clock.now + 20)
    assert sink.loads[-1][:2] == (
        "a",
        LoadReport(queue_depth=3, running=2, kv_cache_utilization=0.5),
    )
    # Every 2 s, shortened by up to 10 %.
    assert 10 <= len(sink.loads) <= 12
    assert prober.load("a") == LoadReport(queue_depth=3, running=2, kv_cache_utilization=0.5)
    await prober.aclose()


async def test_stale_load_expires_after_the_bound():
    prober, clock, sink, http, _ = make(ProbeSettings(metrics_stale_after_s=5))
    http.set(URL, ok)
    http.set(METRICS, lambda r: httpx.Response(200, text=VLLM_TEXT % 3))
    prober.set_endpoints([metrics_endpoint()])
    await run_until(prober, clock, clock.now + 4)
    last_good = sink.loads[-1][2]
    http.set(METRICS, status(500))
    await run_until(prober, clock, last_good + 4.9)
    assert sink.expired == []
    await run_until(prober, clock, last_good + 8)
    assert len(sink.expired) == 1
    assert last_good + 5 < sink.expired[0][1] <= last_good + 7
    assert prober.load("a") is None
    # Garbage text also counts as no load; expiry is reported once.
    http.set(METRICS, lambda r: httpx.Response(200, text="{{{"))
    await run_until(prober, clock, clock.now + 20)
    assert len(sink.expired) == 1
    await prober.aclose()


async def test_high_load_degrades_and_recovers():
    prober, clock, sink, http, _ = make(ProbeSettings(degraded_queue_depth=10))
    queue = [50]
    http.set(URL, ok)
    http.set(METRICS, lambda r: httpx.Response(200, text=VLLM_TEXT % queue[0]))
    prober.set_endpoints([metrics_endpoint()])
    await run_until(prober, clock, clock.now + 5)
    assert sink.statuses("a")[-1] == H.DEGRADED
    assert "high load: queue depth 50 >= 10" in sink.health[-1][2]
    queue[0] = 1
    await run_until(prober, clock, clock.now + 5)
    assert sink.statuses("a")[-2:] == [H.DEGRADED, H.HEALTHY]
    await prober.aclose()


async def test_changed_metrics_url_expires_old_load():
    prober, clock, sink, http, _ = make()
    http.set(URL, ok)
    http.set(METRICS, lambda r: httpx.Response(200, text=VLLM_TEXT % 3))
    prober.set_endpoints([metrics_endpoint()])
    await run_until(prober, clock, clock.now + 5)
    prober.set_endpoints([endpoint()])
    assert [eid for eid, _ in sink.expired] == ["a"]
    await prober.aclose()


async def test_run_loop_probes_with_real_time():
    # The long-lived loop, with a real clock and a mock transport: first check within ~1 s.
    sink = RecordingSink()
    http = ScriptedHTTP()
    http.set(URL, ok)
    prober = Prober(ProbeSettings(liveness="off", interval_s=0.5), sink, transport=http.transport())
    task = asyncio.create_task(prober.run())
    prober.set_endpoints([endpoint()])
    for _ in range(300):
        if sink.health:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await prober.aclose()
    assert sink.statuses("a") == [H.HEALTHY]


async def test_a_failing_sink_or_connector_does_not_stop_probing(caplog):
    calls = []

    class BrokenSink(RecordingSink):
        def set_health(self, endpoint_id, status, *, reason, now):
            calls.append(status)
            raise RuntimeError("engine bug")

    async def broken_connect(host, port, timeout_s):
        raise RuntimeError("connector bug")

    prober, clock, _, http, _ = make(sink=BrokenSink(), connect=broken_connect)
    http.set(URL, ok)
    prober.set_endpoints([endpoint()])
    await run_until(prober, clock, clock.now + 100)
    # HTTP checks kept their 30 s cadence, liveness kept trying.
    assert 4 <= http.count(URL) <= 5
    assert calls
    assert "connector bug" in caplog.text and "engine bug" in caplog.text
    assert prober.next_due() is not None
    await prober.aclose()
