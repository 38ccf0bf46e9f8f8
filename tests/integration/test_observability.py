"""Decision visibility through the real server: spans over OTLP, /metrics over HTTP, JSON logs,
explain, and the `decider endpoints` / `decider decide` commands."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import random
import socket
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import make_settings, running
from decider_support import endpoints_doc
from google.protobuf.duration_pb2 import Duration
from otlp_receiver import OtlpReceiver, ReceivedSpan
from prometheus_client.parser import text_string_to_metric_families

from decider.obs.logs import configure_logging
from decider.obs.telemetry import Tracing
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),)
SPAN_KIND_SERVER = 2
ROUND_ROBIN = {"default_strategy": "round_robin"}


def _by_name(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


async def _spans(receiver: OtlpReceiver, tracing: Tracing, count: int) -> list[ReceivedSpan]:
    await asyncio.to_thread(tracing.force_flush)
    return await asyncio.to_thread(receiver.wait_for_spans, count, timeout_s=10)


async def test_a_traced_decide_is_a_child_span_with_the_decision(tmp_path):
    with OtlpReceiver() as receiver:
        tracing = Tracing.from_env(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "decider-t"}
        )
        settings = make_settings(tmp_path, endpoints_doc("m", 3, routing=ROUND_ROBIN))
        async with running(settings, tracing=tracing) as srv:
            reply = await srv.decider.Decide(
                dpb.DecideRequest(
                    model="m",
                    tenant="acme",
                    request_id="req-1",
                    session_id="user-secret",
                    prefix_hashes=[987654321987654321, 42],
                ),
                metadata=TRACEPARENT,
                timeout=5,
            )
            await srv.decider.ReportOutcome(
                dpb.ReportOutcomeRequest(
                    decision_id=reply.decision_id,
                    endpoint_id=reply.endpoint.id,
                    result=dpb.RESULT_SUCCESS,
                    latency=Duration(nanos=350_000_000),
                ),
                metadata=TRACEPARENT,
                timeout=5,
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await srv.decider.Decide(dpb.DecideRequest(model="nope"), timeout=5)
            spans = await _spans(receiver, tracing, 3)

    (decide, refused) = _by_name(spans, "decider.v1.DeciderService/Decide")
    assert decide.trace_id == TRACE_ID
    assert decide.parent_span_id == PARENT_SPAN_ID
    assert decide.kind == SPAN_KIND_SERVER
    assert decide.resource["service.name"] == "decider-t"
    attrs = decide.attributes
    assert attrs["rpc.system"] == "grpc"
    assert attrs["rpc.method"] == "Decide"
    assert attrs["rpc.grpc.status_code"] == 0
    assert attrs["decider.model"] == "m"
    assert attrs["decider.tenant"] == "acme"
    assert attrs["decider.request_id"] == "req-1"
    assert attrs["decider.result"] == "ok"
    assert attrs["decider.strategy"] == "round_robin"
    assert attrs["decider.decision_id"] == reply.decision_id
    assert attrs["decider.endpoint.id"] == reply.endpoint.id
    assert attrs["decider.endpoint.address"] == reply.endpoint.address
    assert attrs["decider.fallback.ids"] == [e.id for e in reply.fallbacks]
    assert attrs["decider.fallback.count"] == len(reply.fallbacks)
    assert attrs["decider.candidate.count"] == 3
    assert attrs["decider.skipped.total"] == 0
    assert attrs["decider.affinity_hit"] is False
    assert attrs["decider.reason"] == reply.reason
    assert {k for k in attrs if k.startswith("decider.score.")} == {
        f"decider.score.{factor}" for factor in reply.scores
    }
    # Prompt prefix hashes are counted, never recorded; the session id identifies a user.
    assert attrs["decider.prefix_hash.count"] == 2
    values = json.dumps(list(attrs.values()))
    assert "987654321987654321" not in values
    assert "user-secret" not in values
    assert all(k.startswith(("decider.", "rpc.")) for k in attrs)

    (outcome,) = _by_name(spans, "decider.v1.DeciderService/ReportOutcome")
    assert outcome.trace_id == TRACE_ID
    assert outcome.parent_span_id == PARENT_SPAN_ID
    assert outcome.attributes["decider.outcome.result"] == "success"
    assert outcome.attributes["decider.outcome.decision_found"] is True
    assert outcome.attributes["decider.outcome.latency_s"] == pytest.approx(0.35)

    # No traceparent: a new root. NOT_FOUND is not a server error, so the status stays unset.
    assert refused.trace_id != TRACE_ID
    assert refused.parent_span_id == ""
    assert refused.attributes["decider.result"] == "model_not_found"
    assert refused.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


async def test_an_unsampled_caller_gets_no_span_and_admin_calls_are_traced(tmp_path):
    with OtlpReceiver() as receiver:
        tracing = Tracing.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
        settings = make_settings(tmp_path, endpoints_doc("m", 1))
        async with running(settings, tracing=tracing) as srv:
            unsampled = (("traceparent", f"00-{'1' * 32}-{PARENT_SPAN_ID}-00"),)
            await srv.decider.Decide(dpb.DecideRequest(model="m"), metadata=unsampled)
            endpoint = epb.Endpoint(id="new", address="127.0.0.1:20099", model="m2")
            await srv.registry.RegisterEndpoint(
                rpb.RegisterEndpointRequest(endpoint=endpoint), metadata=TRACEPARENT
            )
            await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(model="m2"))
            spans = await _spans(receiver, tracing, 2)
    assert [s.name for s in spans] == [
        "decider.v1.RegistryService/RegisterEndpoint",
        "decider.v1.RegistryService/ListEndpoints",
    ]
    register = spans[0]
    assert register.trace_id == TRACE_ID
    assert register.attributes["decider.endpoint.id"] == "new"
    assert register.attributes["decider.model"] == "m2"
    assert spans[1].attributes["decider.model"] == "m2"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Nothing listens on DEAD once its socket is closed: every probe and scrape fails fast.
DEAD = f"127.0.0.1:{_closed_port()}"
PROBED_DOC = {
    **endpoints_doc("m", 2, routing=ROUND_ROBIN),
    "probe": {"interval_s": 0.2, "unhealthy_interval_s": 0.2, "metrics_interval_s": 0.2},
}
PROBED_DOC["endpoints"] = [
    *PROBED_DOC["endpoints"],
    {
        "id": "probed",
        "address": DEAD,
        "model": "other",
        "health_url": f"http://{DEAD}/health",
        "metrics_url": f"http://{DEAD}/metrics",
    },
]


async def test_metrics_are_scraped_over_http_from_the_real_server(tmp_path):
    settings = make_settings(tmp_path, PROBED_DOC)
    async with running(settings, metrics_listen="127.0.0.1:0") as srv:
        assert srv.server.metrics_server is not None
        url = f"http://127.0.0.1:{srv.server.metrics_server.port}/metrics"
        replies = [await srv.decider.Decide(dpb.DecideRequest(model="m")) for _ in range(3)]
        await srv.decider.Decide(dpb.DecideRequest(model="m", explain=True))
        with pytest.raises(grpc.aio.AioRpcError):
            await srv.decider.Decide(dpb.DecideRequest(model="gpt-7"))
        for malformed in (dpb.DecideRequest(), dpb.DecideRequest(model="m", strategy="nope")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await srv.decider.Decide(malformed)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for reply, result in zip(replies[:2], (dpb.RESULT_SUCCESS, dpb.RESULT_ERROR), strict=True):
            await srv.decider.ReportOutcome(
                dpb.ReportOutcomeRequest(
                    decision_id=reply.decision_id, endpoint_id=reply.endpoint.id, result=result
                )
            )
        await srv.decider.ReportOutcome(
            dpb.ReportOutcomeRequest(
                decision_id="unknown", endpoint_id="m-0", result=dpb.RESULT_SUCCESS
            )
        )
        watch = srv.decider.WatchHealth(dpb.WatchHealthRequest(model="m"))
        await watch.read()  # the snapshot: the stream is open
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            samples = {}
            # Probes of the dead endpoint land within a few 0.2 s intervals.
            for _ in range(100):
                response = await client.get(url)
                assert response.status_code == 200
                samples = _samples(response.text)
                probes = _value(
                    samples,
                    "decider_probes_total",
                    endpoint_id="probed",
                    kind="http",
                    result="unhealthy",
                )
                if probes and _value(
                    samples,
                    "decider_probe_scrape_errors_total",
                    endpoint_id="probed",
                    reason="connection_refused",
                ):
                    break
                await asyncio.sleep(0.1)
            assert response.headers["content-type"].startswith("text/plain")
        watch.cancel()

    decisions = "decider_decisions_total"
    assert _value(samples, decisions, model="m", strategy="round_robin", result="ok") == 3
    assert _value(samples, decisions, model="m", strategy="round_robin", result="explain") == 1
    assert _value(samples, decisions, model="", strategy="", result="model_not_found") == 1
    assert _value(samples, decisions, model="", strategy="", result="invalid_argument") == 2
    assert _value(samples, "decider_decision_duration_seconds_count", strategy="round_robin") == 3
    assert _value(samples, "decider_outcomes_total", result="success") == 2
    assert _value(samples, "decider_outcomes_total", result="error") == 1
    assert _value(samples, "decider_outcomes_unmatched_total") == 1
    # Per endpoint: round robin over m-0 and m-1 chose each at least once in three.
    chosen = [reply.endpoint.id for reply in replies]
    for eid in ("m-0", "m-1"):
        assert _value(
            samples, "decider_endpoint_decisions_total", endpoint_id=eid, model="m"
        ) == chosen.count(eid)
    first, second = replies[0].endpoint.id, replies[1].endpoint.id
    outcomes = "decider_endpoint_outcomes_total"
    assert _value(samples, outcomes, endpoint_id=first, model="m", result="success") >= 1
    # The unmatched outcome named m-0, a registered endpoint: counted for it too.
    assert (
        sum(
            _value(samples, outcomes, endpoint_id=e, model="m", result=r) or 0
            for e in ("m-0", "m-1")
            for r in ("success", "error")
        )
        == 3
    )
    assert second in {"m-0", "m-1"}
    in_flight = sum(
        _value(samples, "decider_endpoint_in_flight", endpoint_id=f"m-{i}", model="m") or 0
        for i in range(2)
    )
    assert in_flight == 1  # three decided, two reported
    assert (
        _value(samples, "decider_endpoint_health", endpoint_id="m-0", model="m", status="healthy")
        == 1
    )
    assert (
        _value(
            samples, "decider_endpoint_breaker_state", endpoint_id="m-0", model="m", state="closed"
        )
        == 1
    )
    assert _value(samples, "decider_watchers") == 1
    assert _value(samples, "decider_probe_duration_seconds_count", kind="http")
    assert (
        _value(
            samples,
            "decider_probe_scrape_errors_total",
            endpoint_id="probed",
            reason="connection_refused",
        )
        or 0
    ) >= 1
    assert any(name == "decider_build_info" for name, _ in samples)


async def test_bounded_state_and_its_evictions_are_on_the_metrics(tmp_path):
    doc = endpoints_doc("m", 2, routing={**ROUND_ROBIN, "max_pending_decisions": 5})
    settings = make_settings(tmp_path, doc)
    async with running(settings, metrics_listen="127.0.0.1:0") as srv:
        assert srv.server.metrics_server is not None
        url = f"http://127.0.0.1:{srv.server.metrics_server.port}/metrics"
        for i in range(12):
            await srv.decider.Decide(dpb.DecideRequest(model="m", session_id=f"s{i}"))
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            samples = _samples((await client.get(url)).text)
        listing = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(model="m"))
    pending = {"state": "pending_decisions"}
    assert _value(samples, "decider_state_entries", **pending) == 5
    assert _value(samples, "decider_state_limit", **pending) == 5
    assert _value(samples, "decider_state_evictions_total", **pending) == 7
    # The evicted decisions no longer count as in flight.
    assert sum(s.in_flight for s in listing.statuses.values()) == 5
    for state in ("sessions", "prefix_blocks", "tenant_buckets", "watch_events"):
        assert _value(samples, "decider_state_limit", state=state), state
        assert _value(samples, "decider_state_evictions_total", state=state) == 0


async def test_a_deregistered_endpoint_leaves_the_metrics(tmp_path):
    settings = make_settings(tmp_path, PROBED_DOC)
    async with running(settings, metrics_listen="127.0.0.1:0") as srv:
        assert srv.server.metrics_server is not None
        url = f"http://127.0.0.1:{srv.server.metrics_server.port}/metrics"
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            for _ in range(100):
                if 'endpoint_id="probed",kind="http"' in (await client.get(url)).text:
                    break
                await asyncio.sleep(0.1)
            await srv.registry.DeregisterEndpoint(
                rpb.DeregisterEndpointRequest(endpoint_id="probed")
            )
            text = (await client.get(url)).text
    assert 'endpoint_id="probed"' not in text
    assert 'endpoint_id="m-0"' in text


async def test_state_changes_are_json_log_lines_with_the_callers_trace_id(tmp_path):
    stream = io.StringIO()
    handler = configure_logging(level="info", stream=stream)
    try:
        tracing = Tracing.from_env({"OTEL_TRACES_EXPORTER": "console"}, console_out=io.StringIO())
        settings = make_settings(tmp_path, endpoints_doc("m", 1))
        async with running(settings, tracing=tracing) as srv:
            endpoint = epb.Endpoint(id="new", address="127.0.0.1:20099", model="m")
            await srv.registry.RegisterEndpoint(
                rpb.RegisterEndpointRequest(endpoint=endpoint), metadata=TRACEPARENT
            )
            await srv.decider.Decide(dpb.DecideRequest(model="m"), metadata=TRACEPARENT)
    finally:
        logging.getLogger().removeHandler(handler)
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    registered = [e for e in entries if e.get("event") == "endpoint_registered"]
    assert len(registered) == 1
    assert registered[0]["logger"] == "decider.registry"
    assert registered[0]["endpoint_id"] == "new"
    assert registered[0]["trace_id"] == TRACE_ID
    health = [e for e in entries if e.get("event") == "endpoint_state"]
    assert {e["endpoint_id"] for e in health} >= {"m-0"}
    # No per-decision lines unless asked for.
    assert not [e for e in entries if e.get("event") == "decision"]


async def _explain_scenario(tmp_path: Path, *, explain_first: bool):
    """Marks m-2 unhealthy, optionally explains three times, then decides six times."""
    doc = endpoints_doc("m", 4, routing={"default_strategy": "round_robin"})
    doc["endpoints"][3]["capabilities"] = ["vision"]
    settings = make_settings(tmp_path, doc)
    async with running(settings, rng=random.Random(7)) as srv:
        await srv.registry.ReportProbeResults(
            rpb.ReportProbeResultsRequest(
                prober_id="p",
                results=[rpb.ProbeResult(endpoint_id="m-2", status=epb.HEALTH_STATUS_UNHEALTHY)],
                valid_for=Duration(seconds=60),
            )
        )
        before = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest())
        explained = []
        if explain_first:
            for _ in range(3):
                explained.append(
                    await srv.decider.Decide(
                        dpb.DecideRequest(model="m", session_id="s", tenant="t", explain=True)
                    )
                )
        after = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest())
        decided = [
            await srv.decider.Decide(dpb.DecideRequest(model="m", session_id="s", tenant="t"))
            for _ in range(6)
        ]
    return explained, before, after, decided


async def test_explain_shows_every_candidate_and_changes_no_state(tmp_path):
    explained, before, after, decided = await _explain_scenario(tmp_path / "a", explain_first=True)
    _, _, _, control = await _explain_scenario(tmp_path / "b", explain_first=False)

    table = {c.endpoint_id: c for c in explained[0].candidates}
    assert set(table) == {"m-0", "m-1", "m-2", "m-3"}
    assert table["m-2"].rank == 0
    assert table["m-2"].health == epb.HEALTH_STATUS_UNHEALTHY
    assert "unhealthy" in table["m-2"].skip_reason
    assert sorted(c.rank for c in table.values() if c.rank) == [1, 2, 3]
    assert all(c.scores for c in table.values() if c.rank)
    assert not explained[0].decision_id
    # The same table every time, and nothing moved: no in-flight, no round-robin step, no
    # session stickiness; the decisions that follow are the ones a server never asked to
    # explain makes.
    assert all(e.candidates == explained[0].candidates for e in explained)
    assert before.statuses == after.statuses
    assert all(s.in_flight == 0 for s in after.statuses.values())
    assert not decided[0].affinity_hit
    assert [d.endpoint.id for d in decided] == [d.endpoint.id for d in control]
    assert [[f.id for f in d.fallbacks] for d in decided] == [
        [f.id for f in d.fallbacks] for d in control
    ]


async def _decider(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "decider",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DECIDER_TARGET": "", "DECIDER_ADMIN_TOKEN": ""},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode if proc.returncode is not None else -1, out.decode(), err.decode()


async def test_an_open_breaker_shows_its_reason_in_list_endpoints_and_decider_endpoints(
    start_server,
):
    doc = endpoints_doc("m", 2, routing=ROUND_ROBIN, breaker={"consecutive_failures": 2})
    async with start_server(doc) as srv:
        for _ in range(2):
            reply = await srv.decider.Decide(
                dpb.DecideRequest(model="m", exclude_endpoint_ids=["m-1"])
            )
            await srv.decider.ReportOutcome(
                dpb.ReportOutcomeRequest(
                    decision_id=reply.decision_id, endpoint_id="m-0", result=dpb.RESULT_ERROR
                )
            )
        listing = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(model="m"))
        opened = listing.statuses["m-0"]
        assert opened.breaker_state == epb.BREAKER_STATE_OPEN
        assert opened.breaker_reason.startswith("breaker open for 30 s: ")
        assert "2 consecutive failures" in opened.breaker_reason
        assert listing.statuses["m-1"].breaker_reason == ""

        code, out, err = await _decider("endpoints", "--target", srv.address)
        assert code == 0, err
        row = next(line for line in out.splitlines() if line.startswith("m-0"))
        assert "open" in row.split() and opened.breaker_reason in row


async def test_decider_endpoints_and_decide_commands_against_a_real_server(start_server):
    async with start_server(endpoints_doc("m", 3, routing=ROUND_ROBIN), admin_token="s3") as srv:
        target = ("--target", srv.address)
        code, out, err = await _decider("endpoints", *target, "--admin-token", "s3")
        assert code == 0, err
        header, *rows = out.splitlines()
        assert header.split() == [
            "ID",
            "MODEL",
            "ADDRESS",
            "HEALTH",
            "BREAKER",
            "IN-FLIGHT",
            "LATENCY",
            "REASON",
        ]
        assert [r.split()[:6] for r in rows] == [
            [f"m-{i}", "m", f"127.0.0.1:{20000 + i}", "healthy", "closed", "0"] for i in range(3)
        ]

        code, out, err = await _decider("endpoints", *target, "--admin-token", "s3", "--json")
        assert code == 0, err
        assert sorted(json.loads(out)["statuses"]) == ["m-0", "m-1", "m-2"]

        code, _, err = await _decider("endpoints", *target)
        assert code == 1
        assert "UNAUTHENTICATED" in err

        code, out, err = await _decider("decide", *target, "--model", "m", "--explain")
        assert code == 0, err
        assert out.startswith("endpoint   m-")
        assert "strategy   round_robin" in out
        table = out.split("\n\n", 1)[1].splitlines()
        assert table[0].split()[:3] == ["RANK", "ENDPOINT", "TOTAL"]
        assert sorted(line.split()[1] for line in table[1:]) == ["m-0", "m-1", "m-2"]

        code, out, err = await _decider(
            "decide", *target, "--model", "m", "--session", "u", "--tenant", "t", "--json"
        )
        assert code == 0, err
        reply = json.loads(out)
        assert reply["endpoint"]["id"] in {"m-0", "m-1", "m-2"}
        assert reply["decision_id"]

        code, _, err = await _decider("decide", *target, "--model", "gpt-7")
        assert code == 1
        assert "NOT_FOUND: no endpoint serves model 'gpt-7'" in err


async def test_a_decide_stream_is_one_span_in_the_callers_trace(tmp_path):
    with OtlpReceiver() as receiver:
        tracing = Tracing.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
        settings = make_settings(tmp_path, endpoints_doc("m", 2, routing=ROUND_ROBIN))
        async with running(settings, tracing=tracing) as srv:
            requests = [
                dpb.DecideStreamRequest(correlation_id=i, decide=dpb.DecideRequest(model="m"))
                for i in range(3)
            ]
            call = srv.decider.DecideStream(iter(requests), metadata=TRACEPARENT, timeout=10)
            answers = [answer async for answer in call]
            spans = await _spans(receiver, tracing, 1)
    assert [a.correlation_id for a in answers] == [0, 1, 2]
    (span,) = _by_name(spans, "decider.v1.DeciderService/DecideStream")
    assert span.trace_id == TRACE_ID
    assert span.parent_span_id == PARENT_SPAN_ID
    assert span.attributes["rpc.grpc.status_code"] == 0


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER: 'sometimes'"),
        ((), {"OTEL_TRACES_SAMPLER_ARG": "2", "OTEL_TRACES_SAMPLER": "traceidratio"}, "'2'"),
        (("--metrics-listen", "nowhere"), {}, "flag --metrics-listen: 'nowhere'"),
        (("--log-level", "loud"), {}, "flag --log-level: 'loud'"),
    ],
)
async def test_serve_reports_bad_observability_settings_like_config_errors(args, env, message):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "decider",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        "",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert message in err.decode()
