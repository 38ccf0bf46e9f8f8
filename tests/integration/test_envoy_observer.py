"""Through a real Envoy with examples/envoy/override_host_observer.yaml: a picker filter that
Envoy waits for on the request only, and a second ext_proc filter in observability mode that
shows Decider the response without Envoy waiting for answers. The outcome still reaches the
decision, once, charged to the endpoint that served."""

from __future__ import annotations

import json

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy_support import MODEL, Stack, stack

from decider.core.model import Decision
from decider.v1 import endpoint_pb2 as epb

TABLES = {"breaker": {"consecutive_failures": 3, "open_s": 60.0}}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with stack(
        tmp_path_factory.mktemp("envoy"), example="override_host_observer.yaml", tables=TABLES
    ) as s:
        yield s


def outcomes_for(gw: Stack, decision_id: str):
    gw.wait_until(
        lambda: any(o.decision_id == decision_id for o in gw.recording.outcomes),
        what=f"the outcome of {decision_id}",
    )
    return [
        (o, settled)
        for o, settled in zip(gw.recording.outcomes, gw.recording.settled, strict=False)
        if o.decision_id == decision_id
    ]


def pending(gw: Stack) -> int:
    assert gw.server is not None
    engine = gw.server.engine
    return int(gw.bg.call(lambda: engine.pending_decisions))


def test_the_outcome_settles_its_decision_once_on_the_endpoint_that_served(gw):
    response = gw.post(gw.chat("count my tokens"))
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    decision_id = response.headers["x-decider-decision-id"]
    # The route echoes the picker's metadata: what Decider chose, and why.
    assert response.headers["x-decider-endpoint"] == response.headers["x-served-by"]
    assert response.headers["x-decider-reason"].startswith("round_robin")
    [(outcome, settled)] = outcomes_for(gw, decision_id)
    assert settled
    assert outcome.endpoint_id == response.headers["x-served-by"]
    assert outcome.result.name == "SUCCESS"
    assert (outcome.input_tokens, outcome.output_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert outcome.latency_s > 0 and outcome.ttft_s == 0.0
    # Nothing is left pending: the picker's stream ended without reporting anything itself.
    gw.wait_until(lambda: pending(gw) == 0, what="no decision pending")
    decided = [d.decision_id for d in gw.recording.decisions if isinstance(d, Decision)]
    assert sorted(o.decision_id for o in gw.recording.outcomes) == sorted(decided)


def test_an_sse_stream_arrives_intact_with_its_usage_counted(gw):
    with gw.http.stream(
        "POST", "/v1/chat/completions", json=gw.chat("stream please", stream=True)
    ) as response:
        assert response.status_code == 200
        text = b"".join(response.iter_bytes()).decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][len("data: ") :])["usage"]
    [(outcome, settled)] = outcomes_for(gw, response.headers["x-decider-decision-id"])
    assert settled
    assert outcome.endpoint_id == response.headers["x-served-by"]
    assert (outcome.input_tokens, outcome.output_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert 0 < outcome.ttft_s <= outcome.latency_s


def test_a_dead_primary_is_retried_on_a_fallback_and_charged_to_the_endpoint_that_served(gw):
    dead = gw.stand_ins[0]
    affinity = {"x-decider-strategy": "affinity"}
    session = gw.pinned_session(dead.name, affinity)
    retried_before = gw.envoy.stat("cluster.models.upstream_rq_retry_success")
    gw.bg.run(dead.close())
    try:
        response = gw.post(gw.chat(), headers={**affinity, "x-session-id": session})
        assert response.status_code == 200, response.text
        # The route echoes the endpoint Decider chose; another one served.
        assert response.headers["x-decider-endpoint"] == dead.name, "the prober saw it first"
        served = response.headers["x-served-by"]
        assert served != dead.name
        [(outcome, settled)] = outcomes_for(gw, response.headers["x-decider-decision-id"])
        assert settled
        assert outcome.endpoint_id == served
        assert outcome.result.name == "SUCCESS"
        assert gw.envoy.stat("cluster.models.upstream_rq_retry_success") > retried_before
    finally:
        gw.bg.run(dead.start())
        gw.wait_until(lambda: gw.healthy_count() == 3, what="model-0 healthy again")


def test_a_breaker_opened_by_errors_seen_by_the_observer_shows_on_watch_health(gw):
    failing = gw.stand_ins[1]
    failing.fail_status = 500
    try:
        statuses = gw.post_until_failed(3)
        assert statuses[500] == 3, statuses
        # The third failure's outcome may land just after Envoy answered the client.
        gw.wait_until(
            lambda: (
                sum(
                    o.endpoint_id == failing.name and o.result.name == "ERROR"
                    for o in list(gw.recording.outcomes)
                )
                >= 3
            ),
            what="the three failures' outcomes",
        )
        states = gw.breaker_states()
        assert states[failing.name] == epb.BREAKER_STATE_OPEN
        assert {states["model-0"], states["model-2"]} == {epb.BREAKER_STATE_CLOSED}
        assert gw.served_by(6) == {"model-0", "model-2"}
    finally:
        failing.fail_status = 0


def observation(decision_id: str, *, served: str, status: int = 200) -> list[pb.ProcessingRequest]:
    """What an observer filter sends for one request, naming `decision_id`."""
    metadata = base_pb2.Metadata()
    named = metadata.filter_metadata["decider"].fields
    named["decision_id"].string_value = decision_id
    named["model"].string_value = MODEL
    named["endpoint"].string_value = "model-0"

    def headers(values: dict[str, str]) -> pb.HttpHeaders:
        return pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()
                ]
            )
        )

    return [
        pb.ProcessingRequest(
            request_headers=headers({":path": "/v1/chat/completions"}),
            metadata_context=metadata,
            observability_mode=True,
        ),
        pb.ProcessingRequest(
            response_headers=headers(
                {
                    ":status": str(status),
                    "content-type": "application/json",
                    "x-gateway-destination-endpoint-served": served,
                }
            ),
            metadata_context=metadata,
            observability_mode=True,
        ),
        pb.ProcessingRequest(
            response_body=pb.HttpBody(body=b"{}", end_of_stream=True),
            metadata_context=metadata,
            observability_mode=True,
        ),
    ]


def test_a_replayed_or_bogus_decision_id_settles_nothing_and_gets_no_answer(gw):
    response = gw.post(gw.chat())
    decision_id = response.headers["x-decider-decision-id"]
    outcomes_for(gw, decision_id)
    served = response.headers["x-gateway-destination-endpoint-served"]
    with grpc.insecure_channel(f"127.0.0.1:{gw.ext_proc_port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        for named in (decision_id, "bogus-1"):
            # Decider answers nothing and ends the stream once the response has ended.
            assert list(stub.Process(iter(observation(named, served=served)), timeout=10)) == []
    replayed = outcomes_for(gw, decision_id)
    assert [settled for _, settled in replayed] == [True, False]
    # What a bogus id reports still lands on the endpoint at the served address, as any
    # ReportOutcome for an unknown decision does, and settles no decision.
    [(bogus, settled)] = outcomes_for(gw, "bogus-1")
    assert not settled
    assert bogus.endpoint_id == response.headers["x-served-by"]
    # A client's own decision-id header means nothing: the id comes from the picker's metadata.
    again = gw.post(gw.chat(), headers={"x-decider-decision-id": decision_id})
    assert again.status_code == 200
    fresh = again.headers["x-decider-decision-id"]
    assert fresh != decision_id
    [(_, settled)] = outcomes_for(gw, fresh)
    assert settled
    assert len(outcomes_for(gw, decision_id)) == 2


def test_with_decider_stopped_a_fail_open_picker_and_the_observer_let_requests_through(tmp_path):
    with stack(
        tmp_path,
        example="override_host_observer.yaml",
        replacements={"failure_mode_allow": "true"},
    ) as gw:
        gw.stop_decider()
        for _ in range(3):
            response = gw.post(gw.chat())
            assert response.status_code == 200, response.text
            assert "x-decider-decision-id" not in response.headers
        gw.start_decider()
        gw.wait_until(
            lambda: "x-decider-decision-id" in gw.post(gw.chat()).headers,
            what="Envoy to reach Decider again",
        )
        response = gw.post(gw.chat())
        [(outcome, settled)] = outcomes_for(gw, response.headers["x-decider-decision-id"])
        assert settled and outcome.endpoint_id == response.headers["x-served-by"]
