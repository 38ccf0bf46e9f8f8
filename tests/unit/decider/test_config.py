"""config.py: defaults, precedence (flags > env > file), and errors naming file, key and value."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from decider import config
from decider.core.model import MetricsKind
from decider.errors import ConfigError


def _write(tmp_path, text: str):
    path = tmp_path / "decider.toml"
    path.write_text(text)
    return path


def test_no_file_and_empty_file_give_the_defaults(tmp_path):
    defaults = config.load(None)
    empty = config.load(_write(tmp_path, ""))
    assert defaults.server == empty.server == config.ServerSettings()
    assert empty.endpoints == ()
    assert empty.source.endswith("decider.toml")


def test_endpoints_are_parsed_with_their_fields(tmp_path):
    settings = config.load(
        _write(
            tmp_path,
            """
[[endpoints]]
id = "a"
address = "10.0.0.1:8000"
model = "m"
health_url = "http://10.0.0.1:8000/health"
weight = 0
capabilities = ["tools"]
cost_per_1k_tokens = 0.5
labels = { zone = "x" }
metrics_url = "http://10.0.0.1:8000/metrics"
metrics_kind = "vllm"
probe_headers = { authorization = "Bearer k" }
max_in_flight = 8
""",
        )
    )
    (endpoint,) = settings.endpoints
    assert endpoint.weight == 1
    assert endpoint.capabilities == frozenset({"tools"})
    assert endpoint.labels == {"zone": "x"}
    assert endpoint.metrics_kind is MetricsKind.VLLM
    assert endpoint.probe_headers == {"authorization": "Bearer k"}
    assert endpoint.max_in_flight == 8
    assert endpoint.source == "config"


def test_flags_override_env_override_file(tmp_path):
    path = _write(tmp_path, '[server]\nlisten = "127.0.0.1:1000"\ndata_dir = "from-file"\n')
    env = {"DECIDER_LISTEN": "127.0.0.1:2000", "DECIDER_GRACE_PERIOD_S": "3.5"}
    settings = config.load(path, env=env, flags={"listen": "127.0.0.1:3000", "data_dir": None})
    assert settings.server.listen == "127.0.0.1:3000"
    assert settings.server.grace_period_s == 3.5
    assert settings.server.data_dir == "from-file"
    settings = config.load(path, env=env)
    assert settings.server.listen == "127.0.0.1:2000"


def test_log_level_is_case_insensitive():
    assert config.load(None, env={"DECIDER_LOG_LEVEL": "debug"}).server.log_level == "DEBUG"


def test_event_loop_defaults_to_uvloop_and_takes_any_case(tmp_path):
    assert config.load(None).server.event_loop == "uvloop"
    path = _write(tmp_path, '[server]\nevent_loop = "AsyncIO"\n')
    assert config.load(path).server.event_loop == "asyncio"
    assert config.load(None, env={"DECIDER_EVENT_LOOP": "asyncio"}).server.event_loop == "asyncio"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[server]\nmax_message_bytes = 'big'\n",
            "server.max_message_bytes: 'big', must be an integer",
        ),
        ("[server]\ngrace_period_s = -1\n", "server.grace_period_s: -1, must be a number from 0"),
        (
            "[server]\nmax_concurrent_rpcs = 0\n",
            "server.max_concurrent_rpcs: 0, must be an integer from 1 to 1000000",
        ),
        ("[server]\ntick_interval_ms = true\n", "server.tick_interval_ms: True"),
        ("[server]\nlisten = ':80'\n", "server.listen: ':80', must be HOST:PORT"),
        ("[server]\nlog_level = 'loud'\n", "server.log_level: 'loud', must be one of"),
        (
            "[server]\nevent_loop = 'trio'\n",
            "server.event_loop: 'trio', must be one of uvloop, asyncio",
        ),
        ("server = 3\n", "server: 3, must be a table"),
        ("endpoints = 3\n", "endpoints: 3, must be an array of tables"),
        (
            "[[endpoints]]\nid='a'\naddress='h:1'\nmodel='m'\n[[endpoints]]\nid='a'\n"
            "address='h:2'\nmodel='m'\n",
            "endpoints[1].id: 'a' is used by an earlier endpoint",
        ),
        ("[[endpoints]]\nid='a'\naddress='h:1'\nmodel='m'\ncolour='red'\n", "endpoints[0].colour"),
        ("[[endpoints]]\nid='a'\naddress='h:1'\nmodel='m'\nweight=-2\n", "endpoints[0].weight: -2"),
        (
            "[[endpoints]]\nid='a'\naddress='h:1'\nmodel='m'\nmetrics_kind='x'\n",
            "metrics_kind: 'x'",
        ),
        ("[[endpoints]]\nid='a'\naddress='h:1'\nmodel='m'\ncapabilities='t'\n", "capabilities"),
        ("[[endpoints]]\nid='a'\naddress='h:1'\nmodel='m'\nlabels={a=1}\n", "labels.a: 1"),
        ("[[endpoints]]\naddress='h:1'\nmodel='m'\n", "endpoints[0].id: '': required"),
        ("[[endpoints]]\nid='a'\naddress='h:1'\nmodel='m'\nhealth_url='x'\n", "health_url: 'x'"),
        ("[routing]\ndefault_strategy = 'nope'\n", "routing.default_strategy"),
        ("[probe]\ntimeout_s = 'x'\n", "probe.timeout_s"),
        ("[nonsense]\n", "nonsense: unknown table"),
        ("a = [", "invalid TOML"),
    ],
)
def test_errors_name_the_file_key_and_value(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"DECIDER_MAX_CONCURRENT_RPCS": "many"},
            "environment DECIDER_MAX_CONCURRENT_RPCS: 'many'",
        ),
        ({"DECIDER_LISTEN": "nope"}, "listen: 'nope'"),
        ({"DECIDER_GRACE_PERIOD_S": "-1"}, "DECIDER_GRACE_PERIOD_S: '-1', must be a number from 0"),
    ],
)
def test_env_errors_name_the_variable(env, message):
    with pytest.raises(ConfigError) as err:
        config.load(None, env=env)
    assert message in str(err.value)


def test_flag_errors_name_the_flag():
    with pytest.raises(ConfigError) as err:
        config.load(None, flags={"grace_period_s": -3.0})
    assert "flag --grace-period-s: -3.0" in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        config.load(tmp_path / "absent.toml")
    assert "absent.toml: cannot read config" in str(err.value)


def test_a_file_that_is_not_utf8_is_a_config_error_naming_it(tmp_path):
    # Found by fuzzing (fuzz/regressions/config/not-utf8): a traceback before.
    path = tmp_path / "decider.toml"
    path.write_bytes(b'[server]\nlisten = "\xff"\n')
    with pytest.raises(
        ConfigError, match=r"decider\.toml: invalid TOML: not UTF-8 \(byte 19: 0xff\)"
    ):
        config.load(path)


def test_the_example_demo_config_is_the_embedded_one():
    root = Path(__file__).resolve().parents[3]
    embedded = config.load(root / "src/decider/defaults/demo.toml")
    example = config.load(root / "examples/demo.toml")
    assert replace(embedded, source="") == replace(example, source="")


def test_metrics_listen_and_log_decisions_from_file_env_and_flags(tmp_path):
    path = _write(tmp_path, "[server]\nmetrics_listen = ':9464'\nlog_decisions = true\n")
    assert config.load(path).server.metrics_listen == ":9464"
    assert config.load(path).server.log_decisions is True
    env = {"DECIDER_METRICS_LISTEN": "127.0.0.1:0", "DECIDER_LOG_DECISIONS": "false"}
    server = config.load(path, env=env).server
    assert (server.metrics_listen, server.log_decisions) == ("127.0.0.1:0", False)
    flags = {"metrics_listen": "[::1]:9000", "log_decisions": True}
    server = config.load(path, env=env, flags=flags).server
    assert (server.metrics_listen, server.log_decisions) == ("[::1]:9000", True)
    assert config.load(None).server.metrics_listen == ""


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[server]\nmetrics_listen = 'nowhere'\n", {}, "server.metrics_listen: 'nowhere'"),
        ("[server]\nlog_decisions = 'yes'\n", {}, "server.log_decisions: 'yes', must be true"),
        ("", {"DECIDER_METRICS_LISTEN": "9464"}, "environment DECIDER_METRICS_LISTEN: '9464'"),
        ("", {"DECIDER_LOG_DECISIONS": "maybe"}, "environment DECIDER_LOG_DECISIONS: 'maybe'"),
    ],
)
def test_observability_setting_errors_name_where(tmp_path, text, env, message):
    with pytest.raises(ConfigError, match=message):
        config.load(_write(tmp_path, text), env=env)


def test_every_problem_of_a_file_is_reported_at_once_in_file_order(tmp_path):
    path = _write(
        tmp_path,
        """
[server]
max_watchers = -5
bogus = 1

[[endpoints]]
id = "gpu-7"
address = "no-port"
model = "m"
weight = -2

[routing]
max_fallbacks = 2.0
least_request = { choice_count = 1 }

[breaker]
open_s = 60
max_open_s = 30

[probe]
timeout_s = -1
""",
    )
    with pytest.raises(ConfigError) as err:
        config.load(path)
    lines = str(err.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert [line.removeprefix(f"{path}: ").split(":")[0] for line in lines] == [
        "server.max_watchers",
        "server.bogus",
        "endpoints[0].address",
        "endpoints[0].weight",
        "routing.max_fallbacks",
        "routing.least_request.choice_count",
        "breaker.max_open_s",
        "probe.timeout_s",
    ]
    # Strict: a float is not an int, even when it is whole.
    assert f"{path}: routing.max_fallbacks: 2.0, must be an int >= 0" in lines


def test_every_probe_problem_is_reported_at_its_place_in_the_file(tmp_path):
    path = _write(
        tmp_path,
        """
[server]
max_watchers = -5

[probe]
liveness = "ping"
interval_s = 0
report_valid_for_s = 4
colour = "red"

[probe.headers.a]
Authorization = 5

[routing]
max_fallbacks = -1
""",
    )
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert [line.removeprefix(f"{path}: ") for line in str(err.value).splitlines()] == [
        "server.max_watchers: -5, must be an integer from 0 to 1000000",
        "probe.liveness: 'ping', must be one of connect, http, off",
        "probe.interval_s: 0, must be a number > 0",
        "probe.report_valid_for_s: 4, must be > report_interval_s (5)",
        "probe.colour: unknown key (known: degraded_kv_cache_utilization, degraded_latency_s,"
        " degraded_queue_depth, embedded, first_check_spread_s, headers, healthy_threshold,"
        " interval_s, jitter_fraction, liveness, liveness_interval_s, liveness_timeout_s,"
        " max_concurrent_http, metrics_interval_s, metrics_stale_after_s, metrics_timeout_s,"
        " relist_interval_s, report_interval_s, report_valid_for_s, timeout_s,"
        " unhealthy_interval_s, unhealthy_threshold)",
        "probe.headers.a.Authorization: must be a string",
        "routing.max_fallbacks: -1, must be an int >= 0",
    ]


def test_endpoint_problems_name_the_endpoint_id(tmp_path):
    path = _write(
        tmp_path,
        "[[endpoints]]\nid='a'\naddress='h:1'\nmodel='m'\n"
        "[[endpoints]]\nid='gpu-7'\naddress='h:2'\nmodel='m'\nmax_in_flight='lots'\n",
    )
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value) == (
        f"{path}: endpoints[1].max_in_flight: 'lots', must be an integer from 0 to 4294967295"
        " (endpoint 'gpu-7')"
    )


def test_environment_and_flag_problems_follow_the_file_problems(tmp_path):
    path = _write(tmp_path, "[server]\nmax_watchers = -5\n")
    with pytest.raises(ConfigError) as err:
        config.load(
            path,
            env={"DECIDER_GRACE_PERIOD_S": "soon", "DECIDER_LOG_LEVEL": "loud"},
            flags={"max_concurrent_rpcs": 0},
        )
    assert str(err.value).splitlines() == [
        f"{path}: server.max_watchers: -5, must be an integer from 0 to 1000000",
        "environment DECIDER_GRACE_PERIOD_S: 'soon', must be a number from 0 to 3600",
        "environment DECIDER_LOG_LEVEL: 'loud', must be one of DEBUG, INFO, WARNING, ERROR",
        "flag --max-concurrent-rpcs: 0, must be an integer from 1 to 1000000",
    ]


def test_server_tls_from_the_file_the_environment_and_flags(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text(
        '[server.tls]\ncert_file = "c.pem"\nkey_file = "k.pem"\nclient_ca_file = "f.pem"\n'
        'admin_client_names = ["ops"]\n'
    )
    tls = config.load(path).server.tls
    assert (tls.cert_file, tls.key_file, tls.admin_client_names) == ("c.pem", "k.pem", ("ops",))
    env = {"DECIDER_TLS_CLIENT_CA_FILE": "ca.pem", "DECIDER_TLS_ADMIN_CLIENT_NAMES": "a, b"}
    tls = config.load(path, env=env, flags={"tls_cert_file": "flag.pem"}).server.tls
    assert tls.cert_file == "flag.pem"
    assert tls.client_ca_file == "ca.pem"
    assert tls.admin_client_names == ("a", "b")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[server.tls]\ncert_file = "c.pem"\n',
            "server.tls.cert_file is set, so server.tls.key_file",
        ),
        ("[server.tls]\ncert = 1\n", "server.tls.cert: unknown key (known: admin_client_names"),
        ("[server.tls]\nadmin_client_names = [1]\n", "must be a list of non-empty strings"),
        ("[server]\ntls = 3\n", "server.tls: 3, must be a table"),
        ("[server]\nkeepalive_time_s = 0\n", "server.keepalive_time_s: 0, must be a number from 1"),
        (
            "[server]\nmax_connection_age_s = -1\n",
            "server.max_connection_age_s: -1, must be a number from 0",
        ),
    ],
)
def test_bad_tls_and_keepalive_settings_are_named(tmp_path, text, message):
    path = tmp_path / "d.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(path)


def test_secrets_of_the_wrong_type_are_named_but_never_quoted(tmp_path):
    path = _write(
        tmp_path,
        "[server]\nadmin_token = 31337\n[[endpoints]]\nid='a'\naddress='h:1'\nmodel='m'\n"
        "probe_headers = { Authorization = ['Bearer k-7'] }\n",
    )
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value).splitlines() == [
        f"{path}: server.admin_token: must be a string",
        f"{path}: endpoints[0].probe_headers.Authorization: must be a string (endpoint 'a')",
    ]
    with pytest.raises(ConfigError) as err:
        config.load(None, flags={"admin_token": 31337})
    assert str(err.value) == "flag --admin-token: must be a string"


def test_the_admin_token_comes_from_a_file_and_never_shows(tmp_path):
    token = tmp_path / "token"
    token.write_text("  s3cr3t\n")
    server = config.load(None, flags={"admin_token_file": str(token)}).server
    assert server.admin_token == "s3cr3t"
    assert "s3cr3t" not in repr(server)
    with pytest.raises(ConfigError, match="both set") as err:
        config.load(
            None, env={"DECIDER_ADMIN_TOKEN": "other"}, flags={"admin_token_file": str(token)}
        )
    assert "s3cr3t" not in str(err.value) and "other" not in str(err.value)
    token.write_text("two\nlines\n")
    with pytest.raises(ConfigError, match="whitespace or several lines"):
        config.load(None, env={"DECIDER_ADMIN_TOKEN_FILE": str(token)})
    token.write_text("\n")
    with pytest.raises(ConfigError, match=f"{token}: the file is empty"):
        config.load(None, env={"DECIDER_ADMIN_TOKEN_FILE": str(token)})
