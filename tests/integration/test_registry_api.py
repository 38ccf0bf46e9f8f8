"""RegistryService through the real server: register, list, replace, deregister, validation."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from decider_support import BadRequest, detail, endpoints_doc
from google.protobuf.duration_pb2 import Duration

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb


def _endpoint(id_: str, model: str = "m", **kw) -> epb.Endpoint:
    return epb.Endpoint(id=id_, address=f"10.0.0.1:{8000 + len(id_)}", model=model, **kw)


async def test_register_list_deregister(start_server):
    async with start_server() as srv:
        reply = await srv.registry.RegisterEndpoint(
            rpb.RegisterEndpointRequest(
                endpoint=_endpoint("a", capabilities=["tools"], labels={"zone": "x"}, weight=0)
            )
        )
        assert reply.created
        assert reply.endpoint.weight == 1  # 0 means 1
        await srv.registry.RegisterEndpoint(rpb.RegisterEndpointRequest(endpoint=_endpoint("b")))
        await srv.registry.RegisterEndpoint(
            rpb.RegisterEndpointRequest(endpoint=_endpoint("c", model="other"))
        )

        listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(model="m"))
        assert [e.id for e in listed.endpoints] == ["a", "b"]
        assert listed.endpoints[0].labels["zone"] == "x"
        assert set(listed.statuses) == {"a", "b"}
        assert listed.statuses["a"].source == "registry"
        assert listed.statuses["a"].health in (
            epb.HEALTH_STATUS_HEALTHY,
            epb.HEALTH_STATUS_UNSPECIFIED,
        )

        replaced = await srv.registry.RegisterEndpoint(
            rpb.RegisterEndpointRequest(endpoint=_endpoint("a", weight=5))
        )
        assert not replaced.created
        assert replaced.endpoint.weight == 5

        await srv.registry.DeregisterEndpoint(rpb.DeregisterEndpointRequest(endpoint_id="a"))
        listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest())
        assert [e.id for e in listed.endpoints] == ["b", "c"]


async def test_registered_endpoint_is_chosen_at_once(start_server):
    async with start_server() as srv:
        await srv.registry.RegisterEndpoint(rpb.RegisterEndpointRequest(endpoint=_endpoint("a")))
        reply = await srv.decider.Decide(dpb.DecideRequest(model="m"))
        assert reply.endpoint.id == "a"
        await srv.registry.DeregisterEndpoint(rpb.DeregisterEndpointRequest(endpoint_id="a"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.decider.Decide(dpb.DecideRequest(model="m"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_config_endpoints_are_listed_with_their_source(start_server):
    async with start_server(endpoints_doc("m", 2)) as srv:
        listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest())
        assert {s.source for s in listed.statuses.values()} == {"config"}


async def test_probe_header_values_are_redacted(start_server):
    async with start_server() as srv:
        await srv.registry.RegisterEndpoint(
            rpb.RegisterEndpointRequest(
                endpoint=_endpoint("a", probe_headers={"authorization": "Bearer secret"})
            )
        )
        listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest())
        assert dict(listed.endpoints[0].probe_headers) == {"authorization": "<redacted>"}


@pytest.mark.parametrize(
    ("endpoint", "fields"),
    [
        (epb.Endpoint(address="h:1", model="m"), {"endpoint.id"}),
        (epb.Endpoint(id="a", model="m"), {"endpoint.address"}),
        (epb.Endpoint(), {"endpoint.id", "endpoint.address", "endpoint.model"}),
        (epb.Endpoint(id="a", address="no-port", model="m"), {"endpoint.address"}),
        (
            epb.Endpoint(id="a", address="h:1", model="m", health_url="ftp://x"),
            {"endpoint.health_url"},
        ),
        (epb.Endpoint(id="a" * 500, address="h:1", model="m"), {"endpoint.id"}),
    ],
)
async def test_register_rejects_bad_endpoints_field_by_field(start_server, endpoint, fields):
    async with start_server() as srv:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.registry.RegisterEndpoint(rpb.RegisterEndpointRequest(endpoint=endpoint))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = detail(err.value, BadRequest).field_violations
        assert {v.field for v in violations} == fields


async def test_register_without_endpoint_is_invalid(start_server):
    async with start_server() as srv:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.registry.RegisterEndpoint(rpb.RegisterEndpointRequest())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in detail(err.value, BadRequest).field_violations] == ["endpoint"]


async def test_deregister_unknown_is_not_found(start_server):
    async with start_server() as srv:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.registry.DeregisterEndpoint(
                rpb.DeregisterEndpointRequest(endpoint_id="ghost")
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "ghost" in (err.value.details() or "")


async def _status(srv, endpoint_id: str) -> epb.EndpointStatus:
    listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(), timeout=5)
    return listed.statuses[endpoint_id]


async def test_standalone_prober_results_apply_then_go_stale(start_server):
    async with start_server(endpoints_doc("m", 2, probe={"embedded": False})) as srv:
        assert srv.server.prober is None
        reply = await srv.registry.ReportProbeResults(
            rpb.ReportProbeResultsRequest(
                prober_id="probe-a",
                results=[
                    rpb.ProbeResult(
                        endpoint_id="m-0", status=epb.HEALTH_STATUS_UNHEALTHY, reason="HTTP 503"
                    ),
                    rpb.ProbeResult(endpoint_id="ghost", status=epb.HEALTH_STATUS_HEALTHY),
                ],
                valid_for=Duration(nanos=300_000_000),
            )
        )
        assert list(reply.unknown_endpoint_ids) == ["ghost"]
        status = await _status(srv, "m-0")
        assert status.health == epb.HEALTH_STATUS_UNHEALTHY
        assert status.health_reason == "probe-a: HTTP 503"

        for _ in range(200):
            status = await _status(srv, "m-0")
            if "stale" in status.health_reason:
                break
            await asyncio.sleep(0.05)
        assert status.health == epb.HEALTH_STATUS_UNSPECIFIED
        assert status.health_reason.startswith("probe-a: results stale")
