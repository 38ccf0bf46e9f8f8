"""Registered endpoints survive a restart; the config file stays the source of config endpoints."""

from __future__ import annotations

import asyncio
import re
import sys

import grpc
from decider_support import endpoints_doc

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb
from decider.v1 import registry_service_pb2_grpc as rgrpc


async def test_restart_keeps_the_registry(start_server):
    doc = endpoints_doc("m", 1)
    async with start_server(doc) as srv:
        for i in range(3):
            await srv.registry.RegisterEndpoint(
                rpb.RegisterEndpointRequest(
                    endpoint=epb.Endpoint(
                        id=f"r{i}",
                        address=f"10.0.0.{i}:8000",
                        model="dyn",
                        labels={"i": str(i)},
                        capabilities=["tools"],
                    )
                )
            )
        await srv.registry.DeregisterEndpoint(rpb.DeregisterEndpointRequest(endpoint_id="r1"))

    async with start_server(doc) as srv:
        listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest())
        by_id = {e.id: e for e in listed.endpoints}
        assert set(by_id) == {"m-0", "r0", "r2"}
        assert by_id["r2"].labels["i"] == "2"
        assert list(by_id["r2"].capabilities) == ["tools"]
        assert listed.statuses["r0"].source == "registry"
        reply = await srv.decider.Decide(dpb.DecideRequest(model="dyn"))
        assert reply.endpoint.id in {"r0", "r2"}


async def test_without_a_data_dir_the_registry_is_in_memory(start_server):
    async with start_server(data_dir="") as srv:
        await srv.registry.RegisterEndpoint(
            rpb.RegisterEndpointRequest(endpoint=epb.Endpoint(id="a", address="h:1", model="m"))
        )
    async with start_server(data_dir="") as srv:
        listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest())
        assert not listed.endpoints


async def _start_process(data_dir, *extra: str):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "decider",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        *extra,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    for _ in range(200):
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        match = re.search(r"\(port (\d+)\)", line)
        if match:
            return proc, int(match.group(1))
        if not line:
            break
    proc.kill()
    await proc.wait()
    raise AssertionError("server never said its port")


async def test_acknowledged_registrations_survive_a_kill(tmp_path):
    """SIGKILL right after the last acknowledged write: nothing acknowledged is lost."""
    proc, port = await _start_process(tmp_path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            registry = rgrpc.RegistryServiceStub(channel)  # type: ignore[arg-type]
            await asyncio.gather(
                *(
                    registry.RegisterEndpoint(
                        rpb.RegisterEndpointRequest(
                            endpoint=epb.Endpoint(id=f"k{i}", address=f"10.1.0.{i}:80", model="k")
                        ),
                        timeout=10,
                    )
                    for i in range(25)
                )
            )
        proc.kill()
        await asyncio.wait_for(proc.wait(), 30)

        proc, port = await _start_process(tmp_path)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            registry = rgrpc.RegistryServiceStub(channel)  # type: ignore[arg-type]
            listed = await registry.ListEndpoints(rpb.ListEndpointsRequest(), timeout=10)
        assert sorted(e.id for e in listed.endpoints) == sorted(f"k{i}" for i in range(25))
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
