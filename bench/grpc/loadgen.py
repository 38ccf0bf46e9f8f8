"""The load generators: ghz (compiled Go, full gRPC client) and h2load (nghttp2, much lighter),
each run reduced to a Run with the server's and the generator's CPU time per call."""

from __future__ import annotations

import json
import re
import resource
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.grpc.servers import Server, pinned


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
