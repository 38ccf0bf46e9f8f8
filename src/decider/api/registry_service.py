"""RegistryService: endpoint administration and standalone prober results (admin token applies)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import trace

from decider.api.errors import unary
from decider.api.ports import Clock, DecisionEngine
from decider.codec import convert, validate
from decider.obs.logs import log_registry_change
from decider.obs.telemetry import Rpc, Tracing, annotate_endpoint, traced
from decider.state.breaker_reasons import BreakerReasons
from decider.state.probe_reports import ProbeReports
from decider.state.registry import LocalMembership, Membership, Registry, validated
from decider.v1 import registry_service_pb2 as rpb
from decider.v1 import registry_service_pb2_grpc as rgrpc

Context = grpc.aio.ServicerContext[Any, Any]


class RegistryService(rgrpc.RegistryServiceServicer):
    def __init__(
        self,
        registry: Registry,
        engine: DecisionEngine,
        *,
        clock: Clock = time.monotonic,
        reports: ProbeReports | None = None,
        breaker_reasons: BreakerReasons | None = None,
        tracing: Tracing | None = None,
        membership: Membership | None = None,
        health_note: Callable[[], str] | None = None,
    ) -> None:
        """`membership` takes the writes (default: `registry` itself, in this process);
        `health_note()`, when not empty, is added to every health reason ListEndpoints shows
        (the shared state being unreachable, say)."""
        self._registry = registry
        self._membership = membership or LocalMembership(registry)
        self._health_note = health_note
        self._engine = engine
        self._clock = clock
        self._reports = reports or ProbeReports()
        self._breaker_reasons = breaker_reasons or BreakerReasons()
        # Read by @traced: one server span per admin call.
        self.tracing = tracing or Tracing.disabled()

    @traced(Rpc.REGISTER_ENDPOINT)
    @unary
    async def RegisterEndpoint(
        self, request: rpb.RegisterEndpointRequest, context: Context
    ) -> rpb.RegisterEndpointResponse:
        validate.register_endpoint_request(request)
        endpoint = validated(convert.endpoint_from_proto(request.endpoint), prefix="endpoint.")
        annotate_endpoint(trace.get_current_span(), endpoint.id, model=endpoint.model)
        created = await self._membership.register(endpoint)
        stored = self._registry.get(endpoint.id) or endpoint
        log_registry_change("registered" if created else "updated", stored)
        return rpb.RegisterEndpointResponse(
            endpoint=convert.endpoint_to_proto(stored), created=created
        )

    @traced(Rpc.DEREGISTER_ENDPOINT)
    @unary
    async def DeregisterEndpoint(
        self, request: rpb.DeregisterEndpointRequest, context: Context
    ) -> rpb.DeregisterEndpointResponse:
        validate.deregister_endpoint_request(request)
        annotate_endpoint(trace.get_current_span(), request.endpoint_id)
        await self._membership.deregister(request.endpoint_id)
        log_registry_change("deregistered", request.endpoint_id)
        return rpb.DeregisterEndpointResponse()

    @traced(Rpc.LIST_ENDPOINTS)
    @unary
    async def ListEndpoints(
        self, request: rpb.ListEndpointsRequest, context: Context
    ) -> rpb.ListEndpointsResponse:
        validate.list_endpoints_request(request)
        annotate_endpoint(trace.get_current_span(), "", model=request.model)
        states = self._engine.endpoint_states(model=request.model, now=self._clock())
        response = convert.list_response(
            sorted(states, key=lambda s: s.endpoint.id),
            breaker_reason=self._breaker_reasons.reason,
        )
        note = self._health_note() if self._health_note is not None else ""
        if note:
            for status in response.statuses.values():
                status.health_reason = f"{status.health_reason}; {note}".lstrip("; ")
        return response

    @traced(Rpc.REPORT_PROBE_RESULTS)
    @unary
    async def ReportProbeResults(
        self, request: rpb.ReportProbeResultsRequest, context: Context
    ) -> rpb.ReportProbeResultsResponse:
        validate.report_probe_results_request(request)
        now = self._clock()
        unknown: list[str] = []
        prober = request.prober_id or "standalone prober"
        for result in request.results:
            if self._registry.get(result.endpoint_id) is None:
                unknown.append(result.endpoint_id)
                continue
            status = convert.health_status_from_proto(result.status)
            reason = f"{prober}: {result.reason}" if result.reason else prober
            self._engine.set_health(result.endpoint_id, status, reason=reason, now=now)
            self._reports.record(
                result.endpoint_id,
                prober_id=prober,
                valid_for_s=convert.duration_s(request.valid_for),
                now=now,
            )
            if result.HasField("load"):
                load = convert.load_from_proto(result.load)
                self._engine.record_load(result.endpoint_id, load, now=now)
        return rpb.ReportProbeResultsResponse(unknown_endpoint_ids=unknown)
