"""[state]: backend, URL, timeouts and key prefix, checked once with messages naming the key."""

from __future__ import annotations

import pytest

from decider import config
from decider.errors import ConfigError
from decider.state.settings import StateSettings


def test_default_is_memory() -> None:
    settings = config.parse({})
    assert settings.state == StateSettings()
    assert not settings.state.shared


def test_redis_table_parsed() -> None:
    doc = {
        "state": {
            "backend": "Redis",
            "url": "rediss://app:s3cret@cache.internal:6380/2",
            "key_prefix": "fleet-a:",
            "connect_timeout_ms": 500,
            "command_timeout_ms": 250,
            "sync_interval_ms": 50,
            "probe_lease_s": 3,
        }
    }
    state = config.parse(doc).state
    assert state.shared and state.backend == "redis"
    assert state.url == "rediss://app:s3cret@cache.internal:6380/2"
    assert state.redacted_url() == "rediss://app:***@cache.internal:6380/2"
    assert (state.key_prefix, state.command_timeout_ms, state.probe_lease_s) == (
        "fleet-a:",
        250,
        3.0,
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"backend": "etcd"}, "test.toml: state.backend: 'etcd', must be one of memory, redis"),
        (
            {"url": "http://h:1"},
            "state.url: 'http://h:1': scheme must be one of redis://, rediss://, unix://",
        ),
        ({"url": "redis://:pw@:6379"}, "state.url: 'redis://:***@:6379': needs a host"),
        (
            {"url": "redis://h:6379/x"},
            "state.url: 'redis://h:6379/x': database 'x' must be a number",
        ),
        ({"url": "redis://h:99999"}, "state.url: 'redis://h:99999': not a valid URL"),
        (
            {"command_timeout_ms": 0},
            "state.command_timeout_ms: 0, must be an integer from 1 to 60000",
        ),
        ({"sync_interval_ms": True}, "state.sync_interval_ms: True, must be an integer"),
        ({"probe_lease_s": 0.5}, "state.probe_lease_s: 0.5, must be a number from 1 to 300"),
        ({"key_prefix": "a b"}, "state.key_prefix: 'a b', must be a string"),
        ({"urls": "x"}, "state.urls: unknown key (known: backend, command_timeout_ms"),
    ],
)
def test_errors_name_key_and_value(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.parse({"state": table}, source="test.toml")
    assert message in str(exc.value)


def test_password_never_in_error() -> None:
    with pytest.raises(ConfigError) as exc:
        config.parse({"state": {"url": "ftp://u:hunter2@h:1"}})
    assert "hunter2" not in str(exc.value)


def test_environment_overrides_file(tmp_path) -> None:
    path = tmp_path / "d.toml"
    path.write_text('[state]\nbackend = "redis"\nurl = "redis://a:1/0"\n')
    env = {"DECIDER_STATE_URL": "redis://b:2/1", "DECIDER_STATE_PROBE_LEASE_S": "7.5"}
    state = config.load(path, env=env).state
    assert (state.backend, state.url, state.probe_lease_s) == ("redis", "redis://b:2/1", 7.5)
    with pytest.raises(ConfigError, match="environment DECIDER_STATE_SYNC_INTERVAL_MS: 'fast'"):
        config.load(path, env={"DECIDER_STATE_SYNC_INTERVAL_MS": "fast"})
