"""decider_client in streaming mode against the real server: one DecideStream shared by
concurrent decide() calls, with the same answers, errors and fail-open as unary calls."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from decider_support import endpoints_doc

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb
from decider_client import (
    Attempt,
    ClientOptions,
    DeciderClient,
    DeciderUnreachable,
    InvalidRequest,
    NoHealthyEndpoint,
    NotFound,
    is_no_healthy_endpoint,
    is_unreachable,
)

RR = dpb.DecideRequest(model="m", strategy="round_robin")


async def succeed(ep: epb.Endpoint) -> Attempt:
    return Attempt(result=dpb.RESULT_SUCCESS, input_tokens=21, output_tokens=7)


async def in_flight(srv: Any) -> dict[str, int]:
    listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(model="m"))
    return {ep_id: status.in_flight for ep_id, status in listed.statuses.items()}


async def wait_for(what: str, cond: Any) -> None:
    for _ in range(1000):
        if await cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


async def test_concurrent_decides_share_one_stream_and_route(start_server):
    async with (
        start_server(endpoints_doc("m", 3)) as srv,
        DeciderClient(srv.address, ClientOptions(decide_timeout_s=5, stream=True)) as client,
    ):
        decisions = await asyncio.gather(*(client.decide(RR) for _ in range(90)))
        assert len({d.decision_id for d in decisions}) == 90
        assert {d.endpoint.id for d in decisions} == {"m-0", "m-1", "m-2"}
        for _ in range(9):
            routed = await client.route(RR, succeed)
            assert routed.decision_id and not routed.fail_open
        await client.flush()
        # The 90 bare decisions are still in flight; the 9 routed ones were reported.
        assert sum((await in_flight(srv)).values()) == 90


async def test_refusals_are_raised_as_with_unary_calls_and_the_stream_goes_on(start_server):
    async with (
        start_server(endpoints_doc("m", 2)) as srv,
        DeciderClient(
            srv.address, ClientOptions(decide_timeout_s=5, fail_open=True, stream=True)
        ) as client,
    ):
        with pytest.raises(NotFound) as info:
            await client.decide(dpb.DecideRequest(model="nobody-serves-this"))
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        everything = dpb.DecideRequest(model="m", exclude_endpoint_ids=["m-0", "m-1"])
        with pytest.raises(NoHealthyEndpoint) as info:
            await client.decide(everything)
        assert is_no_healthy_endpoint(info.value) and not is_unreachable(info.value)
        with pytest.raises(InvalidRequest) as info:
            await client.decide(dpb.DecideRequest(model=""))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert (await client.decide(RR)).endpoint.id in {"m-0", "m-1"}
        assert client.stats.fail_open_decisions == 0


async def test_fails_open_when_the_server_drains_the_stream(start_server):
    async with (
        start_server(endpoints_doc("m", 2)) as srv,
        DeciderClient(
            srv.address, ClientOptions(decide_timeout_s=2, fail_open=True, stream=True)
        ) as client,
    ):
        await client.decide(RR)
        await srv.server.stop(5)
        decision = await client.decide(RR)
        assert decision.fail_open
        assert client.stats.fail_open_decisions == 1


async def test_a_decide_racing_the_end_of_its_stream_fails_open(start_server):
    # The stream has ended but its reader task has not run yet: grpc.aio refuses the write
    # with InvalidStateError, and the caller must still get the stream's end (here: fail-open)
    # rather than that error. Ending the call by hand makes the race deterministic.
    async with (
        start_server(endpoints_doc("m", 2)) as srv,
        DeciderClient(
            srv.address, ClientOptions(decide_timeout_s=2, fail_open=True, stream=True)
        ) as client,
    ):
        await client.decide(RR)
        client._stream._live.call.cancel()
        decision = await client.decide(RR)
        assert decision.fail_open and "decide stream ended" in decision.reason
        # The next call opens a new stream and is answered by the server again.
        assert not (await client.decide(RR)).fail_open
        assert client.stats.fail_open_decisions == 1


class HoldAnswers(grpc.aio.ServerInterceptor):
    """Holds every DecideStream answer until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.endswith("/DecideStream"):
            return handler
        inner = handler.stream_stream

        async def held(requests: Any, context: Any) -> Any:
            async for answer in inner(requests, context):
                await self.release.wait()
                yield answer

        return grpc.stream_stream_rpc_method_handler(
            held,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def test_a_decision_that_comes_too_late_is_reported_cancelled(start_server):
    hold = HoldAnswers()
    async with (
        start_server(endpoints_doc("m", 1), interceptors=[hold]) as srv,
        DeciderClient(srv.address, ClientOptions(decide_timeout_s=0.2, stream=True)) as client,
    ):
        with pytest.raises(DeciderUnreachable):
            await client.decide(RR)
        assert await in_flight(srv) == {"m-0": 1}
        hold.release.set()

        async def freed() -> bool:
            return await in_flight(srv) == {"m-0": 0}

        await wait_for("the late decision's in-flight slot to be freed", freed)
