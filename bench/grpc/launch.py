"""Bench-only launcher: the same Decider under different server architectures.

    python bench/grpc/launch.py --arch aio|uvloop|sync --config FILE --listen HOST:PORT
                                [--processes N]

- aio:    decider.runtime.server.DeciderServer (grpc.aio) on asyncio's own event loop
          (`[server] event_loop = "asyncio"`).
- uvloop: the same server on uvloop's event loop, what `decider serve` runs by default.
- sync:   grpc.server on a thread pool with a synchronous DeciderService over the same engine,
          validation and conversions (no interceptors; the engine behind one lock).
- --processes N: N copies of the chosen architecture on one port with SO_REUSEPORT; the kernel
          spreads connections over them. Each process has its own engine state.
- --replay-decide: (aio, uvloop) Decide answers its first response again and again, doing no
          Python work per call: what Decide's request and response sizes cost the transport
          and the client, the floor the real Decide is compared with.

Each process logs "decider serving on ... (port N)" as `decider serve` does. Nothing here is
used outside bench/grpc; the architecture the server ships is chosen from these measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from typing import Any

import grpc

from decider import config
from decider.obs import logs


def _aio_server_options(reuseport: bool) -> None:
    """DeciderServer turns SO_REUSEPORT off so two servers never share a port by accident;
    the multi-process variant needs it on, so wrap grpc.aio.server in this process only."""
    if not reuseport:
        return
    real = grpc.aio.server

    def server(*args: Any, options: Any = (), **kwargs: Any) -> Any:
        opts = [(k, v) for k, v in options if k != "grpc.so_reuseport"]
        return real(*args, options=[*opts, ("grpc.so_reuseport", 1)], **kwargs)

    grpc.aio.server = server  # type: ignore[assignment]


async def _serve_aio(settings: config.Settings) -> None:
    """What `decider serve` runs: decider.runtime.server.serve, until SIGTERM or SIGINT."""
    from decider.runtime.server import serve

    await serve(settings)


def _replay_decide() -> None:
    from decider.api.decider_service import DeciderService

    real = DeciderService.Decide
    first: list[bytes] = []

    async def replayed(self: DeciderService, request: Any, context: Any) -> bytes:
        if not first:
            first.append(await real(self, request, context))
        return first[0]

    DeciderService.Decide = replayed  # type: ignore[method-assign]


def run_aio(
    settings: config.Settings, *, use_uvloop: bool, reuseport: bool, replay: bool = False
) -> None:
    _aio_server_options(reuseport)
    if replay:
        _replay_decide()
    if use_uvloop:
        import uvloop

        uvloop.run(_serve_aio(settings))
    else:
        asyncio.run(_serve_aio(settings))


def run_sync(settings: config.Settings, *, reuseport: bool, threads: int) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from decider.api import decider_service, reflection
    from decider.api.errors import status_for_refusal
    from decider.api.wire import DecisionEncoder
    from decider.codec import convert, validate
    from decider.core.engine import Engine
    from decider.core.model import Refusal
    from decider.v1 import decider_service_pb2 as dpb
    from decider.v1 import decider_service_pb2_grpc as dgrpc

    engine = Engine(settings.engine, rng=random.Random())
    engine.set_endpoints(settings.endpoints, now=time.monotonic())
    # The engine is not thread-safe; a sync server must serialize calls into it.
    lock = threading.Lock()
    encoder = DecisionEncoder()

    class SyncDeciderService(dgrpc.DeciderServiceServicer):
        def Decide(self, request: dpb.DecideRequest, context: Any) -> bytes:
            validate.decide_request(request)
            route = convert.route_request_from_proto(request)
            with lock:
                result = engine.decide(route, now=time.monotonic())
            if isinstance(result, Refusal):
                context.abort_with_status(status_for_refusal(result))
            return encoder.encode(result)

        def ReportOutcome(
            self, request: dpb.ReportOutcomeRequest, context: Any
        ) -> dpb.ReportOutcomeResponse:
            validate.report_outcome_request(request)
            outcome = convert.outcome_from_proto(request)
            with lock:
                found = engine.record_outcome(outcome, now=time.monotonic())
            return dpb.ReportOutcomeResponse(decision_found=found)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads),
        options=[("grpc.so_reuseport", 1 if reuseport else 0)],
        maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs,
    )
    decider_service.add_to_server(SyncDeciderService(), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        dpb.DESCRIPTOR.services_by_name["DeciderService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable(names, server)
    port = server.add_insecure_port(settings.server.listen)
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    logging.getLogger("decider.server").info(
        "decider serving on %s (port %d)", settings.server.listen, port
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.1):
        with lock:
            engine.tick(now=time.monotonic())
    server.stop(1).wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("aio", "uvloop", "sync"), required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=16, help="sync server's thread pool")
    parser.add_argument("--replay-decide", action="store_true", help="Decide does no work")
    args = parser.parse_args()
    # As `decider serve` sets it up: INFO, and no line per Decide (log_decisions is off).
    logs.configure_logging(level="INFO", log_decisions=False, json_format=False)
    reuseport = args.processes > 1 or os.environ.get("BENCH_REUSEPORT") == "1"
    if args.processes > 1:
        return _supervise(args)
    settings = config.load(args.config, flags={"listen": args.listen, "data_dir": ""})
    if args.arch == "sync":
        run_sync(settings, reuseport=reuseport, threads=args.threads)
    else:
        run_aio(
            settings,
            use_uvloop=args.arch == "uvloop",
            reuseport=reuseport,
            replay=args.replay_decide,
        )
    return 0


def _supervise(args: argparse.Namespace) -> int:
    """Starts N single-process copies on the same port and forwards SIGTERM to them."""
    argv = [sys.executable, __file__, "--arch", args.arch, "--config", args.config]
    argv += ["--listen", args.listen, "--threads", str(args.threads)]
    env = {**os.environ, "BENCH_REUSEPORT": "1"}
    children = [subprocess.Popen(argv, env=env) for _ in range(args.processes)]

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


if __name__ == "__main__":
    sys.exit(main())
