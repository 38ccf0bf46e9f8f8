"""DeciderService: Decide, ReportOutcome and WatchHealth over the engine and the watch hub."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from decider.api.decide_path import INVALID_ARGUMENT, DecidePath
from decider.api.errors import (
    abort,
    encoded_status,
    map_errors,
    shutting_down_status,
    status_for_exception,
    status_for_refusal,
    unary,
)
from decider.api.ports import Clock, DecisionEngine, Observer
from decider.api.wire import DecisionEncoder
from decider.codec import convert, validate
from decider.core.model import Decision, Refusal
from decider.errors import InvalidArgument
from decider.obs.telemetry import Rpc, Tracing, traced, traced_stream
from decider.state.watch import WatchHub
from decider.v1 import decider_service_pb2 as dpb

Context = grpc.aio.ServicerContext[Any, Any]
__all__ = ["INVALID_ARGUMENT", "SERVICE", "DeciderService", "add_to_server"]


class DeciderService:
    """The servicer. Not a subclass of the generated DeciderServiceServicer, because Decide
    and DecideStream answer serialized bytes; register it with add_to_server."""

    def __init__(
        self,
        engine: DecisionEngine,
        hub: WatchHub,
        *,
        clock: Clock = time.monotonic,
        on_failure: Callable[[str], None] | None = None,
        observer: Observer | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._hub = hub
        # Shared with the other adapters (the Envoy ext_proc processor): see `path`.
        self.path = DecidePath(engine, clock=clock, observer=observer, on_failure=on_failure)
        # Read by @traced: one server span per call, continuing the caller's W3C trace.
        self.tracing = tracing or Tracing.disabled()
        self._encoder = DecisionEncoder()
        # DecideStream calls, each marked True while it waits for its next request.
        self._streams: dict[asyncio.Task[Any], bool] = {}
        self._draining = False

    @traced(Rpc.DECIDE)
    @unary
    async def Decide(self, request: dpb.DecideRequest, context: Context) -> bytes:
        """Answers the DecideResponse already serialized (see add_to_server)."""
        result = self._decide(request)
        if isinstance(result, Refusal):
            await abort(context, status_for_refusal(result))
        else:
            return self._encoder.encode(result)

    def _decide(self, request: dpb.DecideRequest) -> Decision | Refusal:
        """Checks, decides and observes one request, unary or streamed; raises InvalidArgument
        for a malformed request or a strategy name the engine does not know."""
        try:
            route = convert.checked_route_request(request)
        except InvalidArgument:
            self.path.rejected(INVALID_ARGUMENT)
            raise
        return self.path.decide(route)

    @traced(Rpc.REPORT_OUTCOME)
    @unary
    async def ReportOutcome(
        self, request: dpb.ReportOutcomeRequest, context: Context
    ) -> dpb.ReportOutcomeResponse:
        validate.report_outcome_request(request)
        found = self.path.record_outcome(convert.outcome_from_proto(request))
        return dpb.ReportOutcomeResponse(decision_found=found)

    @traced_stream(Rpc.DECIDE_STREAM)
    async def DecideStream(
        self, requests: AsyncIterator[dpb.DecideStreamRequest], context: Context
    ) -> AsyncIterator[bytes]:
        """One answer per request, in order, each a serialized DecideStreamResponse; a refusal
        or bad request is answered, not fatal.

        On drain the stream answers what it has read and ends with UNAVAILABLE (SHUTTING_DOWN),
        so the caller resends any request it got no answer for to another instance.
        """
        task = asyncio.current_task()
        assert task is not None
        self._streams[task] = False
        stream = aiter(requests)
        try:
            while not self._draining:
                self._streams[task] = True
                try:
                    message = await anext(stream)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    # drain() cancels only streams waiting here, so nothing is cut mid-answer.
                    if not self._draining:
                        raise
                    break
                finally:
                    self._streams[task] = False
                yield self._stream_answer(message)
        finally:
            del self._streams[task]
        await abort(context, shutting_down_status())

    def drain(self) -> None:
        """Ends every DecideStream once its current answer is sent (server.stop calls this)."""
        self._draining = True
        for task, waiting in self._streams.items():
            if waiting:
                task.cancel()

    def _stream_answer(self, message: dpb.DecideStreamRequest) -> bytes:
        request = message.decide
        try:
            result = self._decide(request)
            if isinstance(result, Refusal):
                status = status_for_refusal(result)
            else:
                return self._encoder.encode_stream(message.correlation_id, result)
        except Exception as exc:
            status = status_for_exception(exc)
        return dpb.DecideStreamResponse(
            correlation_id=message.correlation_id,
            error=dpb.Status.FromString(encoded_status(status)),
        ).SerializeToString()

    @traced_stream(Rpc.WATCH_HEALTH)
    async def WatchHealth(
        self, request: dpb.WatchHealthRequest, context: Context
    ) -> AsyncIterator[dpb.WatchHealthResponse]:
        async with map_errors(context):
            validate.watch_health_request(request)
            watcher = self._hub.open(request.model)
        try:
            async for batch in watcher:
                yield dpb.WatchHealthResponse(
                    events=[convert.health_event_to_proto(e) for e in batch.events],
                    snapshot=batch.snapshot,
                )
        finally:
            self._hub.release(watcher)


SERVICE = dpb.DESCRIPTOR.services_by_name["DeciderService"].full_name


def add_to_server(servicer: Any, server: Any) -> None:
    """The generated add_DeciderServiceServicer_to_server, except that Decide and DecideStream
    answer with bytes the servicer has serialized itself (api/wire.py), so grpc is given no
    serializer for them. Works for grpc.aio and sync servers alike."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Decide": grpc.unary_unary_rpc_method_handler(
            servicer.Decide,
            request_deserializer=dpb.DecideRequest.FromString,
            response_serializer=None,
        ),
        "ReportOutcome": grpc.unary_unary_rpc_method_handler(
            servicer.ReportOutcome,
            request_deserializer=dpb.ReportOutcomeRequest.FromString,
            response_serializer=dpb.ReportOutcomeResponse.SerializeToString,
        ),
        "WatchHealth": grpc.unary_stream_rpc_method_handler(
            servicer.WatchHealth,
            request_deserializer=dpb.WatchHealthRequest.FromString,
            response_serializer=dpb.WatchHealthResponse.SerializeToString,
        ),
        "DecideStream": grpc.stream_stream_rpc_method_handler(
            servicer.DecideStream,
            request_deserializer=dpb.DecideStreamRequest.FromString,
            response_serializer=None,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
