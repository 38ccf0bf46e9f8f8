"""RegistryService is guarded by the admin bearer token; DeciderService never is."""

from __future__ import annotations

import grpc
import pytest
from decider_support import ErrorInfo, detail, endpoints_doc

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import registry_service_pb2 as rpb

TOKEN = "s3cret-admin-token"


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer wrong"),),
        (("authorization", TOKEN),),
        (("authorization", f"Basic {TOKEN}"),),
    ],
)
async def test_registry_calls_without_the_token_are_unauthenticated(start_server, metadata):
    async with start_server(endpoints_doc("m", 1), admin_token=TOKEN) as srv:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in (err.value.details() or "")
        assert TOKEN not in (err.value.details() or "")
        assert detail(err.value, ErrorInfo).reason == "UNAUTHENTICATED"


async def test_registry_calls_with_the_token_succeed(start_server):
    auth = (("authorization", f"Bearer {TOKEN}"),)
    async with start_server(endpoints_doc("m", 1), admin_token=TOKEN) as srv:
        listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(), metadata=auth)
        assert [e.id for e in listed.endpoints] == ["m-0"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.registry.DeregisterEndpoint(rpb.DeregisterEndpointRequest(endpoint_id="m-0"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await srv.registry.DeregisterEndpoint(
            rpb.DeregisterEndpointRequest(endpoint_id="m-0"), metadata=auth
        )


async def test_decider_service_needs_no_token(start_server):
    async with start_server(endpoints_doc("m", 1), admin_token=TOKEN) as srv:
        reply = await srv.decider.Decide(dpb.DecideRequest(model="m"))
        assert reply.endpoint.id == "m-0"


async def test_without_a_configured_token_registry_is_open(start_server):
    async with start_server(endpoints_doc("m", 1)) as srv:
        listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest())
        assert len(listed.endpoints) == 1
