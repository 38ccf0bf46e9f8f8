"""Every routing strategy, by wire name. A strategy exists only if it is listed here.

A leaf of the core's imports: the strategies import base, stats, model and validation, never the
settings or the engine, so settings.py and engine.py import this table at the top."""

from __future__ import annotations

from collections.abc import Mapping

from decider.core.strategies.ab_split import AbSplit
from decider.core.strategies.affinity import Affinity
from decider.core.strategies.base import Strategy, StrategyConfig, StrategyFactory
from decider.core.strategies.cache_aware import CacheAware
from decider.core.strategies.composite import Composite
from decider.core.strategies.cost import Cost
from decider.core.strategies.latency import Latency
from decider.core.strategies.least_request import LeastRequest
from decider.core.strategies.quota_aware import QuotaAware
from decider.core.strategies.random_choice import Random
from decider.core.strategies.round_robin import RoundRobin
from decider.core.strategies.weighted_random import WeightedRandom
from decider.core.strategies.weighted_round_robin import WeightedRoundRobin

STRATEGIES: Mapping[str, StrategyFactory] = {
    RoundRobin.name: RoundRobin,
    WeightedRoundRobin.name: WeightedRoundRobin,
    Random.name: Random,
    WeightedRandom.name: WeightedRandom,
    LeastRequest.name: LeastRequest,
    Latency.name: Latency,
    CacheAware.name: CacheAware,
    QuotaAware.name: QuotaAware,
    Affinity.name: Affinity,
    AbSplit.name: AbSplit,
    Cost.name: Cost,
    Composite.name: Composite,
}

__all__ = ["STRATEGIES", "Strategy", "StrategyConfig", "StrategyFactory"]
