"""The benchmark's phases: the gateway flow through decider_client, alternating Check/Decide
rounds (with the replayed-Decide floor), the streaming cost probe, ReportOutcome, many
connections, and the server architectures; everything lands in one Results."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.grpc.loadgen import Ghz, H2load, Run, check_grpc_status
from bench.grpc.servers import RssSampler, Server, server
from bench.grpc.workload import (
    CHECK,
    CHECK_DATA,
    DECIDE,
    DECIDE_DATA,
    REPORT,
    REPORT_DATA,
    STREAM,
    check_msg,
    decide_msg,
)


@dataclass
class Results:
    machine: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Run]] = field(default_factory=list)
    report_outcome: Run | None = None
    many_connections: Run | None = None
    rss_idle_mb: float = 0.0
    rss_peak_mb: float = 0.0
    peak_connections: int = 0
    architectures: dict[str, dict[str, Run]] = field(default_factory=dict)
    architecture_rss_mb: dict[str, float] = field(default_factory=dict)
    # Server CPU per decision: unary Decide vs the bench-only bidirectional DecideStream.
    stream: dict[str, float] = field(default_factory=dict)
    # Check vs a Decide that replays one answer (launch.py --replay-decide), per round.
    replay: list[dict[str, Run]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def calls_for(
    ghz: Ghz, srv: Server, call: str, data: str, *, c: int, conns: int, seconds: float
) -> int:
    """Sizes a phase: a short probe run, then enough calls for about `seconds`."""
    probe = ghz.run(srv, call, data, n=max(200, c * 10), c=c, conns=conns)
    return max(200, int(probe.rps * seconds))


def main_run(
    ghz: Ghz, h2load: H2load | None, config: Path, args: argparse.Namespace, res: Results
) -> None:
    c, conns = args.concurrency, args.connections
    # Server on one core, load generators on the other, so neither steals the other's CPU.
    pin = bool(args.pin and shutil.which("taskset") and (os.cpu_count() or 1) >= 2)
    ghz.cpus = "1" if pin else None
    if h2load is not None:
        h2load.cpus = ghz.cpus
    res.machine["pinned"] = pin
    # A second server whose Decide replays one answer (no Python work per call), measured in
    # the same rounds so that drift in machine load affects both alike.
    replayed = (
        server(args.arch, config, cpus="0" if pin else None, replay_decide=True)
        if not args.skip_replay
        else contextlib.nullcontext()
    )
    with server(args.arch, config, cpus="0" if pin else None) as srv, replayed as rsrv:
        res.rss_idle_mb = srv.rss_mb()
        problem = asyncio.run(gateway_flow(srv.addr))
        if problem:
            res.failures.append(f"gateway flow through decider_client: {problem}")
        # Warm up and size the phases so each takes about args.seconds on this machine.
        n_check = calls_for(ghz, srv, CHECK, CHECK_DATA, c=c, conns=conns, seconds=args.seconds)
        n_decide = calls_for(ghz, srv, DECIDE, DECIDE_DATA, c=c, conns=conns, seconds=args.seconds)
        serial = ghz.run(srv, DECIDE, DECIDE_DATA, n=200, c=1, conns=1)
        n_serial = max(200, int(serial.rps * args.seconds * 0.6))
        for r in range(args.rounds):
            round_: dict[str, Run] = {}
            # Alternate which goes first so drift in machine load does not favour one call.
            order = [
                ("check", CHECK, CHECK_DATA, n_check),
                ("decide", DECIDE, DECIDE_DATA, n_decide),
            ]
            for name, call, data, n in order if r % 2 == 0 else order[::-1]:
                round_[name] = ghz.run(srv, call, data, n=n, c=c, conns=conns)
            for name, call, data, _ in order if r % 2 == 0 else order[::-1]:
                round_[f"{name}_serial"] = ghz.run(srv, call, data, n=n_serial, c=1, conns=1)
            if h2load is not None:
                pairs = [("check", CHECK, check_msg), ("decide", DECIDE, decide_msg)]
                for name, call, msg in pairs if r % 2 == 0 else pairs[::-1]:
                    round_[f"{name}_h2load"] = h2load.run(
                        srv,
                        "/" + call,
                        [msg()],
                        n=args.h2load_calls,
                        conns=conns,
                        streams=c // conns,
                    )
            res.rounds.append(round_)
            print(f"round {r + 1}: " + _brief(round_), flush=True)
            if rsrv is not None:
                replay: dict[str, Run] = {}
                for name, call, data, n in order if r % 2 == 0 else order[::-1]:
                    replay[name] = ghz.run(rsrv, call, data, n=n, c=c, conns=conns)
                for name, call, data, _ in order if r % 2 == 0 else order[::-1]:
                    replay[f"{name}_serial"] = ghz.run(rsrv, call, data, n=n_serial, c=1, conns=1)
                res.replay.append(replay)
                print(f"round {r + 1}, replayed Decide: " + _brief(replay), flush=True)

        if h2load is not None:
            stream_cost(h2load, srv, args, res)

        n_report = calls_for(ghz, srv, REPORT, REPORT_DATA, c=c, conns=conns, seconds=args.seconds)
        res.report_outcome = ghz.run(srv, REPORT, REPORT_DATA, n=n_report, c=c, conns=conns)
        print(f"ReportOutcome: {res.report_outcome.rps:.0f}/s", flush=True)

        # 1000 connections, one call in flight on each, every call must succeed.
        with RssSampler(srv) as rss:
            res.many_connections = ghz.run(
                srv,
                DECIDE,
                DECIDE_DATA,
                n=args.many * 10,
                c=args.many,
                conns=args.many,
                timeout_s=60,
            )
        res.rss_peak_mb = max(rss.peak_mb, srv.rss_mb())
        res.peak_connections = rss.peak_connections
    ghz.cpus = None
    if h2load is not None:
        h2load.cpus = None
        m = res.many_connections
        print(
            f"{args.many} connections ({res.peak_connections} seen open at once): {m.status}, "
            f"RSS peak {res.rss_peak_mb:.0f} MB",
            flush=True,
        )


def stream_cost(h2load: H2load, srv: Server, args: argparse.Namespace, res: Results) -> None:
    """Server CPU per decision: unary Decide vs K decisions on one DecideStream."""
    from decider.v1 import decider_service_pb2 as dpb

    k = args.stream_messages
    msgs = [decide_msg(i) for i in range(k)]
    streamed = [dpb.DecideStreamRequest(correlation_id=i, decide=m) for i, m in enumerate(msgs)]
    for path, batch, resp in (
        (f"/{DECIDE}", msgs[:1], dpb.DecideResponse),
        (STREAM, streamed, dpb.DecideStreamResponse),
    ):
        problem = check_grpc_status(srv.addr, path, batch, resp)
        if problem:
            res.failures.append(f"grpc-status check: {problem}")
            return
    c, conns = args.concurrency, args.connections
    calls = max(args.h2load_calls // k, 20)
    unary = h2load.run(
        srv, f"/{DECIDE}", msgs[:1], n=args.h2load_calls, conns=conns, streams=c // conns
    )
    stream = h2load.run(
        srv, STREAM, streamed, n=calls, conns=conns, streams=max(1, c // conns // 4)
    )
    res.stream = {
        "messages_per_stream": float(k),
        "unary_cpu_us": unary.server_cpu_us,
        "stream_cpu_us": stream.server_cpu_us,
        "unary_decisions_per_s": unary.rps,
        "stream_decisions_per_s": stream.rps * k,
    }
    print(f"stream: {res.stream}", flush=True)


async def gateway_flow(addr: str) -> str:
    """Before any load, the whole gateway flow through decider_client: route 20 requests
    whose first endpoint fails, report every outcome, and check nothing went wrong."""
    from decider.v1 import decider_service_pb2 as dpb
    from decider.v1 import endpoint_pb2 as epb
    from decider_client import Attempt, ClientOptions, DeciderClient

    tries: list[str] = []

    async def attempt(ep: epb.Endpoint) -> Attempt:
        tries.append(ep.id)
        if len(tries) == 1:
            return Attempt(result=dpb.RESULT_ERROR, error="scripted failure")
        return Attempt(result=dpb.RESULT_SUCCESS, input_tokens=800, output_tokens=120)

    async with DeciderClient(addr, ClientOptions(decide_timeout_s=5)) as client:
        for i in range(20):
            tries.clear()
            routed = await client.route(decide_msg(i), attempt)
            if not routed.decision_id or len(set(routed.tried)) != 2:
                return f"request {i}: {routed}"
        await client.flush()
        if client.stats.failed_reports or client.stats.dropped_reports:
            return f"reports failed: {client.stats}"
    return ""


def _brief(runs: dict[str, Run]) -> str:
    return ", ".join(f"{k} {v.rps:.0f}/s p50 {v.p50_ms:.2f} ms" for k, v in runs.items())


def architectures(
    ghz: Ghz, h2load: H2load | None, config: Path, args: argparse.Namespace, res: Results
) -> None:
    variants: list[tuple[str, str, int]] = [
        ("aio", "aio", 1),
        ("aio+uvloop", "uvloop", 1),
        ("sync", "sync", 1),
        ("aio x2 reuseport", "aio", 2),
        ("aio+uvloop x2 reuseport", "uvloop", 2),
    ]
    try:
        import uvloop  # noqa: F401
    except ImportError:
        variants = [v for v in variants if v[1] != "uvloop"]
        res.notes.append("uvloop is not installed: its variants were skipped")
    # Pinned as in the main run: one server process on core 0, the load generator on core 1;
    # the multi-process variants get both cores and share core 1 with the load generator.
    pin = bool(args.pin and shutil.which("taskset") and (os.cpu_count() or 1) >= 2)
    ghz.cpus = "1" if pin else None
    if h2load is not None:
        h2load.cpus = ghz.cpus
    collected: dict[str, list[dict[str, Run]]] = {label: [] for label, _, _ in variants}
    rss: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    # Rounds over every variant, the order reversed each round, so drift in the machine's load
    # does not favour the variant that happens to run first; each cell is the median round.
    for r in range(args.arch_rounds):
        for label, arch, processes in variants if r % 2 == 0 else variants[::-1]:
            out, rss_mb = _architecture_round(ghz, h2load, config, args, (arch, processes), pin)
            collected[label].append(out)
            rss[label].append(rss_mb)
            print(f"{label} (round {r + 1}): " + _brief(out), flush=True)
    for label, rounds in collected.items():
        res.architectures[label] = {
            key: sorted((o[key] for o in rounds), key=lambda run: run.rps)[len(rounds) // 2]
            for key in rounds[0]
        }
        res.architecture_rss_mb[label] = statistics.median(rss[label])


def _architecture_round(
    ghz: Ghz,
    h2load: H2load | None,
    config: Path,
    args: argparse.Namespace,
    variant: tuple[str, int],
    pin: bool,
) -> tuple[dict[str, Run], float]:
    """One round on a fresh server of one variant: its runs and the server's RSS in MB."""
    arch, processes = variant
    c, conns = args.concurrency, args.connections
    cpus = ("0" if processes == 1 else "0,1") if pin else None
    with server(arch, config, processes=processes, cpus=cpus) as srv:
        ghz.run(srv, DECIDE, DECIDE_DATA, n=500, c=c, conns=conns)  # warm-up
        n = int(args.arch_calls)
        out = {
            "check": ghz.run(srv, CHECK, CHECK_DATA, n=n, c=c, conns=conns),
            "decide": ghz.run(srv, DECIDE, DECIDE_DATA, n=n, c=c, conns=conns),
            "decide_serial": ghz.run(srv, DECIDE, DECIDE_DATA, n=n // 5, c=1, conns=1),
        }
        if h2load is not None:
            # Eight connections so SO_REUSEPORT has something to spread over the processes.
            for name, call, msg in (("check", CHECK, check_msg), ("decide", DECIDE, decide_msg)):
                out[f"{name}_h2load"] = h2load.run(
                    srv, "/" + call, [msg()], n=args.h2load_calls, conns=8, streams=c // 8
                )
        return out, srv.rss_mb()


def check_runs(res: Results) -> None:
    """Adds a failure for every run that did not end all grpc-status 0."""
    runs: list[Run] = [r for round_ in res.rounds + res.replay for r in round_.values()]
    runs += [r for arch in res.architectures.values() for r in arch.values()]
    runs += [r for r in (res.report_outcome, res.many_connections) if r is not None]
    for r in runs:
        if not r.ok:
            res.failures.append(f"{r.call} c={r.concurrency}: status {r.status}, errors {r.errors}")
