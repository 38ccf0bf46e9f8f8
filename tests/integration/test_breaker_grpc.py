"""Circuit breakers through the real server: reported errors open one, Decide, WatchHealth and
ListEndpoints show it, it goes half-open after open_s, trial successes close it; 429s do not."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from decider_support import ErrorInfo, detail, endpoints_doc

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb

MODEL = "m"
WAIT_S = 20.0


def _doc(count: int, *, open_s: float, **routing: Any) -> dict[str, Any]:
    return endpoints_doc(
        MODEL,
        count,
        routing={"default_strategy": "round_robin", **routing},
        breaker={
            "consecutive_failures": 3,
            "open_s": open_s,
            "half_open_trials": 2,
            "half_open_successes": 2,
        },
    )


async def _decide(srv, *exclude: str) -> dpb.DecideResponse:
    reply: dpb.DecideResponse = await srv.decider.Decide(
        dpb.DecideRequest(model=MODEL, exclude_endpoint_ids=list(exclude)), timeout=10
    )
    return reply


async def _report(srv, reply: dpb.DecideResponse, result: dpb.Result.ValueType) -> None:
    done = await srv.decider.ReportOutcome(
        dpb.ReportOutcomeRequest(
            decision_id=reply.decision_id, endpoint_id=reply.endpoint.id, result=result
        ),
        timeout=10,
    )
    assert done.decision_found


async def _fail(srv, endpoint_id: str, others: list[str], times: int) -> None:
    """`times` decisions for `endpoint_id` (the others excluded), each reported as an error."""
    for _ in range(times):
        reply = await _decide(srv, *others)
        assert reply.endpoint.id == endpoint_id
        await _report(srv, reply, dpb.RESULT_ERROR)


async def _breaker(srv, endpoint_id: str) -> int:
    listing = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(model=MODEL), timeout=10)
    state: int = listing.statuses[endpoint_id].breaker_state
    return state


async def _watch(srv) -> Any:
    call = srv.decider.WatchHealth(dpb.WatchHealthRequest(model=MODEL))
    first = await asyncio.wait_for(call.read(), WAIT_S)
    assert first.snapshot
    return call


async def _until(call, predicate: Callable[[dpb.HealthEvent], bool]) -> dpb.HealthEvent:
    """The first event matching `predicate`; every event read on the way is kept in `seen`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    seen: list[dpb.HealthEvent] = []
    while (left := deadline - loop.time()) > 0:
        try:
            reply: dpb.WatchHealthResponse = await asyncio.wait_for(call.read(), left)
        except TimeoutError:
            break
        for event in reply.events:
            if predicate(event):
                return event
            seen.append(event)
    raise AssertionError(f"no matching event within {WAIT_S} s; saw {seen}")


def _breaker_event(
    endpoint_id: str, state: epb.BreakerState.ValueType
) -> Callable[[dpb.HealthEvent], bool]:
    return lambda e: e.endpoint_id == endpoint_id and e.breaker_state == state


async def test_reported_errors_open_the_breaker_and_decide_avoids_the_endpoint(start_server):
    async with start_server(_doc(2, open_s=60.0)) as srv:
        watch = await _watch(srv)
        await _fail(srv, "m-0", ["m-1"], 2)
        assert await _breaker(srv, "m-0") == epb.BREAKER_STATE_CLOSED
        await _fail(srv, "m-0", ["m-1"], 1)

        event = await _until(watch, _breaker_event("m-0", epb.BREAKER_STATE_OPEN))
        assert "3 consecutive failures" in event.reason, event.reason
        assert event.model == MODEL
        assert await _breaker(srv, "m-0") == epb.BREAKER_STATE_OPEN
        assert await _breaker(srv, "m-1") == epb.BREAKER_STATE_CLOSED

        for _ in range(10):
            reply = await _decide(srv)
            assert reply.endpoint.id == "m-1", reply.reason
            assert dict(reply.skipped) == {"breaker_open": 1}
            assert "1 breaker open" in reply.reason, reply.reason
        explained = await srv.decider.Decide(
            dpb.DecideRequest(model=MODEL, explain=True), timeout=10
        )
        skipped = {c.endpoint_id: c for c in explained.candidates if not c.rank}
        assert skipped["m-0"].breaker_state == epb.BREAKER_STATE_OPEN
        assert skipped["m-0"].skip_reason.startswith("breaker open"), skipped["m-0"]
        watch.cancel()


async def test_an_open_breaker_on_the_only_endpoint_is_unavailable_and_says_so(start_server):
    async with start_server(_doc(1, open_s=60.0)) as srv:
        await _fail(srv, "m-0", [], 3)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _decide(srv)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        message = err.value.details() or ""
        assert "breaker open" in message, message
        info = detail(err.value, ErrorInfo)
        assert info.reason == "NO_HEALTHY_ENDPOINT"
        assert info.metadata["registered"] == "1"
        assert info.metadata["skipped_breaker_open"] == "1"


async def test_the_breaker_goes_half_open_and_trial_successes_close_it(start_server):
    async with start_server(_doc(2, open_s=0.5)) as srv:
        watch = await _watch(srv)
        await _fail(srv, "m-0", ["m-1"], 3)
        await _until(watch, _breaker_event("m-0", epb.BREAKER_STATE_OPEN))

        half_open = await _until(watch, _breaker_event("m-0", epb.BREAKER_STATE_HALF_OPEN))
        assert half_open.model == MODEL
        assert await _breaker(srv, "m-0") == epb.BREAKER_STATE_HALF_OPEN

        # Half-open admits two trial requests at a time, in turn with the healthy endpoint.
        trials = []
        for _ in range(8):
            reply = await _decide(srv)
            if reply.endpoint.id == "m-0":
                trials.append(reply)
            if len(trials) == 2:
                break
        assert len(trials) == 2
        # Both trial slots are taken: m-0 gets nothing more until a trial ends.
        for _ in range(4):
            reply = await _decide(srv)
            assert reply.endpoint.id == "m-1", reply.reason
            assert dict(reply.skipped) == {"breaker_half_open": 1}

        for trial in trials:
            await _report(srv, trial, dpb.RESULT_SUCCESS)
        closed = await _until(watch, _breaker_event("m-0", epb.BREAKER_STATE_CLOSED))
        assert closed.model == MODEL
        assert await _breaker(srv, "m-0") == epb.BREAKER_STATE_CLOSED

        # Chosen normally again: its turn every other decision, beyond the two trial slots.
        replies = [await _decide(srv) for _ in range(10)]
        assert Counter(r.endpoint.id for r in replies) == {"m-0": 5, "m-1": 5}
        assert not any(r.skipped for r in replies)
        watch.cancel()


async def test_rate_limited_outcomes_do_not_open_the_breaker(start_server):
    # m-2 only marks a point in the event stream: it is deregistered after the 429s.
    doc = _doc(3, open_s=60.0, rate_limited_cooldown_s=0.2)
    async with start_server(doc) as srv:
        watch = await _watch(srv)
        limited = [await _decide(srv, "m-1", "m-2") for _ in range(6)]
        assert {r.endpoint.id for r in limited} == {"m-0"}
        for reply in limited:
            await _report(srv, reply, dpb.RESULT_RATE_LIMITED)
        assert await _breaker(srv, "m-0") == epb.BREAKER_STATE_CLOSED

        await srv.registry.DeregisterEndpoint(
            rpb.DeregisterEndpointRequest(endpoint_id="m-2"), timeout=10
        )
        marker = await _until(
            watch, lambda e: e.endpoint_id == "m-2" or e.breaker_state == epb.BREAKER_STATE_OPEN
        )
        assert marker.endpoint_id == "m-2" and marker.removed, marker

        # Once its short cooldown is over, m-0 takes requests again with no half-open phase.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while (reply := await _decide(srv)).endpoint.id != "m-0":
            assert loop.time() < deadline, reply.reason
            await asyncio.sleep(0.05)
        assert not reply.skipped, reply.reason
        assert await _breaker(srv, "m-0") == epb.BREAKER_STATE_CLOSED

        # The same breaker does open on three errors.
        await _fail(srv, "m-0", ["m-1"], 3)
        await _until(watch, _breaker_event("m-0", epb.BREAKER_STATE_OPEN))
        watch.cancel()
