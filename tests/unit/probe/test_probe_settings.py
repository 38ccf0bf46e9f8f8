import pytest

from decider.core.validation import ConfigErrors
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
        ({"timeout_s": -1}, "probe.timeout_s: -1, must be a number > 0"),
        ({"interval_s": 0}, "probe.interval_s: 0, must be a number > 0"),
        ({"interval_s": "30s"}, "probe.interval_s: '30s', must be a number > 0"),
        ({"interval_s": float("inf")}, "probe.interval_s: inf, must be a number > 0"),
        ({"interval_s": float("nan")}, "probe.interval_s: nan, must be a number > 0"),
        ({"unhealthy_threshold": 0}, "probe.unhealthy_threshold: 0, must be an int >= 1"),
        ({"healthy_threshold": True}, "probe.healthy_threshold: True, must be an int >= 1"),
        ({"healthy_threshold": 1.5}, "probe.healthy_threshold: 1.5, must be an int >= 1"),
        ({"jitter_fraction": 1.0}, "probe.jitter_fraction: 1.0, must be a number >= 0 and < 1"),
        ({"jitter_fraction": -0.1}, "probe.jitter_fraction: -0.1, must be a number >= 0 and < 1"),
        (
            {"first_check_spread_s": 3601},
            "probe.first_check_spread_s: 3601, must be a number from 0 to 3600",
        ),
        ({"liveness": "ping"}, "probe.liveness: 'ping', must be one of connect, http, off"),
        ({"degraded_queue_depth": -1}, "probe.degraded_queue_depth: -1, must be an int >= 0"),
        (
            {"degraded_kv_cache_utilization": 1.5},
            "probe.degraded_kv_cache_utilization: 1.5, must be a number from 0 to 1",
        ),
        (
            {"report_interval_s": 10, "report_valid_for_s": 10},
            "probe.report_valid_for_s: 10, must be > report_interval_s (10)",
        ),
        (
            {"report_valid_for_s": 2.5},
            "probe.report_valid_for_s: 2.5, must be > report_interval_s (5)",
        ),
        ({"headers": {"a": {"X-Key": 5}}}, "probe.headers.a.X-Key: must be a string"),
        ({"headers": {"a": "X-Key"}}, "probe.headers.a: must be a table of header -> value"),
        ({"max_concurrent_http": 0}, "probe.max_concurrent_http: 0, must be an int >= 1"),
        ({"embedded": "no"}, "probe.embedded: 'no', must be true or false"),
        ({"headers": []}, "probe.headers: must be a table of endpoint id -> header table"),
    ],
)
def test_parse_errors_name_key_and_value(table, message):
    with pytest.raises(ConfigError) as info:
        ProbeSettings.parse(table)
    assert str(info.value) == message


def test_every_problem_of_the_table_is_reported_at_once_in_table_order():
    table = {
        "liveness": "ping",
        "report_valid_for_s": 4,
        "intervl_s": 3,
        "headers": {"a": {"X-Key": 5}},
        "timeout_s": 0,
    }
    with pytest.raises(ConfigErrors) as info:
        ProbeSettings.parse(table)
    assert [p.text.split(":")[0] for p in info.value.problems] == [
        "probe.liveness",
        "probe.report_valid_for_s",
        "probe.intervl_s",
        "probe.headers.a.X-Key",
        "probe.timeout_s",
    ]
    assert [p.order for p in info.value.problems] == [(0,), (1,), (2,), (3, 0, 0), (4,)]


def test_a_rule_between_keys_is_skipped_when_either_key_is_bad_on_its_own():
    with pytest.raises(ConfigError) as info:
        ProbeSettings.parse({"report_interval_s": "5s", "report_valid_for_s": 1})
    assert str(info.value) == "probe.report_interval_s: '5s', must be a number > 0"


def test_settings_built_in_code_meet_the_same_rules():
    with pytest.raises(ConfigErrors) as info:
        ProbeSettings(interval_s=0, liveness="ping", report_interval_s=20.0)
    assert str(info.value).splitlines() == [
        "probe.interval_s: 0, must be a number > 0",
        "probe.liveness: 'ping', must be one of connect, http, off",
        "probe.report_valid_for_s: 15, must be > report_interval_s (20)",
    ]
    assert ProbeSettings(interval_s=1, report_valid_for_s=12).interval_s == 1


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match=r"probe.intervl_s: unknown key"):
        ProbeSettings.parse({"intervl_s": 3})


def test_header_values_never_appear_in_errors():
    with pytest.raises(ConfigError) as info:
        ProbeSettings.parse({"headers": {"a": {"Authorization": ["secret-token"]}}})
    assert "secret-token" not in str(info.value)
