"""RESULT_CANCELLED through the real server: in-flight is freed, the endpoint is not charged."""

from __future__ import annotations

from decider_support import endpoints_doc
from google.protobuf.duration_pb2 import Duration

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb


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
