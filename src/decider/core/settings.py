"""The engine's validated configuration: [routing], [routing.<strategy>], [breaker], [quotas],
[affinity] and [cache], parsed once with `EngineSettings.parse`. Each `[routing.<strategy>]` table
is parsed by its strategy's `parse_config` into that strategy's typed config, kept here and handed
to the strategy's factory; nothing parses it again.

Every error is a ConfigError naming the key path and the bad value; config.py adds the file name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from decider.core.readers import as_table, check_keys, get_bool, get_float, get_int, get_str
from decider.core.strategies import STRATEGIES, StrategyConfig
from decider.errors import ConfigError


def default_strategy_configs() -> Mapping[str, StrategyConfig]:
    """Every strategy's config with no options set."""
    return MappingProxyType(
        {name: factory.parse_config({}, f"routing.{name}") for name, factory in STRATEGIES.items()}
    )


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
    # Every strategy's typed config (from its [routing.<strategy>] table, else its defaults).
    strategies: Mapping[str, StrategyConfig] = field(default_factory=default_strategy_configs)

    def config(self, strategy: str) -> StrategyConfig:
        """The typed config the strategy's factory receives."""
        return self.strategies[strategy]


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
    path = "routing"
    strategies: dict[str, StrategyConfig] = {}
    plain: dict[str, Any] = {}
    for key, value in table.items():
        if key in STRATEGIES:
            options = as_table(value, f"{path}.{key}")
            strategies[key] = STRATEGIES[key].parse_config(options, f"{path}.{key}")
        else:
            plain[key] = value
    for name, factory in STRATEGIES.items():
        if name not in strategies:
            strategies[name] = factory.parse_config({}, f"{path}.{name}")
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
        strategies=MappingProxyType({name: strategies[name] for name in STRATEGIES}),
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
