"""Server interceptors: admission (shutdown and the concurrent-RPC limit), the admin token and
the admin client-certificate list."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeAlias, cast

import grpc

from decider.api.errors import abort, shutting_down_status, status_for_error
from decider.config.tls import peer_identities
from decider.errors import InvalidArgument, Overloaded, PermissionDenied, Unauthenticated

# Quoted: grpc.RpcMethodHandler is generic only in the type stubs.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"
UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]
BidiBehavior = Callable[
    [AsyncIterator[Any], grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]
]

REGISTRY_SERVICE = "decider.v1.RegistryService"
# Health must keep answering while draining (that is how load balancers see NOT_SERVING).
_ALWAYS_ADMITTED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _deny(handler: Handler, status: grpc.Status) -> Handler:
    """A handler with the same shape as `handler` that ends every call with `status`."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await abort(context, status)

    if handler.request_streaming:
        factory = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
    else:
        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
    return factory(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the handler can answer
    INVALID_ARGUMENT instead of grpc's UNKNOWN."""

    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except Exception as exc:
            return _Undecodable(str(exc))

    return parse


def _undecodable_status(request: _Undecodable) -> grpc.Status:
    return status_for_error(
        InvalidArgument.one("", f"the request message does not parse: {request.error[:200]}")
    )


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Refuses new RPCs once draining and unary RPCs beyond `max_concurrent`; answers
    undecodable requests with INVALID_ARGUMENT.

    Streams (WatchHealth) are left to the watch hub's own limit, so many long-lived watchers
    do not use up the request budget. The count is taken inside the handler, before its first
    await, so it is exact on the single event loop thread.
    """

    def __init__(self, *, max_concurrent: int) -> None:
        self._max = max_concurrent
        self._active = 0
        self.draining = False
        # method -> (the handler wrapped, the wrapper): built once per method, not per call.
        self._counted: dict[str, tuple[Handler, Handler]] = {}

    @property
    def active(self) -> int:
        return self._active

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_ALWAYS_ADMITTED):
            return handler
        if self.draining:
            return _deny(handler, shutting_down_status())
        if handler.request_streaming:
            return self._checked_bidi(handler) if handler.response_streaming else handler
        if handler.response_streaming:
            return self._checked_stream(handler)
        cached = self._counted.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        counted = self._counted_unary(handler)
        self._counted[handler_call_details.method] = (handler, counted)
        return counted

    def _counted_unary(self, handler: Handler) -> Handler:
        # grpc.aio stores the servicer's coroutine method here; the stubs type it for sync.
        behavior = cast(UnaryBehavior, handler.unary_unary)

        async def counted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Undecodable):
                await abort(context, _undecodable_status(request))
            if self._active >= self._max:
                await abort(
                    context,
                    status_for_error(
                        Overloaded(
                            f"the server is serving {self._active} RPCs, its limit "
                            "(server.max_concurrent_rpcs); retry with backoff"
                        )
                    ),
                )
            self._active += 1
            try:
                return await behavior(request, context)
            finally:
                self._active -= 1

        return grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=_safe(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    @staticmethod
    def _checked_bidi(handler: Handler) -> Handler:
        """DecideStream: undecodable bytes end the stream with INVALID_ARGUMENT (they carry no
        correlation id to answer), after the answers to every message before them."""
        behavior = cast(BidiBehavior, handler.stream_stream)

        async def checked(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async def parsed() -> AsyncIterator[Any]:
                async for request in requests:
                    if isinstance(request, _Undecodable):
                        await abort(context, _undecodable_status(request))
                    yield request

            async for response in behavior(parsed(), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            checked,
            request_deserializer=_safe(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    @staticmethod
    def _checked_stream(handler: Handler) -> Handler:
        behavior = cast(StreamBehavior, handler.unary_stream)

        async def checked(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await abort(context, _undecodable_status(request))
            async for response in behavior(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            checked,
            request_deserializer=_safe(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    """RegistryService calls need `authorization: Bearer <token>` when a token is configured."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(f"/{REGISTRY_SERVICE}/"):
            return handler
        presented = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                presented = value
        if hmac.compare_digest(presented.encode(), self._expected):
            return handler
        why = "no authorization metadata" if not presented else "the bearer token does not match"
        error = Unauthenticated(
            f"{REGISTRY_SERVICE} needs 'authorization: Bearer <admin token>' metadata ({why})"
        )
        return _deny(handler, status_for_error(error))


class AdminClientInterceptor(grpc.aio.ServerInterceptor):
    """Under mTLS, RegistryService calls need a client certificate whose subject, common name
    or a SAN is in `allowed`: none is UNAUTHENTICATED, one not on the list PERMISSION_DENIED.

    The peer's certificate is only in the call's auth context, which interceptors do not see,
    so the check runs in a wrapper around the handler, before the servicer.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        self._allowed = frozenset(allowed)
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(f"/{REGISTRY_SERVICE}/"):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        if handler.request_streaming or handler.response_streaming:
            # Every RegistryService method is unary; a streaming one must not slip through.
            wrapped = _deny(handler, status_for_error(PermissionDenied(f"{method}: not allowed")))
        else:
            wrapped = self._checked(handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def refusal(self, auth_context: Mapping[str, Iterable[bytes]]) -> grpc.Status | None:
        """None when the peer may call; else the status to end the call with."""
        names = peer_identities(auth_context)
        if not names:
            return status_for_error(
                Unauthenticated(
                    f"{REGISTRY_SERVICE} needs a client certificate on the admin list "
                    "(server.tls.admin_client_names); the call presented none"
                )
            )
        if names & self._allowed:
            return None
        shown = ", ".join(sorted(names))[:300]
        return status_for_error(
            PermissionDenied(
                f"{REGISTRY_SERVICE}: the client certificate ({shown}) is not on the admin "
                "list (server.tls.admin_client_names)"
            )
        )

    def _checked(self, handler: Handler) -> Handler:
        behavior = cast(UnaryBehavior, handler.unary_unary)

        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            refusal = self.refusal(context.auth_context())
            if refusal is not None:
                await abort(context, refusal)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
