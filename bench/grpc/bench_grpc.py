"""gRPC load benchmark: Decider as a gateway sees it, loaded by ghz (compiled Go), not Python.

    make bench-grpc        # or: .venv/bin/python bench/grpc/bench_grpc.py --ghz .tools/bin/ghz

On one server, alternating round by round: grpc.health.v1.Health/Check (the transport floor of
the same stack) and Decide (100 endpoints, composite strategy, sessions and prefix hashes so
session and cache affinity are exercised), each under concurrent load and serially, from ghz
and, when it is installed, from h2load (a lighter client); in the same rounds, the same ghz runs
against a second server whose Decide replays one answer (Decide's message sizes with no Python
work). Then a streaming Decide cost probe,
ReportOutcome throughput, 1000 concurrent HTTP/2 connections doing Decide with the server's RSS
and connections sampled, and the same calls on each server architecture (launch.py).
Before the load, 20 requests go through the gateway flow with decider_client (Decide, a failing
attempt, a fallback, ReportOutcome) on the same server. Every ghz run uses a fixed request
count (not a duration, which cuts calls off mid-flight) and must come back all grpc-status 0.

Writes bench/results/grpc_load.json, docs/img/grpc_latency.png and the "gRPC load" section of
docs/BENCHMARKS.md (between its markers; the other sections are left alone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = Path(__file__).resolve().with_name("launch.py")
RESULTS = ROOT / "bench" / "results" / "grpc_load.json"
PLOT = ROOT / "docs" / "img" / "grpc_latency.png"
DOC = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- grpc-load:begin -->", "<!-- grpc-load:end -->"

MODEL = "llama-3-8b"
ENDPOINTS = 100
CHECK = "grpc.health.v1.Health/Check"
DECIDE = "decider.v1.DeciderService/Decide"
REPORT = "decider.v1.DeciderService/ReportOutcome"
STREAM = "/decider.v1.DeciderService/DecideStream"
# ghz renders these per request: 1000 sessions, 16 shared system prompts, 256 conversations.
DECIDE_DATA = json.dumps(
    {
        "model": MODEL,
        "session_id": "session-{{mod .RequestNumber 1000}}",
        "tenant": "bench",
        "estimated_input_tokens": 800,
        "prefix_hashes": [
            "{{add 1000 (mod .RequestNumber 16)}}",
            "{{add 5000 (mod .RequestNumber 256)}}",
        ],
    }
)
REPORT_DATA = json.dumps(
    {
        "decision_id": "bench-{{.RequestNumber}}",
        "endpoint_id": "ep-{{mod .RequestNumber 100}}",
        "result": "RESULT_SUCCESS",
        "latency": "0.850s",
        "input_tokens": 800,
        "output_tokens": 120,
    }
)
CHECK_DATA = json.dumps({"service": ""})


def check_msg(i: int = 0) -> Any:
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckRequest(service="")


def decide_msg(i: int = 0) -> Any:
    """The binary twin of DECIDE_DATA's request number i, for h2load."""
    from decider.v1 import decider_service_pb2 as dpb

    return dpb.DecideRequest(
        model=MODEL,
        session_id=f"session-{i % 1000}",
        tenant="bench",
        estimated_input_tokens=800,
        prefix_hashes=[1000 + i % 16, 5000 + i % 256],
    )


# Percentiles ghz reports; the plot draws them all.
PERCENTILES = (10, 25, 50, 75, 90, 95, 99)


@dataclass
class Run:
    """One ghz run, reduced to what the report needs."""

    call: str
    concurrency: int
    connections: int
    count: int
    rps: float
    p50_ms: float
    p99_ms: float
    percentiles_ms: dict[int, float]
    status: dict[str, int]
    errors: dict[str, int]
    # Server CPU time (user + system, all its processes) per call during the run.
    server_cpu_us: float = 0.0
    # ghz's own CPU time per call: it shares the cores with the server.
    client_cpu_us: float = 0.0

    @property
    def ok(self) -> bool:
        # ghz reports grpc status names; h2load only HTTP classes (grpc-status is checked apart).
        good = "OK" if "OK" in self.status else "2xx"
        return set(self.status) == {good} and self.status[good] == self.count and not self.errors


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


# -- ghz ----------------------------------------------------------------------------------------


def pinned(argv: list[str], cpus: str | None) -> list[str]:
    """Runs argv on the given CPUs (taskset syntax) when pinning is asked for."""
    return ["taskset", "-c", cpus, *argv] if cpus else argv


class Ghz:
    def __init__(self, binary: str, protoset: Path) -> None:
        self.binary = binary
        self.protoset = protoset
        # CPUs the load generator is pinned to; None leaves it to the scheduler.
        self.cpus: str | None = None

    def run(
        self,
        srv: Server,
        call: str,
        data: str,
        *,
        n: int,
        c: int,
        conns: int,
        timeout_s: float = 20,
    ) -> Run:
        cpu_before, client_before = srv.cpu_s(), _children_cpu_s()
        run = self._run(srv.addr, call, data, n=n, c=c, conns=conns, timeout_s=timeout_s)
        run.server_cpu_us = (srv.cpu_s() - cpu_before) / max(run.count, 1) * 1e6
        run.client_cpu_us = (_children_cpu_s() - client_before) / max(run.count, 1) * 1e6
        if not run.ok:
            srv.dump_log(f"{run.call} c={c} failed")
        return run

    def _run(
        self, addr: str, call: str, data: str, *, n: int, c: int, conns: int, timeout_s: float
    ) -> Run:
        argv = [
            self.binary, "--insecure", "--protoset", str(self.protoset), "--call", call,
            "-d", data, "-n", str(n), "-c", str(c), "--connections", str(conns),
            "--timeout", f"{timeout_s}s", "--connect-timeout", "20s", "-O", "json", addr,
        ]  # fmt: skip
        out = subprocess.run(
            pinned(argv, self.cpus), capture_output=True, text=True, check=False, timeout=600
        )
        if not out.stdout.strip():
            raise RuntimeError(f"ghz failed: {out.stderr.strip()}")
        doc = json.loads(out.stdout)
        pct = {
            int(p["percentage"]): p["latency"] / 1e6 for p in doc.get("latencyDistribution") or []
        }
        return Run(
            call=call.rsplit("/", 1)[-1],
            concurrency=c,
            connections=conns,
            count=int(doc["count"]),
            rps=float(doc["rps"]),
            p50_ms=pct.get(50, 0.0),
            p99_ms=pct.get(99, 0.0),
            percentiles_ms=pct,
            status=dict(doc.get("statusCodeDistribution") or {}),
            errors=dict(doc.get("errorDistribution") or {}),
        )


class H2load:
    """nghttp2's h2load: a much lighter client than ghz, for requests/s and server CPU only.

    It sends one pre-encoded gRPC body (length-prefixed messages) per request and sees HTTP
    status only, so grpc-status 0 is checked separately (check_grpc_status)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.cpus: str | None = None

    def run(
        self, srv: Server, path: str, messages: list[Any], *, n: int, conns: int, streams: int
    ) -> Run:
        body = self.workdir / f"{path.strip('/').replace('/', '_')}-{len(messages)}.bin"
        body.write_bytes(b"".join(grpc_frame(m) for m in messages))
        argv = [
            self.binary, "-n", str(n), "-c", str(conns), "-m", str(streams), "-d", str(body),
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            f"http://{srv.addr}{path}",
        ]  # fmt: skip
        cpu_before, client_before = srv.cpu_s(), _children_cpu_s()
        out = subprocess.run(
            pinned(argv, self.cpus), capture_output=True, text=True, check=False, timeout=600
        )
        text = out.stdout
        rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
        done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", text)
        codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
        if not (rps and done and codes):
            raise RuntimeError(f"h2load failed: {text[-500:]} {out.stderr[-500:]}")
        count = int(done.group(1))
        status = {
            k: int(v)
            for k, v in zip(("2xx", "3xx", "4xx", "5xx"), codes.groups(), strict=True)
            if int(v)
        }
        failed = count - int(done.group(2))
        run = Run(
            call=path.rsplit("/", 1)[-1],
            concurrency=conns * streams,
            connections=conns,
            count=count,
            rps=float(rps.group(1)),
            p50_ms=0.0,
            p99_ms=0.0,
            percentiles_ms={},
            status=status,
            errors={"failed": failed} if failed else {},
        )
        per = max(count * len(messages), 1)
        run.server_cpu_us = (srv.cpu_s() - cpu_before) / per * 1e6
        run.client_cpu_us = (_children_cpu_s() - client_before) / per * 1e6
        return run


def grpc_frame(message: Any) -> bytes:
    data = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(data)) + data


def check_grpc_status(addr: str, path: str, messages: list[Any], response: Any) -> str:
    """One call with exactly what h2load sends; returns "" when it ends in grpc-status 0."""
    import grpc

    with grpc.insecure_channel(addr) as channel:
        if len(messages) == 1 and "Stream" not in path:
            call = channel.unary_unary(path, lambda m: m.SerializeToString(), response.FromString)
            try:
                call(messages[0], timeout=10)
            except grpc.RpcError as err:
                return f"{path}: {err.code().name} {err.details()}"
            return ""
        stream = channel.stream_stream(path, lambda m: m.SerializeToString(), response.FromString)
        try:
            got = list(stream(iter(messages), timeout=10))
        except grpc.RpcError as err:
            return f"{path}: {err.code().name} {err.details()}"
        if len(got) != len(messages):
            return f"{path}: {len(got)} of {len(messages)} answers"
        refused = [a for a in got if a.WhichOneof("result") == "error"]
        return f"{path}: {len(refused)} answers are errors: {refused[0].error}" if refused else ""


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def write_protoset(path: Path) -> None:
    """A FileDescriptorSet for ghz from the generated modules (no reflection round trips)."""
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2

    from decider.v1 import decider_service_pb2

    files = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(fd: Any) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        files.file.append(proto)

    add(decider_service_pb2.DESCRIPTOR)
    add(health_pb2.DESCRIPTOR)
    path.write_bytes(files.SerializeToString())


# -- the server ---------------------------------------------------------------------------------


def write_config(path: Path) -> None:
    lines = ["[routing]", 'default_strategy = "composite"', ""]
    for i in range(ENDPOINTS):
        lines += [
            "[[endpoints]]",
            f'id = "ep-{i}"',
            f'address = "10.0.{i // 200}.{i % 200 + 1}:8000"',
            f'model = "{MODEL}"',
            "",
        ]
    path.write_text("\n".join(lines))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[str]
    addr: str
    log: list[str] = field(default_factory=list)

    def dump_log(self, why: str) -> None:
        print(f"--- {why}; server log tail:\n" + "".join(self.log[-30:]), file=sys.stderr)

    def pids(self) -> list[int]:
        """The server process and, for multi-process variants, its children."""
        pids = [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        return pids

    def cpu_s(self) -> float:
        """User + system CPU seconds the server's processes have used so far."""
        ticks = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # utime and stime are fields 14 and 15 of /proc/PID/stat (proc(5)).
            ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        total_kb = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
            total_kb += int(m.group(1)) if m else 0
        return total_kb / 1024


@contextmanager
def server(
    arch: str,
    config: Path,
    *,
    processes: int = 1,
    cpus: str | None = None,
    replay_decide: bool = False,
) -> Iterator[Server]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DECIDER_LOG_LEVEL": "WARNING"}
    argv = [sys.executable, str(LAUNCH), "--arch", arch, "--config", str(config)]
    argv += ["--listen", f"127.0.0.1:{port}", "--processes", str(processes)]
    if replay_decide:
        argv.append("--replay-decide")
    with running_server(pinned(argv, cpus), env, name=arch, port=port, ready=processes) as srv:
        yield srv


@contextmanager
def running_server(
    argv: list[str], env: dict[str, str], *, name: str, port: int, ready: int = 1
) -> Iterator[Server]:
    """Starts a server process and yields once `ready` processes logged "decider serving on";
    stops it on exit."""
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        serving = 0
        log: list[str] = []
        deadline = time.monotonic() + 60
        assert proc.stderr is not None
        while serving < ready:
            line = proc.stderr.readline()
            if not line:
                raise RuntimeError(f"{name}: server exited before serving:\n{''.join(log)}")
            log.append(line)
            if "decider serving on" in line:
                serving += 1
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: server not ready in 60 s:\n{''.join(log)}")
        srv = Server(proc=proc, addr=f"127.0.0.1:{port}", log=log)
        threading.Thread(target=_drain, args=(proc, log), daemon=True).start()
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _drain(proc: subprocess.Popen[str], log: list[str]) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        log.append(line)
        del log[:-200]


def established(port: int) -> int:
    """TCP connections in ESTABLISHED state on the server's side of `port` (/proc/net/tcp)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 01 is ESTABLISHED.
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


class RssSampler:
    """Samples the server's RSS and open connections every 100 ms in a thread; keeps peaks."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.peak_mb = 0.0
        self.peak_connections = 0
        self._port = int(srv.addr.rsplit(":", 1)[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_mb = max(self.peak_mb, self.srv.rss_mb())
            self.peak_connections = max(self.peak_connections, established(self._port))


# -- the phases ---------------------------------------------------------------------------------


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
    from decider_client import Attempt, DeciderClient

    tries: list[str] = []

    async def attempt(ep: epb.Endpoint) -> Attempt:
        tries.append(ep.id)
        if len(tries) == 1:
            return Attempt(result=dpb.RESULT_ERROR, error="scripted failure")
        return Attempt(result=dpb.RESULT_SUCCESS, input_tokens=800, output_tokens=120)

    async with DeciderClient(addr, decide_timeout_s=5) as client:
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


# -- the report ---------------------------------------------------------------------------------


def median(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def summary(res: Results) -> dict[str, float]:
    get = lambda key: [r[key] for r in res.rounds]  # noqa: E731
    s = {
        "check_rps": median(get("check"), "rps"),
        "decide_rps": median(get("decide"), "rps"),
        "check_p50_ms": median(get("check"), "p50_ms"),
        "decide_p50_ms": median(get("decide"), "p50_ms"),
        "check_p99_ms": median(get("check"), "p99_ms"),
        "decide_p99_ms": median(get("decide"), "p99_ms"),
        "check_serial_p50_ms": median(get("check_serial"), "p50_ms"),
        "decide_serial_p50_ms": median(get("decide_serial"), "p50_ms"),
        "check_serial_p99_ms": median(get("check_serial"), "p99_ms"),
        "decide_serial_p99_ms": median(get("decide_serial"), "p99_ms"),
        "check_cpu_us": median(get("check"), "server_cpu_us"),
        "decide_cpu_us": median(get("decide"), "server_cpu_us"),
    }
    if "check_h2load" in res.rounds[0]:
        for name in ("check", "decide"):
            s[f"{name}_h2load_rps"] = median(get(f"{name}_h2load"), "rps")
            s[f"{name}_h2load_cpu_us"] = median(get(f"{name}_h2load"), "server_cpu_us")
        s["h2load_throughput_ratio"] = s["decide_h2load_rps"] / s["check_h2load_rps"]
    s["throughput_ratio"] = s["decide_rps"] / s["check_rps"]
    s["serial_p50_ratio"] = s["decide_serial_p50_ms"] / s["check_serial_p50_ms"]
    if res.replay:
        rep = lambda key: [r[key] for r in res.replay]  # noqa: E731
        s["replay_throughput_ratio"] = median(rep("decide"), "rps") / median(rep("check"), "rps")
        s["replay_serial_p50_ratio"] = median(rep("decide_serial"), "p50_ms") / median(
            rep("check_serial"), "p50_ms"
        )
        s["replay_cpu_ratio"] = median(rep("decide"), "server_cpu_us") / median(
            rep("check"), "server_cpu_us"
        )
    return s


def plot(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, suffix, title in (
        (axes[0], "", "under load"),
        (axes[1], "_serial", "serial (1 in flight)"),
    ):
        for key, label, style in (
            (f"check{suffix}", "Health/Check (floor)", "o--"),
            (f"decide{suffix}", "Decide", "s-"),
        ):
            ps = list(PERCENTILES)
            ys = [
                statistics.median(r[key].percentiles_ms.get(p, 0.0) for r in res.rounds) for p in ps
            ]
            ax.plot([str(p) for p in ps], ys, style, label=label)
        ax.set_title(f"Latency percentiles, {title}")
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    c = res.rounds[0]["check"]
    fig.suptitle(
        f"Decider gRPC: Decide ({ENDPOINTS} endpoints, composite, affinity) vs transport floor; "
        f"ghz c={c.concurrency} over {c.connections} connections"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(res: Results, args: argparse.Namespace) -> str:
    s = summary(res)
    m, ro = res.many_connections, res.report_outcome
    assert m is not None and ro is not None
    c = res.rounds[0]["check"]
    tp = "meets" if s["throughput_ratio"] >= 0.85 else "misses"
    lat = "meets" if s["serial_p50_ratio"] <= 1.15 else "misses"
    mach = res.machine
    lines = [
        BEGIN,
        "## gRPC load",
        "",
        "Decider as a gateway sees it: the real server loaded by [ghz](https://ghz.sh) (compiled "
        f"Go, version pinned in the Makefile), {ENDPOINTS} endpoints of one model, the composite "
        "strategy, and requests carrying a session id (1000 sessions) and prefix hashes (16 shared "
        "system prompts x 256 conversations), so session and cache affinity are exercised.",
        "",
        "```",
        "make bench-grpc   # = .venv/bin/python bench/grpc/bench_grpc.py --ghz .tools/bin/ghz",
        "```",
        "",
        f"Machine: {mach['cpus']} vCPU ({mach['cpu']}), {mach['python']}, grpcio {mach['grpcio']}. "
        + (
            "The server is pinned to core 0 and the load generator to core 1 (taskset). "
            if mach.get("pinned")
            else "The load generator shares the cores with the server. "
        )
        + "Other work shared the machine, so requests/s are a lower bound; server CPU per call "
        "(from /proc) is the steadier number. "
        f"Main run: `{args.arch}` server (what `decider serve` runs), medians of {len(res.rounds)} "
        "rounds in which Check and Decide alternate on the same server; under load = ghz "
        f"`-c {c.concurrency} --connections {c.connections}`; serial = one call in flight.",
        "",
        _row("", "Health/Check (floor)", "Decide", "Decide / floor"),
        _row("---", "---:", "---:", "---:"),
        _row(
            "requests/s under load",
            f"{s['check_rps']:.0f}",
            f"{s['decide_rps']:.0f}",
            f"{s['throughput_ratio']:.2f} (target >= 0.85: {tp})",
        ),
    ]
    for label, key, fmt in (
        ("p50 under load (ms)", "p50_ms", ".2f"),
        ("p99 under load (ms)", "p99_ms", ".2f"),
        ("serial p50 (ms)", "serial_p50_ms", ".3f"),
        ("serial p99 (ms)", "serial_p99_ms", ".3f"),
        ("server CPU per call (us)", "cpu_us", ".0f"),
    ):
        floor, decide = s[f"check_{key}"], s[f"decide_{key}"]
        ratio = f"{decide / floor:.2f}"
        if key == "serial_p50_ms":
            ratio += f" (target <= 1.15: {lat})"
        lines.append(_row(label, f"{floor:{fmt}}", f"{decide:{fmt}}", ratio))
    if "check_h2load_rps" in s:
        h2 = res.rounds[0]["check_h2load"]
        lines += [
            "",
            f"The same pair from h2load (nghttp2, a much lighter client than ghz: "
            f"`-c {h2.connections} -m {h2.concurrency // h2.connections}`, one fixed request "
            "each, grpc-status 0 checked with a separate call):",
            "",
            _row("", "Health/Check (floor)", "Decide", "Decide / floor"),
            _row("---", "---:", "---:", "---:"),
            _row(
                "requests/s (h2load)",
                f"{s['check_h2load_rps']:.0f}",
                f"{s['decide_h2load_rps']:.0f}",
                f"{s['h2load_throughput_ratio']:.2f}",
            ),
            _row(
                "server CPU per call (us)",
                f"{s['check_h2load_cpu_us']:.0f}",
                f"{s['decide_h2load_cpu_us']:.0f}",
                f"{s['decide_h2load_cpu_us'] / s['check_h2load_cpu_us']:.2f}",
            ),
        ]
    if res.replay:
        rep = lambda key: [r[key] for r in res.replay]  # noqa: E731
        lines += [
            "",
            "**The floor for Decide's messages.** The same comparison against a server whose "
            "Decide replays its first answer, doing no Python work per call "
            "(`launch.py --replay-decide`, a second server measured in the same rounds, "
            f"medians of {len(res.replay)} rounds): what Decide's "
            "larger request and response cost the transport and ghz, which no change to the "
            "Decide path can remove.",
            "",
            _row("", "Health/Check", "replayed Decide", "replayed / Check", "real Decide / Check"),
            _row("---", "---:", "---:", "---:", "---:"),
            _row(
                "requests/s under load",
                f"{median(rep('check'), 'rps'):.0f}",
                f"{median(rep('decide'), 'rps'):.0f}",
                f"{s['replay_throughput_ratio']:.2f}",
                f"{s['throughput_ratio']:.2f}",
            ),
            _row(
                "serial p50 (ms)",
                f"{median(rep('check_serial'), 'p50_ms'):.3f}",
                f"{median(rep('decide_serial'), 'p50_ms'):.3f}",
                f"{s['replay_serial_p50_ratio']:.2f}",
                f"{s['serial_p50_ratio']:.2f}",
            ),
            _row(
                "server CPU per call (us)",
                f"{median(rep('check'), 'server_cpu_us'):.0f}",
                f"{median(rep('decide'), 'server_cpu_us'):.0f}",
                f"{s['replay_cpu_ratio']:.2f}",
                f"{s['decide_cpu_us'] / s['check_cpu_us']:.2f}",
            ),
        ]
    if res.stream:
        st = res.stream
        lines += [
            "",
            f"**Streaming Decide** (DecideStream on the same server, "
            f"{st['messages_per_stream']:.0f} decisions per stream, h2load, every answer checked "
            f"to be a decision): {st['stream_cpu_us']:.0f} us of server CPU per decision against "
            f"{st['unary_cpu_us']:.0f} us for unary Decide, so "
            f"{1e6 / st['stream_cpu_us']:.0f} vs {1e6 / st['unary_cpu_us']:.0f} decisions/s per "
            f"core ({st['unary_cpu_us'] / st['stream_cpu_us']:.1f}x); "
            f"{st['stream_decisions_per_s']:.0f} vs {st['unary_decisions_per_s']:.0f} decisions/s "
            "measured here.",
        ]
    errors = sum(m.errors.values())
    lines += [
        "",
        "Every ghz run is checked for grpc-status 0 on every call: "
        + ("all OK." if not res.failures else "see the failures below.")
        + " Before the load, 20 requests go through the whole gateway flow with decider_client "
        "(the first endpoint fails, a fallback answers, every outcome is reported).",
        "",
        f"- **ReportOutcome**: {ro.rps:.0f} requests/s, p50 {ro.p50_ms:.2f} ms, "
        f"p99 {ro.p99_ms:.2f} ms, {ro.server_cpu_us:.0f} us server CPU per call.",
        f"- **{m.connections} concurrent HTTP/2 connections** doing Decide, one call in flight on "
        f"each ({m.count} calls; the server saw {res.peak_connections} established at once): "
        f"{m.rps:.0f} requests/s, p50 {m.p50_ms:.1f} ms, p99 "
        f"{m.p99_ms:.1f} ms, status {', '.join(f'{k} {v}' for k, v in m.status.items())}, "
        f"{errors} errors.",
        f"- **Server RSS**: {res.rss_idle_mb:.0f} MB idle with {ENDPOINTS} endpoints, peak "
        f"{res.rss_peak_mb:.0f} MB during the {m.connections}-connection run.",
        "",
        "![Latency percentiles, Health/Check vs Decide](img/grpc_latency.png)",
        "",
    ]
    if res.architectures:
        h2 = "check_h2load" in next(iter(res.architectures.values()))
        lines += [
            "### Server architectures",
            "",
            "The same calls on each architecture, built by bench/grpc/launch.py from the server's "
            "own parts. Requests/s and server CPU per call come from "
            + ("h2load (`-c 8 -m 4`)" if h2 else f"ghz ({args.arch_calls} calls)")
            + "; latencies from ghz under load and serially. Each cell is the median of "
            + f"{args.arch_rounds} rounds over all the variants, in alternating order:",
            "",
            _row(
                "architecture",
                "Check req/s",
                "Decide req/s",
                "Decide / Check",
                "server CPU us per Check / Decide",
                "Decide p50 / p99 (ms)",
                "serial Decide p50 (ms)",
                "RSS (MB)",
            ),
            _row("---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"),
        ]
        for label, runs in res.architectures.items():
            check_ = runs["check_h2load" if h2 else "check"]
            decide_ = runs["decide_h2load" if h2 else "decide"]
            d = runs["decide"]
            lines.append(
                _row(
                    label,
                    f"{check_.rps:.0f}",
                    f"{decide_.rps:.0f}",
                    f"{decide_.rps / check_.rps:.2f}",
                    f"{check_.server_cpu_us:.0f} / {decide_.server_cpu_us:.0f}",
                    f"{d.p50_ms:.2f} / {d.p99_ms:.2f}",
                    f"{runs['decide_serial'].p50_ms:.3f}",
                    f"{res.architecture_rss_mb.get(label, 0.0):.0f}",
                )
            )
        lines.append("")
    if res.failures:
        lines += ["Failures:", "", *[f"- {f}" for f in res.failures], ""]
    if res.notes:
        lines += ["Notes:", "", *[f"- {f}" for f in res.notes], ""]
    lines.append(END)
    return "\n".join(lines)


def update_doc(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)


def check(res: Results) -> None:
    runs: list[Run] = [r for round_ in res.rounds + res.replay for r in round_.values()]
    runs += [r for arch in res.architectures.values() for r in arch.values()]
    runs += [r for r in (res.report_outcome, res.many_connections) if r is not None]
    for r in runs:
        if not r.ok:
            res.failures.append(f"{r.call} c={r.concurrency}: status {r.status}, errors {r.errors}")


def main() -> int:
    parser = argparse.ArgumentParser(description="gRPC load benchmark (ghz)")
    parser.add_argument(
        "--ghz", default=shutil.which("ghz") or str(ROOT / ".tools" / "bin" / "ghz")
    )
    parser.add_argument(
        "--arch", default="uvloop", choices=("aio", "uvloop", "sync"), help="main run's server"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="target length of one phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument(
        "--many", type=int, default=1000, help="connections in the many-connections run"
    )
    parser.add_argument("--arch-calls", type=int, default=4000)
    parser.add_argument("--arch-rounds", type=int, default=3, help="rounds over the variants")
    parser.add_argument("--skip-architectures", action="store_true")
    parser.add_argument("--skip-replay", action="store_true", help="no replayed-Decide floor")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="main run: do not pin server/client"
    )
    parser.add_argument("--h2load", default=shutil.which("h2load") or "", help="'' to skip h2load")
    parser.add_argument("--h2load-calls", type=int, default=6000)
    parser.add_argument("--stream-messages", type=int, default=100)
    parser.add_argument(
        "--no-doc", action="store_true", help="write nothing: no doc, plot or results file"
    )
    args = parser.parse_args()
    if not Path(args.ghz).exists():
        print(f"ghz not found at {args.ghz}: run `make bench-grpc` (it installs the pinned ghz)")
        return 2

    import grpc

    res = Results()
    res.machine = {
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": f"Python {platform.python_version()}",
        "grpcio": grpc.__version__,
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="decider-bench-") as tmp:
        config, protoset = Path(tmp) / "bench.toml", Path(tmp) / "decider.protoset"
        write_config(config)
        write_protoset(protoset)
        ghz = Ghz(args.ghz, protoset)
        h2load = H2load(args.h2load, Path(tmp)) if args.h2load else None
        if h2load is None:
            res.notes.append("h2load (nghttp2-client) not found: its runs were skipped")
        main_run(ghz, h2load, config, args, res)
        if not args.skip_architectures:
            architectures(ghz, h2load, config, args, res)
    check(res)
    elapsed = time.monotonic() - started

    section = markdown(res, args)
    print(section)
    if args.no_doc:
        print(f"\n{elapsed:.0f} s (--no-doc: results, plot and doc left as they were)")
        return 1 if res.failures else 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"summary": summary(res), **asdict(res), "elapsed_s": elapsed}, indent=1, default=str
        )
    )
    plot(res, PLOT)
    update_doc(section)
    print(f"\n{elapsed:.0f} s; wrote {RESULTS.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")
    return 1 if res.failures else 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
