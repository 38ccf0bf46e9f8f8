"""Active probing once per fleet: one replica holds the lease and probes, every replica gets the
verdicts, and another replica takes over when the holder is killed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from redis_server import RedisServer, free_port
from replicas import Replica, eventually

from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb
from probe.standin import StandIn

HEALTHY = epb.HEALTH_STATUS_HEALTHY
UNHEALTHY = epb.HEALTH_STATUS_UNHEALTHY


@pytest.fixture
async def backend() -> AsyncIterator[StandIn]:
    standin = await StandIn().start()
    yield standin
    await standin.kill()


async def health(replica: Replica) -> int:
    listed = await replica.registry.ListEndpoints(rpb.ListEndpointsRequest(model="m"), timeout=5)
    return int(listed.statuses["e"].health)


def probes_run(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("decider_probes_total{")
    )


async def test_one_replica_probes_for_the_fleet_and_another_takes_over(
    tmp_path: Path, redis_server: RedisServer, backend: StandIn
) -> None:
    doc = {
        "state": {
            "backend": "redis",
            "url": redis_server.url,
            "probe_lease_s": 1,
            "sync_interval_ms": 50,
        },
        "probe": {
            "interval_s": 0.3,
            "unhealthy_interval_s": 0.2,
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "liveness_interval_s": 0.3,
            "jitter_fraction": 0.0,
        },
        "endpoints": [
            {
                "id": "e",
                "address": f"127.0.0.1:{backend.port}",
                "model": "m",
                "health_url": f"{backend.url}/health",
            }
        ],
    }
    ports = [free_port() for _ in range(3)]
    replicas = [Replica(tmp_path, doc, name=f"r{i}") for i in range(3)]
    lease = aioredis.from_url(redis_server.url)
    try:
        for replica, port in zip(replicas, ports, strict=True):
            await replica.start("--metrics-listen", f"127.0.0.1:{port}")

        async def holder() -> Replica | None:
            value = await lease.get("decider:probe:lease")
            pid = int(value.decode().rsplit(":", 1)[1]) if value else -1
            return next((r for r in replicas if r.pid == pid), None)

        await eventually(holder)
        first = await holder()
        assert first is not None
        for replica in replicas:
            await eventually(lambda r=replica: _eq(health(r), HEALTHY))
        # Only the holder probed; the others took its verdicts from Redis.
        assert probes_run(ports[replicas.index(first)]) > 0
        for replica, port in zip(replicas, ports, strict=True):
            if replica is not first:
                assert probes_run(port) == 0

        backend.status = 503
        for replica in replicas:
            await eventually(lambda r=replica: _eq(health(r), UNHEALTHY))

        first.kill()
        survivors = [r for r in replicas if r is not first]

        async def taken_over() -> bool:
            return (await holder()) in survivors

        await eventually(taken_over)
        backend.status = 200
        for replica in survivors:
            await eventually(lambda r=replica: _eq(health(r), HEALTHY))
    finally:
        await lease.aclose()
        for replica in replicas:
            await replica.stop()


async def _eq(value, expected) -> bool:
    return bool(await value == expected)
