"""api/errors.py: the one mapping from errors and refusals to statuses with rich details."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from decider.api import errors
from decider.codec import validate
from decider.core.model import QuotaViolation, Refusal, RefusalKind
from decider.errors import InvalidArgument, NotFound, Overloaded, Unauthenticated
from decider.v1 import decider_service_pb2 as dpb


def _details(status: grpc.Status) -> dict[str, object]:
    ((key, value),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    rich = status_pb2.Status.FromString(value)
    assert rich.code == status.code.value[0]
    assert rich.message == status.details
    out: dict[str, object] = {}
    for any_ in rich.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.RetryInfo,
            error_details_pb2.QuotaFailure,
            error_details_pb2.BadRequest,
        ):
            if any_.Is(kind.DESCRIPTOR):
                message = kind()
                any_.Unpack(message)
                out[kind.__name__] = message
    return out


@pytest.mark.parametrize(
    ("exc", "code", "detail"),
    [
        (InvalidArgument.one("model", "required"), grpc.StatusCode.INVALID_ARGUMENT, "BadRequest"),
        (NotFound("no such"), grpc.StatusCode.NOT_FOUND, "ErrorInfo"),
        (Unauthenticated("token"), grpc.StatusCode.UNAUTHENTICATED, "ErrorInfo"),
        (Overloaded("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED, "RetryInfo"),
        (RuntimeError("secret internals"), grpc.StatusCode.INTERNAL, None),
    ],
)
def test_error_statuses(exc, code, detail):
    status = errors.status_for_error(exc)
    assert status.code == code
    assert "secret internals" not in status.details
    if detail:
        assert detail in _details(status)


def test_no_healthy_endpoint_carries_counts():
    status = errors.status_for_refusal(
        Refusal(
            kind=RefusalKind.NO_HEALTHY_ENDPOINT,
            message="3 endpoints serve m; all skipped: 3 unhealthy",
            model="m",
            registered=3,
            skipped={"unhealthy": 3},
        )
    )
    assert status.code == grpc.StatusCode.UNAVAILABLE
    info = _details(status)["ErrorInfo"]
    assert info.reason == "NO_HEALTHY_ENDPOINT"
    assert dict(info.metadata) == {"model": "m", "registered": "3", "skipped_unhealthy": "3"}


def test_quota_refusal_has_retry_and_quota_failure():
    status = errors.status_for_refusal(
        Refusal(
            kind=RefusalKind.QUOTA_EXHAUSTED,
            message="tenant acme is over quota",
            model="m",
            retry_after_s=1.5,
            violations=(QuotaViolation(subject="tenant:acme", description="rpm 1"),),
        )
    )
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = _details(status)
    assert details["RetryInfo"].retry_delay.ToMilliseconds() == 1500
    assert details["QuotaFailure"].violations[0].subject == "tenant:acme"


def test_long_messages_are_cut_to_fit_a_header():
    status = errors.status_for_error(NotFound("x" * 100_000))
    assert len(status.details) <= errors.MAX_MESSAGE_CHARS


def test_validate_collects_every_violation():
    with pytest.raises(InvalidArgument) as err:
        validate.decide_request(
            dpb.DecideRequest(model="", session_id="s" * 600, exclude_endpoint_ids=["x"] * 300)
        )
    assert [v.field for v in err.value.violations] == [
        "model",
        "session_id",
        "exclude_endpoint_ids",
    ]


@pytest.mark.parametrize(
    "request_",
    [
        dpb.DecideRequest(model="m" * 513),
        dpb.DecideRequest(model="m", request_id="r" * 513),
        dpb.DecideRequest(model="m", tenant="t" * 513),
        dpb.DecideRequest(model="m", strategy="s" * 513),
        dpb.DecideRequest(model="m", required_capabilities=["c" * 513]),
        dpb.DecideRequest(model="m", required_capabilities=["c"] * 65),
        dpb.DecideRequest(model="m", exclude_endpoint_ids=["e" * 513]),
        dpb.DecideRequest(model="m", prefix_hashes=[1] * 8193),
        dpb.DecideRequest(model="m", max_fallbacks=65),
    ],
)
def test_validate_decide_fast_path_lets_no_bad_field_through(request_):
    with pytest.raises(InvalidArgument):
        validate.decide_request(request_)


def test_validate_decide_accepts_requests_at_the_limits():
    validate.decide_request(
        dpb.DecideRequest(
            model="m" * 512,
            request_id="r" * 512,
            required_capabilities=["c" * 512] * 64,
            exclude_endpoint_ids=["e"] * 256,
            prefix_hashes=[2**64 - 1] * 8192,
            max_fallbacks=64,
        )
    )
