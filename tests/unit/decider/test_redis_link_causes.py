"""How a Redis failure's cause reads in logs, health reasons and errors."""

from __future__ import annotations

import redis.exceptions

from decider.state.redis_link import describe

ADVICE = "set [state] tls_cert_file and tls_key_file"


def _reset() -> redis.exceptions.ConnectionError:
    # As redis-py raises it: its ConnectionError `from` the socket's error.
    reset = ConnectionResetError(104, "Connection reset by peer")
    try:
        raise redis.exceptions.ConnectionError(
            f"Error while reading from 127.0.0.1:6380 : {reset.args}"
        ) from reset
    except redis.exceptions.ConnectionError as wrapped:
        return wrapped


def test_a_reset_over_tls_without_a_client_certificate_says_what_to_set() -> None:
    cause = describe(_reset(), tls_without_client_cert=True)
    assert cause.startswith("Error while reading from 127.0.0.1:6380")
    assert ADVICE in cause


def test_a_reset_otherwise_is_reported_as_it_is() -> None:
    cause = describe(_reset())
    assert ADVICE not in cause
    assert cause == "Error while reading from 127.0.0.1:6380 : (104, 'Connection reset by peer')"


def test_other_errors_get_no_certificate_advice() -> None:
    cause = describe(redis.exceptions.TimeoutError("Timeout reading"), tls_without_client_cert=True)
    assert cause == "Timeout reading"
