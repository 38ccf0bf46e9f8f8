"""The Envoy ext_proc servicer: Decider as the endpoint picker of the Endpoint Picker Protocol.

One Process stream is one HTTP request. The request side becomes a RouteRequest and a decision
through the shared DecidePath (the gRPC Decide's engine, spans, metrics and decision log); the
decision goes back as the `x-gateway-destination-endpoint` header and `envoy.lb` dynamic
metadata, a refusal as an immediate OpenAI-style error. The response side becomes the outcome,
charged to the endpoint that really served. Whatever handling a message raises becomes an
answer in one place (`_Exchange.refused`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Final

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from decider.api.decide_path import DecidePath
from decider.api.extproc.openai import RequestError, parse_request
from decider.api.extproc.response import ResponseMeter
from decider.api.extproc.settings import (
    DESTINATION_HEADER,
    LB_NAMESPACE,
    SUBSET_KEY,
    SUBSET_NAMESPACE,
    ExtProcSettings,
)
from decider.core.model import Decision, Endpoint, Outcome, Refusal, RefusalKind, Result
from decider.errors import InvalidArgument
from decider.obs.telemetry import Tracing

log = logging.getLogger("decider.extproc")

SERVICE: Final = pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
SPAN_NAME: Final = f"{SERVICE}/Process"

_Mode = processing_mode_pb2.ProcessingMode
_BUFFERED: Final = _Mode.BUFFERED
_BUFFERED_PARTIAL: Final = _Mode.BUFFERED_PARTIAL
_DUPLEX: Final = _Mode.FULL_DUPLEX_STREAMED
_STREAMED: Final = _Mode.STREAMED
_NONE: Final = _Mode.NONE
_OVERWRITE: Final = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# Request bodies go back to Envoy in pieces of this size (duplex mode), well under any gRPC
# message limit.
_CHUNK_BYTES: Final = 256 << 10
# Header values Decider adds are cut to this length (Envoy's default header limit is 60 KiB).
_MAX_HEADER_CHARS: Final = 1024

_REFUSAL_ANSWER: Final = {
    RefusalKind.MODEL_NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    RefusalKind.NO_HEALTHY_ENDPOINT: (503, "server_error", "no_healthy_endpoint"),
    RefusalKind.QUOTA_EXHAUSTED: (429, "rate_limit_error", "quota_exhausted"),
}
_EMPTY_HEADERS: Final = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_EMPTY_RESPONSE_BODY: Final = pb.ProcessingResponse(response_body=pb.BodyResponse())


def host_port(address: str) -> str:
    """`host:port` of an endpoint address, without a scheme or path."""
    _, sep, rest = address.partition("://")
    return (rest if sep else address).split("/", 1)[0]


def _header_value(value: str) -> bytes:
    return " ".join(value.split())[:_MAX_HEADER_CHARS].encode()


def _set_headers(headers: Mapping[str, str]) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, raw_value=_header_value(v)),
                append_action=_OVERWRITE,
            )
            for k, v in headers.items()
        ]
    )


def _headers_of(message: pb.HttpHeaders) -> dict[str, str]:
    return {
        h.key: h.raw_value.decode("latin-1") if h.raw_value else h.value
        for h in message.headers.headers
    }


def error_response(
    status: int, message: str, *, kind: str, code: str, headers: Mapping[str, str] | None = None
) -> pb.ProcessingResponse:
    """An immediate response with an OpenAI-style error body."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    extra = {"content-type": "application/json", **(headers or {})}
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=_set_headers(extra),
            body=_json_bytes(body),
            details=f"decider_{code}",
        )
    )


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _refused(exc: Exception) -> pb.ProcessingResponse:
    """What handling a message raised, as the answer Envoy sends the client."""
    if isinstance(exc, RequestError):
        return error_response(exc.status, str(exc), kind="invalid_request_error", code=exc.code)
    if isinstance(exc, InvalidArgument):
        return error_response(400, str(exc), kind="invalid_request_error", code="invalid_request")
    log.error("ext_proc request failed", exc_info=exc)
    return error_response(
        500, "internal error; the Decider log has details", kind="server_error", code="internal"
    )


def refusal_response(refusal: Refusal) -> pb.ProcessingResponse:
    status, kind, code = _REFUSAL_ANSWER[refusal.kind]
    headers = {"x-decider-refusal": refusal.kind.value}
    if refusal.kind is RefusalKind.QUOTA_EXHAUSTED:
        headers["retry-after"] = str(max(1, math.ceil(refusal.retry_after_s)))
    return error_response(status, refusal.message, kind=kind, code=code, headers=headers)


class _Exchange:
    """One HTTP request through Envoy: its messages in, the processor's answers out."""

    __slots__ = (
        "_body",
        "_decided_at",
        "_decision",
        "_headers",
        "_meter",
        "_path",
        "_reported",
        "_request_mode",
        "_response_mode",
        "_served",
        "_settings",
        "_subset",
        "done",
    )

    def __init__(self, path: DecidePath, settings: ExtProcSettings) -> None:
        self._path = path
        self._settings = settings
        self._request_mode: int = _BUFFERED
        self._response_mode: int = _NONE
        self._headers: dict[str, str] = {}
        self._subset: list[str] | None = None
        self._body = bytearray()
        self._decision: Decision | None = None
        self._decided_at = 0.0
        self._meter: ResponseMeter | None = None
        self._served: Endpoint | None = None
        self._reported = False
        # An immediate response ends the exchange: Envoy sends nothing more that needs an answer.
        self.done = False

    def handle(self, message: pb.ProcessingRequest) -> Iterator[pb.ProcessingResponse]:
        kind = message.WhichOneof("request")
        if message.HasField("protocol_config"):
            config = message.protocol_config
            self._request_mode = config.request_body_mode
            self._response_mode = config.response_body_mode
        if kind == "request_headers":
            return self._request_headers(message)
        if kind == "request_body":
            return self._request_body(message.request_body)
        if kind == "response_headers":
            return self._response_headers(message.response_headers)
        if kind == "response_body":
            return self._response_body(message.response_body)
        if kind == "request_trailers":
            return self._request_trailers()
        if kind == "response_trailers":
            self._report(self._path.now())
            return iter((pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),))
        return iter(())

    # ------------------------------------------------------------------ request side

    def _request_headers(self, message: pb.ProcessingRequest) -> Iterator[pb.ProcessingResponse]:
        headers = message.request_headers
        self._headers = _headers_of(headers)
        subset = message.metadata_context.filter_metadata.get(SUBSET_NAMESPACE)
        if subset is not None and SUBSET_KEY in subset.fields:
            values = subset.fields[SUBSET_KEY]
            self._subset = (
                [v.string_value for v in values.list_value.values]
                if values.HasField("list_value")
                else [a.strip() for a in values.string_value.split(",") if a.strip()]
            )
        if headers.end_of_stream or self._request_mode == _NONE:
            # No body will come: decide from the headers alone.
            yield self._decide("request_headers")
        elif self._request_mode == _STREAMED:
            self.done = True
            yield error_response(
                500,
                "Decider needs the whole request body before it picks: set the ext_proc "
                "filter's request_body_mode to BUFFERED or FULL_DUPLEX_STREAMED",
                kind="server_error",
                code="unsupported_processing_mode",
            )
        elif self._request_mode != _DUPLEX:
            # Buffered: the headers wait in Envoy until the body is answered, mutation and all.
            yield _EMPTY_HEADERS

    def _request_body(self, body: pb.HttpBody) -> Iterator[pb.ProcessingResponse]:
        self._body += body.body
        if len(self._body) > self._settings.max_body_bytes:
            self.done = True
            yield error_response(
                413,
                f"the request body is over {self._settings.max_body_bytes} bytes",
                kind="invalid_request_error",
                code="body_too_large",
            )
            return
        if self._request_mode == _DUPLEX:
            if body.end_of_stream:
                yield from self._duplex_answers(end_of_stream=True)
            return
        if not body.end_of_stream and self._request_mode == _BUFFERED_PARTIAL:
            self.done = True
            yield error_response(
                413,
                "the request body is larger than the gateway's buffer for the endpoint picker",
                kind="invalid_request_error",
                code="body_too_large",
            )
            return
        yield self._decide("request_body")
        self._body = bytearray()

    def _duplex_answers(self, *, end_of_stream: bool) -> Iterator[pb.ProcessingResponse]:
        """Duplex mode, once the body is complete: the header answer (it carries the pick),
        then the body Envoy handed over, unchanged. `end_of_stream` is false when trailers
        end the request instead."""
        yield self._decide("request_headers")
        if self.done:
            return
        data = bytes(self._body)
        for start in range(0, max(len(data), 1), _CHUNK_BYTES):
            last = start + _CHUNK_BYTES >= len(data)
            yield pb.ProcessingResponse(
                request_body=pb.BodyResponse(
                    response=pb.CommonResponse(
                        body_mutation=pb.BodyMutation(
                            streamed_response=pb.StreamedBodyResponse(
                                body=data[start : start + _CHUNK_BYTES],
                                end_of_stream=last and end_of_stream,
                            )
                        )
                    )
                )
            )
        self._body = bytearray()

    def _request_trailers(self) -> Iterator[pb.ProcessingResponse]:
        if self._request_mode == _DUPLEX and self._decision is None:
            # Trailers, not the last body chunk, ended this request: the body is complete.
            yield from self._duplex_answers(end_of_stream=False)
            if self.done:
                return
        yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())

    def _decide(self, field: str) -> pb.ProcessingResponse:
        """Decides and answers on `field` ("request_headers" or "request_body"); what it
        raises is answered by `refused`."""
        route = parse_request(bytes(self._body), self._headers, self._settings.headers).route
        if self._subset is not None:
            allowed = set(self._subset)
            route = dataclasses.replace(
                route,
                exclude_endpoint_ids=frozenset(
                    e.id
                    for e in self._path.endpoints(route.model)
                    if host_port(e.address) not in allowed
                ),
            )
        result = self._path.decide(route)
        if isinstance(result, Refusal):
            self.done = True
            return refusal_response(result)
        self._decision = result
        self._decided_at = self._path.now()
        chosen = (
            [result.endpoint, *result.fallbacks] if self._settings.fallbacks else [result.endpoint]
        )
        destination = ",".join(host_port(e.address) for e in chosen)
        common = pb.CommonResponse(
            header_mutation=_set_headers({DESTINATION_HEADER: destination}),
            clear_route_cache=True,
        )
        metadata = struct_pb2.Struct()
        metadata.fields[LB_NAMESPACE].struct_value.fields[
            DESTINATION_HEADER
        ].string_value = destination
        if field == "request_headers":
            answer = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
        else:
            answer = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
        answer.dynamic_metadata.CopyFrom(metadata)
        return answer

    # ------------------------------------------------------------------ response side

    def _response_headers(self, headers: pb.HttpHeaders) -> Iterator[pb.ProcessingResponse]:
        values = _headers_of(headers)
        now = self._path.now()
        meter = self._meter = ResponseMeter(started=self._decided_at or now)
        try:
            status = int(values.get(":status", "0"))
        except ValueError:
            status = 0
        end = headers.end_of_stream or self._response_mode == _NONE
        meter.headers(status, values.get("content-type", ""), end=end, now=now)
        served = self._served = self._served_at(values.get(self._settings.headers.served, ""))
        decision = self._decision
        if decision is not None and self._settings.explain_headers:
            mutation = _set_headers(
                {
                    "x-decider-endpoint": served.id if served else decision.endpoint.id,
                    "x-decider-decision-id": decision.decision_id,
                    "x-decider-strategy": decision.strategy,
                    "x-decider-reason": decision.reason,
                }
            )
            yield pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(
                    response=pb.CommonResponse(header_mutation=mutation)
                )
            )
        else:
            yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        if end:
            self._report(now)

    def _response_body(self, body: pb.HttpBody) -> Iterator[pb.ProcessingResponse]:
        if self._meter is not None:
            self._meter.body(body.body, end=body.end_of_stream, now=self._path.now())
        if self._response_mode == _DUPLEX:
            # Duplex mode wants every chunk back; an empty answer is a protocol error to Envoy.
            yield pb.ProcessingResponse(
                response_body=pb.BodyResponse(
                    response=pb.CommonResponse(
                        body_mutation=pb.BodyMutation(
                            streamed_response=pb.StreamedBodyResponse(
                                body=body.body, end_of_stream=body.end_of_stream
                            )
                        )
                    )
                )
            )
        else:
            yield _EMPTY_RESPONSE_BODY
        if body.end_of_stream:
            self._report(self._path.now())

    def _served_at(self, address: str) -> Endpoint | None:
        """The endpoint at the address the route reported (after Envoy's retries)."""
        decision = self._decision
        address = address.strip()
        if decision is None or not address:
            return None
        for endpoint in (decision.endpoint, *decision.fallbacks):
            if host_port(endpoint.address) == address:
                return endpoint
        for endpoint in self._path.endpoints(decision.endpoint.model):
            if host_port(endpoint.address) == address:
                return endpoint
        return None

    def _report(self, now: float) -> None:
        decision = self._decision
        if decision is None or self._reported:
            return
        self._reported = True
        meter = self._meter
        if meter is None or not meter.ended:
            # The stream ended before the response did: the client (or Envoy) gave up.
            outcome = Outcome(
                decision_id=decision.decision_id,
                endpoint_id=decision.endpoint.id,
                result=Result.CANCELLED,
                latency_s=max(now - self._decided_at, 0.0),
            )
        else:
            outcome = Outcome(
                decision_id=decision.decision_id,
                endpoint_id=(self._served or decision.endpoint).id,
                result=meter.result,
                latency_s=meter.latency_s,
                ttft_s=meter.ttft_s,
                input_tokens=meter.input_tokens,
                output_tokens=meter.output_tokens,
            )
        self._path.record_outcome(outcome)

    def refused(self, exc: Exception) -> pb.ProcessingResponse:
        """The one error boundary: ends the exchange with an immediate error response."""
        self.done = True
        if isinstance(exc, RequestError):
            # Counted here: the engine never saw it (DecidePath counts what the engine refuses).
            self._path.rejected()
        return _refused(exc)

    def close(self) -> None:
        """The stream ended: an outcome never reported is reported as cancelled."""
        self._report(self._path.now())


class ExtProcService:
    """`envoy.service.ext_proc.v3.ExternalProcessor`, answering with Decider's decisions."""

    def __init__(
        self, path: DecidePath, settings: ExtProcSettings, *, tracing: Tracing | None = None
    ) -> None:
        self._path = path
        self._settings = settings
        self.tracing = tracing or Tracing.disabled()

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> None:
        # One span per HTTP request, current while its decision and outcome are observed.
        with self.tracing.server_span(SPAN_NAME, context):
            exchange = _Exchange(self._path, self._settings)
            try:
                # context.read() rather than the request iterator: one wrapper less per message.
                while (message := await context.read()) is not grpc.aio.EOF:
                    assert isinstance(message, pb.ProcessingRequest)
                    try:
                        answers = list(exchange.handle(message))
                    except Exception as exc:
                        answers = [exchange.refused(exc)]
                    for answer in answers:
                        await context.write(answer)
                    if exchange.done:
                        return
            finally:
                exchange.close()


def add_to_server(servicer: ExtProcService, server: grpc.aio.Server) -> None:
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
