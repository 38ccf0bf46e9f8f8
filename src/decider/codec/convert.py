"""Proto messages <-> core values. Enum numbers are shared, so enums convert with int()."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import MappingProxyType

from google.protobuf.duration_pb2 import Duration

from decider.codec import validate
from decider.core.model import (
    CandidateExplanation,
    Decision,
    Endpoint,
    EndpointState,
    HealthEvent,
    HealthStatus,
    LoadReport,
    MetricsKind,
    Outcome,
    Result,
    RetryAdvice,
    RouteRequest,
)
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb

REDACTED = "<redacted>"
_NO_STRINGS: frozenset[str] = frozenset()


def duration_s(d: Duration) -> float:
    return d.seconds + d.nanos / 1e9


def to_duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def endpoint_from_proto(p: epb.Endpoint) -> Endpoint:
    return Endpoint(
        id=p.id,
        address=p.address,
        model=p.model,
        health_url=p.health_url,
        weight=p.weight or 1,
        capabilities=frozenset(p.capabilities),
        cost_per_1k_tokens=p.cost_per_1k_tokens,
        labels=MappingProxyType(dict(p.labels)),
        metrics_url=p.metrics_url,
        metrics_kind=MetricsKind(p.metrics_kind)
        if p.metrics_kind in MetricsKind._value2member_map_
        else MetricsKind.UNSPECIFIED,
        probe_headers=MappingProxyType(dict(p.probe_headers)),
        max_in_flight=p.max_in_flight,
        requests_per_minute=p.requests_per_minute,
        tokens_per_minute=p.tokens_per_minute,
    )


def endpoint_to_proto(e: Endpoint, *, redact_headers: bool = True) -> epb.Endpoint:
    """Probe header values are secrets (API keys): answers carry only their names."""
    headers = {k: REDACTED for k in e.probe_headers} if redact_headers else dict(e.probe_headers)
    return epb.Endpoint(
        id=e.id,
        address=e.address,
        model=e.model,
        health_url=e.health_url,
        weight=e.weight,
        capabilities=sorted(e.capabilities),
        cost_per_1k_tokens=e.cost_per_1k_tokens,
        labels=dict(e.labels),
        metrics_url=e.metrics_url,
        metrics_kind=int(e.metrics_kind),  # type: ignore[arg-type]
        probe_headers=headers,
        max_in_flight=e.max_in_flight,
        requests_per_minute=e.requests_per_minute,
        tokens_per_minute=e.tokens_per_minute,
    )


def route_request_from_proto(p: dpb.DecideRequest) -> RouteRequest:
    capabilities = p.required_capabilities
    excluded = p.exclude_endpoint_ids
    return RouteRequest(
        model=p.model,
        request_id=p.request_id,
        session_id=p.session_id,
        tenant=p.tenant,
        # Usually empty: share one frozenset rather than build one per call.
        required_capabilities=frozenset(capabilities) if capabilities else _NO_STRINGS,
        estimated_input_tokens=p.estimated_input_tokens,
        prefix_hashes=tuple(p.prefix_hashes),
        exclude_endpoint_ids=frozenset(excluded) if excluded else _NO_STRINGS,
        strategy=p.strategy,
        explain=p.explain,
        max_fallbacks=p.max_fallbacks,
    )


# The Decide path's request: checked and converted in one pass over the message, each field
# read once (every read of a upb field builds a new Python object). RouteRequest is a frozen
# dataclass whose generated __init__ sets its 11 fields through object.__setattr__; setting the
# slots through their descriptors builds the same value in about a third of the time. Used
# only while the fields are exactly these (tests/unit checks both paths agree).
_ROUTE_FIELDS = (
    "model",
    "request_id",
    "session_id",
    "tenant",
    "required_capabilities",
    "estimated_input_tokens",
    "prefix_hashes",
    "exclude_endpoint_ids",
    "strategy",
    "explain",
    "max_fallbacks",
)
FAST_ROUTES = tuple(f.name for f in dataclasses.fields(RouteRequest)) == _ROUTE_FIELDS


def _route_setter(name: str) -> Callable[[RouteRequest, object], None]:
    setter: Callable[[RouteRequest, object], None] = RouteRequest.__dict__[name].__set__
    return setter


_new = object.__new__
_MAX_CHARS = validate.MAX_STRING_CHARS
_MAX_PREFIX_HASHES = validate.MAX_PREFIX_HASHES
_MAX_FALLBACKS = validate.MAX_FALLBACKS
_MAX_CAPABILITIES = validate.MAX_CAPABILITIES
_MAX_EXCLUDED = validate.MAX_EXCLUDED
if FAST_ROUTES:
    (
        _set_model,
        _set_request_id,
        _set_session_id,
        _set_tenant,
        _set_capabilities,
        _set_tokens,
        _set_prefix_hashes,
        _set_excluded,
        _set_strategy,
        _set_explain,
        _set_max_fallbacks,
    ) = (_route_setter(name) for name in _ROUTE_FIELDS)


def checked_route_request(p: dpb.DecideRequest) -> RouteRequest:
    """validate.decide_request then route_request_from_proto, as one cheaper step: raises
    InvalidArgument exactly as validate.decide_request does, else returns the equal value."""
    model = p.model
    request_id = p.request_id
    session_id = p.session_id
    tenant = p.tenant
    strategy = p.strategy
    # Slicing first: iterating a upb repeated field directly is several times slower.
    prefix_hashes = tuple(p.prefix_hashes[:])
    max_fallbacks = p.max_fallbacks
    m = _MAX_CHARS
    if not (
        0 < len(model) <= m
        and len(request_id) <= m
        and len(session_id) <= m
        and len(tenant) <= m
        and len(strategy) <= m
        and len(prefix_hashes) <= _MAX_PREFIX_HASHES
        and max_fallbacks <= _MAX_FALLBACKS
    ):
        validate.decide_request(p)
    caps = p.required_capabilities
    if caps:
        if len(caps) > _MAX_CAPABILITIES or not all(len(c) <= m for c in caps):
            validate.decide_request(p)
        capabilities = frozenset(caps[:])
    else:
        # Usually empty: share one frozenset rather than build one per call.
        capabilities = _NO_STRINGS
    excluded = p.exclude_endpoint_ids
    if excluded:
        if len(excluded) > _MAX_EXCLUDED or not all(len(e) <= m for e in excluded):
            validate.decide_request(p)
        exclude_ids = frozenset(excluded[:])
    else:
        exclude_ids = _NO_STRINGS
    if not FAST_ROUTES:
        return RouteRequest(
            model=model,
            request_id=request_id,
            session_id=session_id,
            tenant=tenant,
            required_capabilities=capabilities,
            estimated_input_tokens=p.estimated_input_tokens,
            prefix_hashes=prefix_hashes,
            exclude_endpoint_ids=exclude_ids,
            strategy=strategy,
            explain=p.explain,
            max_fallbacks=max_fallbacks,
        )
    r: RouteRequest = _new(RouteRequest)
    _set_model(r, model)
    _set_request_id(r, request_id)
    _set_session_id(r, session_id)
    _set_tenant(r, tenant)
    _set_capabilities(r, capabilities)
    _set_tokens(r, p.estimated_input_tokens)
    _set_prefix_hashes(r, prefix_hashes)
    _set_excluded(r, exclude_ids)
    _set_strategy(r, strategy)
    _set_explain(r, p.explain)
    _set_max_fallbacks(r, max_fallbacks)
    return r


def decision_to_proto(d: Decision) -> dpb.DecideResponse:
    """The reference encoding; wire.DecisionEncoder writes the same message faster for Decide."""
    return dpb.DecideResponse(
        decision_id=d.decision_id,
        endpoint=endpoint_to_proto(d.endpoint),
        fallbacks=[endpoint_to_proto(e) for e in d.fallbacks],
        reason=d.reason,
        strategy=d.strategy,
        scores=dict(d.scores),
        retry=retry_to_proto(d.retry),
        affinity_hit=d.affinity_hit,
        candidate_count=d.candidate_count,
        skipped=dict(d.skipped),
        candidates=[candidate_to_proto(c) for c in d.candidates],
    )


def retry_to_proto(r: RetryAdvice) -> dpb.RetryPolicy:
    return dpb.RetryPolicy(
        max_attempts=r.max_attempts,
        initial_backoff=to_duration(r.initial_backoff_s),
        max_backoff=to_duration(r.max_backoff_s),
        backoff_multiplier=r.backoff_multiplier,
    )


def candidate_to_proto(c: CandidateExplanation) -> dpb.CandidateExplanation:
    return dpb.CandidateExplanation(
        endpoint_id=c.endpoint_id,
        rank=c.rank,
        scores=dict(c.scores),
        skip_reason=c.skip_reason,
        health=int(c.health),  # type: ignore[arg-type]
        breaker_state=int(c.breaker_state),  # type: ignore[arg-type]
        in_flight=c.in_flight,
        total_score=c.total_score,
    )


def load_from_proto(p: epb.LoadReport) -> LoadReport:
    return LoadReport(
        queue_depth=p.queue_depth, running=p.running, kv_cache_utilization=p.kv_cache_utilization
    )


def load_to_proto(load: LoadReport) -> epb.LoadReport:
    return epb.LoadReport(
        queue_depth=load.queue_depth,
        running=load.running,
        kv_cache_utilization=load.kv_cache_utilization,
    )


def outcome_from_proto(p: dpb.ReportOutcomeRequest) -> Outcome:
    return Outcome(
        decision_id=p.decision_id,
        endpoint_id=p.endpoint_id,
        result=Result(p.result) if p.result in Result._value2member_map_ else Result.UNSPECIFIED,
        latency_s=duration_s(p.latency),
        ttft_s=duration_s(p.time_to_first_token),
        input_tokens=p.input_tokens,
        output_tokens=p.output_tokens,
        load=load_from_proto(p.load) if p.HasField("load") else None,
    )


def health_event_to_proto(e: HealthEvent) -> dpb.HealthEvent:
    return dpb.HealthEvent(
        endpoint_id=e.endpoint_id,
        status=int(e.status),  # type: ignore[arg-type]
        breaker_state=int(e.breaker_state),  # type: ignore[arg-type]
        reason=e.reason,
        model=e.model,
        removed=e.removed,
    )


def health_event_from_state(s: EndpointState) -> HealthEvent:
    return HealthEvent(
        endpoint_id=s.endpoint.id,
        model=s.endpoint.model,
        status=s.health,
        breaker_state=s.breaker_state,
        reason=s.health_reason,
    )


def endpoint_status_to_proto(s: EndpointState, *, breaker_reason: str = "") -> epb.EndpointStatus:
    status = epb.EndpointStatus(
        endpoint_id=s.endpoint.id,
        health=int(s.health),  # type: ignore[arg-type]
        breaker_state=int(s.breaker_state),  # type: ignore[arg-type]
        in_flight=s.in_flight,
        latency_ewma=to_duration(s.latency_ewma_s),
        health_reason=s.health_reason,
        source=s.endpoint.source,
        breaker_reason=breaker_reason,
    )
    if s.load is not None:
        status.load.CopyFrom(load_to_proto(s.load))
    return status


def health_status_from_proto(value: int) -> HealthStatus:
    return HealthStatus(value) if value in HealthStatus._value2member_map_ else HealthStatus.UNKNOWN


def list_response(
    states: list[EndpointState], *, breaker_reason: Callable[[str], str] | None = None
) -> rpb.ListEndpointsResponse:
    """`breaker_reason(endpoint_id)`: why that endpoint's breaker is not closed ("" if it is)."""
    return rpb.ListEndpointsResponse(
        endpoints=[endpoint_to_proto(s.endpoint) for s in states],
        statuses={
            s.endpoint.id: endpoint_status_to_proto(
                s, breaker_reason=breaker_reason(s.endpoint.id) if breaker_reason else ""
            )
            for s in states
        },
    )
