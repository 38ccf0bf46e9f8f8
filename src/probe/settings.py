"""ProbeSettings: the validated `[probe]` TOML table, parsed once at start."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from decider.errors import ConfigError

_EMPTY_HEADERS: Mapping[str, Mapping[str, str]] = MappingProxyType({})

LIVENESS_MODES = ("connect", "http", "off")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeSettings:
    """Every field has the default a user would pick; the names are the TOML keys."""

    # Full health check: GET health_url, 2xx within timeout_s is a success.
    interval_s: float = 30.0
    timeout_s: float = 2.0
    # Each wait is shortened by up to this fraction at random, so probes of many endpoints
    # spread out instead of arriving together (Envoy's interval_jitter_percent).
    jitter_fraction: float = 0.1
    # The first checks of the start-up snapshot (the first endpoint set the prober is given)
    # are spread over up to this many seconds (at most interval_s), so a big fleet is not
    # probed in one burst. Endpoints that join later are probed at once.
    first_check_spread_s: float = 5.0
    # Envoy's thresholds: consecutive failures to become UNHEALTHY, consecutive successes to
    # become HEALTHY again.
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    # After any failure the endpoint is re-probed this soon, so a failure is confirmed (or
    # cleared) in seconds rather than a whole interval; also the cadence while UNHEALTHY.
    unhealthy_interval_s: float = 1.0
    # Cheap liveness check between full checks: "connect" opens and resets a TCP connection
    # to the health_url host:port, "http" is a GET with liveness_timeout_s, "off" disables it.
    # A failed liveness check counts as one failure and triggers the unhealthy_interval
    # re-probes; a successful one counts for nothing (only a 2xx proves health).
    liveness: str = "connect"
    liveness_interval_s: float = 2.0
    liveness_timeout_s: float = 1.0
    # DEGRADED instead of HEALTHY when the last successful probe took longer than this.
    degraded_latency_s: float = 1.0
    # HTTP checks (health, liveness in "http" mode, metrics) running at once; more wait.
    max_concurrent_http: int = 32
    # Load scraping of metrics_url.
    metrics_interval_s: float = 2.0
    metrics_timeout_s: float = 1.0
    # A load report older than this is unknown: the sink is told to forget it.
    metrics_stale_after_s: float = 10.0
    # DEGRADED when scraped load reaches either bound; 0 disables that bound.
    degraded_queue_depth: int = 32
    degraded_kv_cache_utilization: float = 0.98
    # False when a standalone decider-probe reports for this decider: the server then does not
    # run its own prober (two probers would publish competing verdicts).
    embedded: bool = True
    # Standalone prober (decider-probe): how often it pushes results, how long they stay
    # valid at the decider, and how often it re-lists endpoints besides watching for changes.
    report_interval_s: float = 5.0
    report_valid_for_s: float = 15.0
    relist_interval_s: float = 30.0
    # Extra probe headers by endpoint id, merged over the endpoint's own probe_headers.
    # A standalone prober needs this: ListEndpoints redacts header values.
    headers: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: _EMPTY_HEADERS)

    @classmethod
    def parse(cls, table: Mapping[str, Any]) -> ProbeSettings:
        """Validate a `[probe]` table; raises ConfigError naming the key and the bad value."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"probe.{key}: unknown key (known: {', '.join(sorted(known))})")
            if key == "headers":
                values[key] = _parse_headers(value)
            elif key == "liveness":
                if value not in LIVENESS_MODES:
                    raise ConfigError(
                        f"probe.liveness: {value!r}, must be one of {', '.join(LIVENESS_MODES)}"
                    )
                values[key] = value
            elif key == "embedded":
                if not isinstance(value, bool):
                    raise ConfigError(f"probe.embedded: {value!r}, must be true or false")
                values[key] = value
            elif key in _INT_KEYS:
                values[key] = _parse_int(key, value)
            else:
                values[key] = _parse_float(key, value)
            if key in _POSITIVE_KEYS and not value > 0:
                raise ConfigError(f"probe.{key}: {value!r}, must be > 0")
        return cls(**values)

    def __post_init__(self) -> None:
        for key in _POSITIVE_KEYS:
            value = getattr(self, key)
            if not value > 0:
                raise ConfigError(f"probe.{key}: {value!r}, must be > 0")
        if not 0.0 <= self.first_check_spread_s <= 3600.0:
            raise ConfigError(
                f"probe.first_check_spread_s: {self.first_check_spread_s!r}, must be from 0 to 3600"
            )
        if not 0.0 <= self.jitter_fraction < 1.0:
            raise ConfigError(f"probe.jitter_fraction: {self.jitter_fraction!r}, must be in [0, 1)")
        for key in ("unhealthy_threshold", "healthy_threshold", "max_concurrent_http"):
            if getattr(self, key) < 1:
                raise ConfigError(f"probe.{key}: {getattr(self, key)!r}, must be >= 1")
        if self.degraded_queue_depth < 0:
            raise ConfigError(
                f"probe.degraded_queue_depth: {self.degraded_queue_depth!r}, must be >= 0"
            )
        if not 0.0 <= self.degraded_kv_cache_utilization <= 1.0:
            raise ConfigError(
                "probe.degraded_kv_cache_utilization: "
                f"{self.degraded_kv_cache_utilization!r}, must be in [0, 1]"
            )
        if self.report_valid_for_s <= self.report_interval_s:
            raise ConfigError(
                f"probe.report_valid_for_s: {self.report_valid_for_s!r}, must be greater than "
                f"probe.report_interval_s ({self.report_interval_s!r})"
            )


_INT_KEYS = frozenset(
    {"unhealthy_threshold", "healthy_threshold", "degraded_queue_depth", "max_concurrent_http"}
)
_POSITIVE_KEYS = (
    "interval_s",
    "timeout_s",
    "unhealthy_interval_s",
    "liveness_interval_s",
    "liveness_timeout_s",
    "degraded_latency_s",
    "metrics_interval_s",
    "metrics_timeout_s",
    "metrics_stale_after_s",
    "report_interval_s",
    "report_valid_for_s",
    "relist_interval_s",
)


def _parse_int(key: str, value: Any) -> int:
    # bool is an int subclass; `true` is never a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"probe.{key}: {value!r}, must be an integer")
    return value


def _parse_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"probe.{key}: {value!r}, must be a number")
    if not math.isfinite(value):
        raise ConfigError(f"probe.{key}: {value!r}, must be finite")
    return float(value)


def _parse_headers(value: Any) -> Mapping[str, Mapping[str, str]]:
    if not isinstance(value, Mapping):
        raise ConfigError("probe.headers: must be a table of endpoint id -> header table")
    out: dict[str, Mapping[str, str]] = {}
    for endpoint_id, headers in value.items():
        if not isinstance(headers, Mapping):
            raise ConfigError(f"probe.headers.{endpoint_id}: must be a table of header -> value")
        parsed: dict[str, str] = {}
        for name, header_value in headers.items():
            # The value is a secret: the message names the header, never the value.
            if not isinstance(header_value, str):
                raise ConfigError(f"probe.headers.{endpoint_id}.{name}: must be a string")
            parsed[str(name)] = header_value
        out[str(endpoint_id)] = MappingProxyType(parsed)
    return MappingProxyType(out)
