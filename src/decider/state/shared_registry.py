"""Registered endpoints shared by every replica through Redis.

Redis holds the truth: one hash (`<prefix>registry`, endpoint id -> JSON) that outlives every
replica. A write stores the endpoint and publishes the change in one MULTI/EXEC, so changes
reach subscribers in the order Redis applied them; every replica (the writer too) applies
them to its local Registry, which the decide path reads. After each (re)connect a replica
reads the whole hash, so a change published while it was away is not missed.

A write is acknowledged only once Redis has it; while Redis is down writes fail with
StorageUnavailable and nothing changes. Config endpoints stay per replica (each reads its own file);
deregistering one removes it on every replica until their next start, as on one replica.
"""

from __future__ import annotations

import json
from typing import Any

from decider.core.model import Endpoint
from decider.errors import NotFound
from decider.state.redis_link import LINK_ERRORS, RedisLink
from decider.state.registry import (
    SOURCE_REGISTRY,
    Registry,
    _with_source,
    endpoint_from_json,
    endpoint_to_json,
    validated,
)

HASH = "registry"
CHANNEL = "registry:changes"


class SharedRegistry:
    """The Membership that RegistryService writes through when [state] backend = "redis"."""

    def __init__(self, registry: Registry, link: RedisLink) -> None:
        self._registry = registry
        self._link = link
        self._hash = link.key(HASH)
        self._channel = link.key(CHANNEL)
        link.subscribe(CHANNEL, self._on_change)
        link.on_connect(self.reconcile)

    async def register(self, endpoint: Endpoint) -> bool:
        endpoint = validated(_with_source(endpoint, SOURCE_REGISTRY))
        body = json.dumps(endpoint_to_json(endpoint), sort_keys=True)
        change = json.dumps({"op": "put", "endpoint": endpoint_to_json(endpoint)})
        # Read before the write: our own change may be applied from the channel before
        # execute() returns. New means new to the fleet: not in Redis, not a config endpoint.
        known = self._registry.get(endpoint.id) is not None
        try:
            async with self._link.client.pipeline(transaction=True) as pipe:
                pipe.hset(self._hash, endpoint.id, body)
                pipe.publish(self._channel, change)
                added, _ = await pipe.execute()
        except LINK_ERRORS as exc:
            raise self._link.unavailable(exc, doing=f"registering {endpoint.id!r}") from exc
        created = bool(added) and not known
        self._registry.apply_put(endpoint)
        return created

    async def deregister(self, endpoint_id: str) -> None:
        change = json.dumps({"op": "delete", "id": endpoint_id})
        try:
            async with self._link.client.pipeline(transaction=True) as pipe:
                pipe.hdel(self._hash, endpoint_id)
                pipe.publish(self._channel, change)
                removed, _ = await pipe.execute()
        except LINK_ERRORS as exc:
            raise self._link.unavailable(exc, doing=f"deregistering {endpoint_id!r}") from exc
        if not removed and self._registry.get(endpoint_id) is None:
            raise NotFound(f"no endpoint with id {endpoint_id!r} is registered")
        self._registry.apply_delete(endpoint_id)

    async def reconcile(self) -> None:
        """Replaces the local registered endpoints with Redis' (after every reconnect)."""
        stored = await self._link.client.hgetall(self._hash)
        self._registry.replace_registered(
            endpoint_from_json(json.loads(body)) for body in stored.values()
        )

    def _on_change(self, data: bytes) -> None:
        change: dict[str, Any] = json.loads(data)
        if change.get("op") == "put":
            self._registry.apply_put(endpoint_from_json(change["endpoint"]))
        elif change.get("op") == "delete":
            self._registry.apply_delete(str(change["id"]))
