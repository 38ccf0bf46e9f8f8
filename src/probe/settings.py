"""ProbeSettings: the validated `[probe]` TOML table, parsed once at start.

Checked with the shared config schema (decider.core.validation): every problem of the table is
reported at once, each naming the key, the value and what is allowed. The same checks guard a
ProbeSettings built in code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from decider.core.validation import Problems, allowed, position, schema

_EMPTY_HEADERS: Mapping[str, Mapping[str, str]] = MappingProxyType({})

LIVENESS_MODES = ("connect", "http", "off")

# A period or timeout: a positive, finite number of seconds.
_SECONDS = allowed(gt=0, finite=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeSettings:
    """Every field has the default a user would pick; the names are the TOML keys."""

    # Full health check: GET health_url, 2xx within timeout_s is a success.
    interval_s: float = field(default=30.0, metadata=_SECONDS)
    timeout_s: float = field(default=2.0, metadata=_SECONDS)
    # Each wait is shortened by up to this fraction at random, so probes of many endpoints
    # spread out instead of arriving together (Envoy's interval_jitter_percent).
    jitter_fraction: float = field(default=0.1, metadata=allowed(ge=0, lt=1, finite=True))
    # The first checks of the start-up snapshot (the first endpoint set the prober is given)
    # are spread over up to this many seconds (at most interval_s), so a big fleet is not
    # probed in one burst. Endpoints that join later are probed at once.
    first_check_spread_s: float = field(default=5.0, metadata=allowed(ge=0, le=3600, finite=True))
    # Envoy's thresholds: consecutive failures to become UNHEALTHY, consecutive successes to
    # become HEALTHY again.
    unhealthy_threshold: int = field(default=3, metadata=allowed(ge=1))
    healthy_threshold: int = field(default=2, metadata=allowed(ge=1))
    # After any failure the endpoint is re-probed this soon, so a failure is confirmed (or
    # cleared) in seconds rather than a whole interval; also the cadence while UNHEALTHY.
    unhealthy_interval_s: float = field(default=1.0, metadata=_SECONDS)
    # Cheap liveness check between full checks: "connect" opens and resets a TCP connection
    # to the health_url host:port, "http" is a GET with liveness_timeout_s, "off" disables it.
    # A failed liveness check counts as one failure and triggers the unhealthy_interval
    # re-probes; a successful one counts for nothing (only a 2xx proves health).
    liveness: str = field(default="connect", metadata=allowed(choices=LIVENESS_MODES))
    liveness_interval_s: float = field(default=2.0, metadata=_SECONDS)
    liveness_timeout_s: float = field(default=1.0, metadata=_SECONDS)
    # DEGRADED instead of HEALTHY when the last successful probe took longer than this.
    degraded_latency_s: float = field(default=1.0, metadata=_SECONDS)
    # HTTP checks (health, liveness in "http" mode, metrics) running at once; more wait.
    max_concurrent_http: int = field(default=32, metadata=allowed(ge=1))
    # Load scraping of metrics_url.
    metrics_interval_s: float = field(default=2.0, metadata=_SECONDS)
    metrics_timeout_s: float = field(default=1.0, metadata=_SECONDS)
    # A load report older than this is unknown: the sink is told to forget it.
    metrics_stale_after_s: float = field(default=10.0, metadata=_SECONDS)
    # DEGRADED when scraped load reaches either bound; 0 disables that bound.
    degraded_queue_depth: int = field(default=32, metadata=allowed(ge=0))
    degraded_kv_cache_utilization: float = field(
        default=0.98, metadata=allowed(ge=0, le=1, finite=True)
    )
    # False when a standalone decider-probe reports for this decider: the server then does not
    # run its own prober (two probers would publish competing verdicts).
    embedded: bool = True
    # Standalone prober (decider-probe): how often it pushes results, how long they stay
    # valid at the decider, and how often it re-lists endpoints besides watching for changes.
    report_interval_s: float = field(default=5.0, metadata=_SECONDS)
    report_valid_for_s: float = field(default=15.0, metadata=_SECONDS)
    relist_interval_s: float = field(default=30.0, metadata=_SECONDS)
    # Extra probe headers by endpoint id, merged over the endpoint's own probe_headers.
    # A standalone prober needs this: ListEndpoints redacts header values.
    headers: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: _EMPTY_HEADERS)

    @classmethod
    def parse(cls, table: Mapping[str, Any]) -> ProbeSettings:
        """The `[probe]` table; raises ConfigErrors listing every problem, each naming the key,
        the value and what is allowed."""
        problems = Problems()
        values = _check(table, problems)
        problems.raise_any()
        return cls(**values)

    def __post_init__(self) -> None:
        # Settings built in code (tests, benches, embedders) meet the same rules as the file.
        problems = Problems()
        _check({f.name: getattr(self, f.name) for f in fields(self)}, problems)
        problems.raise_any()


def _check(table: Mapping[str, Any], problems: Problems) -> dict[str, Any]:
    """The values of a `[probe]` table by field name, its problems added to `problems` (the
    values are only meaningful when none was added)."""
    failed: set[str] = set()
    values = schema(ProbeSettings, exclude=("headers",)).validate(
        table, "probe", problems, skip=("headers",), failed=failed
    )
    if values is None:
        return {}
    values["headers"] = _parse_headers(
        table.get("headers", _EMPTY_HEADERS), problems, (position(table, "headers"),)
    )
    # Rules between keys, checked when both keys are valid on their own.
    interval_s, valid_for_s = values["report_interval_s"], values["report_valid_for_s"]
    if not failed & {"report_interval_s", "report_valid_for_s"} and valid_for_s <= interval_s:
        # A result must outlive the gap to the next report, or the decider forgets it between.
        problems.add(
            (position(table, "report_valid_for_s"),),
            f"probe.report_valid_for_s: {valid_for_s:g}, must be > report_interval_s"
            f" ({interval_s:g})",
        )
    return values


def _parse_headers(
    value: Any, problems: Problems, order: tuple[int, ...]
) -> Mapping[str, Mapping[str, str]]:
    """`[probe.headers]`; header values are secrets, so these messages never quote them."""
    if not isinstance(value, Mapping):
        problems.add(order, "probe.headers: must be a table of endpoint id -> header table")
        return _EMPTY_HEADERS
    out: dict[str, Mapping[str, str]] = {}
    for i, (endpoint_id, headers) in enumerate(value.items()):
        where = f"probe.headers.{endpoint_id}"
        if not isinstance(headers, Mapping):
            problems.add((*order, i), f"{where}: must be a table of header -> value")
            continue
        parsed: dict[str, str] = {}
        for j, (name, header_value) in enumerate(headers.items()):
            if isinstance(header_value, str):
                parsed[str(name)] = header_value
            else:
                problems.add((*order, i, j), f"{where}.{name}: must be a string")
        out[str(endpoint_id)] = MappingProxyType(parsed)
    return MappingProxyType(out)
