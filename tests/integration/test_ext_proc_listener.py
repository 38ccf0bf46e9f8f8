"""`decider serve --ext-proc-listen`: the picker's own listener, its health entries, its drain."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXT_PROC = "envoy.service.ext_proc.v3.ExternalProcessor"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def health(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        return int((await stub.Check(request, timeout=5)).status)


async def test_serve_with_an_ext_proc_listener_reports_it_and_drains_it(tmp_path):
    main, picker = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "decider",
        "serve",
        "--listen",
        f"127.0.0.1:{main}",
        "--ext-proc-listen",
        f"127.0.0.1:{picker}",
        "--data-dir",
        "",
        "--port-file",
        str(tmp_path / "port"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=os.environ.copy(),
    )
    try:
        for _ in range(300):
            if (tmp_path / "port").exists():
                break
            await asyncio.sleep(0.1)
        serving = health_pb2.HealthCheckResponse.SERVING
        for address in (f"127.0.0.1:{main}", f"127.0.0.1:{picker}"):
            assert await health(address, EXT_PROC) == serving
        assert await health(f"127.0.0.1:{picker}", "") == serving
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert "ext_proc endpoint picker on 127.0.0.1:" in err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_bad_ext_proc_listen_flag_exits_2_naming_it():
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "decider",
        "serve",
        "--ext-proc-listen",
        "nowhere",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert "flag --ext-proc-listen: 'nowhere', must be HOST:PORT" in err.decode()


async def test_an_ext_proc_port_already_taken_exits_2_saying_so():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "decider",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "",
            "--ext-proc-listen",
            f"127.0.0.1:{port}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert f"address already in use: 127.0.0.1:{port} (ext_proc.listen)" in err.decode()
