"""Real Decider replicas for the shared-state tests: `decider serve` processes on loopback.

Each replica reads its own TOML file, binds 127.0.0.1:0 and writes its port to a file; the
test reaches it over real gRPC. Replicas are stopped by pid: `stop()` is SIGTERM (a drain),
`kill()` is SIGKILL (a crash).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from decider.v1 import decider_service_pb2_grpc as dgrpc
from decider.v1 import registry_service_pb2_grpc as rgrpc

START_TIMEOUT_S = 90.0


def toml(doc: Mapping[str, Any]) -> str:
    """Just enough TOML for the tests' documents: tables, arrays of tables, scalars, lists."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return repr(v)

    for name, table in doc.items():
        if isinstance(table, list):
            for item in table:
                lines.append(f"[[{name}]]")
                lines.extend(f"{k} = {value(v)}" for k, v in item.items())
        else:
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


class Replica:
    def __init__(self, directory: Path, doc: Mapping[str, Any], *, name: str) -> None:
        self.directory = directory / name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.config = self.directory / "decider.toml"
        self.config.write_text(toml(doc))
        self.port_file = self.directory / "port"
        self.log = self.directory / "decider.log"
        self.port = 0
        # The latest process's pid, kept after it is stopped or killed.
        self.pid = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: grpc.aio.Channel | None = None
        self.decider: dgrpc.DeciderServiceAsyncStub
        self.registry: rgrpc.RegistryServiceAsyncStub

    def _spawn(self, extra: tuple[str, ...]) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:
            return subprocess.Popen(
                [
                    sys.executable, "-m", "decider", "serve",
                    "--config", str(self.config),
                    "--listen", "127.0.0.1:0",
                    "--grace-period-s", "1",
                    "--port-file", str(self.port_file),
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip

    async def start(self, *extra: str) -> Replica:
        self.port_file.unlink(missing_ok=True)
        self._process = self._spawn(extra)
        self.pid = self._process.pid
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.port_file.exists():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"replica {self.name} did not start:\n{self.logs()[-3000:]}")
            await asyncio.sleep(0.05)
        self.port = int(self.port_file.read_text())
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.decider = dgrpc.DeciderServiceStub(self._channel)  # type: ignore[arg-type]
        self.registry = rgrpc.RegistryServiceStub(self._channel)  # type: ignore[arg-type]
        return self

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def stop(self) -> None:
        """SIGTERM by pid, then wait for the drain (SIGKILL if it never ends)."""
        await self._close_channel()
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def kill(self) -> None:
        """SIGKILL by pid: the replica dies without draining."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    async def _close_channel(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


async def eventually(
    check: Callable[[], Any], *, timeout_s: float = 10.0, interval_s: float = 0.02
) -> float:
    """Awaits `check()` until it returns truthy; the seconds that took. A generous bound, not a
    timing assertion: the figures Decider aims for are measured by bench/scale."""
    start = time.monotonic()
    last: Any = None
    while time.monotonic() - start < timeout_s:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return time.monotonic() - start
        await asyncio.sleep(interval_s)
    raise AssertionError(f"not true within {timeout_s} s (last: {last!r})")
