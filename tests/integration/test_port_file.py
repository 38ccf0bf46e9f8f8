"""`decider serve --port-file PATH`: the bound port, for callers that start it on port 0."""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc

from decider.cli import main as cli
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import decider_service_pb2_grpc as dgrpc

CONFIG = """
[[endpoints]]
id = "e1"
address = "127.0.0.1:20001"
model = "m"
"""


async def test_port_file_names_the_bound_port(tmp_path):
    config = tmp_path / "decider.toml"
    config.write_text(CONFIG)
    port_file = tmp_path / "port"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "decider",
        "serve",
        "--config",
        str(config),
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        "",
        "--port-file",
        str(port_file),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            if port_file.exists() or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        port = int(port_file.read_text())
        assert not (tmp_path / "port.partial").exists()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            decider = dgrpc.DeciderServiceStub(channel)  # type: ignore[arg-type]
            reply = await decider.Decide(dpb.DecideRequest(model="m"), timeout=5)
            assert reply.endpoint.id == "e1"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_port_file_is_refused_with_demo(tmp_path, capsys):
    assert cli.main(["serve", "--demo", "--port-file", str(tmp_path / "port")]) == 2
    assert "--port-file: not supported with --demo" in capsys.readouterr().err
    assert not (tmp_path / "port").exists()
