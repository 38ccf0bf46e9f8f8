"""The one place errors and refusals become gRPC statuses, with google.rpc rich details.

InvalidArgument            -> INVALID_ARGUMENT   + BadRequest (one violation per field)
NotFound                   -> NOT_FOUND          + ErrorInfo
Unauthenticated            -> UNAUTHENTICATED    + ErrorInfo
PermissionDenied           -> PERMISSION_DENIED  + ErrorInfo
StorageUnavailable         -> UNAVAILABLE        + ErrorInfo(STORAGE_UNAVAILABLE) + RetryInfo
Overloaded                 -> RESOURCE_EXHAUSTED + ErrorInfo + RetryInfo
Refusal MODEL_NOT_FOUND    -> NOT_FOUND          + ErrorInfo(MODEL_NOT_FOUND)
Refusal NO_HEALTHY_ENDPOINT-> UNAVAILABLE        + ErrorInfo(NO_HEALTHY_ENDPOINT)
Refusal QUOTA_EXHAUSTED    -> RESOURCE_EXHAUSTED + ErrorInfo + RetryInfo + QuotaFailure
anything else              -> INTERNAL (logged; the message names no internals)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from decider.core.model import Refusal, RefusalKind
from decider.errors import (
    ConfigError,
    DeciderError,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    StorageUnavailable,
    Unauthenticated,
)

log = logging.getLogger("decider.api")

DOMAIN = "decider.v1"
# Status messages travel in a header; keep them well under common header limits.
MAX_MESSAGE_CHARS = 4000
OVERLOADED_RETRY_S = 1.0
# A full or read-only disk is fixed by an operator, not by the next attempt.
STORAGE_RETRY_S = 30.0

_FieldViolation = error_details_pb2.BadRequest.FieldViolation
_QuotaViolation = error_details_pb2.QuotaFailure.Violation
_Context = grpc.aio.ServicerContext[Any, Any]
_S = TypeVar("_S")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def status_for_error(exc: BaseException) -> grpc.Status:
    if isinstance(exc, InvalidArgument):
        request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in exc.violations
            ]
        )
        return rich_status(grpc.StatusCode.INVALID_ARGUMENT, str(exc), request)
    if isinstance(exc, NotFound):
        return rich_status(grpc.StatusCode.NOT_FOUND, str(exc), _info("NOT_FOUND"))
    if isinstance(exc, Unauthenticated):
        return rich_status(grpc.StatusCode.UNAUTHENTICATED, str(exc), _info("UNAUTHENTICATED"))
    if isinstance(exc, PermissionDenied):
        return rich_status(grpc.StatusCode.PERMISSION_DENIED, str(exc), _info("PERMISSION_DENIED"))
    if isinstance(exc, StorageUnavailable):
        return rich_status(
            grpc.StatusCode.UNAVAILABLE,
            str(exc),
            _info("STORAGE_UNAVAILABLE"),
            _retry(STORAGE_RETRY_S),
        )
    if isinstance(exc, Overloaded):
        return rich_status(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            str(exc),
            _info("SERVER_OVERLOADED"),
            _retry(OVERLOADED_RETRY_S),
        )
    if isinstance(exc, ConfigError):
        return rich_status(grpc.StatusCode.FAILED_PRECONDITION, str(exc), _info("CONFIG_ERROR"))
    return rich_status(grpc.StatusCode.INTERNAL, "internal error; the server log has details")


def status_for_refusal(refusal: Refusal) -> grpc.Status:
    metadata = {"model": refusal.model[:200]}
    if refusal.kind is RefusalKind.MODEL_NOT_FOUND:
        return rich_status(
            grpc.StatusCode.NOT_FOUND, refusal.message, _info("MODEL_NOT_FOUND", metadata)
        )
    if refusal.kind is RefusalKind.QUOTA_EXHAUSTED:
        failure = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject=v.subject, description=v.description
                )
                for v in refusal.violations
            ]
        )
        return rich_status(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            refusal.message,
            _info("QUOTA_EXHAUSTED", metadata),
            _retry(refusal.retry_after_s),
            failure,
        )
    metadata["registered"] = str(refusal.registered)
    for reason, count in sorted(refusal.skipped.items()):
        metadata[f"skipped_{reason}"[:60]] = str(count)
    return rich_status(
        grpc.StatusCode.UNAVAILABLE, refusal.message, _info("NO_HEALTHY_ENDPOINT", metadata)
    )


def shutting_down_status() -> grpc.Status:
    return rich_status(
        grpc.StatusCode.UNAVAILABLE,
        "the server is shutting down; retry on another instance",
        _info("SHUTTING_DOWN"),
    )


def rich_status(code: grpc.StatusCode, message: str, *details: Message) -> grpc.Status:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def encoded_status(status: grpc.Status) -> bytes:
    """The serialized google.rpc.Status inside `status` (code, message and rich details)."""
    for key, value in status.trailing_metadata:
        if key == rpc_status.GRPC_DETAILS_METADATA_KEY and isinstance(value, bytes):
            return bytes(value)
    bare = status_pb2.Status(code=status.code.value[0], message=status.details)
    encoded: bytes = bare.SerializeToString()
    return encoded


async def abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> NoReturn:
    """Ends the RPC with `status` by raising, as context.abort does."""
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")


def status_for_exception(exc: Exception) -> grpc.Status:
    if not isinstance(exc, DeciderError):
        log.error("unexpected error serving an RPC", exc_info=exc)
    return status_for_error(exc)


@contextlib.asynccontextmanager
async def map_errors(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    """Wraps a servicer body: every error becomes a status (used by streaming methods)."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        await abort(context, status_for_exception(exc))


def unary(
    method: Callable[[_S, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]],
) -> Callable[[_S, _Req, grpc.aio.ServicerContext[Any, Any]], Coroutine[Any, Any, _Resp]]:
    """Decorates a unary servicer method: every error it raises becomes a status."""

    @functools.wraps(method)
    async def wrapper(
        self: _S, request: _Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _Resp:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, status_for_exception(exc))

    return wrapper


def _info(reason: str, metadata: dict[str, str] | None = None) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata or {})


def _retry(seconds: float) -> error_details_pb2.RetryInfo:
    delay = Duration()
    if math.isfinite(seconds) and seconds > 0:
        delay.FromNanoseconds(round(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)
