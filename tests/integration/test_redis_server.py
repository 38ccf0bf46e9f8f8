"""The tests' redis-server: a real one, killed by pid and restarted with what it acknowledged."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis_server import RedisServer


async def test_killed_and_restarted_keeps_acknowledged_writes(redis_server: RedisServer) -> None:
    client = aioredis.from_url(redis_server.url, socket_timeout=1.0)
    try:
        assert await client.set("k", "v")
        redis_server.kill()
        assert not redis_server.running
        with pytest.raises(RedisConnectionError):
            await client.get("k")
        redis_server.start()
        assert await client.get("k") == b"v"
    finally:
        await client.aclose()
