"""Decider server processes for the benchmark: started through launch.py (or any argv), ready
once they log "decider serving on", stopped on exit; their CPU time, RSS and connections read
from /proc; CPU pinning with taskset."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = Path(__file__).resolve().with_name("launch.py")


def pinned(argv: list[str], cpus: str | None) -> list[str]:
    """Runs argv on the given CPUs (taskset syntax) when pinning is asked for."""
    return ["taskset", "-c", cpus, *argv] if cpus else argv


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
