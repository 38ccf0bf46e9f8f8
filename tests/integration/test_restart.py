"""Registered endpoints survive a restart; the config file stays the source of config endpoints."""

from __future__ import annotations

from decider_support import endpoints_doc

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb


async def test_restart_keeps_the_registry(start_server):
    doc = endpoints_doc("m", 1)
    async with start_server(doc) as srv:
        for i in range(3):
            await srv.registry.RegisterEndpoint(
                rpb.RegisterEndpointRequest(
                    endpoint=epb.Endpoint(
                        id=f"r{i}",
                        address=f"10.0.0.{i}:8000",
                        model="dyn",
                        labels={"i": str(i)},
                        capabilities=["tools"],
                    )
                )
            )
        await srv.registry.DeregisterEndpoint(rpb.DeregisterEndpointRequest(endpoint_id="r1"))

    async with start_server(doc) as srv:
        listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest())
        by_id = {e.id: e for e in listed.endpoints}
        assert set(by_id) == {"m-0", "r0", "r2"}
        assert by_id["r2"].labels["i"] == "2"
        assert list(by_id["r2"].capabilities) == ["tools"]
        assert listed.statuses["r0"].source == "registry"
        reply = await srv.decider.Decide(dpb.DecideRequest(model="dyn"))
        assert reply.endpoint.id in {"r0", "r2"}


async def test_without_a_data_dir_the_registry_is_in_memory(start_server):
    async with start_server(data_dir="") as srv:
        await srv.registry.RegisterEndpoint(
            rpb.RegisterEndpointRequest(endpoint=epb.Endpoint(id="a", address="h:1", model="m"))
        )
    async with start_server(data_dir="") as srv:
        listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest())
        assert not listed.endpoints
