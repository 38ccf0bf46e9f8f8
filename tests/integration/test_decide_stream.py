"""DecideStream through the real server: one answer per request, in order; refusals and bad
requests are answered in the stream, which goes on; half-close and drain end it cleanly."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from decider_support import BadRequest, ErrorInfo, QuotaFailure, RetryInfo, endpoints_doc
from google.rpc import status_pb2

from decider.v1 import decider_service_pb2 as dpb

ROUND_ROBIN = {"default_strategy": "round_robin"}


def ask(correlation_id: int, **fields: Any) -> dpb.DecideStreamRequest:
    fields.setdefault("model", "m")
    return dpb.DecideStreamRequest(
        correlation_id=correlation_id, decide=dpb.DecideRequest(**fields)
    )


def detail(error: dpb.Status, kind: Any) -> Any:
    # The error is a google.rpc.Status on the wire: parse it as one.
    status = status_pb2.Status.FromString(error.SerializeToString())
    (found,) = [d for d in status.details if d.Is(kind.DESCRIPTOR)]
    message = kind()
    found.Unpack(message)
    return message


async def test_answers_come_in_order_with_their_correlation_ids(start_server):
    async with start_server(endpoints_doc("m", 3, routing=ROUND_ROBIN)) as srv:
        requests = [ask(1000 + i) for i in range(60)]
        call = srv.decider.DecideStream(iter(requests), timeout=10)
        answers = [answer async for answer in call]
        assert [a.correlation_id for a in answers] == [r.correlation_id for r in requests]
        assert all(a.WhichOneof("result") == "decide" for a in answers)
        # Round robin from wherever it starts: decided in request order.
        chosen = [a.decide.endpoint.id for a in answers]
        assert set(chosen[:3]) == {"m-0", "m-1", "m-2"}
        assert chosen == chosen[:3] * 20
        assert len({a.decide.decision_id for a in answers}) == 60
        assert await call.code() == grpc.StatusCode.OK


async def test_a_refusal_mid_stream_is_answered_and_the_stream_goes_on(start_server):
    doc = endpoints_doc("m", 2, quotas={"tenants": {"acme": {"requests_per_minute": 1}}})
    async with start_server(doc) as srv:
        call = srv.decider.DecideStream(timeout=10)
        await call.write(ask(1, tenant="acme"))
        assert (await call.read()).WhichOneof("result") == "decide"

        await call.write(ask(2, tenant="acme"))
        refused = await call.read()
        assert refused.correlation_id == 2
        assert refused.WhichOneof("result") == "error"
        assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert detail(refused.error, ErrorInfo).reason == "QUOTA_EXHAUSTED"
        assert detail(refused.error, RetryInfo).retry_delay.ToNanoseconds() > 0
        assert detail(refused.error, QuotaFailure).violations

        await call.write(ask(3, model="no-such-model"))
        missing = await call.read()
        assert missing.error.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert detail(missing.error, ErrorInfo).reason == "MODEL_NOT_FOUND"

        await call.write(ask(4, tenant="other"))
        assert (await call.read()).decide.endpoint.id in {"m-0", "m-1"}
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_an_invalid_request_gets_invalid_argument_for_that_message_only(start_server):
    async with start_server(endpoints_doc("m", 2)) as srv:
        requests = [ask(1), ask(2, model="", session_id="s" * 600), ask(3)]
        answers = [a async for a in srv.decider.DecideStream(iter(requests), timeout=10)]
        assert [a.WhichOneof("result") for a in answers] == ["decide", "error", "decide"]
        bad = answers[1].error
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        fields = {v.field for v in detail(bad, BadRequest).field_violations}
        assert fields == {"model", "session_id"}


async def test_client_half_close_without_requests_ends_cleanly(start_server):
    async with start_server(endpoints_doc("m", 1)) as srv:
        call = srv.decider.DecideStream(timeout=10)
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        # The server still answers unary calls afterwards.
        assert (await srv.decider.Decide(dpb.DecideRequest(model="m"), timeout=5)).endpoint.id


async def test_drain_ends_an_idle_stream_with_shutting_down(start_server):
    async with start_server(endpoints_doc("m", 1)) as srv:
        call = srv.decider.DecideStream(timeout=20)
        await call.write(ask(7))
        assert (await call.read()).correlation_id == 7
        # The stream now waits for its next request; the drain must not wait out the grace.
        stopping = asyncio.create_task(srv.server.stop(15))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call.read(), 10)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (ended.value.details() or "")
        await asyncio.wait_for(stopping, 10)


async def test_new_streams_are_refused_while_draining(start_server):
    async with start_server(endpoints_doc("m", 1)) as srv:
        srv.server.admission.draining = True
        call = srv.decider.DecideStream(iter([ask(1)]), timeout=10)
        answers = []
        try:
            answers = [a async for a in call]
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert answers == []


async def test_undecodable_bytes_end_the_stream_with_invalid_argument(start_server):
    async with start_server(endpoints_doc("m", 1)) as srv:
        raw = srv.channel.stream_stream(
            "/decider.v1.DeciderService/DecideStream",
            request_serializer=lambda data: data,
            response_deserializer=dpb.DecideStreamResponse.FromString,
        )
        call = raw(timeout=10)
        await call.write(ask(1).SerializeToString())
        assert (await call.read()).correlation_id == 1
        await call.write(b"\xff\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
        assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not parse" in (ended.value.details() or "")
        # The server goes on serving.
        assert (await srv.decider.Decide(dpb.DecideRequest(model="m"), timeout=5)).endpoint.id
