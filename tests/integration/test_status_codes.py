"""Every status Decider answers with, and its google.rpc rich details."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from decider_support import BadRequest, ErrorInfo, QuotaFailure, RetryInfo, detail, endpoints_doc

from decider.api.interceptors import AdmissionInterceptor
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb


async def _decide_error(srv, request: dpb.DecideRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await srv.decider.Decide(request, timeout=5)
    return err.value


async def test_unserved_model_is_not_found(start_server):
    async with start_server(endpoints_doc("m", 1)) as srv:
        err = await _decide_error(srv, dpb.DecideRequest(model="nobody-serves-this"))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "nobody-serves-this" in (err.details() or "")
        assert detail(err, ErrorInfo).reason == "MODEL_NOT_FOUND"


async def _mark(srv, status: int, *ids: str) -> None:
    await srv.registry.ReportProbeResults(
        rpb.ReportProbeResultsRequest(
            prober_id="test",
            results=[
                rpb.ProbeResult(endpoint_id=i, status=status, reason="test says so") for i in ids
            ],
        )
    )


async def test_no_healthy_endpoint_is_unavailable_and_says_why(start_server):
    async with start_server(endpoints_doc("m", 3)) as srv:
        await _mark(srv, epb.HEALTH_STATUS_UNHEALTHY, "m-0", "m-1", "m-2")
        err = await _decide_error(srv, dpb.DecideRequest(model="m"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        info = detail(err, ErrorInfo)
        assert info.reason == "NO_HEALTHY_ENDPOINT"
        assert info.metadata["registered"] == "3"
        message = err.details() or ""
        assert "3" in message
        assert "unhealthy" in message.lower()


async def test_excluding_every_endpoint_is_unavailable(start_server):
    async with start_server(endpoints_doc("m", 2)) as srv:
        err = await _decide_error(
            srv, dpb.DecideRequest(model="m", exclude_endpoint_ids=["m-0", "m-1"])
        )
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert detail(err, ErrorInfo).reason == "NO_HEALTHY_ENDPOINT"


async def test_unhealthy_endpoints_are_skipped(start_server):
    doc = endpoints_doc("m", 3, routing={"default_strategy": "round_robin"})
    async with start_server(doc) as srv:
        await _mark(srv, epb.HEALTH_STATUS_UNHEALTHY, "m-0", "m-2")
        for _ in range(6):
            reply = await srv.decider.Decide(dpb.DecideRequest(model="m"))
            assert reply.endpoint.id == "m-1"
        assert reply.skipped


async def test_tenant_over_quota_is_resource_exhausted_with_retry_and_quota_details(start_server):
    doc = endpoints_doc("m", 2, quotas={"tenants": {"acme": {"requests_per_minute": 2}}})
    async with start_server(doc) as srv:
        for _ in range(2):
            await srv.decider.Decide(dpb.DecideRequest(model="m", tenant="acme"))
        err = await _decide_error(srv, dpb.DecideRequest(model="m", tenant="acme"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert detail(err, ErrorInfo).reason == "QUOTA_EXHAUSTED"
        retry = detail(err, RetryInfo)
        assert retry.retry_delay.seconds > 0 or retry.retry_delay.nanos > 0
        violations = detail(err, QuotaFailure).violations
        assert violations
        assert any("acme" in v.subject for v in violations)
        # Another tenant is not affected.
        await srv.decider.Decide(dpb.DecideRequest(model="m", tenant="other"))


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (dpb.DecideRequest(model="m", strategy="no_such_strategy"), "strategy"),
        (dpb.DecideRequest(model=""), "model"),
        (dpb.DecideRequest(model="m", session_id="s" * 10_000), "session_id"),
        (dpb.DecideRequest(model="m" * 10_000), "model"),
        (dpb.DecideRequest(model="m", tenant="t" * 600), "tenant"),
        (dpb.DecideRequest(model="m", prefix_hashes=list(range(10_000))), "prefix_hashes"),
        (dpb.DecideRequest(model="m", required_capabilities=["c"] * 100), "required_capabilities"),
        (dpb.DecideRequest(model="m", max_fallbacks=1000), "max_fallbacks"),
    ],
)
async def test_bad_decide_input_is_invalid_argument_with_field_violations(
    start_server, request_, field
):
    async with start_server(endpoints_doc("m", 2)) as srv:
        err = await _decide_error(srv, request_)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        fields = [v.field for v in detail(err, BadRequest).field_violations]
        assert field in fields


async def test_every_bad_field_is_named_at_once(start_server):
    async with start_server(endpoints_doc("m", 2)) as srv:
        err = await _decide_error(
            srv, dpb.DecideRequest(model="", tenant="t" * 600, prefix_hashes=list(range(9000)))
        )
        fields = {v.field for v in detail(err, BadRequest).field_violations}
        assert fields == {"model", "tenant", "prefix_hashes"}


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (dpb.ReportOutcomeRequest(decision_id="d", result=dpb.RESULT_SUCCESS), "endpoint_id"),
        (dpb.ReportOutcomeRequest(decision_id="d", endpoint_id="e"), "result"),
        (dpb.ReportOutcomeRequest(endpoint_id="e", result=99), "result"),
    ],
)
async def test_bad_outcome_is_invalid_argument(start_server, request_, field):
    async with start_server(endpoints_doc("m", 1)) as srv:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.decider.ReportOutcome(request_)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in [v.field for v in detail(err.value, BadRequest).field_violations]


async def test_oversized_message_is_resource_exhausted(start_server):
    async with start_server(endpoints_doc("m", 1), max_message_bytes=64 * 1024) as srv:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.decider.Decide(dpb.DecideRequest(model="m", request_id="x" * 100_000))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The server is fine afterwards.
        await srv.decider.Decide(dpb.DecideRequest(model="m"))


async def test_watcher_limit_is_resource_exhausted(start_server):
    async with start_server(endpoints_doc("m", 1), max_watchers=1) as srv:
        first = srv.decider.WatchHealth(dpb.WatchHealthRequest())
        snapshot = await asyncio.wait_for(first.read(), 5)
        assert snapshot.snapshot
        second = srv.decider.WatchHealth(dpb.WatchHealthRequest())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(second.read(), 5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert detail(err.value, ErrorInfo).reason == "SERVER_OVERLOADED"
        first.cancel()


async def test_draining_server_refuses_new_rpcs_with_unavailable(start_server):
    async with start_server(endpoints_doc("m", 1)) as srv:
        srv.server.admission.draining = True
        err = await _decide_error(srv, dpb.DecideRequest(model="m"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert detail(err, ErrorInfo).reason == "SHUTTING_DOWN"


async def test_concurrent_rpc_limit_is_resource_exhausted():
    """The admission interceptor on a real aio server with a handler that waits to be released."""
    release = asyncio.Event()

    async def wait(request: bytes, context) -> bytes:
        await release.wait()
        return request

    admission = AdmissionInterceptor(max_concurrent=2)
    server = grpc.aio.server(interceptors=[admission])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Slow", {"Wait": grpc.unary_unary_rpc_method_handler(wait)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Slow/Wait")
            held = [asyncio.ensure_future(call(b"x", timeout=10)) for _ in range(2)]
            for _ in range(500):
                if admission.active == 2:
                    break
                await asyncio.sleep(0.01)
            assert admission.active == 2
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(b"y", timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent_rpcs" in (err.value.details() or "")
            assert detail(err.value, ErrorInfo).reason == "SERVER_OVERLOADED"
            assert detail(err.value, RetryInfo).retry_delay.seconds >= 1
            release.set()
            assert await asyncio.gather(*held) == [b"x", b"x"]
            assert admission.active == 0
    finally:
        await server.stop(0)


@pytest.mark.parametrize(
    "method",
    [
        "/decider.v1.DeciderService/Decide",
        "/decider.v1.DeciderService/ReportOutcome",
        "/decider.v1.RegistryService/RegisterEndpoint",
        "/decider.v1.RegistryService/ListEndpoints",
        "/decider.v1.DeciderService/WatchHealth",
    ],
)
async def test_undecodable_bytes_get_a_status_and_the_server_stays_up(start_server, method):
    async with start_server(endpoints_doc("m", 1)) as srv:
        streaming = method.endswith("WatchHealth")
        call = srv.channel.unary_stream(method) if streaming else srv.channel.unary_unary(method)
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                if streaming:
                    await call(garbage, timeout=5).read()
                else:
                    await call(garbage, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not parse" in (err.value.details() or "")
        reply = await srv.decider.Decide(dpb.DecideRequest(model="m"), timeout=5)
        assert reply.endpoint.id == "m-0"
        assert srv.server.admission.active == 0
