"""The registry shared through one real Redis by real replica processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from decider_support import ErrorInfo, detail
from redis_server import RedisServer, free_port
from replicas import Replica, eventually

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb

Fleet = Callable[..., Replica]


def shared_doc(redis_server: RedisServer, **state: Any) -> dict[str, Any]:
    return {
        "state": {"backend": "redis", "url": redis_server.url, "key_prefix": "t:", **state},
        "endpoints": [{"id": "cfg-0", "address": "127.0.0.1:20000", "model": "m"}],
    }


@pytest.fixture
async def fleet(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Fleet]:
    """`fleet(name)` makes a replica sharing `redis_server` (started with `await r.start()`)."""
    made: list[Replica] = []

    def make(name: str, **state: Any) -> Replica:
        replica = Replica(tmp_path, shared_doc(redis_server, **state), name=name)
        made.append(replica)
        return replica

    try:
        yield make
    finally:
        for replica in made:
            await replica.stop()


async def routed(replica: Replica, model: str) -> str | None:
    """The endpoint Decide picks for `model` on `replica`; None while nobody serves it."""
    try:
        reply = await replica.decider.Decide(dpb.DecideRequest(model=model), timeout=5)
    except grpc.aio.AioRpcError as err:
        if err.code() is grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return reply.endpoint.id


def register(endpoint_id: str, model: str = "dyn") -> rpb.RegisterEndpointRequest:
    return rpb.RegisterEndpointRequest(
        endpoint=epb.Endpoint(id=endpoint_id, address="127.0.0.1:20001", model=model)
    )


async def test_registered_on_one_replica_used_by_every_replica(fleet: Fleet) -> None:
    replicas = [await fleet(f"r{i}").start() for i in range(3)]
    reply = await replicas[1].registry.RegisterEndpoint(register("dyn-1"))
    assert reply.created
    # The writer applies its own change before answering.
    assert await routed(replicas[1], "dyn") == "dyn-1"
    for replica in replicas:
        await eventually(lambda r=replica: _is(routed(r, "dyn"), "dyn-1"))

    await replicas[2].registry.DeregisterEndpoint(
        rpb.DeregisterEndpointRequest(endpoint_id="dyn-1")
    )
    for replica in replicas:
        await eventually(lambda r=replica: _is(routed(r, "dyn"), None))


async def test_registry_survives_every_replica_restarting(fleet: Fleet) -> None:
    first = await fleet("a").start()
    await first.registry.RegisterEndpoint(register("dyn-1"))
    await first.stop()
    second = await fleet("b").start()
    # Read from Redis before the replica serves: right from its first decision.
    assert await routed(second, "dyn") == "dyn-1"
    listed = await second.registry.ListEndpoints(rpb.ListEndpointsRequest())
    assert {e.id for e in listed.endpoints} == {"cfg-0", "dyn-1"}
    assert listed.statuses["dyn-1"].source == "registry"


async def test_redis_down_fails_writes_and_keeps_deciding(
    fleet: Fleet, redis_server: RedisServer
) -> None:
    metrics_port = free_port()
    a = await fleet("a").start("--metrics-listen", f"127.0.0.1:{metrics_port}")
    b = await fleet("b").start()
    await a.registry.RegisterEndpoint(register("dyn-1"))
    await eventually(lambda: _is(routed(b, "dyn"), "dyn-1"))

    redis_server.kill()
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await a.registry.RegisterEndpoint(register("dyn-2"))
    assert exc.value.code() is grpc.StatusCode.UNAVAILABLE
    assert f"shared state at {redis_server.url} is unavailable" in str(exc.value.details())
    assert "registering 'dyn-2' was not applied" in str(exc.value.details())
    assert detail(exc.value, ErrorInfo).reason == "STORAGE_UNAVAILABLE"
    # Fail open: both replicas go on deciding from what they hold.
    assert await routed(a, "dyn") == "dyn-1"
    assert await routed(b, "dyn") == "dyn-1"
    await eventually(
        lambda: 'decider_shared_state_up{backend="redis"} 0.0' in _scrape(metrics_port)
    )
    assert "shared state unreachable" in a.logs()

    async def reasons(replica: Replica) -> str:
        listed = await replica.registry.ListEndpoints(rpb.ListEndpointsRequest())
        return " | ".join(s.health_reason for s in listed.statuses.values())

    await eventually(lambda: _contains(reasons(b), "shared state unreachable"))
    assert "decides from its local state" in await reasons(b)

    redis_server.start()
    await eventually(
        lambda: 'decider_shared_state_up{backend="redis"} 1.0' in _scrape(metrics_port)
    )
    await b.registry.RegisterEndpoint(register("dyn-2", model="other"))
    await eventually(lambda: _is(routed(a, "other"), "dyn-2"))
    # What was acknowledged before Redis went down is still there.
    listed = await a.registry.ListEndpoints(rpb.ListEndpointsRequest())
    assert {e.id for e in listed.endpoints} == {"cfg-0", "dyn-1", "dyn-2"}
    assert "shared state" not in listed.statuses["dyn-1"].health_reason


async def _contains(value: Any, part: str) -> bool:
    return part in await value


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


def _scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
