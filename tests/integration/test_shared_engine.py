"""Breakers, sessions, the prefix index and tenant quotas shared by real replica processes
through one real Redis, over real gRPC calls."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from redis_server import RedisServer
from replicas import Replica, eventually

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb

OPEN = epb.BREAKER_STATE_OPEN


def doc(redis_server: RedisServer, **tables: Any) -> dict[str, Any]:
    return {
        "state": {"backend": "redis", "url": redis_server.url, "sync_interval_ms": 20},
        "breaker": {"consecutive_failures": 3, "open_s": 60},
        **tables,
        "endpoints": [
            {"id": f"e{i}", "address": f"127.0.0.1:{20000 + i}", "model": "m"} for i in range(3)
        ],
    }


@pytest.fixture
async def pair(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Callable[..., Any]]:
    made: list[Replica] = []

    async def start(**tables: Any) -> tuple[Replica, Replica]:
        for name in ("a", "b"):
            made.append(await Replica(tmp_path, doc(redis_server, **tables), name=name).start())
        return made[0], made[1]

    try:
        yield start
    finally:
        for replica in made:
            await replica.stop()


async def decide(replica: Replica, **fields: Any) -> dpb.DecideResponse:
    reply: dpb.DecideResponse = await replica.decider.Decide(
        dpb.DecideRequest(model="m", **fields), timeout=10
    )
    return reply


async def report(replica: Replica, reply: dpb.DecideResponse, result: int) -> None:
    await replica.decider.ReportOutcome(
        dpb.ReportOutcomeRequest(
            decision_id=reply.decision_id,
            endpoint_id=reply.endpoint.id,
            result=result,  # type: ignore[arg-type]
            latency=Duration(nanos=50_000_000),
        ),
        timeout=10,
    )


async def fail(replica: Replica, endpoint_id: str, times: int = 3) -> None:
    """Reports `times` errors for decisions on `endpoint_id`, made on `replica`."""
    others = [e for e in ("e0", "e1", "e2") if e != endpoint_id]
    for _ in range(times):
        reply = await decide(replica, exclude_endpoint_ids=others)
        assert reply.endpoint.id == endpoint_id
        await report(replica, reply, dpb.RESULT_ERROR)


async def breaker(replica: Replica, endpoint_id: str) -> int:
    listed = await replica.registry.ListEndpoints(rpb.ListEndpointsRequest(model="m"), timeout=5)
    return int(listed.statuses[endpoint_id].breaker_state)


async def test_breaker_opened_on_one_replica_opens_on_the_other(pair) -> None:
    a, b = await pair()
    await fail(a, "e1")
    assert await breaker(a, "e1") == OPEN
    await eventually(lambda: _eq(breaker(b, "e1"), OPEN))
    chosen = {(await decide(b)).endpoint.id for _ in range(30)}
    assert "e1" not in chosen


async def test_session_bound_on_one_replica_is_honoured_by_the_other(pair) -> None:
    a, b = await pair()
    first = (await decide(a, session_id="s1", strategy="affinity")).endpoint.id
    await eventually(
        lambda: _eq(_chosen(decide(b, session_id="s1", strategy="affinity", explain=True)), first)
    )
    for _ in range(5):
        assert (await decide(b, session_id="s1", strategy="affinity")).endpoint.id == first

    # The bound endpoint fails on a: a rebinds, and b follows a's new binding.
    await fail(a, first)
    rebound = (await decide(a, session_id="s1", strategy="affinity")).endpoint.id
    assert rebound != first
    await eventually(
        lambda: _eq(_chosen(decide(b, session_id="s1", strategy="affinity", explain=True)), rebound)
    )
    assert (await decide(b, session_id="s1", strategy="affinity")).endpoint.id == rebound


async def test_prefix_blocks_indexed_on_one_replica_inform_the_other(pair) -> None:
    a, b = await pair()
    placed: dict[int, str] = {}
    for prompt in range(6):
        hashes = [1000 + prompt, 2000 + prompt, 3000 + prompt]
        reply = await decide(a, prefix_hashes=hashes, strategy="cache_aware")
        await report(a, reply, dpb.RESULT_SUCCESS)
        placed[prompt] = reply.endpoint.id
    for prompt, endpoint_id in placed.items():
        hashes = [1000 + prompt, 2000 + prompt, 3000 + prompt]
        await eventually(
            lambda h=hashes, e=endpoint_id: _eq(
                _chosen(decide(b, prefix_hashes=h, strategy="cache_aware", explain=True)), e
            )
        )


async def test_tenant_quota_split_over_two_replicas(pair) -> None:
    # Near the end of the budget each replica admits on its own until the other's charges
    # arrive (one sync, tens of ms): a few requests, whatever the budget. A budget of a few
    # hundred, as real ones are, keeps that within 5% even on a loaded machine.
    budget = 300
    a, b = await pair(quotas={"tenants": {"acme": {"requests_per_minute": budget}}})
    admitted = 0
    start = time.monotonic()
    for i in range(2 * budget + 60):
        replica = (a, b)[i % 2]
        try:
            await decide(replica, tenant="acme")
            admitted += 1
        except grpc.aio.AioRpcError as err:
            assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    elapsed_s = time.monotonic() - start
    # The bucket refills at budget/60 per second while the test runs.
    allowed = budget + elapsed_s * budget / 60
    assert admitted >= budget
    assert admitted <= 1.05 * allowed, (admitted, allowed)


async def _chosen(reply: Any) -> str:
    return str((await reply).endpoint.id)


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def in_flight(replica: Replica, endpoint_id: str) -> int:
    listed = await replica.registry.ListEndpoints(rpb.ListEndpointsRequest(model="m"), timeout=5)
    return int(listed.statuses[endpoint_id].in_flight)


async def test_in_flight_load_is_fleet_wide(pair) -> None:
    a, b = await pair(routing={"default_strategy": "least_request"})
    open_on_a = [await decide(a, exclude_endpoint_ids=["e1", "e2"]) for _ in range(4)]
    assert await in_flight(a, "e0") == 4
    await eventually(lambda: _eq(in_flight(b, "e0"), 4))
    # least_request on b sees a's open requests on e0: it keeps to e1 while they are open.
    for _ in range(3):
        reply = await decide(b, exclude_endpoint_ids=["e2"])
        assert reply.endpoint.id == "e1"
        await report(b, reply, dpb.RESULT_SUCCESS)
    for reply in open_on_a:
        await report(a, reply, dpb.RESULT_SUCCESS)
    await eventually(lambda: _eq(in_flight(b, "e0"), 0))


async def test_redis_down_decides_locally_and_reconciles_charges(pair, redis_server) -> None:
    budget = 20
    a, b = await pair(quotas={"tenants": {"acme": {"requests_per_minute": budget}}})
    redis_server.kill()
    # Fail open: a goes on deciding (and charging its own buckets) without Redis.
    for _ in range(budget):
        await decide(a, tenant="acme")
    redis_server.start()

    async def b_refuses() -> bool:
        # explain charges nothing, but is refused like any Decide when the tenant is over.
        try:
            await decide(b, tenant="acme", explain=True)
        except grpc.aio.AioRpcError as err:
            assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            return True
        return False

    # The charges made on a while Redis was down reach b once it is back.
    await eventually(b_refuses, timeout_s=20)


async def test_sessions_and_prefix_blocks_learned_while_redis_is_down_reach_the_other_replica(
    pair, redis_server
) -> None:
    a, b = await pair()
    redis_server.kill()
    # While Redis is down, a binds a session to e2 and indexes a prompt's blocks on e1.
    bound = await decide(
        a, session_id="s-outage", strategy="affinity", exclude_endpoint_ids=["e0", "e1"]
    )
    assert bound.endpoint.id == "e2"
    hashes = [7001, 7002, 7003]
    placed = await decide(
        a, prefix_hashes=hashes, strategy="cache_aware", exclude_endpoint_ids=["e0", "e2"]
    )
    assert placed.endpoint.id == "e1"
    await report(a, placed, dpb.RESULT_SUCCESS)

    async def what_b_knows() -> tuple[float, float]:
        """b's explained view: the session's affinity to e2 and e1's share of cached blocks."""
        session = await decide(b, session_id="s-outage", strategy="affinity", explain=True)
        prefix = await decide(b, prefix_hashes=hashes, strategy="cache_aware", explain=True)
        return (
            _score(session, "e2", "affinity"),
            _score(prefix, "e1", "cache"),
        )

    assert await what_b_knows() == (0.0, 0.0)
    redis_server.start()

    async def b_knows() -> bool:
        return await what_b_knows() == (1.0, 1.0)

    await eventually(b_knows, timeout_s=20)


def _score(reply: dpb.DecideResponse, endpoint_id: str, key: str) -> float:
    (candidate,) = [c for c in reply.candidates if c.endpoint_id == endpoint_id]
    return float(candidate.scores.get(key, 0.0))
