"""Active probing once per fleet: the replica holding a lease in Redis probes for everyone.

The lease is one key (`<prefix>probe:lease`, the holder's replica id, expiring after
`[state] probe_lease_s`). Every replica tries to take it (SET NX PX) or, holding it, renews
it (compare-and-expire) three times per lease period; when the holder dies its lease expires
and another replica takes over at most one lease period later. A holder stopped by SIGTERM
deletes its lease, so the next replica takes over at once.

The holder's verdicts go to its own engine at once and, batched every `sync_interval_ms`, to
Redis: one PUBLISH per batch to every replica, and the latest health of each endpoint in a
hash that a (re)connecting replica reads. A replica that sees a failed request asks the
holder for a prompt check over the same channel.

While Redis is down no lease can be trusted, so every replica probes for itself (fail open);
when Redis answers again they contend for the lease and all but the holder stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from decider.core.model import Endpoint, HealthStatus, LoadReport
from decider.state.redis_link import LINK_ERRORS, RedisLink
from probe import HealthSink, Prober

log = logging.getLogger("decider.state")

LEASE = "probe:lease"
HEALTH = "probe:health"
CHANNEL = "probe:results"
# Renew when the value is still ours; never extend another replica's lease.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# Changes held while Redis is slow; beyond this the oldest go (the next probe resends).
_MAX_OUTBOX = 10_000


class FleetProbing:
    """Takes the place of the embedded Prober when [state] backend = "redis"."""

    def __init__(
        self,
        link: RedisLink,
        engine: HealthSink,
        make_prober: Callable[[HealthSink], Prober],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._link = link
        self._engine = engine
        self._make_prober = make_prober
        self._clock = clock
        self._lease_key = link.key(LEASE)
        self._health_key = link.key(HEALTH)
        self._channel = link.key(CHANNEL)
        self._lease_ms = round(link.settings.probe_lease_s * 1000)
        self._endpoints: Sequence[Endpoint] = ()
        self._prober: Prober | None = None
        self._prober_task: asyncio.Task[None] | None = None
        self._outbox: list[dict[str, Any]] = []
        self.holder = False
        self._released = False
        link.subscribe(CHANNEL, self._on_batch)
        link.on_connect(self._reconcile)

    @property
    def probing(self) -> bool:
        """Whether this replica probes now (holding the lease, or Redis being down)."""
        return self._prober is not None

    # -- what the server calls ------------------------------------------------------------

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = endpoints
        if self._prober is not None:
            self._prober.set_endpoints(endpoints)

    def probe_soon(self, endpoint_id: str) -> None:
        """Passive evidence of a failure: check now here, or ask the holder to."""
        if self._prober is not None:
            self._prober.probe_soon(endpoint_id)
        else:
            self._queue({"op": "probe_soon", "id": endpoint_id})

    async def run(self) -> None:
        """Contends for the lease and publishes verdicts until cancelled."""
        sync_s = self._link.settings.sync_interval_ms / 1000
        lease_every_s = self._lease_ms / 3000
        next_lease = 0.0
        try:
            while True:
                now = time.monotonic()
                try:
                    if self._released:
                        return
                    if now >= next_lease:
                        next_lease = now + lease_every_s
                        await self._contend()
                    await self._flush()
                except LINK_ERRORS as exc:
                    self._link.mark_down(exc)
                    await self._fail_open()
                await asyncio.sleep(sync_s)
        finally:
            await self._stop_probing()

    async def release(self) -> None:
        """Gives the lease up for good (on a drain), so another replica takes over at once."""
        self._released = True
        await self._stop_probing()
        if self.holder:
            self.holder = False
            with contextlib.suppress(*LINK_ERRORS):
                await self._link.client.eval(_RELEASE, 1, self._lease_key, self._link.replica_id)

    # -- the lease ------------------------------------------------------------------------

    async def _contend(self) -> None:
        me = self._link.replica_id
        client = self._link.client
        if self.holder:
            kept = await client.eval(_RENEW, 1, self._lease_key, me, str(self._lease_ms))
            if not kept:
                log.warning("probing lease lost; another replica probes for the fleet")
                self.holder = False
                await self._stop_probing()
            return
        taken = await client.set(self._lease_key, me, nx=True, px=self._lease_ms)
        self._link.mark_up()
        if taken:
            log.info("probing lease taken: this replica probes for the fleet")
            self.holder = True
            await self._stop_probing()
            self._start_probing()
        elif self._prober is not None:
            # Probing alone while Redis was down: the holder is back in charge.
            await self._stop_probing()

    async def _fail_open(self) -> None:
        self.holder = False
        self._outbox.clear()
        if self._prober is None:
            log.warning("probing locally while the shared state is unreachable")
            self._start_probing()

    def _start_probing(self) -> None:
        # A fresh prober: its verdicts start from UNKNOWN, so the first one is published
        # even when an earlier prober here had published the same status long ago.
        self._prober = self._make_prober(_SharingSink(self._engine, self._share))
        self._prober.set_endpoints(self._endpoints)
        self._prober_task = asyncio.create_task(self._prober.run(), name="decider-prober")

    async def _stop_probing(self) -> None:
        prober, task = self._prober, self._prober_task
        self._prober, self._prober_task = None, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if prober is not None:
            await prober.aclose()

    # -- sharing verdicts -----------------------------------------------------------------

    def _share(self, change: dict[str, Any]) -> None:
        """A verdict of this replica's prober: for the fleet when it holds the lease."""
        if self.holder:
            self._queue(change)

    def _queue(self, change: dict[str, Any]) -> None:
        if len(self._outbox) >= _MAX_OUTBOX:
            del self._outbox[0]
        self._outbox.append(change)

    async def _flush(self) -> None:
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        async with self._link.client.pipeline(transaction=False) as pipe:
            for change in batch:
                if change["op"] == "health":
                    pipe.hset(self._health_key, change["id"], json.dumps(change))
            pipe.publish(
                self._channel, json.dumps({"from": self._link.replica_id, "changes": batch})
            )
            await pipe.execute()

    def _on_batch(self, data: bytes) -> None:
        batch = json.loads(data)
        if batch.get("from") == self._link.replica_id:
            return
        now = self._clock()
        for change in batch.get("changes", ()):
            op, endpoint_id = change.get("op"), str(change.get("id", ""))
            if op == "probe_soon":
                if self._prober is not None:
                    self._prober.probe_soon(endpoint_id)
            elif self._prober is None:
                self._apply(change, now)

    def _apply(self, change: dict[str, Any], now: float) -> None:
        endpoint_id = str(change["id"])
        if change["op"] == "health":
            status = HealthStatus(int(change["status"]))
            self._engine.set_health(endpoint_id, status, reason=str(change["reason"]), now=now)
        elif change["op"] == "load":
            load = LoadReport(
                queue_depth=int(change["queue_depth"]),
                running=int(change["running"]),
                kv_cache_utilization=float(change["kv_cache_utilization"]),
            )
            self._engine.record_load(endpoint_id, load, now=now)

    async def _reconcile(self) -> None:
        """The latest verdict for every endpoint (after each reconnect)."""
        stored = await self._link.client.hgetall(self._health_key)
        if self._prober is not None:
            return
        now = self._clock()
        known = {e.id for e in self._endpoints}
        for body in stored.values():
            change = json.loads(body)
            if change.get("id") in known:
                self._apply(change, now)


class _SharingSink:
    """The prober's sink on a probing replica: its engine at once, the fleet at the next flush."""

    def __init__(self, engine: HealthSink, share: Callable[[dict[str, Any]], None]) -> None:
        self._engine = engine
        self._share = share

    def set_health(
        self, endpoint_id: str, status: HealthStatus, *, reason: str, now: float
    ) -> None:
        self._engine.set_health(endpoint_id, status, reason=reason, now=now)
        self._share({"op": "health", "id": endpoint_id, "status": int(status), "reason": reason})

    def record_load(self, endpoint_id: str, load: LoadReport, *, now: float) -> None:
        self._engine.record_load(endpoint_id, load, now=now)
        self._share(
            {
                "op": "load",
                "id": endpoint_id,
                "queue_depth": load.queue_depth,
                "running": load.running,
                "kv_cache_utilization": load.kv_cache_utilization,
            }
        )
