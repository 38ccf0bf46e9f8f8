"""Input limits for every request, checked before anything reaches the core.

Each check collects every bad field, so one INVALID_ARGUMENT names all of them
(google.rpc.BadRequest field violations).
"""

from __future__ import annotations

from collections.abc import Iterable

from decider.errors import FieldViolation, InvalidArgument
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import registry_service_pb2 as rpb

MAX_STRING_CHARS = 512
MAX_CAPABILITIES = 64
# 128k tokens of prompt in 16-token blocks (vLLM's default block size).
MAX_PREFIX_HASHES = 8192
MAX_EXCLUDED = 256
MAX_FALLBACKS = 64
MAX_PROBE_RESULTS = 10_000


class _Violations:
    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def string(self, field: str, value: str, *, required: bool = False) -> None:
        if required and not value:
            self.add(field, "required")
        elif len(value) > MAX_STRING_CHARS:
            self.add(field, f"{len(value)} characters, at most {MAX_STRING_CHARS}")

    def strings(self, field: str, values: Iterable[str], *, max_items: int) -> None:
        items = list(values)
        if len(items) > max_items:
            self.add(field, f"{len(items)} entries, at most {max_items}")
            return
        for i, value in enumerate(items):
            self.string(f"{field}[{i}]", value)

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)


def decide_request(r: dpb.DecideRequest) -> None:
    if _decide_request_ok(r):
        return
    v = _Violations()
    v.string("request_id", r.request_id)
    v.string("model", r.model, required=True)
    v.string("session_id", r.session_id)
    v.string("tenant", r.tenant)
    v.string("strategy", r.strategy)
    v.strings("required_capabilities", r.required_capabilities, max_items=MAX_CAPABILITIES)
    v.strings("exclude_endpoint_ids", r.exclude_endpoint_ids, max_items=MAX_EXCLUDED)
    if len(r.prefix_hashes) > MAX_PREFIX_HASHES:
        v.add("prefix_hashes", f"{len(r.prefix_hashes)} hashes, at most {MAX_PREFIX_HASHES}")
    if r.max_fallbacks > MAX_FALLBACKS:
        v.add("max_fallbacks", f"{r.max_fallbacks}, at most {MAX_FALLBACKS}")
    v.raise_if_any()


def _decide_request_ok(r: dpb.DecideRequest) -> bool:
    """The common case in one expression; only a request that fails it pays for collecting
    violations (this runs on every Decide)."""
    m = MAX_STRING_CHARS
    caps = r.required_capabilities
    excluded = r.exclude_endpoint_ids
    return (
        0 < len(r.model) <= m
        and len(r.request_id) <= m
        and len(r.session_id) <= m
        and len(r.tenant) <= m
        and len(r.strategy) <= m
        and len(r.prefix_hashes) <= MAX_PREFIX_HASHES
        and r.max_fallbacks <= MAX_FALLBACKS
        and len(caps) <= MAX_CAPABILITIES
        and len(excluded) <= MAX_EXCLUDED
        and all(len(c) <= m for c in caps)
        and all(len(e) <= m for e in excluded)
    )


def report_outcome_request(r: dpb.ReportOutcomeRequest) -> None:
    v = _Violations()
    v.string("decision_id", r.decision_id)
    v.string("endpoint_id", r.endpoint_id, required=True)
    if r.result == dpb.RESULT_UNSPECIFIED:
        v.add("result", "required: SUCCESS, ERROR, TIMEOUT, RATE_LIMITED or CANCELLED")
    elif r.result not in dpb.Result.values():
        v.add("result", f"{r.result} is not a known Result")
    for name in ("latency", "time_to_first_token"):
        d = getattr(r, name)
        if d.seconds < 0 or d.nanos < 0:
            v.add(name, "must not be negative")
    load = r.load
    if not 0.0 <= load.kv_cache_utilization <= 1.0:
        v.add("load.kv_cache_utilization", f"{load.kv_cache_utilization}, must be 0.0 to 1.0")
    v.raise_if_any()


def watch_health_request(r: dpb.WatchHealthRequest) -> None:
    v = _Violations()
    v.string("model", r.model)
    v.raise_if_any()


def register_endpoint_request(r: rpb.RegisterEndpointRequest) -> None:
    """Only presence here; the registry checks the endpoint's fields (registry.check_endpoint)."""
    if not r.HasField("endpoint"):
        raise InvalidArgument.one("endpoint", "required")


def deregister_endpoint_request(r: rpb.DeregisterEndpointRequest) -> None:
    v = _Violations()
    v.string("endpoint_id", r.endpoint_id, required=True)
    v.raise_if_any()


def list_endpoints_request(r: rpb.ListEndpointsRequest) -> None:
    v = _Violations()
    v.string("model", r.model)
    v.raise_if_any()


def report_probe_results_request(r: rpb.ReportProbeResultsRequest) -> None:
    v = _Violations()
    v.string("prober_id", r.prober_id)
    if len(r.results) > MAX_PROBE_RESULTS:
        v.add("results", f"{len(r.results)} results, at most {MAX_PROBE_RESULTS}")
    else:
        for i, result in enumerate(r.results):
            v.string(f"results[{i}].endpoint_id", result.endpoint_id, required=True)
            v.string(f"results[{i}].reason", result.reason)
    v.raise_if_any()
