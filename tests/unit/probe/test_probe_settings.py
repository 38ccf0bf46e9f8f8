import pytest

from decider.errors import ConfigError
from probe import ProbeSettings


def test_defaults_are_the_documented_ones():
    s = ProbeSettings()
    assert (s.interval_s, s.timeout_s, s.unhealthy_interval_s) == (30.0, 2.0, 1.0)
    assert (s.unhealthy_threshold, s.healthy_threshold) == (3, 2)
    assert (s.liveness, s.liveness_interval_s) == ("connect", 2.0)
    assert ProbeSettings.parse({}) == s


def test_parse_accepts_ints_for_floats_and_headers():
    s = ProbeSettings.parse(
        {"interval_s": 10, "healthy_threshold": 1, "headers": {"a": {"Authorization": "k"}}}
    )
    assert s.interval_s == 10.0
    assert s.healthy_threshold == 1
    assert ProbeSettings.parse({"embedded": False}).embedded is False
    assert s.headers["a"]["Authorization"] == "k"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"timeout_s": -1}, "probe.timeout_s: -1, must be > 0"),
        ({"interval_s": 0}, "probe.interval_s: 0, must be > 0"),
        ({"interval_s": "30s"}, "probe.interval_s: '30s', must be a number"),
        ({"interval_s": float("inf")}, "probe.interval_s: inf, must be finite"),
        ({"unhealthy_threshold": 0}, "probe.unhealthy_threshold: 0, must be >= 1"),
        ({"healthy_threshold": True}, "probe.healthy_threshold: True, must be an integer"),
        ({"healthy_threshold": 1.5}, "probe.healthy_threshold: 1.5, must be an integer"),
        ({"jitter_fraction": 1.0}, "probe.jitter_fraction: 1.0, must be in [0, 1)"),
        ({"liveness": "ping"}, "probe.liveness: 'ping', must be one of connect, http, off"),
        ({"degraded_queue_depth": -1}, "probe.degraded_queue_depth: -1, must be >= 0"),
        (
            {"degraded_kv_cache_utilization": 1.5},
            "probe.degraded_kv_cache_utilization: 1.5, must be in [0, 1]",
        ),
        (
            {"report_interval_s": 10, "report_valid_for_s": 10},
            "probe.report_valid_for_s: 10.0, must be greater than probe.report_interval_s (10.0)",
        ),
        ({"headers": {"a": {"X-Key": 5}}}, "probe.headers.a.X-Key: must be a string"),
        ({"max_concurrent_http": 0}, "probe.max_concurrent_http: 0, must be >= 1"),
        ({"embedded": "no"}, "probe.embedded: 'no', must be true or false"),
        ({"headers": []}, "probe.headers: must be a table of endpoint id -> header table"),
    ],
)
def test_parse_errors_name_key_and_value(table, message):
    with pytest.raises(ConfigError) as info:
        ProbeSettings.parse(table)
    assert str(info.value) == message


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match=r"probe.intervl_s: unknown key"):
        ProbeSettings.parse({"intervl_s": 3})


def test_header_values_never_appear_in_errors():
    with pytest.raises(ConfigError) as info:
        ProbeSettings.parse({"headers": {"a": {"Authorization": ["secret-token"]}}})
    assert "secret-token" not in str(info.value)
