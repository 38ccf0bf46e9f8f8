"""Scale-out benchmark: what sharing state through Redis costs, and what it buys.

    make bench-scale       # or: .venv/bin/python -m bench.scale.bench_scale --ghz .tools/bin/ghz

Part 1, throughput: Decide under ghz (compiled Go) against `decider serve` with the memory
backend, the Redis backend, and the Redis backend with `--workers 2`, in alternating rounds so
the machine's drift hits every variant alike. The Redis backend keeps Redis off the Decide
path, so its throughput should match memory's. ghz runs on the same cores as the servers:
with 2 cores, 2 workers compete with the load generator, and the ratio says so.

Part 2, consistency: with two replicas sharing one Redis, how long a RegisterEndpoint on one
takes to be used by Decide on the other (polled over gRPC every millisecond or so), and how
long the probing lease takes to move when its holder is killed (SIGKILL).

Writes bench/results/scale.json and the tables between the bench-scale markers of
docs/BENCHMARKS.md and docs/SCALING.md. Never part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.grpc.loadgen import Ghz, Run
from bench.grpc.servers import ROOT, free_port, running_server
from bench.grpc.workload import DECIDE, DECIDE_DATA, write_config, write_protoset
from tests.redis_server import RedisServer

RESULTS = ROOT / "bench" / "results" / "scale.json"
DOCS = (ROOT / "docs" / "BENCHMARKS.md", ROOT / "docs" / "SCALING.md")
BEGIN, END = "<!-- bench-scale:begin -->", "<!-- bench-scale:end -->"
VARIANTS = ("memory", "redis", "redis, 2 workers")


@dataclass
class Results:
    machine: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Run]] = field(default_factory=list)
    registry_delay_ms: list[float] = field(default_factory=list)
    breaker_delay_ms: list[float] = field(default_factory=list)
    # Tenant quota under ghz load split over two replicas.
    quota_per_minute: int = 0
    quota_offered: int = 0
    quota_admitted: int = 0
    quota_allowed: float = 0.0
    lease_takeover_s: list[float] = field(default_factory=list)
    lease_s: float = 0.0
    command: str = ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ghz", default=str(ROOT / ".tools" / "bin" / "ghz"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20_000, help="Decide calls per ghz run")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--samples", type=int, default=50, help="registry propagation samples")
    parser.add_argument("--takeovers", type=int, default=3)
    parser.add_argument("--quota", type=int, default=2000, help="tenant requests per minute")
    parser.add_argument("--no-doc", action="store_true", help="print, write no files")
    args = parser.parse_args()
    res = Results(
        machine={"cpus": os.cpu_count(), "python": platform.python_version()},
        command=_command(sys.argv[1:]),
    )
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        redis = RedisServer(work / "redis")
        redis.start()
        try:
            throughput(args, work, redis, res)
            asyncio.run(consistency(args, work, redis, res))
        finally:
            redis.kill()
    report = render(res)
    print(report)
    if not args.no_doc:
        RESULTS.write_text(json.dumps(asdict(res), indent=2) + "\n")
        for doc in DOCS:
            replace_section(doc, report)
    return 0


def _command(argv: list[str]) -> str:
    """How the figures were made: `make bench-scale`, or the options given beyond --ghz."""
    shown = [a for i, a in enumerate(argv) if not (a.startswith("--ghz") or argv[i - 1] == "--ghz")]
    return "python -m bench.scale.bench_scale " + " ".join(shown) if shown else "make bench-scale"


# -- part 1: throughput --------------------------------------------------------------------------


def throughput(args: argparse.Namespace, work: Path, redis: RedisServer, res: Results) -> None:
    ghz = Ghz(args.ghz, work / "decider.protoset")
    write_protoset(ghz.protoset)
    memory = work / "memory.toml"
    write_config(memory)
    shared = work / "redis.toml"
    shared.write_text(memory.read_text() + f'\n[state]\nbackend = "redis"\nurl = "{redis.url}"\n')
    configs = {"memory": (memory, 1), "redis": (shared, 1), "redis, 2 workers": (shared, 2)}
    env = {**os.environ, "DECIDER_LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT / "src")}
    for number in range(args.rounds):
        round_: dict[str, Run] = {}
        for name in VARIANTS:
            config, workers = configs[name]
            port = free_port()
            argv = [sys.executable, "-m", "decider", "serve", "--config", str(config)]
            argv += ["--listen", f"127.0.0.1:{port}", "--workers", str(workers)]
            with running_server(argv, env, name=name, port=port, ready=workers) as srv:
                # Warm-up: connections, caches, the first decisions' allocations.
                ghz.run(srv, DECIDE, DECIDE_DATA, n=2000, c=args.concurrency, conns=4)
                run = ghz.run(srv, DECIDE, DECIDE_DATA, n=args.calls, c=args.concurrency, conns=4)
            round_[name] = run
            print(f"round {number + 1} {name}: {run.rps:.0f} Decide/s, p50 {run.p50_ms:.2f} ms, "
                  f"ok={run.ok}", file=sys.stderr)  # fmt: skip
        res.rounds.append(round_)


# -- part 2: consistency -------------------------------------------------------------------------


async def consistency(
    args: argparse.Namespace, work: Path, redis: RedisServer, res: Results
) -> None:
    import grpc

    from decider.v1 import decider_service_pb2 as dpb
    from decider.v1 import decider_service_pb2_grpc as dgrpc
    from decider.v1 import endpoint_pb2 as epb
    from decider.v1 import registry_service_pb2 as rpb
    from decider.v1 import registry_service_pb2_grpc as rgrpc

    res.lease_s = 5.0
    res.quota_per_minute = args.quota
    config = work / "pair.toml"
    write_config(config)
    config.write_text(
        config.read_text()
        + f'\n[state]\nbackend = "redis"\nurl = "{redis.url}"\nkey_prefix = "pair:"\n'
        f"probe_lease_s = {res.lease_s}\n"
        "\n[breaker]\nconsecutive_failures = 3\nopen_s = 300\n"
        f"\n[quotas.tenants.bench]\nrequests_per_minute = {args.quota}\n"
    )
    env = {**os.environ, "DECIDER_LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT / "src")}
    ports = [free_port() for _ in range(3)]
    procs = [_spawn(config, port, env) for port in ports]
    try:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in ports]
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 60)
        writer = rgrpc.RegistryServiceStub(channels[0])  # type: ignore[arg-type]
        reader = dgrpc.DeciderServiceStub(channels[1])  # type: ignore[arg-type]
        for i in range(args.samples):
            model = f"sync-{i}"
            await writer.RegisterEndpoint(
                rpb.RegisterEndpointRequest(
                    endpoint=epb.Endpoint(id=model, address="127.0.0.1:9", model=model)
                )
            )
            start = time.perf_counter()
            while True:
                try:
                    await reader.Decide(dpb.DecideRequest(model=model), timeout=5)
                    break
                except grpc.aio.AioRpcError as err:
                    if err.code() is not grpc.StatusCode.NOT_FOUND:
                        raise
                if time.perf_counter() - start > 10:
                    raise RuntimeError(f"{model} never reached the second replica")
            res.registry_delay_ms.append((time.perf_counter() - start) * 1000)
        admin = rgrpc.RegistryServiceStub(channels[1])  # type: ignore[arg-type]
        deciding = dgrpc.DeciderServiceStub(channels[0])  # type: ignore[arg-type]
        for i in range(args.samples):
            model = f"brk-{i}"
            await writer.RegisterEndpoint(
                rpb.RegisterEndpointRequest(
                    endpoint=epb.Endpoint(id=model, address="127.0.0.1:9", model=model)
                )
            )
            await _until_routed(reader, model)
            for _ in range(3):
                reply = await deciding.Decide(dpb.DecideRequest(model=model), timeout=5)
                await deciding.ReportOutcome(
                    dpb.ReportOutcomeRequest(
                        decision_id=reply.decision_id,
                        endpoint_id=model,
                        result=dpb.RESULT_ERROR,
                    ),
                    timeout=5,
                )
            start = time.perf_counter()
            while True:
                listed = await admin.ListEndpoints(rpb.ListEndpointsRequest(model=model))
                if listed.statuses[model].breaker_state == epb.BREAKER_STATE_OPEN:
                    break
                if time.perf_counter() - start > 10:
                    raise RuntimeError(f"{model}'s breaker never opened on the second replica")
            res.breaker_delay_ms.append((time.perf_counter() - start) * 1000)
        for channel in channels:
            await channel.close()

        quota_load(args, work, ports[:2], res)

        import redis.asyncio as aioredis

        client = aioredis.from_url(redis.url)
        alive = dict(zip((p.pid for p in procs), procs, strict=True))
        for _ in range(min(args.takeovers, len(procs) - 1)):
            holder_pid = await _lease_holder(client, alive, timeout_s=60)
            os.kill(holder_pid, signal.SIGKILL)
            alive.pop(holder_pid).wait()
            start = time.perf_counter()
            await _lease_holder(client, alive, timeout_s=60)
            res.lease_takeover_s.append(time.perf_counter() - start)
        await client.aclose()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _until_routed(stub: Any, model: str) -> None:
    import grpc

    from decider.v1 import decider_service_pb2 as dpb

    for _ in range(10_000):
        try:
            await stub.Decide(dpb.DecideRequest(model=model), timeout=5)
            return
        except grpc.aio.AioRpcError as err:
            if err.code() is not grpc.StatusCode.NOT_FOUND:
                raise
        await asyncio.sleep(0.001)
    raise RuntimeError(f"{model} never reached the second replica")


def quota_load(args: argparse.Namespace, work: Path, ports: list[int], res: Results) -> None:
    """Two ghz at once, one per replica, for tenant "bench" with a per-minute budget: how many
    calls the fleet admitted against what the budget allows over the run (burst + refill)."""
    ghz = Ghz(args.ghz, work / "decider.protoset")
    if not ghz.protoset.exists():
        write_protoset(ghz.protoset)
    per_replica = args.quota * 2
    runs: list[Run] = []

    def one(port: int) -> None:
        runs.append(
            ghz._run(
                f"127.0.0.1:{port}", DECIDE, DECIDE_DATA, n=per_replica, c=20, conns=2, timeout_s=20
            )
        )

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(port,)) for port in ports]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed_s = time.perf_counter() - start
    res.quota_offered = per_replica * len(ports)
    res.quota_admitted = sum(run.status.get("OK", 0) for run in runs)
    res.quota_allowed = args.quota + args.quota / 60 * elapsed_s


def _spawn(config: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "decider", "serve", "--config", str(config)]
    argv += ["--listen", f"127.0.0.1:{port}"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _lease_holder(client: Any, alive: dict[int, Any], *, timeout_s: float) -> int:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        value = await client.get("pair:probe:lease")
        if value:
            pid = int(value.decode().rsplit(":", 1)[1])
            if pid in alive:
                return pid
        await asyncio.sleep(0.01)
    raise RuntimeError("no live replica took the probing lease")


# -- the report ----------------------------------------------------------------------------------


def render(res: Results) -> str:
    rps = {name: statistics.median(r[name].rps for r in res.rounds) for name in VARIANTS}
    p50 = {name: statistics.median(r[name].p50_ms for r in res.rounds) for name in VARIANTS}
    ok = all(r[name].ok for r in res.rounds for name in VARIANTS)
    lines = [
        f"`{res.command}` ({res.machine['cpus']} CPUs, Python {res.machine['python']}; "
        f"{len(res.rounds)} alternating rounds, medians; ghz shares the cores with the "
        f"servers{'' if ok else '; SOME CALLS FAILED'}).",
        "",
        "| Decide under ghz | calls/s | p50 ms | vs memory |",
        "|---|---:|---:|---:|",
    ]
    for name in VARIANTS:
        lines.append(
            f"| {name} | {rps[name]:,.0f} | {p50[name]:.2f} | {rps[name] / rps['memory']:.2f} |"
        )
    delays = sorted(res.registry_delay_ms)
    if delays:
        lines += [
            "",
            "| Consistency (2-3 replicas, one Redis, loopback) | p50 | p99 | max |",
            "|---|---:|---:|---:|",
            f"| RegisterEndpoint on one replica -> used by Decide on another "
            f"({len(delays)} samples) | {_pct(delays, 50):.1f} ms | {_pct(delays, 99):.1f} ms "
            f"| {delays[-1]:.1f} ms |",
        ]
    breaker = sorted(res.breaker_delay_ms)
    if breaker:
        lines.append(
            f"| Breaker opened by outcomes on one replica -> open on another "
            f"({len(breaker)} samples) | {_pct(breaker, 50):.1f} ms | {_pct(breaker, 99):.1f} ms "
            f"| {breaker[-1]:.1f} ms |"
        )
    if res.lease_takeover_s:
        takeovers = sorted(res.lease_takeover_s)
        lines.append(
            f"| Probing lease holder killed -> another replica holds it "
            f"(probe_lease_s = {res.lease_s:g}, {len(takeovers)} kills) "
            f"| {statistics.median(takeovers):.2f} s | | {takeovers[-1]:.2f} s |"
        )
    if res.quota_allowed:
        over = res.quota_admitted / res.quota_allowed - 1
        lines += [
            "",
            f"Tenant quota ({res.quota_per_minute} requests/minute) under two ghz at once, one per "
            f"replica: {res.quota_offered:,} calls offered, {res.quota_admitted:,} admitted "
            f"against {res.quota_allowed:,.0f} allowed over the run (the burst plus the refill): "
            f"**{over:+.1%}**.",
        ]
    return "\n".join(lines)


def _pct(sorted_values: list[float], pct: int) -> float:
    index = min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1)))
    return sorted_values[index]


def replace_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n## Scale-out (`make bench-scale`)\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
