"""Failure detection: how fast the prober notices, and what its liveness checks cost.

    .venv/bin/python -m bench.bench_detection            # everything (about 3 minutes)
    .venv/bin/python -m bench.bench_detection --quick    # fewer trials, shorter windows

1. Detection: real backends on 127.0.0.1 are made to fail (killed, hung, answering 503) at
   random moments of their probe cycle; we time the UNHEALTHY verdict, with the default
   settings and with `liveness = "http"`.
2. Cost at N endpoints (default 1000): the listeners (default one per endpoint, all on
   127.0.0.1) run in a child process so that only the prober's CPU is measured. For each
   liveness mode we report CPU% of one core over a steady window, event-loop lag, and the wall
   and CPU time of one liveness round over all N. A variant with one sleeping task per endpoint
   (instead of the prober's single timer heap) is measured for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from decider.core.model import Endpoint, HealthStatus, LoadReport, MetricsKind
from probe import Prober, ProbeSettings, parse_load
from probe.checks import TcpConnector
from probe.standin import StandIn


class Sink:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.status: dict[str, HealthStatus] = {}
        self.unhealthy_at: dict[str, float] = {}

    def set_health(
        self, endpoint_id: str, status: HealthStatus, *, reason: str, now: float
    ) -> None:
        self.status[endpoint_id] = status
        if status is HealthStatus.UNHEALTHY:
            self.unhealthy_at.setdefault(endpoint_id, self.clock())

    def record_load(self, endpoint_id: str, load: LoadReport, *, now: float) -> None:
        pass


def endpoint(eid: str, port: int) -> Endpoint:
    return Endpoint(
        id=eid,
        address=f"127.0.0.1:{port}",
        model="bench",
        health_url=f"http://127.0.0.1:{port}/health",
    )


async def wait_until(condition: Callable[[], bool], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


# -- 1. detection ----------------------------------------------------------------------


@dataclass
class Detection:
    scenario: str
    liveness: str
    times: list[float]
    missed: int


async def detect(scenario: str, liveness: str, trials: int, seed: int) -> Detection:
    """`trials` backends under one prober; each fails at a random moment within 30 s
    (one full-check interval, so every phase of the cycle is sampled)."""
    rng = random.Random(seed)
    backends = [await StandIn().start() for _ in range(trials)]
    sink = Sink(time.monotonic)
    prober = Prober(ProbeSettings(liveness=liveness), sink)
    runner = asyncio.create_task(prober.run())
    prober.set_endpoints([endpoint(f"b{i}", b.port) for i, b in enumerate(backends)])
    await wait_until(lambda: len(sink.status) == trials, 10)
    failed_at: dict[str, float] = {}

    async def fail(i: int, backend: StandIn) -> None:
        await asyncio.sleep(rng.uniform(0, 30))
        failed_at[f"b{i}"] = time.monotonic()
        if scenario == "killed":
            await backend.kill()
        elif scenario == "hung":
            backend.hang = True
        else:
            backend.status = 503

    await asyncio.gather(*(fail(i, b) for i, b in enumerate(backends)))
    # Hung and 503 need a full check when liveness only connects: up to 30 s + confirmations.
    await wait_until(lambda: len(sink.unhealthy_at) == trials, 45)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await prober.aclose()
    for backend in backends:
        await backend.kill()
    times = sorted(sink.unhealthy_at[e] - t for e, t in failed_at.items() if e in sink.unhealthy_at)
    return Detection(scenario, liveness, times, trials - len(times))


# -- 2. cost at N endpoints -------------------------------------------------------------


def _listeners_main(count: int, conn: multiprocessing.connection.Connection) -> None:
    async def main() -> None:
        backends = [await StandIn().start() for _ in range(count)]
        conn.send([b.port for b in backends])
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        # Close connections first so no handler is still running when the loop shuts down.
        for backend in backends:
            await backend.kill()
        await asyncio.sleep(0.2)

    asyncio.run(main())


@dataclass
class Cost:
    variant: str
    cpu_pct: float
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    checks_per_s: float


async def loop_lag(stop: asyncio.Event, samples: list[float]) -> None:
    while not stop.is_set():
        started = time.monotonic()
        await asyncio.sleep(0.01)
        samples.append(time.monotonic() - started - 0.01)


async def steady_cost(variant: str, ports: list[int], n: int, seconds: float) -> Cost:
    endpoints = [endpoint(f"e{i}", ports[i % len(ports)]) for i in range(n)]
    sink = Sink(time.monotonic)
    counter = [0]
    tcp_connect = TcpConnector()

    async def counting_connect(host: str, port: int, timeout_s: float) -> None:
        counter[0] += 1
        await tcp_connect(host, port, timeout_s)

    tasks: list[asyncio.Task[None]] = []
    prober: Prober | None = None
    if variant == "tasks":
        # One sleeping task per endpoint, each connecting every ~2 s.
        async def per_endpoint(port: int) -> None:
            rng = random.Random(port)
            await asyncio.sleep(rng.uniform(0, 2))
            while True:
                with contextlib.suppress(OSError):
                    await counting_connect("127.0.0.1", port, 1.0)
                await asyncio.sleep(2.0 * (1 - 0.1 * rng.random()))

        tasks = [
            asyncio.create_task(per_endpoint(int(e.address.rsplit(":", 1)[1]))) for e in endpoints
        ]
    else:
        liveness = {
            "heap-connect": "connect",
            "heap-connect-only": "connect",
            "heap-http": "http",
            "heap-off": "off",
        }[variant]
        # heap-connect-only: liveness alone (full checks an hour apart), to set against "tasks".
        interval_s = 3600.0 if variant == "heap-connect-only" else 30.0
        prober = Prober(
            ProbeSettings(liveness=liveness, interval_s=interval_s),
            sink,
            connect=counting_connect,
            transport=CountingTransport(counter),
        )
        prober.set_endpoints(endpoints)
        tasks = [asyncio.create_task(prober.run())]
    # Let the first checks (spread over 5 s) settle before measuring.
    await asyncio.sleep(8)
    stop = asyncio.Event()
    lags: list[float] = []
    lag_task = asyncio.create_task(loop_lag(stop, lags))
    requests_before = counter[0]
    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, wall1 = time.process_time(), time.monotonic()
    checks = counter[0] - requests_before
    stop.set()
    await lag_task
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if prober is not None:
        await prober.aclose()
    lags.sort()
    return Cost(
        variant=variant,
        cpu_pct=100 * (cpu1 - cpu0) / (wall1 - wall0),
        lag_p50_ms=1000 * lags[len(lags) // 2],
        lag_p99_ms=1000 * lags[int(len(lags) * 0.99)],
        lag_max_ms=1000 * lags[-1],
        checks_per_s=checks / (wall1 - wall0),
    )


class CountingTransport(httpx.AsyncBaseTransport):
    """The prober's own pool settings, counting requests."""

    def __init__(self, counter: list[int]) -> None:
        self._counter = counter
        self._inner = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0)
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._counter[0] += 1
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def one_round(ports: list[int], n: int) -> tuple[float, float]:
    """Wall and CPU seconds for one liveness connect to each of n endpoints, all at once."""
    targets = [ports[i % len(ports)] for i in range(n)]
    tcp_connect = TcpConnector()
    cpu0, wall0 = time.process_time(), time.monotonic()
    results = await asyncio.gather(
        *(tcp_connect("127.0.0.1", p, 2.0) for p in targets), return_exceptions=True
    )
    cpu1, wall1 = time.process_time(), time.monotonic()
    failures = sum(1 for r in results if isinstance(r, BaseException))
    if failures:
        print(f"  ({failures} of {n} connects failed)")
    return wall1 - wall0, cpu1 - cpu0


async def one_http_round(ports: list[int], n: int) -> tuple[float, float]:
    """The same round as HTTP GETs, with the prober's client settings (32 at once, no
    keep-alive)."""
    slots = asyncio.Semaphore(ProbeSettings().max_concurrent_http)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(trust_env=False, limits=limits) as client:
        urls = [f"http://127.0.0.1:{ports[i % len(ports)]}/health" for i in range(n)]

        async def get(url: str) -> None:
            async with slots:
                await client.get(url, timeout=5.0)

        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.gather(*(get(u) for u in urls), return_exceptions=True)
        cpu1, wall1 = time.process_time(), time.monotonic()
    return wall1 - wall0, cpu1 - cpu0


def synthetic_vllm_page(models: int = 2, histograms: int = 25, buckets: int = 20) -> str:
    """About the size and shape of a vLLM /metrics page: mostly histograms."""
    lines = []
    for name in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc"):
        lines += [f"# HELP vllm:{name} x", f"# TYPE vllm:{name} gauge"]
        lines += [f'vllm:{name}{{engine="0",model_name="m{m}"}} 3.0' for m in range(models)]
    for h in range(histograms):
        name = f"vllm:latency_{h}_seconds"
        lines += [f"# HELP {name} x", f"# TYPE {name} histogram"]
        for m in range(models):
            labels = f'engine="0",model_name="m{m}"'
            for b in range(buckets):
                lines.append(f'{name}_bucket{{{labels},le="{0.01 * 2**b:g}"}} {b * 10}.0')
            lines.append(f'{name}_bucket{{{labels},le="+Inf"}} 200.0')
            lines += [f"{name}_count{{{labels}}} 200.0", f"{name}_sum{{{labels}}} 31.5"]
    return "\n".join(lines) + "\n"


def parse_cost(repeat: int = 50) -> tuple[int, int, float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    page = synthetic_vllm_page()
    cpu0 = time.process_time()
    for _ in range(repeat):
        parse_load(page, MetricsKind.VLLM)
    filtered = (time.process_time() - cpu0) / repeat
    cpu0 = time.process_time()
    for _ in range(max(1, repeat // 10)):
        for _family in text_string_to_metric_families(page):
            pass
    whole = (time.process_time() - cpu0) / max(1, repeat // 10)
    return len(page), page.count("\n"), filtered, whole


def stats_line(d: Detection) -> str:
    t = d.times
    if not t:
        return f"| {d.scenario} | {d.liveness} | 0 | - | - | - | {d.missed} |"
    p90 = t[min(len(t) - 1, int(len(t) * 0.9))]
    return (
        f"| {d.scenario} | {d.liveness} | {len(t)} | {statistics.median(t):.2f} | {p90:.2f} "
        f"| {t[-1]:.2f} | {d.missed} |"
    )


async def main_async(args: argparse.Namespace) -> None:
    print(f"# bench_detection  (python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')})")
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if not args.skip_detection:
        print("\n## Detection time, failure -> UNHEALTHY verdict (seconds)\n")
        print("| failure | liveness | trials | median | p90 | max | missed |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        scenarios = [("killed", "connect"), ("hung", "connect"), ("503", "connect")]
        scenarios += [("killed", "http"), ("hung", "http"), ("503", "http")]
        for i, (scenario, liveness) in enumerate(scenarios):
            result = await detect(scenario, liveness, args.trials, seed=i)
            print(stats_line(result), flush=True)

    size, lines, filtered, whole = parse_cost()
    print(f"\n## Parsing one vLLM-sized /metrics page ({size // 1024} KiB, {lines} lines)\n")
    print("| parse | CPU ms per scrape | at 1000 endpoints every 2 s |")
    print("| --- | --- | --- |")
    for label, cost in (("parse_load (lines filtered first)", filtered), ("whole page", whole)):
        print(f"| {label} | {cost * 1000:.2f} | {cost * 500 * 100:.0f} % of a core |")

    n = args.endpoints
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(
        target=_listeners_main, args=(args.listeners, child), daemon=True
    )
    proc.start()
    ports: list[int] = parent.recv()
    try:
        print(f"\n## One round over {n} endpoints ({len(ports)} listeners)\n")
        print("| check | wall ms | prober CPU ms | CPU us per check |")
        print("| --- | --- | --- | --- |")
        for name, fn in (
            ("tcp connect+reset", one_round),
            ("http GET (32 at once)", one_http_round),
        ):
            walls, cpus = [], []
            for _ in range(3):
                wall, cpu = await fn(ports, n)
                walls.append(wall)
                cpus.append(cpu)
                await asyncio.sleep(0.5)
            wall, cpu = statistics.median(walls), statistics.median(cpus)
            print(f"| {name} | {wall * 1000:.0f} | {cpu * 1000:.0f} | {cpu / n * 1e6:.0f} |")

        print(f"\n## Steady state at {n} endpoints, {args.seconds:g} s window\n")
        print(
            "| variant | checks/s | CPU % of one core | CPU us per check "
            "| loop lag p50 ms | p99 ms | max ms |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for variant in args.variants.split(",") * args.repeat:
            c = await steady_cost(variant, ports, n, args.seconds)
            print(
                f"| {variant} | {c.checks_per_s:.0f} | {c.cpu_pct:.1f} "
                f"| {c.cpu_pct * 1e4 / max(c.checks_per_s, 1):.0f} | {c.lag_p50_ms:.2f} "
                f"| {c.lag_p99_ms:.2f} | {c.lag_max_ms:.2f} |",
                flush=True,
            )
    finally:
        parent.send("stop")
        proc.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--listeners", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="5 trials, 8 s windows")
    parser.add_argument("--skip-detection", action="store_true")
    parser.add_argument("--skip-round", action="store_true")
    parser.add_argument(
        "--variants",
        default="heap-off,heap-connect,heap-connect-only,tasks,heap-http",
        help="steady-state variants, comma-separated",
    )
    parser.add_argument("--repeat", type=int, default=1, help="run the variant list this often")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.seconds = 5, 8.0
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
