"""WatchHealth fan-out: a thousand concurrent watchers all see a change, and a watcher that never
reads neither holds up the others nor misses the current state (it gets a fresh snapshot)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from decider_support import endpoints_doc

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import decider_service_pb2_grpc as dgrpc
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb

MODEL = "m"
ENDPOINTS = 4
WATCHERS = 1000
CHANNELS = 4
WAIT_S = 30.0
# A small receive window and no BDP probing, so a client that never reads stops taking data
# after a few kilobytes and the server's writes to it stall.
STALLED_CLIENT = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]

if TYPE_CHECKING:
    Stub = dgrpc.DeciderServiceAsyncStub
    Call = grpc.aio.UnaryStreamCall[dpb.WatchHealthRequest, dpb.WatchHealthResponse]


@contextlib.asynccontextmanager
async def _stubs(address: str, count: int, **options: Any) -> AsyncIterator[list[Stub]]:
    channels = [grpc.aio.insecure_channel(address, **options) for _ in range(count)]
    try:
        yield [dgrpc.DeciderServiceStub(c) for c in channels]
    finally:
        for channel in channels:
            await channel.close()


async def _watch(stub: Stub) -> Call:
    call: Call = stub.WatchHealth(dpb.WatchHealthRequest(model=MODEL))
    first = await asyncio.wait_for(call.read(), WAIT_S)
    assert isinstance(first, dpb.WatchHealthResponse) and first.snapshot
    assert len(first.events) == ENDPOINTS
    return call


@contextlib.asynccontextmanager
async def _watchers(stubs: Sequence[Stub], count: int) -> AsyncIterator[list[Call]]:
    """`count` streams spread over `stubs`, each past its snapshot; cancelled on the way out."""
    calls = await asyncio.gather(*(_watch(stubs[i % len(stubs)]) for i in range(count)))
    try:
        yield calls
    finally:
        for call in calls:
            call.cancel()


def _initial() -> dict[str, int]:
    """The snapshot's view: endpoints without a health_url count as healthy."""
    return {f"{MODEL}-{i}": epb.HEALTH_STATUS_HEALTHY for i in range(ENDPOINTS)}


def _apply(state: dict[str, int], reply: object) -> None:
    """Folds one response into a watcher's view: a snapshot replaces it, changes update it."""
    assert isinstance(reply, dpb.WatchHealthResponse), reply
    if reply.snapshot:
        state.clear()
    for event in reply.events:
        if event.removed:
            state.pop(event.endpoint_id, None)
        else:
            state[event.endpoint_id] = event.status


async def _report(srv, endpoint_id: str, status: epb.HealthStatus.ValueType, reason: str) -> None:
    await srv.registry.ReportProbeResults(
        rpb.ReportProbeResultsRequest(
            prober_id="fanout",
            results=[rpb.ProbeResult(endpoint_id=endpoint_id, status=status, reason=reason)],
        ),
        timeout=10,
    )


async def _seen_at(call: Call, predicate: Callable[[dpb.HealthEvent], bool]) -> float:
    """When (perf_counter) the first event matching `predicate` arrived on the stream."""
    while True:
        reply = await call.read()
        assert isinstance(reply, dpb.WatchHealthResponse), reply
        if any(predicate(e) for e in reply.events):
            return time.perf_counter()


async def test_a_thousand_watchers_all_see_a_change(start_server):
    async with (
        start_server(endpoints_doc(MODEL, ENDPOINTS)) as srv,
        _stubs(srv.address, CHANNELS) as stubs,
        _watchers(stubs, WATCHERS) as calls,
    ):
        assert srv.server.hub.watcher_count == WATCHERS

        def went_down(event: dpb.HealthEvent) -> bool:
            return event.endpoint_id == "m-3" and event.status == epb.HEALTH_STATUS_UNHEALTHY

        readers = [asyncio.create_task(_seen_at(call, went_down)) for call in calls]
        changed_at = time.perf_counter()
        await _report(srv, "m-3", epb.HEALTH_STATUS_UNHEALTHY, "connection refused")
        done, pending = await asyncio.wait(readers, timeout=WAIT_S)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)} of {WATCHERS} watchers missed the change"
        last = max(task.result() for task in done)
        print(
            f"\nWatchHealth fan-out: {WATCHERS} watchers on {CHANNELS} channels, change to last"
            f" watcher {(last - changed_at) * 1000:.0f} ms"
        )


async def test_a_watcher_that_never_reads_holds_up_nobody_and_gets_a_fresh_snapshot(
    start_server,
):
    # Changes 0..n-1 flip m-0..m-2 between UNHEALTHY and HEALTHY, one event each; then m-3 is
    # deregistered. A long reason makes every event a few hundred bytes.
    flips = 300
    reason = "probe: HTTP 503 " + "x" * 200

    def status_after(flip: int) -> epb.HealthStatus.ValueType:
        return epb.HEALTH_STATUS_UNHEALTHY if (flip // 3) % 2 == 0 else epb.HEALTH_STATUS_HEALTHY

    expected = {f"m-{(flips - 1 - k) % 3}": status_after(flips - 1 - k) for k in range(3)}

    async def follow(call: Call) -> dict[str, int]:
        """A watcher's view once m-3 is gone."""
        state = _initial()
        while "m-3" in state:
            _apply(state, await call.read())
        return state

    async with (
        start_server(endpoints_doc(MODEL, ENDPOINTS), watch_queue_size=8) as srv,
        _stubs(srv.address, 1, options=STALLED_CLIENT) as slow_stubs,
        _watchers(slow_stubs, 1) as (slow,),
        _watchers([srv.decider], 50) as fast,
    ):
        followers = [asyncio.create_task(follow(call)) for call in fast]
        for flip in range(flips):
            await _report(srv, f"m-{flip % 3}", status_after(flip), reason)
        await srv.registry.DeregisterEndpoint(
            rpb.DeregisterEndpointRequest(endpoint_id="m-3"), timeout=10
        )

        # Every other watcher has the final state while the slow one still has not read.
        done, pending = await asyncio.wait(followers, timeout=WAIT_S)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)} of {len(fast)} watchers missed the last change"
        assert [t.result() for t in done] == [expected] * len(fast), expected

        # The slow watcher fell behind: after what its window held, a fresh snapshot of now.
        snapshots = responses = 0
        state = _initial()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while not (snapshots and state == expected):
            reply = await asyncio.wait_for(slow.read(), max(0.1, deadline - loop.time()))
            _apply(state, reply)
            assert isinstance(reply, dpb.WatchHealthResponse)
            snapshots += reply.snapshot
            responses += 1
        # Far fewer responses than changes: what its window held, then one snapshot.
        assert responses < flips // 2, responses
