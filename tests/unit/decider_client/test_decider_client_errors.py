"""The client's error boundary and options, without a server: gRPC statuses (unary and
DecideStream messages) become the typed errors; bad options are refused when built."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from decider.v1 import decider_service_pb2 as dpb
from decider_client import (
    ClientOptions,
    DeciderClientError,
    DeciderUnreachable,
    InvalidRequest,
    NoHealthyEndpoint,
    NotFound,
    QuotaExceeded,
    Refused,
    TlsOptions,
    Unauthenticated,
)
from decider_client._errors import error_for_status, rpc_errors, status_from_proto, status_of


def rich(code: grpc.StatusCode, *details: object, message: str = "m") -> status_pb2.Status:
    status = status_pb2.Status(code=code.value[0], message=message)
    for d in details:
        status.details.add().Pack(d)
    return status


def aio_error(status: status_pb2.Status, *, details: str = "m") -> grpc.aio.AioRpcError:
    code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details)


def info(reason: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain="decider")


QUOTA = rich(
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    info("QUOTA_EXHAUSTED"),
    error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=3, nanos=500_000_000)),
)
BAD = rich(
    grpc.StatusCode.INVALID_ARGUMENT,
    error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="model", description="required")
        ]
    ),
)
TABLE = [
    (rich(grpc.StatusCode.NOT_FOUND, info("MODEL_NOT_FOUND")), NotFound, "MODEL_NOT_FOUND"),
    (rich(grpc.StatusCode.UNAVAILABLE, info("NO_HEALTHY_ENDPOINT")), NoHealthyEndpoint, None),
    (QUOTA, QuotaExceeded, "QUOTA_EXHAUSTED"),
    (BAD, InvalidRequest, ""),
    (rich(grpc.StatusCode.UNAUTHENTICATED, info("UNAUTHENTICATED")), Unauthenticated, None),
    (rich(grpc.StatusCode.PERMISSION_DENIED), Unauthenticated, ""),
    # gRPC's own message-size limit: the request's fault, not a quota and not an outage.
    (rich(grpc.StatusCode.RESOURCE_EXHAUSTED), Refused, ""),
    (rich(grpc.StatusCode.FAILED_PRECONDITION), Refused, ""),
    (rich(grpc.StatusCode.UNAVAILABLE, info("SHUTTING_DOWN")), DeciderUnreachable, None),
    (rich(grpc.StatusCode.UNAVAILABLE), DeciderUnreachable, ""),
    (
        rich(grpc.StatusCode.RESOURCE_EXHAUSTED, info("SERVER_OVERLOADED")),
        DeciderUnreachable,
        "SERVER_OVERLOADED",
    ),
    (rich(grpc.StatusCode.DEADLINE_EXCEEDED), DeciderUnreachable, ""),
    (rich(grpc.StatusCode.INTERNAL), DeciderUnreachable, ""),
]


@pytest.mark.parametrize(("status", "kind", "reason"), TABLE)
def test_unary_statuses_become_typed_errors(status, kind, reason):
    with pytest.raises(DeciderClientError) as raised, rpc_errors():
        raise aio_error(status)
    err = raised.value
    assert type(err) is kind
    assert isinstance(raised.value.__cause__, grpc.aio.AioRpcError)
    assert err.code.value[0] == status.code
    if reason is not None:
        assert err.reason == reason
    assert str(err).endswith(f"{err.code.name}: m)" if kind is DeciderUnreachable else ": m")


@pytest.mark.parametrize(("status", "kind", "reason"), TABLE)
def test_stream_message_errors_become_the_same_errors(status, kind, reason):
    # DecideStreamResponse.error is wire-identical to google.rpc.Status.
    carried = dpb.Status.FromString(status.SerializeToString())
    message = status_pb2.Status.FromString(carried.SerializeToString())
    assert type(error_for_status(status_from_proto(message))) is kind


def test_details_are_read_from_the_status():
    quota = error_for_status(status_of(aio_error(QUOTA)))
    assert isinstance(quota, QuotaExceeded) and quota.retry_after_s == 3.5
    bad = error_for_status(status_of(aio_error(BAD)))
    assert bad.status.field_violations == (("model", "required"),)
    assert bad.retry_after_s == 0.0


def test_details_that_disagree_with_the_call_are_dropped():
    # grpcio-status refuses details whose message differs from the call's; the code decides.
    err = error_for_status(status_of(aio_error(QUOTA, details="rewritten by a proxy")))
    assert type(err) is Refused
    assert err.status.details is None and err.status.message == "rewritten by a proxy"


def test_a_call_without_details_is_classified_by_its_code():
    bare = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=None
    )
    err = error_for_status(status_of(bare))
    assert isinstance(err, DeciderUnreachable)
    assert str(err) == "decider unreachable (UNAVAILABLE: )" and err.status.details is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"decide_timeout_s": 0}, "ClientOptions.decide_timeout_s: 0, must be a number > 0"),
        (
            {"report_timeout_s": float("inf")},
            "ClientOptions.report_timeout_s: inf, must be a number > 0",
        ),
        ({"watch_max_age_s": "5"}, "ClientOptions.watch_max_age_s: '5', must be a number > 0"),
        ({"max_backoff_s": -1}, "ClientOptions.max_backoff_s: -1, must be a number >= 0"),
        ({"max_attempts": 0}, "ClientOptions.max_attempts: 0, must be an int >= 1"),
        (
            {"max_pending_reports": True},
            "ClientOptions.max_pending_reports: True, must be an int >= 1",
        ),
    ],
)
def test_bad_options_are_refused_when_built(options, message):
    with pytest.raises(ValueError) as raised:
        ClientOptions(**options)
    assert str(raised.value) == message


def test_options_are_frozen_values():
    a = ClientOptions(seed_endpoints=[], channel_options=[("grpc.keepalive_time_ms", 1000)])
    assert a == ClientOptions(channel_options=(("grpc.keepalive_time_ms", 1000),))
    assert isinstance(a.seed_endpoints, tuple) and hash(a) == hash(
        ClientOptions(channel_options=(("grpc.keepalive_time_ms", 1000),))
    )


def test_tls_options_need_cert_and_key_together_and_readable_files(tmp_path: Path):
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        TlsOptions(cert_file=tmp_path / "client.pem")
    missing = tmp_path / "missing-ca.pem"
    with pytest.raises(ValueError) as raised:
        ClientOptions(tls=TlsOptions(ca_file=missing)).open_channel("127.0.0.1:1")
    assert str(raised.value) == (
        f"TlsOptions.ca_file: cannot read {str(missing)!r}: No such file or directory"
    )


def _python_section() -> str:
    text = (Path(__file__).parents[3] / "docs" / "CLIENTS.md").read_text()
    return text.split("## Python\n", 1)[1].split("\n## ", 1)[0]


def test_the_docs_list_every_option_and_every_error():
    import dataclasses
    import re

    import decider_client

    section = _python_section()
    rows = re.findall(r"^\| `([^|]+?)` \|", section, re.M)
    documented = {name.strip("` ") for row in rows for name in row.split(",")}
    options = {f.name for f in dataclasses.fields(ClientOptions)}
    errors = {
        name
        for name in decider_client.__all__
        if isinstance(getattr(decider_client, name), type)
        and issubclass(getattr(decider_client, name), DeciderClientError)
    }
    assert options | errors <= documented, (options | errors) - documented
