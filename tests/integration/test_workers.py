"""`decider serve --workers N`: N processes on one port sharing state through a real Redis."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from redis_server import RedisServer
from replicas import eventually, toml

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import decider_service_pb2_grpc as dgrpc
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb
from decider.v1 import registry_service_pb2_grpc as rgrpc


def test_workers_refuse_the_memory_backend(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "decider", "serve", "--listen", "127.0.0.1:0", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert 'flag --workers 2: needs [state] backend = "redis"' in done.stderr
    assert "route half-blind" in done.stderr


async def test_two_workers_share_one_port_and_the_registry(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    config = tmp_path / "decider.toml"
    config.write_text(
        toml(
            {
                "state": {"backend": "redis", "url": redis_server.url},
                "endpoints": [{"id": "e0", "address": "127.0.0.1:20000", "model": "m"}],
            }
        )
    )
    port_file = tmp_path / "port"
    supervisor = _spawn(config, port_file, tmp_path / "log")
    try:
        await eventually(port_file.exists, timeout_s=60)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        # SO_REUSEPORT spreads connections over the workers; each engine names its decisions
        # with its own prefix, so the prefixes count the workers that answered.
        prefixes: set[str] = set()
        for _ in range(200):
            if len(prefixes) == 2:
                break
            async with fresh_channel(address) as channel:
                stub = dgrpc.DeciderServiceStub(channel)
                reply = await stub.Decide(dpb.DecideRequest(model="m"), timeout=10)
                prefixes.add(reply.decision_id.rsplit("-", 1)[0])
        assert len(prefixes) == 2

        async with grpc.aio.insecure_channel(address) as channel:
            await rgrpc.RegistryServiceStub(channel).RegisterEndpoint(
                rpb.RegisterEndpointRequest(
                    endpoint=epb.Endpoint(id="dyn", address="127.0.0.1:20001", model="dyn")
                )
            )

        async def every_connection_sees_it() -> bool:
            for _ in range(20):
                async with fresh_channel(address) as channel:
                    reply = await dgrpc.DeciderServiceStub(channel).Decide(
                        dpb.DecideRequest(model="dyn"), timeout=10
                    )
                    if reply.endpoint.id != "dyn":
                        return False
            return True

        await eventually(_ignoring_not_found(every_connection_sees_it))
    finally:
        os.kill(supervisor.pid, signal.SIGTERM)
        try:
            code = await asyncio.to_thread(supervisor.wait, 60)
        except subprocess.TimeoutExpired:
            supervisor.kill()
            supervisor.wait()
            raise
    assert code == 0, (tmp_path / "log").read_text()[-3000:]
    assert not port_file.with_name("port.worker0").exists()


async def test_a_worker_stuck_in_its_stop_is_killed_and_the_supervisor_exits(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    config = tmp_path / "decider.toml"
    config.write_text(toml({"state": {"backend": "redis", "url": redis_server.url}}))
    port_file, log = tmp_path / "port", tmp_path / "log"
    supervisor = _spawn(config, port_file, log)
    stuck = 0
    try:
        await eventually(port_file.exists, timeout_s=60)
        pids = re.search(r"supervising 2 workers on \S+ \(pids (\d+),(\d+)\)", log.read_text())
        assert pids, log.read_text()
        # A stopped process cannot act on its SIGTERM: as stuck as a worker gets.
        stuck = int(pids.group(1))
        os.kill(stuck, signal.SIGSTOP)
        os.kill(supervisor.pid, signal.SIGTERM)
        # Grace 1 s + 2 x STOP_STEPS_S 5 s + a 5 s margin, then the kill.
        code = await asyncio.to_thread(supervisor.wait, 60)
        assert code == 1
        assert f"worker pid {stuck} still running 16 s after SIGTERM; killed" in log.read_text()
        with pytest.raises(ProcessLookupError):
            os.kill(stuck, 0)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


def fresh_channel(address: str) -> grpc.aio.Channel:
    """A channel with a connection of its own: by default channels to one address share
    connections (gRPC's global subchannel pool), and would all reach the same worker."""
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def _spawn(config: Path, port_file: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                sys.executable, "-m", "decider", "serve",
                "--config", str(config),
                "--listen", "127.0.0.1:0",
                "--workers", "2",
                "--grace-period-s", "1",
                "--port-file", str(port_file),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def _ignoring_not_found(check):
    async def run() -> bool:
        try:
            return bool(await check())
        except grpc.aio.AioRpcError as err:
            if err.code() is grpc.StatusCode.NOT_FOUND:
                return False
            raise

    return run
