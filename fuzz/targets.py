"""Fuzz targets: each RPC's request path (bytes -> decode -> validate -> engine -> encode) and the
TOML config loader, as plain functions of bytes that raise `Crash` on a finding.

The RPCs run through the real servicers, engine, registry and watch hub in-process (no sockets,
so a run does tens of thousands of inputs a second). A finding is anything a client could see
as a server fault: an exception escaping a servicer, an INTERNAL status (an unexpected exception
the error mapper caught), an answer that does not parse back, or a DecideStream answer that
lost its correlation id. A config finding is any exception other than a ConfigError naming the
file. `fuzz/run.py` drives these under atheris; tests replay the seeds and every regression.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from decider import config
from decider.api.decider_service import DeciderService
from decider.api.registry_service import RegistryService
from decider.codec.convert import health_event_from_state
from decider.core.engine import Engine
from decider.core.model import Endpoint, HealthEvent
from decider.errors import ConfigError
from decider.state.registry import Registry
from decider.state.watch import WatchHub
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb

# Codes a request can legitimately end with; INTERNAL or UNKNOWN means a fault.
EXPECTED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
# The registry is reset past this many endpoints, so a long run stays small.
MAX_REGISTERED = 64
# Messages a DecideStream input carries at most.
MAX_STREAM_MESSAGES = 4

STACK_CONFIG = """
[routing]
in_flight_timeout_s = 30
[quotas.tenants.metered]
requests_per_minute = 30
tokens_per_minute = 5000
[affinity]
max_sessions = 100
[cache]
blocks_per_endpoint = 64
[[endpoints]]
id = "a"
address = "10.0.0.1:8000"
model = "m"
capabilities = ["tools"]
[[endpoints]]
id = "b"
address = "10.0.0.2:8000"
model = "m"
max_in_flight = 3
requests_per_minute = 100
[[endpoints]]
id = "c"
address = "10.0.0.3:8000"
model = "n"
health_url = "http://10.0.0.3/health"
"""


class Crash(AssertionError):
    """A finding: the input made the server fail in a way a client would see as a fault."""


class Aborted(grpc.aio.AbortError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class _Context:
    """The slice of grpc.aio.ServicerContext the servicers use."""

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        raise Aborted(code, details)

    def invocation_metadata(self) -> tuple[()]:
        return ()


def _context() -> Any:
    return _Context()


class Stack:
    """The servicers over a real engine, registry and watch hub, with a clock one second
    ahead per call (so in-flight decisions expire and breakers half-open during a run)."""

    def __init__(self) -> None:
        settings = config.parse(_toml(STACK_CONFIG), source="fuzz.toml")
        self.settings = settings
        self.now = 1000.0
        self.hub = WatchHub(self._snapshot, queue_size=8, max_watchers=4)
        self.engine = Engine(settings.engine, rng=random.Random(0), on_event=self.hub.publish)
        self.registry = Registry(settings.endpoints, store=None)
        self.registry.subscribe(self._on_membership)
        self._on_membership(self.registry.snapshot())
        self.decider = DeciderService(self.engine, self.hub, clock=self.clock)
        self.admin = RegistryService(self.registry, self.engine, clock=self.clock)
        self.loop = asyncio.new_event_loop()

    def clock(self) -> float:
        return self.now

    def _on_membership(self, endpoints: Sequence[Endpoint]) -> None:
        self.engine.set_endpoints(endpoints, now=self.now)

    def _snapshot(self, model: str) -> list[HealthEvent]:
        states = self.engine.endpoint_states(model=model, now=self.now)
        return [health_event_from_state(s) for s in states]

    def step(self) -> None:
        self.now += 1.0
        self.engine.tick(now=self.now)

    def close(self) -> None:
        self.loop.close()


def _toml(text: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(text)


_stack: Stack | None = None


def stack() -> Stack:
    """One stack per process, rebuilt when fuzzed registrations have grown it."""
    global _stack
    if _stack is None or len(_stack.registry.snapshot()) > MAX_REGISTERED:
        if _stack is not None:
            _stack.close()
        _stack = Stack()
    return _stack


# -- RPC targets -----------------------------------------------------------------------------


def _expect_status(exc: Aborted, rpc: str) -> None:
    if exc.code not in EXPECTED_CODES:
        raise Crash(f"{rpc}: {exc.code.name}: {exc.details}") from exc


def _run(s: Stack, rpc: str, coro: Any) -> Any:
    try:
        return s.loop.run_until_complete(coro)
    except Aborted as exc:
        _expect_status(exc, rpc)
        return None
    except Crash:
        raise
    except Exception as exc:
        raise Crash(f"{rpc}: {type(exc).__name__}: {exc}") from exc


def _parse(cls: Any, data: bytes) -> Any:
    """Decode as grpc's deserializer would; None for bytes protobuf rejects (grpc answers
    those itself, before any Decider code runs)."""
    try:
        return cls.FromString(data)
    except DecodeError:
        return None


def decide(data: bytes) -> None:
    s = stack()
    request = _parse(dpb.DecideRequest, data)
    if request is None:
        return
    answer = _run(s, "Decide", s.decider.Decide(request, _context()))
    if answer is None:
        return
    try:
        response = dpb.DecideResponse.FromString(answer)
    except DecodeError as exc:
        raise Crash(f"Decide answered bytes that do not parse: {exc}") from exc
    if not response.endpoint.id or s.registry.get(response.endpoint.id) is None:
        raise Crash(f"Decide chose an unregistered endpoint: {response.endpoint.id!r}")
    if bool(response.decision_id) == request.explain:
        raise Crash(f"Decide: decision_id {response.decision_id!r} with explain={request.explain}")


def report_outcome(data: bytes) -> None:
    s = stack()
    request = _parse(dpb.ReportOutcomeRequest, data)
    if request is None:
        return
    _run(s, "ReportOutcome", s.decider.ReportOutcome(request, _context()))


def decide_stream(data: bytes) -> None:
    s = stack()
    messages = []
    for chunk in _split(data, MAX_STREAM_MESSAGES):
        message = _parse(dpb.DecideStreamRequest, chunk)
        if message is not None:
            messages.append(message)

    async def requests() -> AsyncIterator[dpb.DecideStreamRequest]:
        for message in messages:
            yield message

    async def collect() -> list[bytes]:
        return [answer async for answer in s.decider.DecideStream(requests(), _context())]

    answers = _run(s, "DecideStream", collect()) or []
    if len(answers) != len(messages):
        raise Crash(f"DecideStream: {len(answers)} answers to {len(messages)} requests")
    for message, answer in zip(messages, answers, strict=True):
        try:
            response = dpb.DecideStreamResponse.FromString(answer)
        except DecodeError as exc:
            raise Crash(f"DecideStream answered bytes that do not parse: {exc}") from exc
        if response.correlation_id != message.correlation_id:
            raise Crash("DecideStream: correlation id not echoed")
        if response.HasField("error"):
            code = _code(response.error.code)
            if code not in EXPECTED_CODES:
                raise Crash(f"DecideStream: {code}: {response.error.message}")
        elif not response.decide.endpoint.id:
            raise Crash("DecideStream: an answer with neither a decision nor an error")


def watch_health(data: bytes) -> None:
    s = stack()
    request = _parse(dpb.WatchHealthRequest, data)
    if request is None:
        return

    async def first_batch() -> dpb.WatchHealthResponse:
        stream: Any = s.decider.WatchHealth(request, _context())
        try:
            response: dpb.WatchHealthResponse = await anext(stream)
            return response
        finally:
            await stream.aclose()

    response = _run(s, "WatchHealth", first_batch())
    if response is not None and not response.snapshot:
        raise Crash("WatchHealth: the first batch is not a snapshot")


def register_endpoint(data: bytes) -> None:
    s = stack()
    request = _parse(rpb.RegisterEndpointRequest, data)
    if request is None:
        return
    response = _run(s, "RegisterEndpoint", s.admin.RegisterEndpoint(request, _context()))
    if response is not None and s.registry.get(response.endpoint.id) is None:
        raise Crash("RegisterEndpoint acknowledged an endpoint the registry does not hold")


def deregister_endpoint(data: bytes) -> None:
    s = stack()
    request = _parse(rpb.DeregisterEndpointRequest, data)
    if request is None:
        return
    _run(s, "DeregisterEndpoint", s.admin.DeregisterEndpoint(request, _context()))


def list_endpoints(data: bytes) -> None:
    s = stack()
    request = _parse(rpb.ListEndpointsRequest, data)
    if request is None:
        return
    response = _run(s, "ListEndpoints", s.admin.ListEndpoints(request, _context()))
    if response is not None:
        rpb.ListEndpointsResponse.FromString(response.SerializeToString())


def report_probe_results(data: bytes) -> None:
    s = stack()
    request = _parse(rpb.ReportProbeResultsRequest, data)
    if request is None:
        return
    _run(s, "ReportProbeResults", s.admin.ReportProbeResults(request, _context()))


RPCS: tuple[Callable[[bytes], None], ...] = (
    decide,
    report_outcome,
    decide_stream,
    watch_health,
    register_endpoint,
    deregister_endpoint,
    list_endpoints,
    report_probe_results,
)


def rpc(data: bytes) -> None:
    """The first byte picks the RPC, the rest is its request message. Every call moves the
    stack's clock a second on and runs the engine's housekeeping."""
    if not data:
        return
    s = stack()
    RPCS[data[0] % len(RPCS)](data[1:])
    s.step()


def _split(data: bytes, most: int) -> list[bytes]:
    """Length-prefixed chunks: one length byte, then that many bytes."""
    chunks: list[bytes] = []
    while data and len(chunks) < most:
        n = data[0]
        chunks.append(data[1 : 1 + n])
        data = data[1 + n :]
    return chunks


def _code(number: int) -> grpc.StatusCode | int:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return number


# -- config target ---------------------------------------------------------------------------

_config_dir: str | None = None


def config_file(data: bytes) -> None:
    """The bytes as a config file, through the same loader `decider serve --config` uses."""
    global _config_dir
    if _config_dir is None:
        _config_dir = tempfile.mkdtemp(prefix="decider-fuzz-")
    path = Path(_config_dir) / "decider.toml"
    path.write_bytes(data)
    try:
        config.load(path, env={}, flags={})
    except ConfigError as exc:
        if str(path) not in str(exc):
            raise Crash(f"config error that does not name the file: {exc}") from exc
    except Exception as exc:
        raise Crash(f"config loader: {type(exc).__name__}: {exc}") from exc


TARGETS: dict[str, Callable[[bytes], None]] = {"rpc": rpc, "config": config_file}


# -- seeds -----------------------------------------------------------------------------------


def _framed(index: int, message: Any) -> bytes:
    return bytes([index]) + bytes(message.SerializeToString())


def _stream(*messages: dpb.DecideStreamRequest) -> bytes:
    out = b""
    for message in messages:
        raw = message.SerializeToString()
        out += bytes([len(raw)]) + raw
    return bytes([RPCS.index(decide_stream)]) + out


def seeds(target: str) -> list[bytes]:
    """Valid inputs to start from: the coverage a fuzzer then mutates away from."""
    if target == "config":
        examples = Path(__file__).resolve().parents[1] / "examples"
        files = sorted(examples.glob("*.toml")) if examples.is_dir() else []
        return [STACK_CONFIG.encode(), b"", *(f.read_bytes() for f in files)]
    d = RPCS.index(decide)
    requests = [
        dpb.DecideRequest(model="m"),
        dpb.DecideRequest(model="m", session_id="s1", strategy="affinity", prefix_hashes=[1, 2]),
        dpb.DecideRequest(model="m", tenant="metered", estimated_input_tokens=900, explain=True),
        dpb.DecideRequest(
            model="m", required_capabilities=["tools"], exclude_endpoint_ids=["b"], max_fallbacks=1
        ),
        dpb.DecideRequest(model="n", strategy="cache_aware", prefix_hashes=[7, 8, 9]),
        dpb.DecideRequest(model="gpt-7"),
    ]
    out = [_framed(d, r) for r in requests]
    out.append(
        _framed(
            RPCS.index(report_outcome),
            dpb.ReportOutcomeRequest(
                decision_id="x-1",
                endpoint_id="a",
                result=dpb.RESULT_SUCCESS,
                input_tokens=10,
                output_tokens=20,
            ),
        )
    )
    out.append(
        _stream(
            dpb.DecideStreamRequest(correlation_id=1, decide=requests[0]),
            dpb.DecideStreamRequest(correlation_id=2, decide=requests[5]),
        )
    )
    out.append(_framed(RPCS.index(watch_health), dpb.WatchHealthRequest(model="m")))
    endpoint = epb.Endpoint(
        id="z",
        address="10.0.0.9:8000",
        model="m",
        health_url="http://10.0.0.9/health",
        weight=2,
        capabilities=["vision"],
        labels={"zone": "a"},
    )
    out.append(
        _framed(RPCS.index(register_endpoint), rpb.RegisterEndpointRequest(endpoint=endpoint))
    )
    out.append(
        _framed(RPCS.index(deregister_endpoint), rpb.DeregisterEndpointRequest(endpoint_id="z"))
    )
    out.append(_framed(RPCS.index(list_endpoints), rpb.ListEndpointsRequest(model="m")))
    out.append(
        _framed(
            RPCS.index(report_probe_results),
            rpb.ReportProbeResultsRequest(
                prober_id="p",
                results=[
                    rpb.ProbeResult(
                        endpoint_id="c",
                        status=epb.HEALTH_STATUS_HEALTHY,
                        reason="ok",
                        load=epb.LoadReport(queue_depth=3),
                    )
                ],
            ),
        )
    )
    return out


def write_seeds(target: str, directory: str | os.PathLike[str]) -> None:
    """Fills an empty corpus directory with the seeds."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        return
    for i, seed in enumerate(seeds(target)):
        (folder / f"seed-{i:03d}").write_bytes(seed)
