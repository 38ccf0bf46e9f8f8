"""RESULT_CANCELLED through the real server: in-flight is freed, the endpoint is not charged."""

from __future__ import annotations

import asyncio

import pytest
from decider_support import endpoints_doc
from google.protobuf.duration_pb2 import Duration

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb
from decider_client import Attempt, ClientOptions, DeciderClient


async def test_cancelled_outcome_frees_in_flight_and_charges_nothing(start_server):
    async with start_server(endpoints_doc("m", 1)) as srv:
        for _ in range(10):
            decision = await srv.decider.Decide(dpb.DecideRequest(model="m"), timeout=5)
            reply = await srv.decider.ReportOutcome(
                dpb.ReportOutcomeRequest(
                    decision_id=decision.decision_id,
                    endpoint_id=decision.endpoint.id,
                    result=dpb.RESULT_CANCELLED,
                    latency=Duration(seconds=30),
                ),
                timeout=5,
            )
            assert reply.decision_found
        listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(model="m"), timeout=5)
        status = listed.statuses["m-0"]
        assert status.in_flight == 0
        assert status.breaker_state == epb.BREAKER_STATE_CLOSED
        assert status.latency_ewma.ToNanoseconds() == 0


async def test_python_client_reports_a_cancelled_attempt_as_cancelled(start_server):
    async with (
        start_server(endpoints_doc("m", 2)) as srv,
        DeciderClient(srv.address, ClientOptions(decide_timeout_s=5)) as client,
    ):
        started = asyncio.Event()

        async def hang(ep: epb.Endpoint) -> Attempt:
            started.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        routing = asyncio.create_task(client.route(dpb.DecideRequest(model="m"), hang))
        await asyncio.wait_for(started.wait(), 10)
        routing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await routing
        await client.flush()
        listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(model="m"), timeout=5)
        assert {s.in_flight for s in listed.statuses.values()} == {0}
        assert client.stats.failed_reports == 0
        assert {s.breaker_state for s in listed.statuses.values()} == {epb.BREAKER_STATE_CLOSED}
