"""The Envoy ext_proc servicer: Decider as the endpoint picker of the Endpoint Picker Protocol.

One Process stream is one HTTP request. The request side becomes a RouteRequest and a decision
through the shared DecidePath (the gRPC Decide's engine, spans, metrics and decision log); the
decision goes back as the `x-gateway-destination-endpoint` header and `envoy.lb` dynamic
metadata, a refusal as an immediate OpenAI-style error. The response side becomes the outcome,
charged to the endpoint that really served: on the same stream, or on the stream of a second
ext_proc filter in observability mode (`_Observation`), which Envoy does not wait for. Whatever
handling a message raises becomes an answer in one place (`_Exchange.refused`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
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
    DECIDER_NAMESPACE,
    DESTINATION_HEADER,
    LB_NAMESPACE,
    OUTCOME_BY_OBSERVER,
    OUTCOME_METADATA,
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


def _start_meter(
    headers: pb.HttpHeaders, *, started: float, body_mode: int, now: float
) -> tuple[ResponseMeter, dict[str, str]]:
    """A meter for the response these headers begin, and the headers as a dict."""
    values = _headers_of(headers)
    meter = ResponseMeter(started=started)
    try:
        status = int(values.get(":status", "0"))
    except ValueError:
        status = 0
    end = headers.end_of_stream or body_mode == _NONE
    meter.headers(status, values.get("content-type", ""), end=end, now=now)
    return meter, values


def _endpoint_at(
    path: DecidePath, address: str, model: str, first: Iterable[Endpoint] = ()
) -> Endpoint | None:
    """The endpoint of `model` at the address the route reported (after Envoy's retries),
    looked for in `first` (the decision's endpoints) before the registry."""
    address = address.strip()
    if not address:
        return None
    for endpoint in first:
        if host_port(endpoint.address) == address:
            return endpoint
    for endpoint in path.endpoints(model):
        if host_port(endpoint.address) == address:
            return endpoint
    return None


def _outcome(
    decision_id: str,
    *,
    chosen_id: str,
    served_id: str,
    meter: ResponseMeter | None,
    started: float,
    now: float,
) -> Outcome:
    if meter is None or not meter.ended:
        # The stream ended before the response did: the client (or Envoy) gave up.
        return Outcome(
            decision_id=decision_id,
            endpoint_id=chosen_id,
            result=Result.CANCELLED,
            latency_s=max(now - started, 0.0),
        )
    return Outcome(
        decision_id=decision_id,
        endpoint_id=served_id or chosen_id,
        result=meter.result,
        latency_s=meter.latency_s,
        ttft_s=meter.ttft_s,
        input_tokens=meter.input_tokens,
        output_tokens=meter.output_tokens,
    )


def observed_by_filter(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """True when the stream's gRPC metadata says an observer filter reports the outcome."""
    return any(k == OUTCOME_METADATA and v == OUTCOME_BY_OBSERVER for k, v in metadata or ())


class _Exchange:
    """One HTTP request through Envoy: its messages in, the processor's answers out. With
    `observed`, a filter in observability mode reports the outcome (`_Observation`): the
    decision is named in `decider` metadata for it, and this exchange reports nothing."""

    __slots__ = (
        "_body",
        "_decided_at",
        "_decision",
        "_headers",
        "_meter",
        "_observed",
        "_path",
        "_reported",
        "_request_mode",
        "_response_mode",
        "_served",
        "_settings",
        "_subset",
        "done",
    )

    def __init__(
        self, path: DecidePath, settings: ExtProcSettings, *, observed: bool = False
    ) -> None:
        self._path = path
        self._settings = settings
        self._observed = observed
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
        if self._observed:
            named = metadata.fields[DECIDER_NAMESPACE].struct_value.fields
            named["decision_id"].string_value = result.decision_id
            named["model"].string_value = result.endpoint.model
            named["endpoint"].string_value = result.endpoint.id
            if self._settings.explain_headers:
                named["strategy"].string_value = result.strategy
                named["reason"].string_value = " ".join(result.reason.split())[:_MAX_HEADER_CHARS]
        if field == "request_headers":
            answer = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
        else:
            answer = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
        answer.dynamic_metadata.CopyFrom(metadata)
        return answer

    # ------------------------------------------------------------------ response side

    def _response_headers(self, headers: pb.HttpHeaders) -> Iterator[pb.ProcessingResponse]:
        now = self._path.now()
        meter, values = _start_meter(
            headers, started=self._decided_at or now, body_mode=self._response_mode, now=now
        )
        self._meter = meter
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
        if meter.ended:
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
        decision = self._decision
        if decision is None:
            return None
        return _endpoint_at(
            self._path, address, decision.endpoint.model, (decision.endpoint, *decision.fallbacks)
        )

    def _report(self, now: float) -> None:
        decision = self._decision
        if decision is None or self._reported or self._observed:
            return
        self._reported = True
        self._path.record_outcome(
            _outcome(
                decision.decision_id,
                chosen_id=decision.endpoint.id,
                served_id=self._served.id if self._served else "",
                meter=self._meter,
                started=self._decided_at,
                now=now,
            )
        )

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


class _Observation:
    """One HTTP request as an ext_proc filter in observability mode shows it (Envoy sets
    `observability_mode` on each of its messages): the request headers, then the response
    headers and body chunks, sent without waiting for answers, so Decider sends none. The
    outcome is reported as `_Exchange` reports it, for the decision the picker named in the
    `decider` metadata; then `done` ends the stream, which Envoy would otherwise hold open for
    its `deferred_close_timeout`. A request without that metadata (no decision: the picker was
    bypassed) is not reported."""

    __slots__ = (
        "_chosen_id",
        "_decision_id",
        "_meter",
        "_model",
        "_path",
        "_served_header",
        "_served_id",
        "_started",
        "done",
    )

    def __init__(self, path: DecidePath, settings: ExtProcSettings) -> None:
        self._path = path
        self._served_header = settings.headers.served
        self._decision_id = ""
        self._model = ""
        self._chosen_id = ""
        self._served_id = ""
        self._started = 0.0
        self._meter: ResponseMeter | None = None
        self.done = False

    def handle(self, message: pb.ProcessingRequest) -> None:
        if not self._decision_id:
            self._named(message)
        now = self._path.now()
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            # Sent as the request goes on to the upstream, just after the decision.
            self._started = now
        elif kind == "response_headers":
            self._meter, values = _start_meter(
                message.response_headers,
                started=self._started or now,
                # Envoy sends observers no protocol_config; the only body mode they support
                # is STREAMED (a body ends with its end_of_stream chunk, or with trailers).
                body_mode=_STREAMED,
                now=now,
            )
            if self._model:
                address = values.get(self._served_header, "")
                served = _endpoint_at(self._path, address, self._model)
                self._served_id = served.id if served else ""
            if self._meter.ended:
                self._report(now)
        elif kind == "response_body" and self._meter is not None:
            body = message.response_body
            self._meter.body(body.body, end=body.end_of_stream, now=now)
            if body.end_of_stream:
                self._report(now)
        elif kind == "response_trailers":
            self._report(now)

    def _named(self, message: pb.ProcessingRequest) -> None:
        named = message.metadata_context.filter_metadata.get(DECIDER_NAMESPACE)
        if named is None:
            return
        fields = named.fields
        if "decision_id" in fields:
            self._decision_id = fields["decision_id"].string_value
            self._model = fields["model"].string_value if "model" in fields else ""
            self._chosen_id = fields["endpoint"].string_value if "endpoint" in fields else ""

    def _report(self, now: float) -> None:
        if self.done:
            return
        self.done = True
        if not self._decision_id or not (self._served_id or self._chosen_id):
            return
        self._path.record_outcome(
            _outcome(
                self._decision_id,
                chosen_id=self._chosen_id,
                served_id=self._served_id,
                meter=self._meter,
                started=self._started,
                now=now,
            )
        )

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
        # One span per stream, current while its decision and outcome are observed.
        with self.tracing.server_span(SPAN_NAME, context):
            message = await _read(context)
            if message is None:
                return
            if message.observability_mode:
                await self._observe(message, context)
                return
            observed = observed_by_filter(context.invocation_metadata())
            exchange = _Exchange(self._path, self._settings, observed=observed)
            try:
                while True:
                    try:
                        answers = list(exchange.handle(message))
                    except Exception as exc:
                        answers = [exchange.refused(exc)]
                    for answer in answers:
                        await context.write(answer)
                    if exchange.done:
                        return
                    message = await _read(context)
                    if message is None:
                        return
            finally:
                exchange.close()

    async def _observe(
        self,
        message: pb.ProcessingRequest,
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> None:
        """An outcome-only stream: read until the outcome is reported, answer nothing."""
        observation = _Observation(self._path, self._settings)
        try:
            while True:
                observation.handle(message)
                if observation.done:
                    return
                message = await _read(context)
                if message is None:
                    return
        except Exception:
            # Nothing can be answered here: Envoy ignores replies in observability mode.
            log.exception("ext_proc observation failed")
        finally:
            observation.close()


async def _read(
    context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
) -> pb.ProcessingRequest | None:
    """The stream's next message, None at its end. context.read() rather than the request
    iterator: one wrapper less per message."""
    message = await context.read()
    if message is grpc.aio.EOF:
        return None
    assert isinstance(message, pb.ProcessingRequest)
    return message


def add_to_server(servicer: ExtProcService, server: grpc.aio.Server) -> None:
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
