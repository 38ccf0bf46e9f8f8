"""The real Prober against real HTTP backends on 127.0.0.1, started and killed here.

Timing bounds are deliberately generous (the 5 s target is asserted as 10 s); the measured
numbers live in bench/bench_detection.py and docs/BENCHMARKS.md.
"""

import asyncio
import time
from collections.abc import Callable

import pytest

from decider.core.model import Endpoint, HealthStatus, LoadReport, MetricsKind
from probe import Prober, ProbeSettings
from probe.standin import StandIn

H = HealthStatus


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, HealthStatus, str, float]] = []
        self.loads: list[tuple[str, LoadReport, float]] = []

    def set_health(self, endpoint_id, status, *, reason, now):
        self.events.append((endpoint_id, status, reason, now))

    def record_load(self, endpoint_id, load, *, now):
        self.loads.append((endpoint_id, load, now))

    def statuses(self, endpoint_id):
        return [s for eid, s, _, _ in self.events if eid == endpoint_id]

    def last(self, endpoint_id):
        got = self.statuses(endpoint_id)
        return got[-1] if got else H.UNKNOWN


async def wait_for(condition: Callable[[], bool], *, within_s: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within_s:
            raise AssertionError(f"condition not met within {within_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def ep(eid: str, backend: StandIn, **kwargs) -> Endpoint:
    return Endpoint(
        id=eid,
        address=f"127.0.0.1:{backend.port}",
        model="m",
        health_url=f"{backend.url}/health",
        **kwargs,
    )


@pytest.fixture
async def running():
    """Start a Prober's run loop with the given settings; stopped and closed after the test."""
    started: list[tuple[Prober, asyncio.Task]] = []

    def start(settings: ProbeSettings, sink: Sink) -> Prober:
        prober = Prober(settings, sink)
        started.append((prober, asyncio.create_task(prober.run())))
        return prober

    yield start
    for prober, task in started:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await prober.aclose()


@pytest.fixture
async def backends():
    made: list[StandIn] = []

    async def make() -> StandIn:
        backend = await StandIn().start()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.kill()


async def test_killed_backend_unhealthy_within_bound_with_default_config(running, backends):
    alive, victim = await backends(), await backends()
    sink = Sink()
    prober = running(ProbeSettings(), sink)
    prober.set_endpoints([ep("alive", alive), ep("victim", victim)])
    # Both must have a first verdict before the kill, or "alive" could still be unprobed.
    await wait_for(
        lambda: sink.last("victim") == H.HEALTHY and sink.last("alive") == H.HEALTHY,
        within_s=10,
    )
    await victim.kill()
    await wait_for(lambda: sink.last("victim") == H.UNHEALTHY, within_s=10)
    assert "connection refused" in sink.events[-1][2]
    assert sink.statuses("alive") == [H.HEALTHY]


async def test_hung_backend_detected_by_timeout(running, backends):
    backend = await backends()
    sink = Sink()
    settings = ProbeSettings(interval_s=1, timeout_s=0.3, unhealthy_interval_s=0.2)
    prober = running(settings, sink)
    prober.set_endpoints([ep("hung", backend)])
    await wait_for(lambda: sink.last("hung") == H.HEALTHY, within_s=10)
    backend.hang = True
    await wait_for(lambda: sink.last("hung") == H.UNHEALTHY, within_s=10)
    assert "timeout after 0.3 s" in sink.events[-1][2]


async def test_5xx_backend_is_unhealthy_and_revives_after_threshold(running, backends):
    backend = await backends()
    backend.status = 503
    sink = Sink()
    settings = ProbeSettings(unhealthy_interval_s=0.2, healthy_threshold=3)
    prober = running(settings, sink)
    prober.set_endpoints([ep("five", backend)])
    await wait_for(lambda: sink.last("five") == H.UNHEALTHY, within_s=10)
    assert "HTTP 503" in sink.events[-1][2]
    seen = backend.requests
    backend.status = 200
    await wait_for(lambda: sink.last("five") == H.HEALTHY, within_s=10)
    # Three successes were needed; the first two left it UNHEALTHY.
    assert backend.requests - seen >= 3
    assert sink.statuses("five") == [H.UNHEALTHY, H.HEALTHY]


async def test_killed_backend_revives_after_restart_on_same_port(running, backends):
    backend = await backends()
    sink = Sink()
    prober = running(ProbeSettings(unhealthy_interval_s=0.3), sink)
    prober.set_endpoints([ep("phoenix", backend)])
    await wait_for(lambda: sink.last("phoenix") == H.HEALTHY, within_s=10)
    await backend.kill()
    await wait_for(lambda: sink.last("phoenix") == H.UNHEALTHY, within_s=10)
    await backend.start()
    await wait_for(lambda: sink.last("phoenix") == H.HEALTHY, within_s=10)
    assert sink.statuses("phoenix") == [H.HEALTHY, H.UNHEALTHY, H.HEALTHY]


async def test_flapping_backend_flaps_no_faster_than_thresholds(running, backends):
    backend = await backends()
    sink = Sink()
    settings = ProbeSettings(interval_s=0.1, unhealthy_interval_s=0.1, liveness="off")
    prober = running(settings, sink)
    prober.set_endpoints([ep("flap", backend)])
    await wait_for(lambda: sink.last("flap") == H.HEALTHY, within_s=10)

    # Alternate every ~0.1 s: never 3 failures or, once unhealthy, 2 successes in a row
    # is the common case, so changes must be far fewer than flips.
    async def flap():
        for i in range(30):
            backend.status = 503 if i % 2 == 0 else 200
            await asyncio.sleep(0.1)
        backend.status = 200

    await flap()
    flips = 30
    changes = len(sink.statuses("flap")) - 1
    assert changes <= flips // 3
    # Every UNHEALTHY was preceded by at least three failed probes, which the reason says.
    for _, status, reason, _ in sink.events:
        if status is H.UNHEALTHY:
            assert "3 consecutive failed probes" in reason


VLLM_METRICS = """\
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} %d
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 4
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.5
"""


async def test_vllm_metrics_are_scraped_into_load_reports(running, backends):
    backend = await backends()
    backend.metrics_text = VLLM_METRICS % 2
    sink = Sink()
    prober = running(ProbeSettings(metrics_interval_s=0.2), sink)
    prober.set_endpoints(
        [ep("v", backend, metrics_url=f"{backend.url}/metrics", metrics_kind=MetricsKind.VLLM)]
    )
    expected = LoadReport(queue_depth=2, running=4, kv_cache_utilization=0.5)
    await wait_for(lambda: bool(sink.loads) and sink.loads[-1][1] == expected, within_s=5)
    backend.metrics_text = VLLM_METRICS % 40
    await wait_for(lambda: sink.loads[-1][1].queue_depth == 40, within_s=5)
    # 40 waiting is past the default degraded_queue_depth of 32.
    await wait_for(lambda: sink.last("v") == H.DEGRADED, within_s=5)


async def test_probe_soon_confirms_a_failure_without_waiting_for_the_interval(running, backends):
    backend = await backends()
    sink = Sink()
    prober = running(ProbeSettings(interval_s=3600, liveness="off", unhealthy_interval_s=0.2), sink)
    prober.set_endpoints([ep("p", backend)])
    await wait_for(lambda: sink.last("p") == H.HEALTHY, within_s=10)
    await backend.kill()
    prober.probe_soon("p")
    await wait_for(lambda: sink.last("p") == H.UNHEALTHY, within_s=10)


async def test_tcp_connector_against_real_sockets(backends):
    from probe.checks import TcpConnector

    backend = await backends()
    connect = TcpConnector()
    await connect("127.0.0.1", backend.port, 1.0)
    await connect("localhost", backend.port, 1.0)
    await backend.kill()
    with pytest.raises(ConnectionRefusedError):
        await connect("127.0.0.1", backend.port, 1.0)
    with pytest.raises(ConnectionRefusedError):
        await connect("localhost", backend.port, 1.0)


async def test_tcp_connector_times_out_when_syns_go_unanswered():
    import socket

    from probe.checks import TcpConnector

    # A listener that never accepts, with a full backlog: further connects stay in progress.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    connect = TcpConnector()
    try:
        outcomes = []
        for _ in range(3):
            try:
                await connect("127.0.0.1", port, 0.3)
                outcomes.append("ok")
            except TimeoutError:
                outcomes.append("timeout")
        assert "timeout" in outcomes
    finally:
        listener.close()


async def test_host_names_in_health_urls_work(running, backends):
    backend = await backends()
    sink = Sink()
    prober = running(ProbeSettings(unhealthy_interval_s=0.3), sink)
    prober.set_endpoints(
        [
            Endpoint(
                id="named",
                address=f"localhost:{backend.port}",
                model="m",
                health_url=f"http://localhost:{backend.port}/health",
            )
        ]
    )
    await wait_for(lambda: sink.last("named") == H.HEALTHY, within_s=10)
    await backend.kill()
    await wait_for(lambda: sink.last("named") == H.UNHEALTHY, within_s=10)
