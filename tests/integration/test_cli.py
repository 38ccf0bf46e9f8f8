"""The `decider` command as a process: check-config, bad configs, and serve with SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import decider_service_pb2_grpc as dgrpc

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


async def _decider(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "decider",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode if proc.returncode is not None else -1, out.decode(), err.decode()


async def test_empty_config_is_valid(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    code, out, err = await _decider("check-config", str(path))
    assert code == 0, err
    assert "ok" in out


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
async def test_examples_are_valid(example):
    code, _, err = await _decider("check-config", str(example))
    assert code == 0, err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\ngrace_period_s = 'soon'\n", "server.grace_period_s: 'soon'"),
        ("[server]\nlisten = 'nowhere'\n", "server.listen: 'nowhere'"),
        ("[server]\nmax_concurrent_rpcs = 0\n", "server.max_concurrent_rpcs: 0"),
        ("[server]\nbogus = 1\n", "server.bogus: unknown key"),
        ("[serverr]\n", "serverr: unknown table"),
        (
            "[[endpoints]]\nid = 'a'\nmodel = 'm'\naddress = 'no-port'\n",
            "endpoints[0].address: 'no-port'",
        ),
        ("[[endpoints]]\nid = 'a'\nmodel = 'm'\n", "endpoints[0].address"),
        ("[routing]\ndefault_strategy = 'nope'\n", "routing.default_strategy"),
        ("[probe]\ninterval_s = -1\n", "probe.interval_s"),
        ("this is = not toml [", "invalid TOML"),
    ],
)
async def test_bad_config_names_file_key_and_value(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, _, err = await _decider("check-config", str(path))
    assert code == 2
    assert str(path) in err
    assert expected in err


async def test_check_config_applies_the_environment_as_serve_does(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    env = {"DECIDER_GRACE_PERIOD_S": "soon"}
    code, out, err = await _decider("check-config", str(path), env=env)
    assert code == 2, out
    assert "environment DECIDER_GRACE_PERIOD_S: 'soon', must be a number from 0 to 3600" in err
    code, _, err = await _decider(
        "serve", "--config", str(path), "--listen", "127.0.0.1:0", env=env
    )
    assert code == 2
    assert "environment DECIDER_GRACE_PERIOD_S: 'soon'" in err


async def test_check_config_reports_every_problem_in_file_order(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        "[server]\nmax_watchers = -5\n[[endpoints]]\nid = 'gpu-7'\nmodel = 'm'\n"
        "address = 'no-port'\n[routing]\ndefault_strategy = 'nope'\n"
    )
    code, _, err = await _decider("check-config", str(path))
    assert code == 2
    lines = err.strip().removeprefix("decider: ").splitlines()
    assert lines == [
        f"{path}: server.max_watchers: -5, must be an integer from 0 to 1000000",
        f"{path}: endpoints[0].address: 'no-port': 'no-port' is not host:port (endpoint 'gpu-7')",
        f"{path}: routing.default_strategy: 'nope', must be one of ab_split, affinity,"
        " cache_aware, composite, cost, latency, least_request, quota_aware, random,"
        " round_robin, weighted_random, weighted_round_robin",
    ]


async def test_missing_config_file_is_an_error(tmp_path):
    code, _, err = await _decider("check-config", str(tmp_path / "absent.toml"))
    assert code == 2
    assert "absent.toml" in err


async def test_serve_with_bad_config_exits_non_zero(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nmax_watchers = -5\n")
    code, _, err = await _decider("serve", "--config", str(path), "--listen", "127.0.0.1:0")
    assert code == 2
    assert "server.max_watchers: -5" in err


async def test_serve_lists_every_probe_problem_as_docs_prober_shows(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[probe]\ninterval_s = 0\nliveness = 'ping'\nreport_valid_for_s = 4\n")
    code, _, err = await _decider("serve", "--config", str(path), "--listen", "127.0.0.1:0")
    assert code == 2
    lines = err.strip().removeprefix("decider: ").splitlines()
    assert lines == [
        f"{path}: probe.interval_s: 0, must be a number > 0",
        f"{path}: probe.liveness: 'ping', must be one of connect, http, off",
        f"{path}: probe.report_valid_for_s: 4, must be > report_interval_s (5)",
    ]
    shown = "\n".join(line.replace(str(path), "bad.toml") for line in lines)
    assert f"```\n{shown}\n```" in (ROOT / "docs" / "PROBER.md").read_text()


async def test_bad_environment_override_names_the_variable(tmp_path):
    code, _, err = await _decider(
        "serve", "--listen", "127.0.0.1:0", env={"DECIDER_GRACE_PERIOD_S": "later"}
    )
    assert code == 2
    assert "DECIDER_GRACE_PERIOD_S" in err
    assert "later" in err


CONFIG = """
[server]
grace_period_s = 5.0

[routing]
default_strategy = "round_robin"

[[endpoints]]
id = "e1"
address = "127.0.0.1:20001"
model = "m"
"""


async def _read_port(stream: asyncio.StreamReader, seen: list[str]) -> int:
    for _ in range(200):
        line = (await asyncio.wait_for(stream.readline(), 30)).decode()
        if not line:
            break
        seen.append(line)
        match = re.search(r"\(port (\d+)\)", line)
        if match:
            return int(match.group(1))
    raise AssertionError("server never said its port:\n" + "".join(seen))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_streams_and_exits_zero(tmp_path, signum):
    path = tmp_path / "decider.toml"
    path.write_text(CONFIG)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "decider",
        "serve",
        "--config",
        str(path),
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path / "data"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        port = await _read_port(proc.stderr, seen)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            decider = dgrpc.DeciderServiceStub(channel)  # type: ignore[arg-type]
            reply = await decider.Decide(dpb.DecideRequest(model="m"), timeout=5)
            assert reply.endpoint.id == "e1"
            watch = decider.WatchHealth(dpb.WatchHealthRequest())
            assert (await asyncio.wait_for(watch.read(), 5)).snapshot
            health = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="decider.v1.DeciderService")
            )
            first = await asyncio.wait_for(health.read(), 5)
            assert first.status == health_pb2.HealthCheckResponse.SERVING

            proc.send_signal(signum)

            # Health turns NOT_SERVING for those watching it, and the watch stream ends with OK.
            turned = await asyncio.wait_for(health.read(), 10)
            assert turned.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await asyncio.wait_for(watch.read(), 10) is grpc.aio.EOF
            assert await watch.code() == grpc.StatusCode.OK
            health.cancel()
        rest = await asyncio.wait_for(proc.stderr.read(), 30)
        code = await asyncio.wait_for(proc.wait(), 30)
        assert code == 0, "".join(seen) + rest.decode()
        assert "decider stopped" in rest.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_second_signal_ends_the_grace_period(tmp_path):
    """A Health.Watch stream never ends by itself, so it holds the 60 s drain open; the
    second SIGTERM must end it long before that."""
    path = tmp_path / "decider.toml"
    path.write_text(CONFIG.replace("grace_period_s = 5.0", "grace_period_s = 60.0"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "decider",
        "serve",
        "--config",
        str(path),
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        "",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        port = await _read_port(proc.stderr, seen)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await asyncio.wait_for(health.read(), 5)).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
            proc.send_signal(signal.SIGTERM)
            assert (await asyncio.wait_for(health.read(), 10)).status == (
                health_pb2.HealthCheckResponse.NOT_SERVING
            )
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
        rest = (await proc.stderr.read()).decode()
        assert code == 0, "".join(seen) + rest
        assert "stopping now" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_demo_serves_decisions_and_its_stand_ins_answer(tmp_path):
    """What `make run` starts: Decide answers for the demo model at once, and the endpoint it
    names is an OpenAI-compatible stand-in."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "decider",
        "serve",
        "--demo",
        "--listen",
        "127.0.0.1:0",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        port = await _read_port(proc.stderr, seen)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            decider = dgrpc.DeciderServiceStub(channel)  # type: ignore[arg-type]
            reply = await decider.Decide(
                dpb.DecideRequest(model="llama-3.1-8b", session_id="demo"), timeout=10
            )
        assert reply.endpoint.id in {"llama-a", "llama-b", "llama-c"}
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            answer = await client.post(
                f"http://{reply.endpoint.address}/v1/chat/completions",
                json={"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["role"] == "assistant"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
