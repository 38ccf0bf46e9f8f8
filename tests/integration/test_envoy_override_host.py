"""Through a real Envoy (examples/envoy/override_host.yaml: FULL_DUPLEX_STREAMED bodies, the
override_host policy with a retry policy) to three stand-in model servers, Decider picking."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest
from envoy_support import MODEL, Stack, stack

from decider.core.model import Decision
from decider.v1 import endpoint_pb2 as epb

TABLES = {
    "quotas": {"tenants": {"tight": {"requests_per_minute": 2}}},
    "breaker": {"consecutive_failures": 3, "open_s": 60.0},
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with stack(tmp_path_factory.mktemp("envoy"), tables=TABLES) as s:
        yield s


def outcome_for(gw: Stack, decision_id: str):
    gw.wait_until(
        lambda: any(o.decision_id == decision_id for o in gw.recording.outcomes),
        what=f"the outcome of {decision_id}",
    )
    return next(o for o in gw.recording.outcomes if o.decision_id == decision_id)


def decision_for(gw: Stack, decision_id: str) -> Decision:
    return next(
        d
        for d in gw.recording.decisions
        if isinstance(d, Decision) and d.decision_id == decision_id
    )


def test_requests_spread_over_the_three_backends_as_decider_picks(gw):
    served = Counter()
    for _ in range(30):
        response = gw.post(gw.chat())
        assert response.status_code == 200, response.text
        assert response.headers["x-decider-endpoint"] == response.headers["x-served-by"]
        assert response.headers["x-decider-reason"].startswith("round_robin")
        served[response.headers["x-served-by"]] += 1
    assert set(served) == {"model-0", "model-1", "model-2"}
    assert min(served.values()) >= 5, served


def test_a_session_header_keeps_its_backend_under_the_affinity_strategy(gw):
    bound = {}
    for session in ("alice", "bob", "carol", "dave"):
        headers = {"x-session-id": session, "x-decider-strategy": "affinity"}
        served = {gw.post(gw.chat(), headers=headers).headers["x-served-by"] for _ in range(5)}
        assert len(served) == 1, (session, served)
        bound[session] = served.pop()
    # The same sessions again, after the others: still where they were bound.
    for session, endpoint in bound.items():
        headers = {"x-session-id": session, "x-decider-strategy": "affinity"}
        assert gw.post(gw.chat(), headers=headers).headers["x-served-by"] == endpoint


def test_json_usage_is_counted_on_the_endpoint_that_served(gw):
    response = gw.post(gw.chat("count my tokens"))
    usage = response.json()["usage"]
    outcome = outcome_for(gw, response.headers["x-decider-decision-id"])
    assert outcome.endpoint_id == response.headers["x-served-by"]
    assert outcome.result.name == "SUCCESS"
    assert (outcome.input_tokens, outcome.output_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert outcome.latency_s > 0 and outcome.ttft_s == 0.0


def test_an_sse_stream_arrives_intact_with_its_usage_counted(gw):
    with gw.http.stream(
        "POST", "/v1/chat/completions", json=gw.chat("stream please", stream=True)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        text = b"".join(response.iter_bytes()).decode()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    words = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert words.startswith(f"Hello from {response.headers['x-served-by']} (")
    assert words.endswith("You said: stream please")
    usage = chunks[-1]["usage"]
    outcome = outcome_for(gw, response.headers["x-decider-decision-id"])
    assert (outcome.input_tokens, outcome.output_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert 0 < outcome.ttft_s <= outcome.latency_s


def test_a_1mb_prompt_arrives_intact(gw):
    body = json.dumps(gw.chat("x" * (1 << 20) + " the end")).encode()
    response = gw.http.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text[:500]
    assert response.headers["x-request-body-sha256"] == hashlib.sha256(body).hexdigest()
    outcome = outcome_for(gw, response.headers["x-decider-decision-id"])
    assert outcome.input_tokens == len(body) // 4


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"model": "no-such-model", "messages": []}', 404, "model_not_found"),
        (b'{"model": ', 400, "invalid_json"),
        (b'{"messages": []}', 400, "missing_model"),
        (b'{"model": "llama-3.1-8b", "stream": "yes"}', 400, "invalid_request"),
    ],
)
def test_requests_decider_cannot_route_get_an_openai_style_error(gw, body, status, code):
    response = gw.http.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]


def test_a_strategy_decider_does_not_know_is_a_400_naming_it(gw):
    response = gw.post(gw.chat(), headers={"x-decider-strategy": "fastest-please"})
    assert response.status_code == 400
    assert "fastest-please" in response.json()["error"]["message"]


def test_a_tenant_over_quota_gets_429_with_retry_after(gw):
    statuses = [gw.post(gw.chat(), headers={"x-tenant-id": "tight"}) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    refused = statuses[-1]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-decider-refusal"] == "QUOTA_EXHAUSTED"
    assert refused.json()["error"]["code"] == "quota_exhausted"


def test_a_dead_primary_is_retried_on_a_fallback_and_charged_to_the_endpoint_that_served(gw):
    dead = gw.stand_ins[0]
    # A session bound to the endpoint about to die makes it the primary of the next request,
    # sent before the prober can notice the death.
    affinity = {"x-decider-strategy": "affinity"}
    session = gw.pinned_session(dead.name, affinity)
    retried_before = gw.envoy.stat("cluster.models.upstream_rq_retry_success")
    gw.bg.run(dead.close())
    try:
        response = gw.post(gw.chat(), headers={**affinity, "x-session-id": session})
        assert response.status_code == 200, response.text
        decision = decision_for(gw, response.headers["x-decider-decision-id"])
        assert decision.endpoint.id == dead.name, "the prober saw the death first"
        served = response.headers["x-served-by"]
        assert served != dead.name
        assert response.headers["x-decider-endpoint"] == served
        outcome = outcome_for(gw, response.headers["x-decider-decision-id"])
        assert outcome.endpoint_id == served
        assert outcome.result.name == "SUCCESS"
        assert gw.envoy.stat("cluster.models.upstream_rq_retry_success") > retried_before
    finally:
        gw.bg.run(dead.start())
        gw.wait_until(lambda: gw.healthy_count() == 3, what="model-0 healthy again")


def test_all_backends_dead_gives_503_with_the_reason(gw):
    for stand_in in gw.stand_ins:
        gw.bg.run(stand_in.close())
    try:
        gw.wait_until(lambda: gw.healthy_count() == 0, what="the prober to see every death")
        response = gw.post(gw.chat())
        assert response.status_code == 503
        assert response.headers["x-decider-refusal"] == "NO_HEALTHY_ENDPOINT"
        error = response.json()["error"]
        assert error["code"] == "no_healthy_endpoint"
        assert MODEL in error["message"] and "unhealthy" in error["message"]
    finally:
        for stand_in in gw.stand_ins:
            gw.bg.run(stand_in.start())
        gw.wait_until(lambda: gw.healthy_count() == 3, what="every stand-in healthy again")


def test_a_breaker_opened_by_errors_through_envoy_shows_on_watch_health(gw):
    failing = gw.stand_ins[1]
    failing.fail_status = 500
    try:
        statuses = gw.post_until_failed(3)
        assert statuses[500] == 3, statuses
        states = gw.breaker_states()
        assert states[failing.name] == epb.BREAKER_STATE_OPEN
        assert {states["model-0"], states["model-2"]} == {epb.BREAKER_STATE_CLOSED}
        # With the breaker open, Decider stops naming it.
        assert gw.served_by(6) == {"model-0", "model-2"}
    finally:
        failing.fail_status = 0
