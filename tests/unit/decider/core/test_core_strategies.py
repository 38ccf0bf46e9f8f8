"""Each strategy: its config, its pick, and its distribution with a fixed seed and a tolerance."""

from __future__ import annotations

import importlib
import itertools
import pkgutil
import random
from collections import Counter

import pytest
from fakes import FakeClock, endpoint, endpoints, request

import decider.core.strategies as strategies_pkg
from decider.core.engine import Engine
from decider.core.model import Decision, LoadReport, Outcome, Result
from decider.core.settings import EngineSettings
from decider.core.stats import FactorWeights, ScoreParams, peak_ewma
from decider.core.strategies import STRATEGIES
from decider.core.strategies.base import ShapesScores, Splitter
from decider.errors import ConfigError


def decided(result):
    assert isinstance(result, Decision), result
    return result


def make(eps, tables=None, seed=1):
    clock = FakeClock()
    engine = Engine(EngineSettings.parse(tables or {}), rng=random.Random(seed))
    engine.set_endpoints(eps, now=clock.now)
    return engine, clock


def succeed(engine, d, now, **fields):
    engine.record_outcome(
        Outcome(
            decision_id=d.decision_id, endpoint_id=d.endpoint.id, result=Result.SUCCESS, **fields
        ),
        now=now,
    )


def hold(engine, clock, endpoint_id, count, others):
    """Put `count` requests in flight on one endpoint (no outcome)."""
    for _ in range(count):
        d = decided(
            engine.decide(
                request(strategy="round_robin", exclude_endpoint_ids=set(others) - {endpoint_id}),
                now=clock.now,
            )
        )
        assert d.endpoint.id == endpoint_id


# -- the table ------------------------------------------------------------------------------------


def test_every_strategy_module_is_listed_in_the_table():
    listed = {factory.__module__ for factory in STRATEGIES.values()}
    modules = {
        f"{strategies_pkg.__name__}.{m.name}"
        for m in pkgutil.iter_modules(strategies_pkg.__path__)
        if m.name != "base"
    }
    assert modules == listed
    for name, factory in STRATEGIES.items():
        module = importlib.import_module(factory.__module__)
        assert getattr(module, factory.__name__) is factory
        assert factory.name == name  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_strategy_parses_empty_options_and_rejects_unknown_keys(name):
    EngineSettings.parse({"routing": {name: {}}})
    with pytest.raises(ConfigError, match=rf"routing\.{name}\.bogus: unknown key"):
        EngineSettings.parse({"routing": {name: {"bogus": 1}}})


def test_each_strategy_is_built_from_its_typed_config_and_declares_its_hooks():
    settings = EngineSettings.parse(
        {"routing": {"composite": {"cache": 0.5}, "latency": {"ttft_weight": 0.25}}}
    )
    rng = random.Random(1)
    built = {
        name: factory(settings.routing.config(name), rng) for name, factory in STRATEGIES.items()
    }
    assert {n for n, s in built.items() if isinstance(s, Splitter)} == {"ab_split"}
    assert {n for n, s in built.items() if isinstance(s, ShapesScores)} == {"composite", "latency"}
    params = ScoreParams()
    for strategy in built.values():
        if isinstance(strategy, ShapesScores):
            params = strategy.shape_scores(params)
    assert params == ScoreParams(weights=FactorWeights(cache=0.5), ttft_weight=0.25)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_strategy_works_as_the_default(name):
    engine, clock = make(endpoints(("a", "b", "c")), {"routing": {"default_strategy": name}})
    d = decided(engine.decide(request(session_id="s", prefix_hashes=[1, 2]), now=clock.now))
    assert d.strategy == name
    ids = [d.endpoint.id, *(f.id for f in d.fallbacks)]
    assert len(ids) == len(set(ids)) == 3
    assert d.reason


# -- rotation and random --------------------------------------------------------------------------


def test_weighted_round_robin_is_smooth_and_exact():
    engine, clock = make([endpoint("a", weight=5), endpoint("b"), endpoint("c")])
    picks = [
        decided(engine.decide(request(strategy="weighted_round_robin"), now=clock.now)).endpoint.id
        for _ in range(700)
    ]
    assert Counter(picks) == {"a": 500, "b": 100, "c": 100}
    longest = run = 1
    for prev, cur in itertools.pairwise(picks):
        run = run + 1 if cur == prev else 1
        longest = max(longest, run)
    # Smooth: a's are interleaved with b and c, as nginx's smooth WRR does (a a b a c a a),
    # never a burst of all five.
    assert longest <= 4


def test_random_is_uniform():
    engine, clock = make(endpoints(("a", "b", "c")), seed=42)
    counts = Counter(
        decided(engine.decide(request(strategy="random"), now=clock.now)).endpoint.id
        for _ in range(3000)
    )
    for count in counts.values():
        assert abs(count - 1000) < 100


def test_weighted_random_follows_the_weights():
    engine, clock = make(
        [endpoint("a", weight=1), endpoint("b", weight=2), endpoint("c", weight=7)], seed=42
    )
    counts = Counter(
        decided(engine.decide(request(strategy="weighted_random"), now=clock.now)).endpoint.id
        for _ in range(10_000)
    )
    assert counts["a"] / 10_000 == pytest.approx(0.1, abs=0.02)
    assert counts["b"] / 10_000 == pytest.approx(0.2, abs=0.02)
    assert counts["c"] / 10_000 == pytest.approx(0.7, abs=0.02)


# -- load and latency -----------------------------------------------------------------------------


def test_least_request_full_scan_picks_the_least_loaded_and_says_so():
    ids = ("a", "b", "c")
    engine, clock = make(endpoints(ids), {"routing": {"least_request": {"full_scan": True}}})
    hold(engine, clock, "a", 5, ids)
    hold(engine, clock, "b", 2, ids)
    hold(engine, clock, "c", 7, ids)
    d = decided(engine.decide(request(strategy="least_request"), now=clock.now))
    assert d.endpoint.id == "b"
    assert [f.id for f in d.fallbacks] == ["a", "c"]
    assert d.reason.startswith("least_request: 2 in flight vs 5 and 7; 3 of 3 candidates")
    # It ranks by load, so it reports the chosen endpoint's load score, as composite does.
    assert set(d.scores) == {"load"}
    assert 0.0 < d.scores["load"] < 1.0


def test_least_request_two_choices_avoids_the_busy_endpoint():
    ids = [f"e{i}" for i in range(10)]
    engine, clock = make(endpoints(ids), seed=5)
    hold(engine, clock, "e0", 50, ids)
    counts = Counter()
    for _ in range(2000):
        d = decided(engine.decide(request(strategy="least_request"), now=clock.now))
        counts[d.endpoint.id] += 1
        succeed(engine, d, clock.now)
    assert counts["e0"] == 0
    for i in range(1, 10):
        assert abs(counts[f"e{i}"] - 2000 / 9) < 70


def test_least_request_counts_reported_queue_depth():
    ids = ("a", "b")
    engine, clock = make(endpoints(ids), {"routing": {"least_request": {"full_scan": True}}})
    engine.record_load("a", LoadReport(queue_depth=9), now=clock.now)
    d = decided(engine.decide(request(strategy="least_request"), now=clock.now))
    assert d.endpoint.id == "b"
    # A stale report stops counting.
    clock.advance(11)
    engine.tick(now=clock.now)
    hold(engine, clock, "b", 1, ids)
    d = decided(engine.decide(request(strategy="least_request"), now=clock.now))
    assert d.endpoint.id == "a"


def test_peak_ewma_jumps_up_and_decays_down():
    assert peak_ewma(0.0, 0.5, elapsed_s=1, decay_s=10) == 0.5
    assert peak_ewma(0.2, 0.9, elapsed_s=1, decay_s=10) == 0.9
    down = peak_ewma(1.0, 0.1, elapsed_s=1, decay_s=10)
    assert 0.9 < down < 1.0
    assert peak_ewma(1.0, 0.1, elapsed_s=100, decay_s=10) == pytest.approx(0.1, abs=0.001)


def test_latency_prefers_the_fastest_until_it_is_busy():
    ids = ("fast", "mid", "slow")
    engine, clock = make(endpoints(ids), {"routing": {"latency": {"full_scan": True}}})
    for endpoint_id, latency in (("fast", 0.1), ("mid", 0.5), ("slow", 1.0)):
        engine.record_outcome(
            Outcome(
                decision_id="", endpoint_id=endpoint_id, result=Result.SUCCESS, latency_s=latency
            ),
            now=clock.now,
        )
    d = decided(engine.decide(request(strategy="latency"), now=clock.now))
    assert d.endpoint.id == "fast"
    assert [f.id for f in d.fallbacks] == ["mid", "slow"]
    assert d.reason.startswith("latency: 100 ms EWMA x 1 outstanding vs 500 ms x 1")
    # Peak EWMA x outstanding: 0.1 s x 6 > 0.5 s x 1.
    hold(engine, clock, "fast", 5, ids)
    d = decided(engine.decide(request(strategy="latency"), now=clock.now))
    assert d.endpoint.id == "mid"


def test_latency_uses_time_to_first_token_when_reported():
    ids = ("a", "b")
    engine, clock = make(endpoints(ids), {"routing": {"latency": {"ttft_weight": 1.0}}})
    # a finishes sooner but starts streaming later.
    engine.record_outcome(
        Outcome(decision_id="", endpoint_id="a", result=Result.SUCCESS, latency_s=1.0, ttft_s=0.8),
        now=clock.now,
    )
    engine.record_outcome(
        Outcome(decision_id="", endpoint_id="b", result=Result.SUCCESS, latency_s=2.0, ttft_s=0.1),
        now=clock.now,
    )
    d = decided(engine.decide(request(strategy="latency"), now=clock.now))
    assert d.endpoint.id == "b"


def test_cost_picks_the_cheapest_then_the_least_loaded():
    eps = [
        endpoint("pricey", cost_per_1k_tokens=2.0),
        endpoint("cheap1", cost_per_1k_tokens=0.5),
        endpoint("cheap2", cost_per_1k_tokens=0.5),
    ]
    engine, clock = make(eps)
    hold(engine, clock, "cheap1", 2, ("pricey", "cheap1", "cheap2"))
    d = decided(engine.decide(request(strategy="cost"), now=clock.now))
    assert d.endpoint.id == "cheap2"
    assert [f.id for f in d.fallbacks] == ["cheap1", "pricey"]
    assert d.scores["cost"] == 1.0
    counts = Counter()
    for _ in range(100):
        d = decided(engine.decide(request(strategy="cost"), now=clock.now))
        counts[d.endpoint.id] += 1
        succeed(engine, d, clock.now)
    assert counts["pricey"] == 0


# -- cache and quota (seed scenarios 1 and 2) -----------------------------------------------------


PROMPT = tuple(range(1000, 1100))  # 100 chained block hashes


def seed_cache(engine, clock, ids, coverage, prompt=PROMPT):
    for endpoint_id, blocks in coverage.items():
        d = decided(
            engine.decide(
                request(
                    strategy="round_robin",
                    prefix_hashes=prompt[:blocks],
                    exclude_endpoint_ids=set(ids) - {endpoint_id},
                ),
                now=clock.now,
            )
        )
        succeed(engine, d, clock.now)


@pytest.mark.parametrize("strategy", ["cache_aware", "composite"])
def test_cache_aware_sends_most_to_the_best_cached_endpoint(strategy):
    # Seed scenario 1: hit rates 85/62/91% over 1000 requests: most go to the 91% one. Each
    # request has its own prompt, of which A holds 85%, B 62% and C 91% of the blocks.
    ids = ("A", "B", "C")
    engine, clock = make(endpoints(ids), {"cache": {"blocks_per_endpoint": 1_000_000}})
    prompts = [tuple(range(i * 1000, i * 1000 + 100)) for i in range(1, 1001)]
    for prompt in prompts:
        seed_cache(engine, clock, ids, {"A": 85, "B": 62, "C": 91}, prompt)
    first = decided(
        engine.decide(request(strategy=strategy, prefix_hashes=prompts[0]), now=clock.now)
    )
    assert first.endpoint.id == "C"
    assert first.scores["cache"] == pytest.approx(0.91)
    if strategy == "cache_aware":
        assert first.reason.startswith("cache_aware: 91% of 100 prefix blocks cached")
    succeed(engine, first, clock.now)
    counts = Counter({"C": 1})
    for prompt in prompts[1:]:
        d = decided(
            engine.decide(request(strategy=strategy, prefix_hashes=prompt), now=clock.advance(0.01))
        )
        counts[d.endpoint.id] += 1
        succeed(engine, d, clock.now)
    assert counts["C"] >= 800
    assert counts["B"] == min(counts["A"], counts["B"], counts["C"])


def test_cache_aware_does_not_pile_a_hot_prefix_onto_one_endpoint():
    ids = ("A", "B", "C")
    engine, clock = make(endpoints(ids), {"routing": {"cache_aware": {"max_load_gap": 4}}})
    seed_cache(engine, clock, ids, {"A": 100})
    counts = Counter(
        decided(
            engine.decide(request(strategy="cache_aware", prefix_hashes=PROMPT), now=clock.now)
        ).endpoint.id
        for _ in range(30)
    )
    # No outcomes: A takes the hot prefix only while within 4 requests of the least loaded.
    assert counts["A"] <= 30 / 3 + 4 + 1
    assert counts["B"] >= 5 and counts["C"] >= 5


def test_quota_aware_prefers_headroom():
    # Seed scenario 2: 95/45/78% of the budget used; 500 requests prefer the 45% one.
    ids = ("A", "B", "C")
    engine, clock = make(endpoints(ids, tokens_per_minute=100_000))
    for endpoint_id, used in (("A", 95_000), ("B", 45_000), ("C", 78_000)):
        d = decided(
            engine.decide(
                request(
                    strategy="round_robin",
                    estimated_input_tokens=used,
                    exclude_endpoint_ids=set(ids) - {endpoint_id},
                ),
                now=clock.now,
            )
        )
        succeed(engine, d, clock.now, input_tokens=used)
    counts = Counter()
    for _ in range(500):
        d = decided(
            engine.decide(request(strategy="quota_aware", estimated_input_tokens=10), now=clock.now)
        )
        counts[d.endpoint.id] += 1
        succeed(engine, d, clock.now, input_tokens=10)
    assert counts["B"] >= 400
    assert counts["A"] <= 10
    d = decided(engine.decide(request(strategy="quota_aware"), now=clock.now))
    assert d.reason.startswith("quota_aware: 50% of budget left vs 22% and 5%")


# -- ab_split -------------------------------------------------------------------------------------


AB = {
    "routing": {
        "ab_split": {
            "within": "round_robin",
            "arms": [
                {"name": "control", "model": "llama", "weight": 70},
                {"name": "candidate", "model": "qwen", "weight": 30},
            ],
        }
    }
}


def test_ab_split_lands_within_three_points_and_keeps_sessions_on_their_arm():
    eps = [*endpoints(("l1", "l2"), model="llama"), *endpoints(("q1", "q2"), model="qwen")]
    engine, clock = make(eps, AB)
    arms: dict[str, str] = {}
    for i in range(1000):
        d = decided(
            engine.decide(
                request(model="chat", strategy="ab_split", session_id=f"user-{i}"), now=clock.now
            )
        )
        arms[f"user-{i}"] = d.endpoint.model
    share = sum(1 for m in arms.values() if m == "llama") / 1000
    assert share == pytest.approx(0.70, abs=0.03)
    for i in range(0, 1000, 37):
        d = decided(
            engine.decide(
                request(model="chat", strategy="ab_split", session_id=f"user-{i}"), now=clock.now
            )
        )
        assert d.endpoint.model == arms[f"user-{i}"]
        assert d.reason.startswith("ab_split: arm ")


def test_ab_split_falls_over_to_the_other_arm_and_says_so():
    eps = [*endpoints(("l1",), model="llama")]
    engine, clock = make(eps, AB)
    reasons = set()
    for i in range(50):
        d = decided(
            engine.decide(
                request(model="chat", strategy="ab_split", session_id=f"user-{i}"), now=clock.now
            )
        )
        assert d.endpoint.id == "l1"
        reasons.add(d.reason.split(";")[0])
    assert "ab_split: arm control (70%) after arm candidate had no usable endpoint" in reasons


def test_ab_split_arms_by_label():
    tables = {
        "routing": {
            "ab_split": {
                "arms": [
                    {"name": "stable", "labels": {"track": "stable"}, "weight": 1},
                    {"name": "canary", "labels": {"track": "canary"}, "weight": 1},
                ]
            }
        }
    }
    eps = [endpoint("s1", labels={"track": "stable"}), endpoint("c1", labels={"track": "canary"})]
    engine, clock = make(eps, tables)
    seen = Counter(
        decided(
            engine.decide(request(strategy="ab_split", session_id=f"u{i}"), now=clock.now)
        ).endpoint.id
        for i in range(400)
    )
    assert seen["s1"] == pytest.approx(200, abs=40)
    assert seen["s1"] + seen["c1"] == 400


# -- composite ------------------------------------------------------------------------------------


def test_composite_weighs_load_latency_health_and_cost():
    eps = [
        endpoint("a", cost_per_1k_tokens=1.0),
        endpoint("b", cost_per_1k_tokens=1.0),
        endpoint("c", cost_per_1k_tokens=3.0),
    ]
    engine, clock = make(eps)
    for endpoint_id, latency in (("a", 2.0), ("b", 0.5), ("c", 0.5)):
        engine.record_outcome(
            Outcome(
                decision_id="", endpoint_id=endpoint_id, result=Result.SUCCESS, latency_s=latency
            ),
            now=clock.now,
        )
    engine.tick(now=clock.advance(2))
    d = decided(engine.decide(request(), now=clock.now))
    assert d.endpoint.id == "b"
    assert set(d.scores) == {"load", "latency", "cache", "quota", "health", "cost"}
    assert all(0.0 <= v <= 1.0 for v in d.scores.values())
    assert d.reason.startswith("composite: score ")


def test_composite_weights_are_configurable():
    eps = [endpoint("cheap", cost_per_1k_tokens=0.1), endpoint("dear", cost_per_1k_tokens=5.0)]
    tables = {
        "routing": {
            "composite": {"load": 0, "latency": 0, "cache": 0, "quota": 0, "health": 0, "cost": 1}
        }
    }
    engine, clock = make(eps, tables)
    for _ in range(20):
        d = decided(engine.decide(request(), now=clock.now))
        assert d.endpoint.id == "cheap"


def test_composite_spreads_load_without_outcomes():
    ids = [f"e{i}" for i in range(4)]
    engine, clock = make(endpoints(ids))
    counts = Counter(
        decided(engine.decide(request(), now=clock.now)).endpoint.id for _ in range(400)
    )
    assert counts == {i: 100 for i in ids}


@pytest.mark.parametrize("strategy", ["least_request", "cost", "quota_aware", "cache_aware"])
def test_ties_rotate_instead_of_always_picking_the_same_endpoint(strategy):
    ids = ("a", "b", "c")
    engine, clock = make(endpoints(ids), {"routing": {"least_request": {"full_scan": True}}})
    counts = Counter()
    for _ in range(300):
        d = decided(engine.decide(request(strategy=strategy), now=clock.now))
        counts[d.endpoint.id] += 1
        succeed(engine, d, clock.now)
    assert counts == {"a": 100, "b": 100, "c": 100}
