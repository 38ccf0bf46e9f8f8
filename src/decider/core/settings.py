"""The engine's validated configuration: [routing], [routing.<strategy>], [breaker], [quotas],
[affinity] and [cache], parsed once with `EngineSettings.parse`. Each `[routing.<strategy>]` table
is parsed by its strategy's `parse_config` into that strategy's typed config, kept here and handed
to the strategy's factory; nothing parses it again.

Each table is checked by pydantic in strict mode (core/validation.py) against the limits written
on its fields below. Problems are ConfigErrors naming the key path and the bad value, every one of
the document at once; config/loader.py adds the file name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from decider.core.strategies import STRATEGIES, StrategyConfig
from decider.core.validation import Problems, allowed, position, schema
from decider.errors import ConfigError


def default_strategy_configs() -> Mapping[str, StrategyConfig]:
    """Every strategy's config with no options set."""
    return MappingProxyType(
        {name: factory.parse_config({}, f"routing.{name}") for name, factory in STRATEGIES.items()}
    )


# -- the tables ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingSettings:
    default_strategy: str = field(
        default="composite", metadata=allowed(choices=tuple(sorted(STRATEGIES)))
    )
    # Fallbacks returned after the chosen endpoint, unless a request asks for fewer.
    max_fallbacks: int = field(default=2, metadata=allowed(ge=0))
    # Envoy's panic mode: when the usable share of a model's endpoints drops below this fraction,
    # route across all of them, ignoring health and breakers. 0 turns it off.
    panic_threshold: float = field(default=0.0, metadata=allowed(ge=0, le=1))
    # A decision with no outcome stops counting as in flight after this long...
    in_flight_timeout_s: float = field(default=300.0, metadata=allowed(gt=0))
    # ... or once this many newer decisions are waiting for theirs: the oldest is forgotten and
    # its in-flight slot released, so a gateway that never reports cannot grow memory.
    max_pending_decisions: int = field(default=50_000, metadata=allowed(ge=1))
    # How long an endpoint that answered RATE_LIMITED gets no new requests.
    rate_limited_cooldown_s: float = field(default=5.0, metadata=allowed(ge=0))
    # In-flight plus queued requests at which the load score is 0.5.
    load_reference: float = field(default=4.0, metadata=allowed(gt=0))
    # A load report older than this is ignored.
    load_report_max_age_s: float = field(default=10.0, metadata=allowed(gt=0))
    # Peak-EWMA decay constant for latency and time to first token.
    latency_decay_s: float = field(default=10.0, metadata=allowed(gt=0))
    retry_max_attempts: int = field(default=3, metadata=allowed(ge=1))
    retry_initial_backoff_s: float = field(default=0.1, metadata=allowed(gt=0))
    retry_max_backoff_s: float = field(default=2.0, metadata=allowed(ge=0))
    retry_backoff_multiplier: float = field(default=2.0, metadata=allowed(ge=1))
    # Every strategy's typed config (from its [routing.<strategy>] table, else its defaults).
    strategies: Mapping[str, StrategyConfig] = field(default_factory=default_strategy_configs)

    def config(self, strategy: str) -> StrategyConfig:
        """The typed config the strategy's factory receives."""
        return self.strategies[strategy]


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerSettings:
    enabled: bool = True
    # Open after this many failures in a row.
    consecutive_failures: int = field(default=5, metadata=allowed(ge=1))
    # ... or when the failure share over window_s reaches this (0 turns the rate check off),
    failure_rate: float = field(default=0.5, metadata=allowed(ge=0, le=1))
    window_s: float = field(default=30.0, metadata=allowed(gt=0))
    # ... counted only once the window holds this many outcomes.
    min_requests: int = field(default=20, metadata=allowed(ge=1))
    # Open time is open_s times the number of consecutive ejections, capped at max_open_s.
    open_s: float = field(default=30.0, metadata=allowed(gt=0))
    max_open_s: float = field(default=300.0, metadata=allowed(gt=0))
    # Half-open admits this many trial requests at a time and closes after this many successes.
    half_open_trials: int = field(default=3, metadata=allowed(ge=1))
    half_open_successes: int = field(default=2, metadata=allowed(ge=1))


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantQuota:
    # 0 means unlimited.
    requests_per_minute: int = field(default=0, metadata=allowed(ge=0))
    tokens_per_minute: int = field(default=0, metadata=allowed(ge=0))


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaSettings:
    # Applies to every tenant without its own [quotas.tenants.<name>] table, the "" tenant included.
    default: TenantQuota = TenantQuota()
    tenants: Mapping[str, TenantQuota] = field(default_factory=dict)
    # Token buckets kept for tenants seen; beyond this the least recently charged are dropped
    # (a dropped tenant starts again with a full bucket). Buckets that have refilled are
    # dropped anyway: a full bucket is the same as a new one.
    max_tenants: int = field(default=20_000, metadata=allowed(ge=1))

    def for_tenant(self, tenant: str) -> TenantQuota:
        return self.tenants.get(tenant, self.default)


@dataclass(frozen=True, slots=True, kw_only=True)
class AffinitySettings:
    # Sliding: every request of the session renews it.
    ttl_s: float = field(default=300.0, metadata=allowed(gt=0))
    # The least recently used sessions are dropped beyond this (the oldest eighth at a time).
    max_sessions: int = field(default=100_000, metadata=allowed(ge=1))


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheSettings:
    # Prefix blocks remembered per endpoint (approximate LRU); 8192 blocks of 16 tokens is about
    # the KV cache of one GPU serving a 7-8B model.
    blocks_per_endpoint: int = field(default=8192, metadata=allowed(ge=2))
    # Blocks of one request looked at; longer prompts are indexed by their first blocks only.
    max_blocks_per_request: int = field(default=1024, metadata=allowed(ge=1))
    # Endpoints whose cached prefix a decision looks at, deepest matches first.
    max_matches: int = field(default=4, metadata=allowed(ge=1))
    # Blocks remembered over all endpoints; beyond it the endpoint holding the most forgets its
    # older generation. 250,000 blocks are about 23 MB.
    max_blocks: int = field(default=250_000, metadata=allowed(ge=2))


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
        ignored: they belong to the config loader and the prober). Raises ConfigErrors with
        every problem found, in document order."""
        problems = Problems()
        settings = cls.collect(tables, problems)
        problems.raise_any()
        return settings

    @classmethod
    def collect(cls, tables: Mapping[str, Any], problems: Problems) -> EngineSettings:
        """As parse, adding problems to `problems` (positions in `tables`) instead of raising;
        the result is only meaningful when no problem was added."""

        def order(key: str) -> tuple[int, ...]:
            return (position(tables, key),)

        return cls(
            routing=_parse_routing(tables.get("routing", {}), problems, order("routing")),
            breaker=_parse_breaker(tables.get("breaker", {}), problems, order("breaker")),
            quotas=_parse_quotas(tables.get("quotas", {}), problems, order("quotas")),
            affinity=_parse_plain(
                AffinitySettings,
                tables.get("affinity", {}),
                "affinity",
                problems,
                order("affinity"),
            ),
            cache=_parse_plain(
                CacheSettings, tables.get("cache", {}), "cache", problems, order("cache")
            ),
        )


def _parse_routing(table: Any, problems: Problems, order: tuple[int, ...]) -> RoutingSettings:
    path = "routing"
    if not isinstance(table, Mapping):
        problems.add(order, f"{path}: {table!r}, must be a table")
        return RoutingSettings()
    strategies: dict[str, StrategyConfig] = {}
    for name, factory in STRATEGIES.items():
        options = table.get(name, {})
        where = (*order, position(table, name))
        if not isinstance(options, Mapping):
            problems.add(where, f"{path}.{name}: {options!r}, must be a table")
            continue
        try:
            strategies[name] = factory.parse_config(options, f"{path}.{name}")
        except ConfigError as exc:
            problems.extend(exc, where)
    values = schema(RoutingSettings, exclude=("strategies",)).validate(
        table, path, problems, order, skip=STRATEGIES
    )
    if values is None or len(strategies) < len(STRATEGIES):
        return RoutingSettings()
    initial, maximum = values["retry_initial_backoff_s"], values["retry_max_backoff_s"]
    if maximum < initial:
        problems.add(
            (*order, position(table, "retry_max_backoff_s")),
            f"{path}.retry_max_backoff_s: {maximum:g}, must be >= retry_initial_backoff_s"
            f" ({initial:g})",
        )
    return RoutingSettings(**values, strategies=MappingProxyType(strategies))


def _parse_breaker(table: Any, problems: Problems, order: tuple[int, ...]) -> BreakerSettings:
    path = "breaker"
    values = schema(BreakerSettings).validate(table, path, problems, order)
    if values is None:
        return BreakerSettings()
    open_s, max_open_s = values["open_s"], values["max_open_s"]
    if max_open_s < open_s:
        problems.add(
            (*order, position(table, "max_open_s")),
            f"{path}.max_open_s: {max_open_s:g}, must be >= open_s ({open_s:g})",
        )
    if "half_open_successes" not in table:
        # At most the trials admitted, so that a breaker can close at all.
        values["half_open_successes"] = min(
            BreakerSettings().half_open_successes, values["half_open_trials"]
        )
    return BreakerSettings(**values)


def _parse_quotas(table: Any, problems: Problems, order: tuple[int, ...]) -> QuotaSettings:
    path = "quotas"
    values = schema(TenantQuota).validate(
        table, path, problems, order, skip=("tenants", "max_tenants")
    )
    if values is None:
        return QuotaSettings()
    bounds = schema(QuotaSettings, exclude=("default", "tenants")).validate(
        table, path, problems, order, skip=[k for k in table if k != "max_tenants"]
    )
    default = TenantQuota(**values)
    tenants: dict[str, TenantQuota] = {}
    raw = table.get("tenants", {})
    where = (*order, position(table, "tenants"))
    if not isinstance(raw, Mapping):
        problems.add(where, f"{path}.tenants: {raw!r}, must be a table")
        raw = {}
    for i, (name, tenant_table) in enumerate(raw.items()):
        tenant = schema(TenantQuota).validate(
            tenant_table, f"{path}.tenants.{name}", problems, (*where, i)
        )
        if tenant is not None:
            # A tenant table overrides only the keys it sets.
            own = {k: v for k, v in tenant.items() if k in tenant_table}
            tenants[name] = TenantQuota(**{**values, **own})
    return QuotaSettings(default=default, tenants=MappingProxyType(tenants), **(bounds or {}))


def _parse_plain(
    cls: type[Any], table: Any, path: str, problems: Problems, order: tuple[int, ...]
) -> Any:
    values = schema(cls).validate(table, path, problems, order)
    return cls() if values is None else cls(**values)
