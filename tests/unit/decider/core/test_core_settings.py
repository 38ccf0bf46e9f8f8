"""EngineSettings.parse: defaults, every table, and errors that name the key and the value."""

from __future__ import annotations

import pytest

from decider.core.settings import EngineSettings, TenantQuota
from decider.core.strategies.least_request import LeastRequestConfig
from decider.core.strategies.round_robin import RoundRobinConfig
from decider.errors import ConfigError


def test_empty_document_gives_the_defaults():
    assert EngineSettings.parse({}) == EngineSettings()
    settings = EngineSettings()
    assert settings.routing.default_strategy == "composite"
    assert settings.routing.panic_threshold == 0.0
    assert settings.breaker.consecutive_failures == 5
    assert settings.breaker.open_s == 30.0
    assert settings.breaker.max_open_s == 300.0
    assert settings.breaker.half_open_trials == 3
    assert settings.affinity.ttl_s == 300.0


def test_other_top_level_tables_are_left_to_their_owners():
    doc = {"server": {"listen": "x"}, "endpoints": [], "probe": {"interval_s": 3}}
    assert EngineSettings.parse(doc) == EngineSettings()


def test_every_table_parses():
    settings = EngineSettings.parse(
        {
            "routing": {
                "default_strategy": "least_request",
                "max_fallbacks": 3,
                "panic_threshold": 0.5,
                "retry_max_attempts": 4,
                "least_request": {"choice_count": 3},
                "ab_split": {
                    "within": "round_robin",
                    "arms": [
                        {"name": "a", "weight": 70},
                        {"name": "b", "model": "q", "weight": 30},
                    ],
                },
            },
            "breaker": {"consecutive_failures": 3, "open_s": 10, "max_open_s": 60},
            "quotas": {
                "requests_per_minute": 60,
                "tenants": {"acme": {"tokens_per_minute": 1000}},
            },
            "affinity": {"ttl_s": 60},
            "cache": {"blocks_per_endpoint": 1024},
        }
    )
    assert settings.routing.default_strategy == "least_request"
    assert settings.routing.max_fallbacks == 3
    assert settings.routing.config("least_request") == LeastRequestConfig(choice_count=3)
    assert settings.routing.config("round_robin") == RoundRobinConfig()
    assert settings.breaker.consecutive_failures == 3
    assert settings.quotas.for_tenant("acme") == TenantQuota(
        requests_per_minute=60, tokens_per_minute=1000
    )
    assert settings.quotas.for_tenant("other") == TenantQuota(requests_per_minute=60)
    assert settings.affinity.ttl_s == 60.0
    assert settings.cache.blocks_per_endpoint == 1024


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"routing": {"default_stratgy": "x"}}, "routing.default_stratgy: unknown key"),
        ({"routing": {"default_strategy": "fastest"}}, "routing.default_strategy: 'fastest'"),
        ({"routing": {"max_fallbacks": -1}}, "routing.max_fallbacks: -1, must be an int >= 0"),
        ({"routing": {"max_fallbacks": True}}, "routing.max_fallbacks: True"),
        ({"routing": {"panic_threshold": 1.5}}, "routing.panic_threshold: 1.5"),
        (
            {"routing": {"least_request": {"choice_count": 1}}},
            "routing.least_request.choice_count: 1, must be an int >= 2",
        ),
        ({"routing": {"least_request": {"choices": 2}}}, "routing.least_request.choices: unknown"),
        ({"routing": {"round_robin": {"x": 1}}}, "routing.round_robin.x: unknown key"),
        ({"routing": {"composite": {"load": -1}}}, "routing.composite.load: -1"),
        ({"routing": {"cache_aware": {"load_weight": 0}}}, "routing.cache_aware.load_weight: 0"),
        ({"routing": {"affinity": {"fallback": "cost"}}}, "routing.affinity.fallback: 'cost'"),
        ({"routing": {"ab_split": {"arms": [{"weight": 1}]}}}, "routing.ab_split.arms[0].name"),
        ({"routing": {"ab_split": {"arms": "a"}}}, "routing.ab_split.arms: 'a'"),
        ({"routing": {"latency": {"ttft_weight": 2}}}, "routing.latency.ttft_weight: 2"),
        ({"routing": "x"}, "routing: 'x', must be a table"),
        ({"breaker": {"open_s": 0}}, "breaker.open_s: 0"),
        ({"breaker": {"open_s": 60, "max_open_s": 30}}, "breaker.max_open_s: 30"),
        ({"breaker": {"half_open_trial": 3}}, "breaker.half_open_trial: unknown key"),
        ({"quotas": {"rpm": 3}}, "quotas.rpm: unknown key"),
        ({"quotas": {"tenants": {"acme": {"rpm": 3}}}}, "quotas.tenants.acme.rpm: unknown key"),
        ({"quotas": {"requests_per_minute": "60"}}, "quotas.requests_per_minute: '60'"),
        ({"affinity": {"ttl_s": 0}}, "affinity.ttl_s: 0"),
        ({"affinity": {"ttl": 5}}, "affinity.ttl: unknown key"),
        ({"cache": {"blocks_per_endpoint": 1}}, "cache.blocks_per_endpoint: 1"),
        ({"cache": {"size": 1}}, "cache.size: unknown key"),
    ],
)
def test_errors_name_the_key_and_the_value(doc, message):
    with pytest.raises(ConfigError) as info:
        EngineSettings.parse(doc)
    assert message in str(info.value)


def test_every_problem_is_reported_in_document_order():
    doc = {
        "cache": {"max_matches": 0},
        "routing": {"composite": {"load": -1, "cache": "x"}, "max_fallbacks": True},
        "affinity": {"ttl": 5},
    }
    with pytest.raises(ConfigError) as info:
        EngineSettings.parse(doc)
    assert str(info.value).splitlines() == [
        "cache.max_matches: 0, must be an int >= 1",
        "routing.composite.load: -1, must be a number >= 0",
        "routing.composite.cache: 'x', must be a number >= 0",
        "routing.max_fallbacks: True, must be an int >= 0",
        "affinity.ttl: unknown key (known: max_sessions, ttl_s)",
    ]
