"""Streaming mode: concurrent decide() calls multiplexed over one DecideStream."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from google.rpc import status_pb2

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import decider_service_pb2_grpc as dgrpc
from decider_client._errors import (
    DeciderClientError,
    DeciderUnreachable,
    RpcStatus,
    error_for_status,
    status_from_proto,
    status_of,
)


@dataclass(slots=True)
class _LiveStream:
    call: grpc.aio.StreamStreamCall[dpb.DecideStreamRequest, dpb.DecideStreamResponse]
    pending: dict[int, asyncio.Future[dpb.DecideStreamResponse]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None


class DecideStream:
    """decide() calls matched to their answers by correlation id on one shared stream.

    A per-message error raises the same typed error as a unary call would. A broken stream
    fails every call waiting on it with the stream's status (unreachable, so callers fail open
    as with unary calls); the next call opens a new stream. A decision that arrives after its
    caller gave up goes to `on_late`.
    """

    def __init__(
        self,
        api: dgrpc.DeciderServiceAsyncStub,
        *,
        on_late: Callable[[dpb.DecideResponse], None],
    ) -> None:
        self._api = api
        self._on_late = on_late
        self._live: _LiveStream | None = None
        self._ids = itertools.count(1)
        # grpc.aio allows one write at a time on a stream.
        self._write_lock = asyncio.Lock()

    async def decide(self, request: dpb.DecideRequest, *, timeout_s: float) -> dpb.DecideResponse:
        live = self._open()
        correlation_id = next(self._ids)
        answer: asyncio.Future[dpb.DecideStreamResponse] = (
            asyncio.get_running_loop().create_future()
        )
        live.pending[correlation_id] = answer
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    async with self._write_lock:
                        await live.call.write(
                            dpb.DecideStreamRequest(correlation_id=correlation_id, decide=request)
                        )
                except (grpc.aio.UsageError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    # The stream has ended (grpc.aio raises InvalidStateError when it ended
                    # before its reader task noticed): the reader fails `answer` with the
                    # stream's status.
                    pass
                response = await answer
        except TimeoutError:
            live.pending.pop(correlation_id, None)
            raise _unreachable(grpc.StatusCode.DEADLINE_EXCEEDED, "decide timed out") from None
        if response.HasField("error"):
            # decider.v1.Status is wire-identical to google.rpc.Status.
            raise error_for_status(status_from_proto(_rpc_status(response.error)))
        return response.decide

    def _open(self) -> _LiveStream:
        if self._live is None:
            live = _LiveStream(call=self._api.DecideStream())
            live.reader = asyncio.create_task(self._read(live), name="decider-decide-stream")
            self._live = live
        return self._live

    async def _read(self, live: _LiveStream) -> None:
        error: DeciderClientError = _unreachable(
            grpc.StatusCode.UNAVAILABLE, "the decide stream ended"
        )
        try:
            async for response in live.call:
                answer = live.pending.pop(response.correlation_id, None)
                if answer is not None and not answer.done():
                    answer.set_result(response)
                elif response.HasField("decide"):
                    self._on_late(response.decide)
        except grpc.aio.AioRpcError as err:
            error = error_for_status(status_of(err))
        finally:
            if self._live is live:
                self._live = None
            for answer in live.pending.values():
                if not answer.done():
                    answer.set_exception(error)
            live.pending.clear()

    async def close(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.call.cancel()
            if live.reader is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await live.reader


def _unreachable(code: grpc.StatusCode, message: str) -> DeciderUnreachable:
    return DeciderUnreachable(
        f"decider unreachable ({code.name}: {message})", RpcStatus(code=code, message=message)
    )


def _rpc_status(status: dpb.Status) -> status_pb2.Status:
    return status_pb2.Status.FromString(status.SerializeToString())
