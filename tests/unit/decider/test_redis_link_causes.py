"""How a Redis failure's cause reads in logs, health reasons and errors."""

from __future__ import annotations

import redis.exceptions

from decider.state.redis_link import describe

CLIENT_CERT_ADVICE = "set [state] tls_cert_file and tls_key_file"
USE_REDISS = "if Redis serves TLS on this port, use a rediss:// [state] url"
USE_REDIS = "if Redis serves this port without TLS, use a redis:// [state] url"


def _wrapped(error: redis.exceptions.RedisError, cause: BaseException) -> BaseException:
    # As redis-py raises them: its own error `from` the socket's.
    try:
        raise error from cause
    except redis.exceptions.RedisError as wrapped:
        return wrapped


def _reset() -> BaseException:
    reset = ConnectionResetError(104, "Connection reset by peer")
    return _wrapped(
        redis.exceptions.ConnectionError(f"Error while reading from 127.0.0.1:6380 : {reset.args}"),
        reset,
    )


def _connect_timeout() -> BaseException:
    return _wrapped(redis.exceptions.TimeoutError("Timeout connecting to server"), TimeoutError())


def test_a_reset_over_tls_without_a_client_certificate_says_what_to_set() -> None:
    cause = describe(_reset(), scheme="rediss")
    assert cause.startswith("Error while reading from 127.0.0.1:6380")
    assert CLIENT_CERT_ADVICE in cause


def test_a_reset_over_tls_with_a_client_certificate_is_reported_as_it_is() -> None:
    cause = describe(_reset(), scheme="rediss", client_cert=True)
    assert cause == "Error while reading from 127.0.0.1:6380 : (104, 'Connection reset by peer')"


def test_a_reset_of_a_plaintext_link_suggests_rediss() -> None:
    cause = describe(_reset(), scheme="redis")
    assert cause.endswith(f"({USE_REDISS})")
    assert CLIENT_CERT_ADVICE not in cause


def test_a_reset_of_a_unix_socket_gets_no_scheme_advice() -> None:
    cause = describe(_reset(), scheme="unix")
    assert cause == "Error while reading from 127.0.0.1:6380 : (104, 'Connection reset by peer')"


def test_a_tls_connect_timeout_suggests_redis() -> None:
    cause = describe(_connect_timeout(), scheme="rediss")
    assert cause.startswith("Timeout connecting to server (")
    assert USE_REDIS in cause


def test_a_plaintext_connect_timeout_is_reported_as_it_is() -> None:
    assert describe(_connect_timeout(), scheme="redis") == "Timeout connecting to server"


def test_other_errors_get_no_advice() -> None:
    cause = describe(redis.exceptions.TimeoutError("Timeout reading"), scheme="rediss")
    assert cause == "Timeout reading"
