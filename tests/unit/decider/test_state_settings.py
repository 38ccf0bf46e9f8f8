"""[state]: backend, URL, timeouts, key prefix and TLS files, checked once with messages naming
the key (and the file), every problem at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tls_certs import CA

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
            "test.toml: state.url: 'http://h:1': scheme must be one of redis://, rediss://, "
            "unix://",
        ),
        ({"url": "redis://:pw@:6379"}, "state.url: 'redis://:***@:6379': needs a host"),
        (
            {"url": "redis://h:6379/x"},
            "state.url: 'redis://h:6379/x': database 'x' must be a number",
        ),
        ({"url": "redis://h:99999"}, "state.url: 'redis://h:99999': not a valid URL"),
        ({"url": 6379}, "state.url: 6379, must be a redis://, rediss:// or unix:// URL"),
        (
            {"url": "rediss://h:6380/0?ssl_cert_reqs=none"},
            "state.url: 'rediss://h:6380/0?ssl_cert_reqs=none': query option ssl_cert_reqs is "
            "not taken: Redis' certificate is always verified; set state.tls_ca_file",
        ),
        (
            {"url": "rediss://h:6380/0?ssl_ca_certs=/etc/ca.pem"},
            "query option ssl_ca_certs is not taken: set state.tls_ca_file instead",
        ),
        (
            {"url": "rediss://h:6380/0?ssl_min_version=2"},
            "query option ssl_min_version is not taken: TLS is set with the state.tls_* keys",
        ),
        (
            {"url": "redis://h:6379/0?socket_timeout=5"},
            "query option socket_timeout is not taken: set state.command_timeout_ms instead",
        ),
        (
            {"command_timeout_ms": 0},
            "state.command_timeout_ms: 0, must be an integer from 1 to 60000",
        ),
        (
            {"sync_interval_ms": True},
            "state.sync_interval_ms: True, must be an integer from 10 to 60000",
        ),
        ({"probe_lease_s": 0.5}, "state.probe_lease_s: 0.5, must be a number from 1 to 300"),
        (
            {"probe_lease_s": float("inf")},
            "state.probe_lease_s: inf, must be a number from 1 to 300",
        ),
        (
            {"key_prefix": "a b"},
            "state.key_prefix: 'a b', must be a string of up to 200 non-space chars",
        ),
        ({"tls_ca_file": 1}, "state.tls_ca_file: 1, must be a string"),
        ({"tls_check_hostname": "no"}, "state.tls_check_hostname: 'no', must be true or false"),
        ({"urls": "x"}, "state.urls: unknown key (known: backend, command_timeout_ms"),
    ],
)
def test_errors_name_key_and_value(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.parse({"state": table}, source="test.toml")
    assert message in str(exc.value)


def test_every_problem_reported_at_once() -> None:
    table = {
        "backend": "etcd",
        "url": "ftp://u:hunter2@h:1",
        "key_prefix": "a b",
        "sync_interval_ms": 1,
        "tls_cert_file": 5,
    }
    with pytest.raises(ConfigError) as exc:
        config.parse({"state": table}, source="test.toml")
    assert str(exc.value).splitlines() == [
        "test.toml: state.backend: 'etcd', must be one of memory, redis",
        "test.toml: state.url: 'ftp://u:***@h:1': scheme must be one of redis://, rediss://, "
        "unix://",
        "test.toml: state.key_prefix: 'a b', must be a string of up to 200 non-space chars",
        "test.toml: state.sync_interval_ms: 1, must be an integer from 10 to 60000",
        "test.toml: state.tls_cert_file: 5, must be a string",
    ]


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


def test_environment_problems_reported_at_once(tmp_path) -> None:
    path = tmp_path / "d.toml"
    path.write_text('[state]\nbackend = "redis"\n')
    env = {
        "DECIDER_STATE_SYNC_INTERVAL_MS": "fast",
        "DECIDER_STATE_URL": "redis://u:hunter2@h:1/x",
        "DECIDER_STATE_TLS_CHECK_HOSTNAME": "maybe",
    }
    with pytest.raises(ConfigError) as exc:
        config.load(path, env=env)
    assert str(exc.value).splitlines() == [
        "environment DECIDER_STATE_URL: 'redis://u:***@h:1/x': database 'x' must be a number",
        "environment DECIDER_STATE_SYNC_INTERVAL_MS: 'fast', must be an integer from 10 to 60000",
        "environment DECIDER_STATE_TLS_CHECK_HOSTNAME: 'maybe', must be true or false",
    ]
    assert "hunter2" not in str(exc.value)


@pytest.fixture
def redis_ca(tmp_path) -> CA:
    return CA(tmp_path / "pki", name="Redis CA")


def write_state(tmp_path, **state: str) -> Path:
    """A config file with a `[state]` table of these string keys (backend "redis" unless
    given)."""
    path = tmp_path / "d.toml"
    state = {"backend": "redis", **state}
    lines = ["[state]", *(f"{k} = {json.dumps(v)}" for k, v in state.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def load_error(path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        config.load(path, env=env or {})
    return str(exc.value)


def test_tls_files_handed_to_redis_py(tmp_path, redis_ca: CA) -> None:
    client = redis_ca.issue("decider", server=False, stem="client")
    path = write_state(
        tmp_path,
        url="rediss://redis.internal:6380/0",
        tls_ca_file=str(redis_ca.ca_file),
        tls_cert_file=str(client.cert_file),
        tls_key_file=str(client.key_file),
    )
    state = config.load(path, env={}).state
    assert state.tls
    assert state.redis_tls_options() == {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": str(redis_ca.ca_file),
        "ssl_certfile": str(client.cert_file),
        "ssl_keyfile": str(client.key_file),
    }
    assert StateSettings().redis_tls_options() == {}


def test_environment_completes_the_tls_keys(tmp_path, redis_ca: CA) -> None:
    # The file names the CA; the URL (with its password) comes from the environment.
    path = write_state(tmp_path, tls_ca_file=str(redis_ca.ca_file))
    env = {
        "DECIDER_STATE_URL": "rediss://d:pw@127.0.0.1:6380/0",
        "DECIDER_STATE_TLS_CHECK_HOSTNAME": "false",
    }
    state = config.load(path, env=env).state
    assert state.redis_tls_options()["ssl_ca_certs"] == str(redis_ca.ca_file)
    assert state.redis_tls_options()["ssl_check_hostname"] is False


@pytest.mark.parametrize("url", ["redis://h:6379/0", "unix:///run/redis.sock"])
def test_tls_keys_need_a_rediss_url(tmp_path, redis_ca: CA, url: str) -> None:
    path = write_state(tmp_path, url=url, tls_ca_file=str(redis_ca.ca_file))
    assert load_error(path) == (
        f"state.tls_ca_file: set, but state.url {url!r} is not a rediss:// URL; "
        "TLS to Redis needs rediss://host:port (or drop the TLS keys)"
    )
    env = {"DECIDER_STATE_URL": url, "DECIDER_STATE_TLS_CHECK_HOSTNAME": "false"}
    assert load_error(write_state(tmp_path), env).startswith(
        "state.tls_check_hostname: set, but state.url"
    )


def test_certificate_without_key(tmp_path, redis_ca: CA) -> None:
    client = redis_ca.issue("decider", server=False, stem="client")
    path = write_state(tmp_path, url="rediss://h:6380", tls_cert_file=str(client.cert_file))
    assert load_error(path) == "state.tls_cert_file is set, so state.tls_key_file must be too"
    path = write_state(tmp_path, url="rediss://h:6380", tls_key_file=str(client.key_file))
    assert load_error(path) == "state.tls_key_file is set, so state.tls_cert_file must be too"


def test_bad_files_name_key_and_file(tmp_path, redis_ca: CA) -> None:
    client = redis_ca.issue("decider", server=False, stem="client")
    other = redis_ca.issue("other", server=False, stem="other")
    missing = tmp_path / "missing.crt"
    empty = tmp_path / "empty.crt"
    empty.write_text("\n")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n")
    cases = [
        (
            {"tls_ca_file": str(missing)},
            f"state.tls_ca_file: {missing}: cannot read: No such file or directory",
        ),
        ({"tls_ca_file": str(empty)}, f"state.tls_ca_file: {empty}: the file is empty"),
        (
            {"tls_ca_file": str(garbage)},
            f"state.tls_ca_file: {garbage}: not a PEM certificate bundle",
        ),
        (
            {"tls_cert_file": str(garbage), "tls_key_file": str(client.key_file)},
            f"state.tls_cert_file: {garbage}: not a PEM certificate",
        ),
        (
            {"tls_cert_file": str(client.cert_file), "tls_key_file": str(other.key_file)},
            f"state.tls_key_file: {other.key_file}: the key does not match the certificate "
            f"in {client.cert_file}",
        ),
        (
            {"tls_cert_file": str(client.cert_file), "tls_key_file": str(garbage)},
            f"state.tls_key_file: {garbage}: not a PEM private key",
        ),
        (
            {"tls_cert_file": str(client.cert_file), "tls_key_file": str(encrypted)},
            f"state.tls_key_file: {encrypted}: the key is encrypted",
        ),
        (
            {"tls_cert_file": str(missing), "tls_key_file": str(missing)},
            f"state.tls_cert_file: {missing}: cannot read",
        ),
    ]
    for keys, message in cases:
        path = write_state(tmp_path, url="rediss://h:6380", **keys)
        assert message in load_error(path), keys


def test_memory_backend_reads_no_tls_file(tmp_path) -> None:
    missing = str(tmp_path / "missing.crt")
    path = write_state(tmp_path, backend="memory", url="rediss://h:6380", tls_ca_file=missing)
    assert not config.load(path, env={}).state.shared
    assert "cannot read" in load_error(
        write_state(tmp_path, url="rediss://h:6380", tls_ca_file=missing)
    )
