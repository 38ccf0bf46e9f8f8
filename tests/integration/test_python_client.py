"""decider_client.DeciderClient against the real server: the gateway flow end to end."""

from __future__ import annotations

import ast
import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from decider_support import endpoints_doc

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb
from decider_client import (
    Attempt,
    AttemptsExhausted,
    ClientOptions,
    DeciderClient,
    DeciderUnreachable,
    InvalidRequest,
    NoHealthyEndpoint,
    NotFound,
    Outcome,
    QuotaExceeded,
    Unauthenticated,
    decide_request,
    is_no_healthy_endpoint,
    is_unreachable,
)

# Fast failover: breakers open after 3 reported failures, fallbacks cover the whole model.
RR = dpb.DecideRequest(model="m", strategy="round_robin")
DOC: dict[str, Any] = {
    **endpoints_doc("m", 3),
    "routing": {
        "max_fallbacks": 3,
        "retry_max_attempts": 4,
        "retry_initial_backoff_s": 0.005,
        "retry_max_backoff_s": 0.02,
    },
    "breaker": {"consecutive_failures": 3, "open_s": 120.0},
}


def attempts(failing: set[str]) -> tuple[Any, Counter[str]]:
    """An attempt function that fails on `failing` endpoints, counting every call."""
    calls: Counter[str] = Counter()

    async def attempt(ep: epb.Endpoint) -> Attempt:
        calls[ep.id] += 1
        if ep.id in failing:
            return Attempt(result=dpb.RESULT_ERROR, error="connection refused")
        return Attempt(result=dpb.RESULT_SUCCESS, input_tokens=21, output_tokens=7)

    return attempt, calls


async def wait_for(what: str, cond: Any) -> None:
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


async def test_route_spreads_requests_and_reports_every_outcome(start_server):
    async with (
        start_server(DOC) as srv,
        DeciderClient(srv.address, ClientOptions(decide_timeout_s=5)) as client,
    ):
        attempt, calls = attempts(set())
        for _ in range(30):
            routed = await client.route(RR, attempt)
            assert routed.decision_id and not routed.fail_open and len(routed.tried) == 1
        assert set(calls) == {"m-0", "m-1", "m-2"} and sum(calls.values()) == 30

        await client.flush()
        listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(model="m"))
        for ep_id, status in listed.statuses.items():
            assert status.in_flight == 0, ep_id
            assert status.latency_ewma.ToNanoseconds() > 0, ep_id
        assert client.stats.failed_reports == 0 and client.stats.dropped_reports == 0


async def test_route_fails_over_and_the_breaker_reaches_the_health_view(start_server):
    async with (
        start_server(DOC) as srv,
        DeciderClient(srv.address, ClientOptions(decide_timeout_s=5, watch=True)) as client,
    ):
        await wait_for("the first snapshot", lambda: client.health_snapshots > 0)
        attempt, calls = attempts({"m-0"})
        for _ in range(24):
            routed = await client.route(RR, attempt)
            assert routed.endpoint is not None and routed.endpoint.id != "m-0"

        def breaker_open() -> bool:
            view = client.health("m-0")
            return view is not None and view.breaker_state == epb.BREAKER_STATE_OPEN

        await wait_for("m-0's breaker to open", breaker_open)
        before = calls["m-0"]
        for _ in range(6):
            await client.route(RR, attempt)
        assert calls["m-0"] == before, "Decider still chose m-0 with its breaker open"


async def test_route_decides_again_without_the_endpoints_it_tried(start_server):
    doc = {**DOC, "routing": {**DOC["routing"], "max_fallbacks": 0}}
    async with (
        start_server(doc) as srv,
        DeciderClient(srv.address, ClientOptions(decide_timeout_s=5)) as client,
    ):
        attempt, _ = attempts({"m-0", "m-1"})
        routed = await client.route(RR, attempt)
        # Without fallbacks every retry is a new Decide excluding what failed.
        assert routed.endpoint is not None and routed.endpoint.id == "m-2"
        assert len(routed.tried) == len(set(routed.tried)) <= 3


async def test_route_raises_when_every_endpoint_fails(start_server):
    async with (
        start_server(DOC) as srv,
        DeciderClient(srv.address, ClientOptions(decide_timeout_s=5)) as client,
    ):
        attempt, calls = attempts({"m-0", "m-1", "m-2"})
        with pytest.raises(AttemptsExhausted) as info:
            await client.route(dpb.DecideRequest(model="m"), attempt)
        assert sorted(info.value.routed.tried) == ["m-0", "m-1", "m-2"]
        assert all(n == 1 for n in calls.values())


async def test_refusals_are_raised_and_never_fail_open(start_server):
    async with (
        start_server(DOC) as srv,
        DeciderClient(srv.address, ClientOptions(decide_timeout_s=5, fail_open=True)) as client,
    ):
        with pytest.raises(NotFound) as info:
            await client.decide(dpb.DecideRequest(model="nobody-serves-this"))
        assert info.value.code == grpc.StatusCode.NOT_FOUND

        everything = dpb.DecideRequest(model="m", exclude_endpoint_ids=["m-0", "m-1", "m-2"])
        with pytest.raises(NoHealthyEndpoint) as info:
            await client.decide(everything)
        assert is_no_healthy_endpoint(info.value) and not is_unreachable(info.value)
        assert client.stats.fail_open_decisions == 0


async def test_fail_open_routes_to_last_known_endpoints_when_decider_is_gone(start_server):
    async with start_server(DOC) as srv:
        opened = DeciderClient(srv.address, ClientOptions(decide_timeout_s=1, fail_open=True))
        closed = DeciderClient(srv.address, ClientOptions(decide_timeout_s=1))
        try:
            # Learn every endpoint (each decision names one plus its fallbacks).
            await opened.decide(dpb.DecideRequest(model="m"))
            await closed.decide(dpb.DecideRequest(model="m"))
            assert [ep.id for ep in opened.known_endpoints("m")] == ["m-0", "m-1", "m-2"]
            await srv.server.stop(0)

            attempt, calls = attempts(set())
            for _ in range(6):
                routed = await opened.route(dpb.DecideRequest(model="m"), attempt)
                assert routed.fail_open and routed.decision_id == ""
            assert len(calls) > 1, "fail-open should spread over the known endpoints"
            with pytest.raises(DeciderUnreachable):
                await closed.decide(dpb.DecideRequest(model="m"))
            with pytest.raises(DeciderUnreachable):
                await opened.decide(dpb.DecideRequest(model="never-seen"))
        finally:
            await opened.close()
            await closed.close()


async def test_refusals_carry_their_details(start_server):
    doc = {**DOC, "quotas": {"tenants": {"acme": {"requests_per_minute": 2}}}}
    async with (
        start_server(doc, admin_token="s3cret") as srv,
        DeciderClient(srv.address, ClientOptions(decide_timeout_s=5, fail_open=True)) as client,
    ):
        for _ in range(2):
            await client.decide(dpb.DecideRequest(model="m", tenant="acme"))
        with pytest.raises(QuotaExceeded) as quota:
            await client.decide(dpb.DecideRequest(model="m", tenant="acme"))
        assert quota.value.reason == "QUOTA_EXHAUSTED" and quota.value.retry_after_s > 0

        with pytest.raises(InvalidRequest) as bad:
            await client.decide(dpb.DecideRequest(model="", tenant="t" * 600))
        assert {f for f, _ in bad.value.status.field_violations} == {"model", "tenant"}

        with pytest.raises(Unauthenticated) as denied:
            await client.refresh_endpoints()
        assert denied.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert client.stats.fail_open_decisions == 0


async def test_refresh_and_prefix_signals_from_an_openai_body(start_server):
    options = ClientOptions(decide_timeout_s=5, admin_token="s3cret", watch_model="m")
    async with (
        start_server(DOC, admin_token="s3cret") as srv,
        DeciderClient(srv.address, options) as client,
    ):
        await client.refresh_endpoints()
        assert [ep.id for ep in client.known_endpoints()] == ["m-0", "m-1", "m-2"]
        system = "You are a careful assistant. " * 8
        body = {
            "model": "m",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": "hi"},
            ],
        }
        request = decide_request(body, strategy="cache_aware")
        assert len(request.prefix_hashes) >= 3 and request.estimated_input_tokens > 0
        first = await client.decide(request)
        # A success indexes the prompt's prefix blocks for the endpoint that served it.
        assert await client.report_outcome(
            Outcome(
                decision_id=first.decision_id,
                endpoint_id=first.endpoint.id,
                result=dpb.RESULT_SUCCESS,
                latency_s=0.2,
            )
        )
        # The same system prompt with another question lands where the first one did.
        other = {**body, "messages": [body["messages"][0], {"role": "user", "content": "bye"}]}
        second = await client.decide(decide_request(other, strategy="cache_aware"))
        assert second.endpoint.id == first.endpoint.id


async def test_the_python_example_in_clients_md_runs(start_server):
    section = (Path(__file__).parents[2] / "docs" / "CLIENTS.md").read_text()
    section = section.split("## Python\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    sent: list[str] = []

    def model_server(request: httpx.Request) -> httpx.Response:
        sent.append(f"{request.url.host}:{request.url.port}")
        return httpx.Response(200, json={"usage": {"prompt_tokens": 5, "completion_tokens": 7}})

    async with (
        start_server(DOC) as srv,
        httpx.AsyncClient(transport=httpx.MockTransport(model_server)) as http,
    ):
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        scope: dict[str, Any] = {"http": http, "body": body}
        example = compile(
            code.replace("127.0.0.1:50051", srv.address),
            "CLIENTS.md",
            "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
        )
        pending = eval(example, scope)
        if pending is not None:
            await pending
    routed = scope["routed"]
    assert routed.attempt.input_tokens == 5 and routed.decision_id
    assert sent == [routed.endpoint.address]
