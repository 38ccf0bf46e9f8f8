"""The engine's validated configuration: [routing], [routing.<strategy>], [breaker], [quotas],
[affinity] and [cache], parsed once with `EngineSettings.parse`.

Every error is a ConfigError naming the key path and the bad value; config.py adds the file name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from decider.errors import ConfigError

# -- small typed readers, shared with the strategies' own config parsers ------------------------


def check_keys(table: Mapping[str, Any], allowed: frozenset[str] | set[str], path: str) -> None:
    """Raise ConfigError for the first key of `table` that is not in `allowed`."""
    for key in table:
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(f"{path}.{key}: unknown key (known keys: {known})")


def as_table(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: {value!r}, must be a table")
    return value


def get_int(
    table: Mapping[str, Any], key: str, default: int, path: str, *, minimum: int = 0
) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{path}.{key}: {value!r}, must be an int >= {minimum}")
    return value


def get_float(
    table: Mapping[str, Any],
    key: str,
    default: float,
    path: str,
    *,
    minimum: float = 0.0,
    maximum: float = math.inf,
    exclusive_minimum: bool = False,
) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}.{key}: {value!r}, must be a number")
    number = float(value)
    too_low = number <= minimum if exclusive_minimum else number < minimum
    if math.isnan(number) or too_low or number > maximum:
        low = f"> {minimum:g}" if exclusive_minimum else f">= {minimum:g}"
        high = "" if maximum == math.inf else f" and <= {maximum:g}"
        raise ConfigError(f"{path}.{key}: {value!r}, must be a number {low}{high}")
    return number


def get_bool(table: Mapping[str, Any], key: str, default: bool, path: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}.{key}: {value!r}, must be true or false")
    return value


def get_str(
    table: Mapping[str, Any],
    key: str,
    default: str,
    path: str,
    *,
    choices: frozenset[str] | None = None,
) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{path}.{key}: {value!r}, must be a string")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}.{key}: {value!r}, must be one of {', '.join(sorted(choices))}")
    return value


# -- the tables ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingSettings:
    default_strategy: str = "composite"
    # Fallbacks returned after the chosen endpoint, unless a request asks for fewer.
    max_fallbacks: int = 2
    # Envoy's panic mode: when the usable share of a model's endpoints drops below this fraction,
    # route across all of them, ignoring health and breakers. 0 turns it off.
    panic_threshold: float = 0.0
    # A decision with no outcome stops counting as in flight after this long.
    in_flight_timeout_s: float = 300.0
    # How long an endpoint that answered RATE_LIMITED gets no new requests.
    rate_limited_cooldown_s: float = 5.0
    # In-flight plus queued requests at which the load score is 0.5.
    load_reference: float = 4.0
    # A load report older than this is ignored.
    load_report_max_age_s: float = 10.0
    # Peak-EWMA decay constant for latency and time to first token.
    latency_decay_s: float = 10.0
    retry_max_attempts: int = 3
    retry_initial_backoff_s: float = 0.1
    retry_max_backoff_s: float = 2.0
    retry_backoff_multiplier: float = 2.0
    # Raw [routing.<strategy>] tables, each validated by its strategy in EngineSettings.parse.
    strategies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def options(self, strategy: str) -> Mapping[str, Any]:
        return self.strategies.get(strategy, _EMPTY_TABLE)


_EMPTY_TABLE: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerSettings:
    enabled: bool = True
    # Open after this many failures in a row.
    consecutive_failures: int = 5
    # ... or when the failure share over window_s reaches this (0 turns the rate check off),
    failure_rate: float = 0.5
    window_s: float = 30.0
    # ... counted only once the window holds this many outcomes.
    min_requests: int = 20
    # Open time is open_s times the number of consecutive ejections, capped at max_open_s.
    open_s: float = 30.0
    max_open_s: float = 300.0
    # Half-open admits this many trial requests at a time and closes after this many successes.
    half_open_trials: int = 3
    half_open_successes: int = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantQuota:
    # 0 means unlimited.
    requests_per_minute: int = 0
    tokens_per_minute: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaSettings:
    # Applies to every tenant without its own [quotas.tenants.<name>] table, the "" tenant included.
    default: TenantQuota = TenantQuota()
    tenants: Mapping[str, TenantQuota] = field(default_factory=dict)

    def for_tenant(self, tenant: str) -> TenantQuota:
        return self.tenants.get(tenant, self.default)


@dataclass(frozen=True, slots=True, kw_only=True)
class AffinitySettings:
    # Sliding: every request of the session renews it.
    ttl_s: float = 300.0
    # The least recently used sessions are dropped beyond this.
    max_sessions: int = 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheSettings:
    # Prefix blocks remembered per endpoint (approximate LRU); 8192 blocks of 16 tokens is about
    # the KV cache of one GPU serving a 7-8B model.
    blocks_per_endpoint: int = 8192
    # Blocks of one request looked at; longer prompts are indexed by their first blocks only.
    max_blocks_per_request: int = 1024
    # Endpoints whose cached prefix a decision looks at, deepest matches first.
    max_matches: int = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSettings:
    routing: RoutingSettings = RoutingSettings()
    breaker: BreakerSettings = BreakerSettings()
    quotas: QuotaSettings = QuotaSettings()
    affinity: AffinitySettings = AffinitySettings()
    cache: CacheSettings = CacheSettings()

    @classmethod
    def parse(cls, tables: Mapping[str, Any]) -> EngineSettings:
        """Validate the engine's tables of a parsed TOML document (other top-level keys are
        ignored: they belong to config.py and the prober)."""
        return cls(
            routing=_parse_routing(as_table(tables.get("routing", {}), "routing")),
            breaker=_parse_breaker(as_table(tables.get("breaker", {}), "breaker")),
            quotas=_parse_quotas(as_table(tables.get("quotas", {}), "quotas")),
            affinity=_parse_affinity(as_table(tables.get("affinity", {}), "affinity")),
            cache=_parse_cache(as_table(tables.get("cache", {}), "cache")),
        )


_ROUTING_KEYS = frozenset(
    {
        "default_strategy",
        "max_fallbacks",
        "panic_threshold",
        "in_flight_timeout_s",
        "rate_limited_cooldown_s",
        "load_reference",
        "load_report_max_age_s",
        "latency_decay_s",
        "retry_max_attempts",
        "retry_initial_backoff_s",
        "retry_max_backoff_s",
        "retry_backoff_multiplier",
    }
)


def _parse_routing(table: Mapping[str, Any]) -> RoutingSettings:
    # Imported here: strategies import this module for the readers above.
    from decider.core.strategies import STRATEGIES

    path = "routing"
    strategies: dict[str, Mapping[str, Any]] = {}
    plain: dict[str, Any] = {}
    for key, value in table.items():
        if key in STRATEGIES:
            options = as_table(value, f"{path}.{key}")
            # Build once to validate; the engine builds its own with its rng.
            STRATEGIES[key].parse_config(options, f"{path}.{key}")
            strategies[key] = MappingProxyType(dict(options))
        else:
            plain[key] = value
    check_keys(plain, _ROUTING_KEYS | set(STRATEGIES), path)
    d = RoutingSettings()
    default_strategy = get_str(
        plain, "default_strategy", d.default_strategy, path, choices=frozenset(STRATEGIES)
    )
    initial = get_float(
        plain, "retry_initial_backoff_s", d.retry_initial_backoff_s, path, exclusive_minimum=True
    )
    maximum = get_float(plain, "retry_max_backoff_s", d.retry_max_backoff_s, path)
    if maximum < initial:
        raise ConfigError(
            f"{path}.retry_max_backoff_s: {maximum:g}, must be >= retry_initial_backoff_s"
            f" ({initial:g})"
        )
    return RoutingSettings(
        default_strategy=default_strategy,
        max_fallbacks=get_int(plain, "max_fallbacks", d.max_fallbacks, path),
        panic_threshold=get_float(plain, "panic_threshold", d.panic_threshold, path, maximum=1.0),
        in_flight_timeout_s=get_float(
            plain, "in_flight_timeout_s", d.in_flight_timeout_s, path, exclusive_minimum=True
        ),
        rate_limited_cooldown_s=get_float(
            plain, "rate_limited_cooldown_s", d.rate_limited_cooldown_s, path
        ),
        load_reference=get_float(
            plain, "load_reference", d.load_reference, path, exclusive_minimum=True
        ),
        load_report_max_age_s=get_float(
            plain, "load_report_max_age_s", d.load_report_max_age_s, path, exclusive_minimum=True
        ),
        latency_decay_s=get_float(
            plain, "latency_decay_s", d.latency_decay_s, path, exclusive_minimum=True
        ),
        retry_max_attempts=get_int(
            plain, "retry_max_attempts", d.retry_max_attempts, path, minimum=1
        ),
        retry_initial_backoff_s=initial,
        retry_max_backoff_s=maximum,
        retry_backoff_multiplier=get_float(
            plain, "retry_backoff_multiplier", d.retry_backoff_multiplier, path, minimum=1.0
        ),
        strategies=MappingProxyType(strategies),
    )


_BREAKER_KEYS = frozenset(
    {
        "enabled",
        "consecutive_failures",
        "failure_rate",
        "window_s",
        "min_requests",
        "open_s",
        "max_open_s",
        "half_open_trials",
        "half_open_successes",
    }
)


def _parse_breaker(table: Mapping[str, Any]) -> BreakerSettings:
    path = "breaker"
    check_keys(table, _BREAKER_KEYS, path)
    d = BreakerSettings()
    open_s = get_float(table, "open_s", d.open_s, path, exclusive_minimum=True)
    max_open_s = get_float(table, "max_open_s", d.max_open_s, path, exclusive_minimum=True)
    if max_open_s < open_s:
        raise ConfigError(f"{path}.max_open_s: {max_open_s:g}, must be >= open_s ({open_s:g})")
    trials = get_int(table, "half_open_trials", d.half_open_trials, path, minimum=1)
    successes = get_int(
        table, "half_open_successes", min(d.half_open_successes, trials), path, minimum=1
    )
    return BreakerSettings(
        enabled=get_bool(table, "enabled", d.enabled, path),
        consecutive_failures=get_int(
            table, "consecutive_failures", d.consecutive_failures, path, minimum=1
        ),
        failure_rate=get_float(table, "failure_rate", d.failure_rate, path, maximum=1.0),
        window_s=get_float(table, "window_s", d.window_s, path, exclusive_minimum=True),
        min_requests=get_int(table, "min_requests", d.min_requests, path, minimum=1),
        open_s=open_s,
        max_open_s=max_open_s,
        half_open_trials=trials,
        half_open_successes=successes,
    )


_QUOTA_KEYS = frozenset({"requests_per_minute", "tokens_per_minute"})


def _parse_tenant_quota(table: Mapping[str, Any], path: str, default: TenantQuota) -> TenantQuota:
    return TenantQuota(
        requests_per_minute=get_int(
            table, "requests_per_minute", default.requests_per_minute, path
        ),
        tokens_per_minute=get_int(table, "tokens_per_minute", default.tokens_per_minute, path),
    )


def _parse_quotas(table: Mapping[str, Any]) -> QuotaSettings:
    path = "quotas"
    check_keys(table, _QUOTA_KEYS | {"tenants"}, path)
    default = _parse_tenant_quota(table, path, TenantQuota())
    tenants: dict[str, TenantQuota] = {}
    for name, value in as_table(table.get("tenants", {}), f"{path}.tenants").items():
        tenant_path = f"{path}.tenants.{name}"
        tenant_table = as_table(value, tenant_path)
        check_keys(tenant_table, _QUOTA_KEYS, tenant_path)
        # A tenant table overrides only the keys it sets.
        tenants[name] = _parse_tenant_quota(tenant_table, tenant_path, default)
    return QuotaSettings(default=default, tenants=MappingProxyType(tenants))


def _parse_affinity(table: Mapping[str, Any]) -> AffinitySettings:
    path = "affinity"
    check_keys(table, {"ttl_s", "max_sessions"}, path)
    d = AffinitySettings()
    return AffinitySettings(
        ttl_s=get_float(table, "ttl_s", d.ttl_s, path, exclusive_minimum=True),
        max_sessions=get_int(table, "max_sessions", d.max_sessions, path, minimum=1),
    )


def _parse_cache(table: Mapping[str, Any]) -> CacheSettings:
    path = "cache"
    check_keys(table, {"blocks_per_endpoint", "max_blocks_per_request", "max_matches"}, path)
    d = CacheSettings()
    return CacheSettings(
        blocks_per_endpoint=get_int(
            table, "blocks_per_endpoint", d.blocks_per_endpoint, path, minimum=2
        ),
        max_blocks_per_request=get_int(
            table, "max_blocks_per_request", d.max_blocks_per_request, path, minimum=1
        ),
        max_matches=get_int(table, "max_matches", d.max_matches, path, minimum=1),
    )
