"""In-process benchmark of the unary Decide path, stage by stage (`make bench-decide-path`).

The server's own parts, built as `decider serve` builds them from the gRPC load benchmark's
config (100 endpoints, composite): the admission interceptor, the Decide handler with its
decorators, the engine, the metrics observer and the wire encoder. Requests are the load
benchmark's mix (1000 sessions, shared and per-conversation prefix hashes), parsed from bytes
on every call as the server does. Health/Check through the same interceptor is the floor.

Each stage is timed on its own, and then the whole path; the whole path costs more than the sum
of its stages because the stages evict each other's data from the CPU caches. Printed: the
median and the 25th percentile of the per-call mean over rounds of calls, in microseconds.

In a loaded server each call finds the CPU caches holding the grpc core's, the event loop's and
other calls' data rather than its own. `--evict-mb N` copies an N MB buffer before every call
(not timed), so each call starts with cold caches; the default loop, with caches warm, is the
other extreme. 2 MB covers the L1 and L2 caches of the 2-vCPU machine in docs/BENCHMARKS.md.

    .venv/bin/python -m bench.bench_decide_path [--rounds 30] [--calls 3000] [--evict-mb 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2_grpc

from bench.grpc import workload
from decider import config
from decider.api import decider_service
from decider.codec import convert
from decider.runtime.server import DeciderServer
from decider.v1 import decider_service_pb2 as dpb

DECIDE = "/" + workload.DECIDE
CHECK = "/" + workload.CHECK


class _Context:
    """The servicer context as the success path uses it: not at all (tracing is off)."""

    def invocation_metadata(self) -> tuple[()]:
        return ()


class _CallDetails:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class _Handlers:
    """Stands in for grpc.aio.Server to collect the registered method handlers."""

    def __init__(self) -> None:
        self.by_method: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self.by_method[f"/{service}/{name}"] = handler


async def _measure(
    step: Callable[[int], Awaitable[object] | object], rounds: int, calls: int, evict: bytes
) -> tuple[float, float]:
    scratch = bytearray(len(evict))
    means = []
    perf_counter = time.perf_counter
    for _ in range(rounds):
        if not evict:
            started = perf_counter()
            for i in range(calls):
                result = step(i & 4095)
                if asyncio.iscoroutine(result):
                    await result
            means.append((perf_counter() - started) / calls * 1e6)
            continue
        spent = 0.0
        for i in range(calls):
            scratch[:] = evict  # a copy larger than the caches: the call below starts cold
            started = perf_counter()
            result = step(i & 4095)
            if asyncio.iscoroutine(result):
                await result
            spent += perf_counter() - started
        means.append(spent / calls * 1e6)
    means.sort()
    return statistics.median(means), means[len(means) // 4]


async def run(rounds: int, calls: int, evict_mb: int = 0) -> list[tuple[str, float, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.toml"
        workload.write_config(path)
        settings = config.load(path, flags={"data_dir": ""})
    server = DeciderServer(settings, metrics_listen="")
    handlers = _Handlers()
    decider_service.add_to_server(server._decider, handlers)
    health_pb2_grpc.add_HealthServicer_to_server(server.health, handlers)
    await server.health.set("", 1)
    admission, context = server.admission, _Context()
    service, engine = server._decider, server.engine
    observer, encoder = service._observer, service._encoder

    raw = [workload.decide_msg(i).SerializeToString() for i in range(4096)]
    check_raw = workload.check_msg().SerializeToString()
    messages = [dpb.DecideRequest.FromString(r) for r in raw]
    routes = [convert.checked_route_request(m) for m in messages]

    async def through_interceptor(method: str, data: bytes) -> object:
        async def lookup(details: Any) -> Any:
            return handlers.by_method[method]

        handler = await admission.intercept_service(lookup, _CallDetails(method))
        return await handler.unary_unary(handler.request_deserializer(data), context)

    # Warm up: fill the engine's session and load state as the load benchmark does.
    for i in range(20_000):
        await through_interceptor(DECIDE, raw[i & 4095])
    decisions = [engine.decide(routes[i], now=time.monotonic()) for i in range(4096)]

    steps: list[tuple[str, Callable[[int], Awaitable[object] | object]]] = [
        ("parse the request bytes", lambda k: dpb.DecideRequest.FromString(raw[k])),
        ("check and convert (convert.checked_route_request)",
         lambda k: convert.checked_route_request(messages[k])),
        ("engine.decide (composite, 100 endpoints)",
         lambda k: engine.decide(routes[k], now=time.monotonic())),
        ("observer (metrics; tracing off)",
         lambda k: observer.decided(routes[k], decisions[k], elapsed_s=2e-5)),
        ("encode the answer (wire.DecisionEncoder)", lambda k: encoder.encode(decisions[k])),
        ("whole Decide through the admission interceptor",
         lambda k: through_interceptor(DECIDE, raw[k])),
        ("Health/Check through the admission interceptor (floor)",
         lambda k: through_interceptor(CHECK, check_raw)),
    ]  # fmt: skip
    evict = bytes(evict_mb << 20)
    out = []
    for name, step in steps:
        median, p25 = await _measure(step, rounds, calls, evict)
        out.append((name, median, p25))
        print(f"{name}: median {median:.2f} us, p25 {p25:.2f} us", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=3000, help="calls per round")
    parser.add_argument(
        "--evict-mb", type=int, default=0, help="copy this many MB before each call (cold caches)"
    )
    args = parser.parse_args()
    rows = asyncio.run(run(args.rounds, args.calls, args.evict_mb))
    print("\n| stage | median (us) | p25 (us) |\n| --- | ---: | ---: |")
    for name, median, p25 in rows:
        print(f"| {name} | {median:.2f} | {p25:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
