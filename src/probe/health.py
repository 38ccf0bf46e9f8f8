"""EndpointHealth: one endpoint's thresholds and degraded signals -> status; pure, no I/O."""

from __future__ import annotations

from decider.core.model import HealthStatus, LoadReport

from .checks import CheckKind, ProbeResult
from .settings import ProbeSettings


class EndpointHealth:
    """Envoy's active health check state machine for one endpoint.

    A new endpoint is UNKNOWN; its first successful HTTP check makes it HEALTHY at once (Envoy
    treats the first check of a new host the same way). Otherwise `unhealthy_threshold`
    consecutive failures of any kind make it UNHEALTHY, and `healthy_threshold` consecutive
    successful HTTP checks bring it back. Liveness successes count for nothing: an open port
    is not a 2xx. HEALTHY shows as DEGRADED while the last probe was slow or the load is high.
    """

    def __init__(self, settings: ProbeSettings) -> None:
        self._settings = settings
        self._verdict = HealthStatus.UNKNOWN
        self._failures = 0
        self._successes = 0
        self._last: ProbeResult | None = None
        self._slow = False
        self._load_reason = ""

    @property
    def failing(self) -> bool:
        """True while a failure is unconfirmed or the endpoint has not yet recovered."""
        return self._failures > 0 or self._verdict is HealthStatus.UNHEALTHY

    @property
    def last(self) -> ProbeResult | None:
        return self._last

    def observe(self, result: ProbeResult) -> None:
        if result.kind is CheckKind.METRICS:
            return
        if not result.healthy:
            self._last = result
            self._successes = 0
            self._failures += 1
            if self._failures >= self._settings.unhealthy_threshold:
                self._verdict = HealthStatus.UNHEALTHY
            return
        if result.kind is CheckKind.LIVENESS:
            return
        self._last = result
        self._failures = 0
        self._successes += 1
        self._slow = result.latency_s > self._settings.degraded_latency_s
        if (
            self._verdict is not HealthStatus.UNHEALTHY
            or self._successes >= self._settings.healthy_threshold
        ):
            self._verdict = HealthStatus.HEALTHY

    def observe_load(self, load: LoadReport | None) -> None:
        """The latest fresh load, or None when it is unknown (stale or never scraped)."""
        s = self._settings
        self._load_reason = ""
        if load is None:
            return
        if s.degraded_queue_depth and load.queue_depth >= s.degraded_queue_depth:
            self._load_reason = f"queue depth {load.queue_depth} >= {s.degraded_queue_depth}"
        elif (
            s.degraded_kv_cache_utilization
            and load.kv_cache_utilization >= s.degraded_kv_cache_utilization
        ):
            self._load_reason = (
                f"KV cache {load.kv_cache_utilization:.0%} >= {s.degraded_kv_cache_utilization:.0%}"
            )

    def status(self) -> tuple[HealthStatus, str]:
        """The status to publish and a reason a person can act on."""
        last = self._last
        last_reason = last.reason if last is not None else "no probe yet"
        if self._verdict is HealthStatus.UNHEALTHY:
            if self._failures:
                return (
                    HealthStatus.UNHEALTHY,
                    f"{self._failures} consecutive failed probes, last: {last_reason}",
                )
            return (
                HealthStatus.UNHEALTHY,
                f"recovering ({self._successes}/{self._settings.healthy_threshold} "
                f"successful probes), last: {last_reason}",
            )
        if self._verdict is HealthStatus.HEALTHY:
            if self._slow:
                return (
                    HealthStatus.DEGRADED,
                    f"slow probe: {last_reason} "
                    f"(> {self._settings.degraded_latency_s * 1000:.0f} ms)",
                )
            if self._load_reason:
                return HealthStatus.DEGRADED, f"high load: {self._load_reason}"
            return HealthStatus.HEALTHY, f"probe ok: {last_reason}"
        return HealthStatus.UNKNOWN, last_reason
