"""WatchHealth: a snapshot first, then changes, filtered by model; ends cleanly on shutdown."""

from __future__ import annotations

import asyncio

import grpc
from decider_support import endpoints_doc

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb


def _two_models() -> dict:
    doc = endpoints_doc("a", 2)
    doc["endpoints"] += endpoints_doc("b", 1)["endpoints"]
    return doc


async def _next(call) -> dpb.WatchHealthResponse:
    return await asyncio.wait_for(call.read(), 5)


async def _until(call, predicate) -> dpb.HealthEvent:
    for _ in range(20):
        reply = await _next(call)
        for event in reply.events:
            if predicate(event):
                return event
    raise AssertionError("no matching event in 20 responses")


async def test_snapshot_first_filtered_by_model(start_server):
    async with start_server(_two_models()) as srv:
        call = srv.decider.WatchHealth(dpb.WatchHealthRequest(model="a"))
        first = await _next(call)
        assert first.snapshot
        assert sorted(e.endpoint_id for e in first.events) == ["a-0", "a-1"]
        assert {e.model for e in first.events} == {"a"}

        everything = srv.decider.WatchHealth(dpb.WatchHealthRequest())
        first = await _next(everything)
        assert sorted(e.endpoint_id for e in first.events) == ["a-0", "a-1", "b-0"]
        call.cancel()
        everything.cancel()


async def test_changes_follow_the_snapshot(start_server):
    async with start_server(_two_models()) as srv:
        call = srv.decider.WatchHealth(dpb.WatchHealthRequest(model="a"))
        assert (await _next(call)).snapshot
        await srv.registry.ReportProbeResults(
            rpb.ReportProbeResultsRequest(
                prober_id="t",
                results=[
                    rpb.ProbeResult(endpoint_id="b-0", status=epb.HEALTH_STATUS_UNHEALTHY),
                    rpb.ProbeResult(endpoint_id="a-1", status=epb.HEALTH_STATUS_UNHEALTHY),
                ],
            )
        )
        event = await _until(call, lambda e: e.endpoint_id == "a-1")
        assert event.status == epb.HEALTH_STATUS_UNHEALTHY
        assert event.model == "a"

        await srv.registry.DeregisterEndpoint(rpb.DeregisterEndpointRequest(endpoint_id="a-0"))
        event = await _until(call, lambda e: e.endpoint_id == "a-0")
        assert event.removed
        call.cancel()


async def test_streams_end_cleanly_when_the_server_stops(start_server):
    async with start_server(_two_models()) as srv:
        calls = [srv.decider.WatchHealth(dpb.WatchHealthRequest()) for _ in range(5)]
        for call in calls:
            assert (await _next(call)).snapshot
        await srv.server.stop(2.0)
        for call in calls:
            assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
