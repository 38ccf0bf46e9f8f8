"""A registered endpoint is probed at once: registered beside a healthy one, it takes its share
of the next decisions as soon as its first check answers, not after the start-up spread.

Backends are real HTTP servers on 127.0.0.1; the only time bound is a generous wait.
"""

import asyncio
import time

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb
from probe.standin import StandIn

HEALTHY = epb.HEALTH_STATUS_HEALTHY
# Were newcomers spread like the start-up snapshot, they would wait up to this long.
SPREAD_S = 600


def endpoint(eid: str, backend: StandIn) -> epb.Endpoint:
    return epb.Endpoint(
        id=eid, address=f"127.0.0.1:{backend.port}", model="m", health_url=f"{backend.url}/health"
    )


async def wait_healthy(srv, eid: str, *, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while True:
        listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(model="m"))
        if listed.statuses[eid].health == HEALTHY:
            return
        assert time.monotonic() < deadline, f"{eid}: {listed.statuses[eid]}"
        await asyncio.sleep(0.02)


async def test_registered_endpoints_share_the_next_decisions_at_once(start_server):
    backends = [await StandIn().start() for _ in range(3)]
    doc = {"probe": {"first_check_spread_s": SPREAD_S, "interval_s": 3600, "liveness": "off"}}
    try:
        async with start_server(doc) as srv:
            await srv.registry.RegisterEndpoint(
                rpb.RegisterEndpointRequest(endpoint=endpoint("a", backends[0]))
            )
            await wait_healthy(srv, "a", within_s=10)
            for eid, backend in (("b", backends[1]), ("c", backends[2])):
                await srv.registry.RegisterEndpoint(
                    rpb.RegisterEndpointRequest(endpoint=endpoint(eid, backend))
                )

            chosen: list[str] = []
            deadline = time.monotonic() + 10
            while set(chosen[-3:]) != {"a", "b", "c"} and time.monotonic() < deadline:
                decision = await srv.decider.Decide(
                    dpb.DecideRequest(model="m", strategy="round_robin")
                )
                chosen.append(decision.endpoint.id)
                await asyncio.sleep(0.01)
            assert set(chosen[-3:]) == {"a", "b", "c"}, chosen[-12:]
            # Each newcomer was checked once, on registration; the next check is an hour away.
            assert backends[1].requests == 1 and backends[2].requests == 1
    finally:
        for backend in backends:
            await backend.kill()
