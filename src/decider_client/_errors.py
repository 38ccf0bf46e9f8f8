"""The client's errors, and the one place gRPC statuses become them.

    DeciderClientError            everything the client raises
    ├── DeciderUnreachable        Decider did not answer (connection, deadline, draining,
    │                             overloaded) and fail-open could not help
    ├── Refused                   Decider answered the request with an error status
    │   ├── InvalidRequest        INVALID_ARGUMENT (BadRequest field violations)
    │   ├── NotFound              NOT_FOUND: no endpoint serves the model, or no such endpoint
    │   ├── QuotaExceeded         RESOURCE_EXHAUSTED for a tenant over quota (RetryInfo)
    │   ├── NoHealthyEndpoint     UNAVAILABLE with ErrorInfo NO_HEALTHY_ENDPOINT
    │   └── Unauthenticated       UNAUTHENTICATED or PERMISSION_DENIED (RegistryService token)
    └── AttemptsExhausted         every attempt of `route` failed; `.routed` says what was tried

Every gRPC call the client makes runs inside `rpc_errors()`, and DecideStream's per-message
errors go through `error_for_status`, so no `grpc.aio.AioRpcError` reaches the caller (as httpx
maps httpcore's exceptions in `map_httpcore_exceptions`). Rich details are read with
grpcio-status.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

if TYPE_CHECKING:
    from decider_client._results import Routed

# ErrorInfo reasons Decider sets (README, "Status codes").
REASON_NO_HEALTHY_ENDPOINT = "NO_HEALTHY_ENDPOINT"
REASON_SHUTTING_DOWN = "SHUTTING_DOWN"
REASON_SERVER_OVERLOADED = "SERVER_OVERLOADED"
REASON_QUOTA_EXHAUSTED = "QUOTA_EXHAUSTED"

# Codes that mean Decider itself did not answer; UNKNOWN and INTERNAL come from a broken hop
# or a crashed handler. UNAVAILABLE and RESOURCE_EXHAUSTED depend on the ErrorInfo.
_UNREACHABLE_CODES = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_Detail = TypeVar("_Detail", bound=Message)


@dataclass(frozen=True, slots=True)
class RpcStatus:
    """A gRPC status with its google.rpc.Status details (None when the server sent none)."""

    code: grpc.StatusCode
    message: str
    details: status_pb2.Status | None = None

    def _detail(self, kind: type[_Detail]) -> _Detail | None:
        for detail in self.details.details if self.details is not None else ():
            if detail.Is(kind.DESCRIPTOR):
                value = kind()
                detail.Unpack(value)
                return value
        return None

    @property
    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        return self._detail(error_details_pb2.ErrorInfo)

    @property
    def reason(self) -> str:
        """The ErrorInfo reason, or ""."""
        info = self.error_info
        return info.reason if info is not None else ""

    @property
    def retry_after_s(self) -> float:
        """The RetryInfo delay, or 0."""
        info = self._detail(error_details_pb2.RetryInfo)
        return float(info.retry_delay.ToTimedelta().total_seconds()) if info is not None else 0.0

    @property
    def field_violations(self) -> tuple[tuple[str, str], ...]:
        """(field, description) of every BadRequest violation."""
        bad = self._detail(error_details_pb2.BadRequest)
        if bad is None:
            return ()
        return tuple((v.field, v.description) for v in bad.field_violations)

    @property
    def unreachable(self) -> bool:
        """True when the status means Decider did not answer, rather than refused."""
        if self.code == grpc.StatusCode.UNAVAILABLE:
            # Only NO_HEALTHY_ENDPOINT is an answer; no ErrorInfo (transport) or SHUTTING_DOWN
            # is not.
            return self.reason != REASON_NO_HEALTHY_ENDPOINT
        if self.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # A tenant over quota is an answer; a server out of capacity is not.
            return self.reason == REASON_SERVER_OVERLOADED
        return self.code in _UNREACHABLE_CODES


class DeciderClientError(Exception):
    """Base of every error the client raises."""


class _StatusError(DeciderClientError):
    def __init__(self, message: str, status: RpcStatus) -> None:
        super().__init__(message)
        self.status = status

    @property
    def code(self) -> grpc.StatusCode:
        return self.status.code

    @property
    def reason(self) -> str:
        return self.status.reason

    @property
    def retry_after_s(self) -> float:
        return self.status.retry_after_s


class DeciderUnreachable(_StatusError):
    """Decider could not be reached and fail-open had no endpoint (or is off). `.status` is
    what the transport or the draining server said."""


class Refused(_StatusError):
    """Decider answered the request with an error status: `.code`, `.status.message`,
    `.reason` (ErrorInfo) and the other details on `.status`. Never triggers fail-open."""


class InvalidRequest(Refused):
    """INVALID_ARGUMENT; `.status.field_violations` names every bad field."""


class NotFound(Refused):
    """NOT_FOUND: no endpoint serves the model (Decide), or no such endpoint (registry)."""


class QuotaExceeded(Refused):
    """RESOURCE_EXHAUSTED for a tenant over quota; `.retry_after_s` says when to retry."""


class NoHealthyEndpoint(Refused):
    """UNAVAILABLE with NO_HEALTHY_ENDPOINT: Decider is up but no endpoint is usable."""


class Unauthenticated(Refused):
    """UNAUTHENTICATED or PERMISSION_DENIED: a RegistryService call without the admin token."""


class AttemptsExhausted(DeciderClientError):
    """Every attempt failed; `routed` says what was tried."""

    def __init__(self, message: str, routed: Routed) -> None:
        super().__init__(message)
        self.routed = routed


_REFUSALS: dict[grpc.StatusCode, type[Refused]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: NoHealthyEndpoint,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
}


def error_for_status(status: RpcStatus) -> DeciderUnreachable | Refused:
    """The typed error for a non-OK status."""
    text = f"{status.code.name}: {status.message}"
    if status.unreachable:
        return DeciderUnreachable(f"decider unreachable ({text})", status)
    cls = _REFUSALS.get(status.code, Refused)
    if (
        status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        and status.reason == REASON_QUOTA_EXHAUSTED
    ):
        # gRPC's own message-size limit is RESOURCE_EXHAUSTED too: a Refused, not a quota.
        cls = QuotaExceeded
    return cls(text, status)


def status_of(err: grpc.aio.AioRpcError) -> RpcStatus:
    """The status of a failed call, its details read by grpcio-status."""
    try:
        details = rpc_status.from_call(err)
    except ValueError:
        # The details disagree with the call's code or message (a proxy rewrote one): trust
        # the call and drop details that may describe another failure.
        details = None
    return RpcStatus(code=err.code(), message=err.details() or "", details=details)


def status_from_proto(status: status_pb2.Status) -> RpcStatus:
    """A status carried in a message (DecideStreamResponse.error, a google.rpc.Status twin)."""
    return RpcStatus(
        code=_CODES.get(status.code, grpc.StatusCode.UNKNOWN),
        message=status.message,
        details=status,
    )


@contextlib.contextmanager
def rpc_errors() -> Iterator[None]:
    """Turns a failed gRPC call into DeciderUnreachable or a Refused subclass."""
    try:
        yield
    except grpc.aio.AioRpcError as err:
        raise error_for_status(status_of(err)) from err


def _status(err: BaseException) -> RpcStatus | None:
    if isinstance(err, _StatusError):
        return err.status
    if isinstance(err, grpc.aio.AioRpcError):
        return status_of(err)
    return None


def is_unreachable(err: BaseException) -> bool:
    """True when `err` means Decider did not answer, rather than answered with a refusal.
    Takes the client's errors and raw `grpc.aio.AioRpcError`s alike."""
    status = _status(err)
    if status is None:
        return isinstance(err, (OSError, asyncio.TimeoutError))
    return status.unreachable


def is_no_healthy_endpoint(err: BaseException) -> bool:
    """True when Decider answered UNAVAILABLE because no endpoint is usable."""
    status = _status(err)
    return (
        status is not None
        and status.code == grpc.StatusCode.UNAVAILABLE
        and status.reason == REASON_NO_HEALTHY_ENDPOINT
    )


def retry_after_s(err: BaseException) -> float:
    """The RetryInfo delay on a RESOURCE_EXHAUSTED (tenant over quota), or 0."""
    status = _status(err)
    return status.retry_after_s if status is not None else 0.0
