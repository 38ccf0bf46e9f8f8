import logging
import random

from probe_fakes import FakeClock, ScriptedHTTP, endpoint, ok

from decider.codec.convert import REDACTED, duration_s
from decider.core.model import HealthStatus, LoadReport
from probe import Prober, ProbeSettings
from probe.remote import ReportingSink, build_report, with_local_headers


def test_redacted_headers_are_replaced_by_local_ones_or_dropped(caplog):
    listed = endpoint(probe_headers={"Authorization": REDACTED, "X-Team": REDACTED})
    local = {"a": {"Authorization": "Bearer local-secret"}}
    warned: set[str] = set()
    with caplog.at_level(logging.WARNING, logger="decider.probe"):
        got = with_local_headers(listed, local, warned)
        with_local_headers(listed, local, warned)
    assert dict(got.probe_headers) == {"Authorization": "Bearer local-secret"}
    # One warning naming the header without a value, never a value.
    assert caplog.text.count("X-Team") == 1
    assert "local-secret" not in caplog.text


def test_plain_headers_pass_through():
    listed = endpoint(probe_headers={"X-Plain": "v"})
    assert dict(with_local_headers(listed, {}, set()).probe_headers) == {"X-Plain": "v"}


async def test_report_carries_verdicts_latency_load_and_valid_for():
    clock = FakeClock()
    http = ScriptedHTTP()
    url = "http://127.0.0.1:8001/health"

    def slowish(request):
        clock.advance(0.25)
        return ok(request)

    http.set(url, slowish)
    sink = ReportingSink()
    settings = ProbeSettings(report_valid_for_s=12)
    prober = Prober(settings, sink, clock=clock, transport=http.transport(), rng=random.Random(1))
    prober.set_endpoints([endpoint()])
    clock.advance(10)
    await prober.run_due()
    assert sink.changed.is_set()
    sink.record_load("a", LoadReport(queue_depth=4), now=clock.now)
    request = build_report("probe-1", prober, sink, settings)
    assert request.prober_id == "probe-1"
    assert duration_s(request.valid_for) == 12
    [result] = request.results
    assert result.endpoint_id == "a"
    assert result.status == int(HealthStatus.HEALTHY)
    assert "HTTP 200" in result.reason
    assert abs(duration_s(result.latency) - 0.25) < 1e-6
    assert result.load.queue_depth == 4

    sink.expire_load("a", now=clock.now)
    assert not build_report("p", prober, sink, settings).results[0].HasField("load")
    sink.keep_only(set())
    assert not build_report("p", prober, sink, settings).results
    await prober.aclose()


def test_cli_config_takes_probe_table_and_endpoint_headers(tmp_path):
    from decider.cli.probe import load_config

    path = tmp_path / "decider.toml"
    path.write_text(
        """
[probe]
interval_s = 10
[probe.headers.b]
X-Extra = "e"

[[endpoints]]
id = "a"
address = "127.0.0.1:9001"
model = "m"
health_url = "http://127.0.0.1:9001/health"
probe_headers = { Authorization = "Bearer k" }
"""
    )
    settings, headers = load_config(str(path))
    assert settings.interval_s == 10
    assert headers == {"a": {"Authorization": "Bearer k"}, "b": {"X-Extra": "e"}}
    assert load_config(None) == (ProbeSettings(), {})
