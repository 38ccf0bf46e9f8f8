"""Graceful stop with a unary RPC in flight: new RPCs are refused, the in-flight one finishes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from decider_support import endpoints_doc

from decider.runtime import server as server_module
from decider.v1 import decider_service_pb2 as dpb


class HoldDecide(grpc.aio.ServerInterceptor):
    """Keeps every Decide waiting until released, so a test can stop the server mid-RPC."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.endswith("/Decide"):
            return handler
        inner = handler.unary_unary

        async def held(request: Any, context: Any) -> Any:
            self.entered.set()
            await self.release.wait()
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            held,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def test_in_flight_decide_finishes_while_new_rpcs_are_refused(start_server):
    hold = HoldDecide()
    async with start_server(endpoints_doc("m", 1), interceptors=[hold]) as srv:
        in_flight = asyncio.ensure_future(
            srv.decider.Decide(dpb.DecideRequest(model="m"), timeout=20)
        )
        await asyncio.wait_for(hold.entered.wait(), 10)
        stopping = asyncio.create_task(srv.server.stop(15))

        refused = None
        for _ in range(100):
            try:
                await srv.decider.ReportOutcome(
                    dpb.ReportOutcomeRequest(endpoint_id="m-0", result=dpb.RESULT_SUCCESS),
                    timeout=2,
                )
            except grpc.aio.AioRpcError as err:
                # A call that reaches grpc core just as its own shutdown starts is cancelled
                # by core (CANCELLED, which the clients count as unreachable); the next one
                # is refused with UNAVAILABLE, by Decider or by the closed listener.
                assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), (
                    err.code(),
                    err.details(),
                )
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    refused = err
                    break
            await asyncio.sleep(0.02)
        assert refused is not None
        assert not stopping.done()

        hold.release.set()
        reply = await asyncio.wait_for(in_flight, 10)
        assert reply.endpoint.id == "m-0"
        await asyncio.wait_for(stopping, 15)


async def test_a_step_that_never_finishes_does_not_hold_the_stop(start_server, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="decider.server")
    monkeypatch.setattr(server_module, "STOP_STEPS_S", 0.5)
    never = asyncio.Event()
    async with start_server(endpoints_doc("m", 1)) as srv:
        assert srv.server.prober is not None
        # A prober whose close waits forever, as a dependency stuck on a dead peer would.
        monkeypatch.setattr(srv.server.prober, "aclose", never.wait)
        await asyncio.wait_for(srv.server.stop(0.1), 10)
    messages = [r.getMessage() for r in caplog.records]
    assert "stopping: closing the prober did not finish in time; going on without it" in messages
    assert messages[-1] == "decider stopped"
