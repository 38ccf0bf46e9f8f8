"""`decider serve --workers N`: N server processes on one port, sharing state through Redis.

Each worker is a whole `decider serve` process (its own event loop and gRPC server) bound to
the same address with SO_REUSEPORT, so the kernel spreads new connections over them; a
connection, and every call on it, stays with one worker. The workers share the registry and
the fleet's state through the `[state]` backend, which must be "redis": with the memory
backend each worker would route from its own half-blind copy (its own registry, quotas,
sessions, breakers and load), so `--workers` refuses it.

The supervisor (this process) holds the port when the listen address asks for port 0, forwards
SIGTERM and SIGINT to every worker and waits for their drains. If a worker dies on its own,
the others are stopped and the supervisor exits 1: a process manager restarts the whole set.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from decider.config import Settings
from decider.config.listen import parse_listen
from decider.errors import ConfigError

log = logging.getLogger("decider.server")

MAX_WORKERS = 64
# Flags the supervisor sets per worker; the rest of the command line goes to every worker.
_PER_WORKER_FLAGS = ("--workers", "--listen", "--port-file", "--metrics-listen")
_START_TIMEOUT_S = 60.0
_STOP_MARGIN_S = 5.0


def check(workers: int, settings: Settings, *, demo: bool) -> None:
    """ConfigError when `--workers N` cannot run with these settings."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"flag --workers: {workers}, must be from 1 to {MAX_WORKERS}")
    if workers == 1:
        return
    if demo:
        raise ConfigError("flag --workers: not supported with --demo (one process)")
    if settings.ext_proc.listen:
        raise ConfigError(
            f"flag --workers {workers}: not supported with [ext_proc] listen yet (each worker "
            "would bind the ext_proc port); run one process per ext_proc listener"
        )
    if not settings.state.shared:
        raise ConfigError(
            f'flag --workers {workers}: needs [state] backend = "redis". With the memory '
            "backend each worker would keep its own registry, quotas, sessions, breakers and "
            "load, and route half-blind; run one process, or configure Redis (docs/SCALING.md)"
        )


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The command line without the flags the supervisor sets for each worker."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _PER_WORKER_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def supervise(
    argv: Sequence[str], settings: Settings, *, workers: int, port_file: str | None
) -> int:
    """Runs `workers` copies of `decider serve` until SIGTERM/SIGINT; the exit status."""
    # Here rather than at the top: the other CLI commands need none of the server.
    from decider.runtime.server import STOP_STEPS_S

    host, port = parse_listen(settings.server.listen, name="server.listen")
    holder: socket.socket | None = None
    if port == 0:
        # Bound, never listening: it only reserves the port the workers share.
        holder = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host, 0))
        port = holder.getsockname()[1]
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    metrics_host, metrics_port = (
        parse_listen(settings.server.metrics_listen, name="server.metrics_listen")
        if settings.server.metrics_listen
        else ("", -1)
    )
    base = worker_argv(argv)
    children: list[subprocess.Popen[bytes]] = []
    ready_files: list[Path] = []
    stopping = False
    # A worker still running this long after its SIGTERM is killed: its stop is bounded by the
    # grace period plus twice STOP_STEPS_S (the drain's overrun and the other steps), so it
    # is stuck.
    stop_within_s = settings.server.grace_period_s + 2 * STOP_STEPS_S + _STOP_MARGIN_S
    kill_at = math.inf

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping, kill_at
        if not stopping:
            kill_at = time.monotonic() + stop_within_s
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(workers):
            extra = ["--listen", listen, "--worker-index", str(index)]
            if metrics_port >= 0:
                # One /metrics per worker: the configured port, then the next ones.
                shifted = metrics_port + index if metrics_port else 0
                extra += ["--metrics-listen", f"{metrics_host}:{shifted}"]
            if port_file:
                ready = Path(f"{port_file}.worker{index}")
                ready.unlink(missing_ok=True)
                ready_files.append(ready)
                extra += ["--port-file", str(ready)]
            # A process group of its own: Ctrl-C reaches the supervisor alone, which forwards
            # one SIGTERM (a second signal would cut a worker's drain short).
            children.append(
                subprocess.Popen([sys.executable, "-m", "decider", *base, *extra], process_group=0)
            )
        log.info("supervising %d workers on %s (pids %s)", workers, listen,
                 ",".join(str(c.pid) for c in children))  # fmt: skip
        if port_file and _wait_ready(children, ready_files):
            _write_port_file(port_file, port)
        status = 0
        while any(child.poll() is None for child in children):
            died = [c for c in children if c.poll() is not None]
            if died and not stopping:
                log.error("worker pid %d exited %s; stopping the others", died[0].pid,
                          died[0].returncode)  # fmt: skip
                status = 1
                on_signal(signal.SIGTERM, None)
            if time.monotonic() > kill_at:
                for child in children:
                    if child.poll() is None:
                        log.error("worker pid %d still running %.0f s after SIGTERM; killed",
                                  child.pid, stop_within_s)  # fmt: skip
                        child.kill()
                status = 1
            time.sleep(0.1)
        if not stopping:
            status = 1
        return status
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for ready in ready_files:
            ready.unlink(missing_ok=True)
        if holder is not None:
            holder.close()


def _wait_ready(children: Sequence[subprocess.Popen[bytes]], ready: Sequence[Path]) -> bool:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not all(path.exists() for path in ready):
        if any(c.poll() is not None for c in children) or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _write_port_file(path: str, port: int) -> None:
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(f"{port}\n")
    os.replace(partial, path)
