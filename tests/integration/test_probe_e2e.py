"""The prober through the real gRPC server: WatchHealth sees a killed backend, Decide stops
choosing it, and the standalone prober reports over RegistryService.

Backends are real HTTP servers on 127.0.0.1 started and killed here; bounds are generous.
"""

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest

from decider.cli.probe import main as probe_main
from decider.core.model import HealthStatus
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb
from probe import ProbeSettings
from probe.remote import StandaloneProber
from probe.standin import StandIn

SRC = Path(__file__).resolve().parents[2] / "src"
UNHEALTHY = epb.HEALTH_STATUS_UNHEALTHY
HEALTHY = epb.HEALTH_STATUS_HEALTHY


@pytest.fixture
async def backends():
    made: list[StandIn] = []

    async def make() -> StandIn:
        backend = await StandIn().start()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.kill()


def endpoint_doc(eid: str, backend: StandIn) -> dict:
    return {
        "id": eid,
        "address": f"127.0.0.1:{backend.port}",
        "model": "m",
        "health_url": f"{backend.url}/health",
    }


ADMIN = (("authorization", "Bearer sesame"),)


async def status_of(srv, eid: str) -> epb.EndpointStatus:
    response = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(model="m"), metadata=ADMIN)
    return response.statuses[eid]


async def wait_status(srv, eid: str, status: int, *, within_s: float) -> epb.EndpointStatus:
    deadline = time.monotonic() + within_s
    while True:
        got = await status_of(srv, eid)
        if got.health == status:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{eid} is {got.health} ({got.health_reason}) after {within_s} s")
        await asyncio.sleep(0.05)


async def test_killed_backend_reaches_watchers_and_is_not_chosen(start_server, backends):
    alive, victim = await backends(), await backends()
    doc = {"endpoints": [endpoint_doc("alive", alive), endpoint_doc("victim", victim)]}
    async with start_server(doc) as srv:
        await wait_status(srv, "victim", HEALTHY, within_s=10)
        await wait_status(srv, "alive", HEALTHY, within_s=10)
        stream = srv.decider.WatchHealth(dpb.WatchHealthRequest(model="m"))
        snapshot = await stream.read()
        assert snapshot.snapshot
        assert {e.endpoint_id: e.status for e in snapshot.events} == {
            "alive": HEALTHY,
            "victim": HEALTHY,
        }

        killed_at = time.monotonic()
        await victim.kill()

        async def victim_unhealthy() -> dpb.HealthEvent:
            while True:
                response = await stream.read()
                for event in response.events:
                    if event.endpoint_id == "victim" and event.status == UNHEALTHY:
                        return event

        # Default config: the target is 5 s; 10 s is the generous test bound.
        event = await asyncio.wait_for(victim_unhealthy(), timeout=10)
        assert time.monotonic() - killed_at < 10
        assert "connection refused" in event.reason
        stream.cancel()

        chosen = set()
        for _ in range(30):
            decision = await srv.decider.Decide(dpb.DecideRequest(model="m"))
            chosen.add(decision.endpoint.id)
        assert chosen == {"alive"}


async def test_standalone_prober_reports_and_follows_the_registry(start_server, backends):
    first, second = await backends(), await backends()
    # The embedded prober checks once, then not for an hour: what changes later is the
    # standalone prober's doing.
    doc = {
        "endpoints": [endpoint_doc("first", first)],
        "probe": {"interval_s": 3600, "liveness": "off"},
    }
    async with start_server(doc, admin_token="sesame") as srv:
        await wait_status(srv, "first", HEALTHY, within_s=10)
        standalone = StandaloneProber(
            ProbeSettings(
                unhealthy_interval_s=0.2,
                report_interval_s=0.5,
                report_valid_for_s=2.0,
                relist_interval_s=60,
            ),
            target=srv.address,
            prober_id="probe-test",
            admin_token="sesame",
        )
        task = asyncio.create_task(standalone.run())
        try:
            await asyncio.wait_for(standalone.listed.wait(), 5)
            await first.kill()
            got = await wait_status(srv, "first", UNHEALTHY, within_s=10)
            assert got.health_reason.startswith("probe-test: ")
            assert "connection refused" in got.health_reason

            # A registration shows on WatchHealth with an unknown id: the prober re-lists.
            await srv.registry.RegisterEndpoint(
                rpb.RegisterEndpointRequest(
                    endpoint=epb.Endpoint(
                        id="second",
                        address=f"127.0.0.1:{second.port}",
                        model="m",
                        health_url=f"{second.url}/health",
                    )
                ),
                metadata=ADMIN,
            )
            deadline = time.monotonic() + 10
            while standalone.prober.status("second")[0] is not HealthStatus.HEALTHY:
                assert time.monotonic() < deadline, "standalone prober never probed 'second'"
                await asyncio.sleep(0.05)

            await srv.registry.DeregisterEndpoint(
                rpb.DeregisterEndpointRequest(endpoint_id="second"), metadata=ADMIN
            )
            deadline = time.monotonic() + 10
            while standalone.prober.status("second")[1] != "not probed":
                assert time.monotonic() < deadline, "standalone prober kept 'second'"
                await asyncio.sleep(0.05)
            assert standalone.reports_sent > 0
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_standalone_prober_without_token_keeps_retrying(start_server, backends):
    backend = await backends()
    async with start_server({"endpoints": [endpoint_doc("x", backend)]}, admin_token="t") as srv:
        standalone = StandaloneProber(ProbeSettings(), target=srv.address, prober_id="p")
        task = asyncio.create_task(standalone.run())
        await asyncio.sleep(1.0)
        # Refused (UNAUTHENTICATED) but alive: it logs and retries instead of dying.
        assert not task.done()
        assert not standalone.listed.is_set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_cli_config_error_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[probe]\ntimeout_s = -1\n")
    assert probe_main(["--decider", "127.0.0.1:1", "--config", str(bad)]) == 2
    assert "probe.timeout_s: -1, must be a number > 0" in capsys.readouterr().err


def test_cli_requires_decider(capsys):
    with pytest.raises(SystemExit) as info:
        probe_main([])
    assert info.value.code == 2
    assert "--decider" in capsys.readouterr().err


_ = grpc  # stubs raise grpc.aio.AioRpcError on failure


VLLM_METRICS = """\
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} %d
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 1
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.2
"""


async def test_scraped_vllm_load_steers_least_request(start_server, backends):
    a, b = await backends(), await backends()
    a.metrics_text, b.metrics_text = VLLM_METRICS % 20, VLLM_METRICS % 0
    doc = {
        "endpoints": [
            {**endpoint_doc(eid, be), "metrics_url": f"{be.url}/metrics", "metrics_kind": "vllm"}
            for eid, be in (("a", a), ("b", b))
        ],
        "probe": {"metrics_interval_s": 0.2},
    }
    async with start_server(doc, admin_token="sesame") as srv:

        async def chosen(times: int = 10) -> set[str]:
            picked = set()
            for _ in range(times):
                d = await srv.decider.Decide(dpb.DecideRequest(model="m", strategy="least_request"))
                picked.add(d.endpoint.id)
                await srv.decider.ReportOutcome(
                    dpb.ReportOutcomeRequest(
                        decision_id=d.decision_id,
                        endpoint_id=d.endpoint.id,
                        result=dpb.RESULT_SUCCESS,
                    )
                )
            return picked

        async def until_chosen(expected: set[str]) -> None:
            deadline = time.monotonic() + 10
            while (got := await chosen()) != expected:
                assert time.monotonic() < deadline, f"still choosing {got}"
                await asyncio.sleep(0.1)

        await until_chosen({"b"})
        status = await status_of(srv, "a")
        assert status.load.queue_depth == 20
        # The load moves: decisions follow the scrape.
        a.metrics_text, b.metrics_text = VLLM_METRICS % 0, VLLM_METRICS % 20
        await until_chosen({"a"})


async def test_decider_probe_command_end_to_end(start_server, backends):
    backend = await backends()
    doc = {
        "endpoints": [endpoint_doc("cli", backend)],
        "probe": {"interval_s": 3600, "liveness": "off"},
    }
    async with start_server(doc, admin_token="sesame") as srv:
        await wait_status(srv, "cli", HEALTHY, within_s=10)
        path = f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        env = {**os.environ, "PYTHONPATH": path}
        env["DECIDER_ADMIN_TOKEN"] = "sesame"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "decider.cli.probe",
            "--decider",
            srv.address,
            "--prober-id",
            "cli-probe",
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            # Wait until the command has listed the endpoint and probed it once.
            await asyncio.sleep(3)
            await backend.kill()
            got = await wait_status(srv, "cli", UNHEALTHY, within_s=15)
            assert got.health_reason.startswith("cli-probe: ")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()
        assert b"sesame" not in stderr


async def test_with_traffic_a_killed_backend_stops_being_chosen_quickly(start_server, backends):
    alive, victim = await backends(), await backends()
    doc = {"endpoints": [endpoint_doc("alive", alive), endpoint_doc("victim", victim)]}
    async with start_server(doc) as srv:
        await wait_status(srv, "victim", HEALTHY, within_s=10)
        await wait_status(srv, "alive", HEALTHY, within_s=10)

        async def gateway_request() -> str:
            """Decide, dial the chosen address as a gateway would, report what happened."""
            d = await srv.decider.Decide(dpb.DecideRequest(model="m"))
            host, port = d.endpoint.address.rsplit(":", 1)
            try:
                _, writer = await asyncio.open_connection(host, int(port))
                writer.close()
                result = dpb.RESULT_SUCCESS
            except OSError:
                result = dpb.RESULT_ERROR
            await srv.decider.ReportOutcome(
                dpb.ReportOutcomeRequest(
                    decision_id=d.decision_id, endpoint_id=d.endpoint.id, result=result
                )
            )
            return d.endpoint.id

        for _ in range(20):
            await gateway_request()
        killed_at = time.monotonic()
        await victim.kill()
        last_victim = killed_at
        while time.monotonic() - killed_at < 4:
            if await gateway_request() == "victim":
                last_victim = time.monotonic()
            await asyncio.sleep(0.005)
        # The target is 1 s; 3 s is the generous bound for a shared test machine.
        assert last_victim - killed_at < 3
