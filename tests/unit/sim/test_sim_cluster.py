import itertools
import math

import pytest

from bench.sim.cluster import ORACLE, Cluster, ProberParams
from bench.sim.metrics import Imbalance, percentile
from bench.sim.server import ServerParams
from bench.sim.workloads import WORKLOADS, EndpointSpec, Fault, Session, Turn, Workload
from decider.core.model import HealthStatus, Result

PROBER = ProberParams(
    interval_s=30.0,
    jitter_fraction=0.1,
    unhealthy_threshold=3,
    healthy_threshold=2,
    unhealthy_interval_s=1.0,
    liveness_interval_s=2.0,
    metrics_interval_s=2.0,
)


def steady(
    *, endpoints: int = 3, every_s: float = 0.1, until_s: float = 20.0, faults=(), turns: int = 1
) -> Workload:
    params = ServerParams(block_tokens=16, cache_blocks=200)
    sessions = []
    n = int(until_s / every_s)
    for i in range(n):
        history: list[tuple[int, int]] = [(1, 64)]
        ts = []
        for k in range(turns):
            history.append((1000 + 10 * i + k, 40))
            ts.append(
                Turn(
                    segments=tuple(history),
                    output_tokens=20,
                    response_key=5000 + 10 * i + k,
                    think_s=1.0 if k else 0.0,
                )
            )
            history.append((5000 + 10 * i + k, 20))
        sessions.append(
            Session(id=f"s{i}", start_s=i * every_s, model="m", tenant="t", turns=tuple(ts))
        )
    return Workload(
        name="steady",
        description="",
        endpoints=tuple(
            EndpointSpec(id=f"ep-{i}", model="m", params=params) for i in range(endpoints)
        ),
        sessions=tuple(sessions),
        faults=tuple(faults),
        arrival_window_s=until_s,
    )


def test_same_seed_gives_identical_results_and_another_seed_does_not(new_router):
    def run(seed: int):
        workload = WORKLOADS["shared_prefix"](seed, scale=0.1)
        return Cluster(workload, new_router(), seed=seed, prober=PROBER).run()

    first, again, other = run(3), run(3), run(4)
    assert first == again
    assert first != other
    assert first.completed == first.requests > 0


def test_every_request_is_decided_served_and_reported(router):
    result = Cluster(steady(until_s=5.0), router, prober=PROBER).run()
    assert result.requests == result.completed == 50
    assert result.failed == 0 and result.sent_to_dead == 0
    assert len(router.outcomes) == 50
    assert all(o.result is Result.SUCCESS and o.output_tokens == 20 for o in router.outcomes)
    assert all(0 < o.ttft_s < o.latency_s for o in router.outcomes)
    assert result.ttft_p50_s <= result.ttft_p90_s <= result.ttft_p99_s < result.e2e_p99_s
    # The 64-token shared prefix is cached after the first request on each endpoint.
    assert result.cache_hit_rate > 0.5
    assert result.imbalance < 1.5


def test_load_is_scraped_at_the_metrics_interval_and_the_engine_ticks(router):
    Cluster(steady(until_s=10.0), router, prober=PROBER).run()
    times = [t for t, eid, _ in router.loads if eid == "ep-0"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps and all(1.8 - 1e-9 <= g <= 2.0 + 1e-9 for g in gaps)
    assert router.ticks >= 100
    assert {s for _, _, s in router.health_calls} == {HealthStatus.HEALTHY}


def test_next_turn_is_sent_after_the_answer_and_think_time(router):
    cluster = Cluster(steady(until_s=0.1, turns=2), router, prober=PROBER)
    result = cluster.run()
    assert result.completed == 2
    (t0, _), (t1, _) = router.decisions
    first_latency = router.outcomes[0].latency_s
    assert t1 == pytest.approx(t0 + first_latency + 1.0)


def test_crash_is_detected_after_the_thresholds_and_the_dead_endpoint_is_avoided(router):
    crash_s = 5.0
    workload = steady(until_s=20.0, faults=[Fault(endpoint_id="ep-1", at_s=crash_s, kind="crash")])
    result = Cluster(workload, router, prober=PROBER).run()
    # With traffic, a failed request triggers an HTTP check at once, then re-checks every
    # second (liveness checks are skipped meanwhile): the third failure comes 2 s after.
    assert result.detection_delay_s == pytest.approx(2.0)
    assert result.sent_to_dead > 0
    assert result.sent_to_dead_after_detection == 0
    down = [t for t, eid, s in router.health_calls if eid == "ep-1"]
    assert down[-1] == pytest.approx(crash_s + result.detection_delay_s)
    assert all(eid != "ep-1" for t, eid in router.decisions if t >= down[-1])
    # Requests cut before their first token were retried elsewhere; failures are reported.
    assert result.failed + result.completed == result.requests == 200
    assert result.completed >= 195
    assert any(o.result is Result.ERROR and o.endpoint_id == "ep-1" for o in router.outcomes)


def test_without_failed_requests_detection_waits_for_a_liveness_check(router):
    prober = ProberParams(
        unhealthy_threshold=3,
        unhealthy_interval_s=1.0,
        liveness_interval_s=2.0,
        jitter_fraction=0.1,
        probe_on_error=False,
    )
    workload = steady(
        every_s=1.0, until_s=30.0, faults=[Fault(endpoint_id="ep-2", at_s=10.05, kind="crash")]
    )
    result = Cluster(workload, router, prober=prober).run()
    assert 2.0 < result.detection_delay_s <= 2.0 + 2.0
    assert result.sent_to_dead_after_detection == 0


def test_recovered_endpoint_returns_after_the_healthy_threshold(router):
    faults = [
        Fault(endpoint_id="ep-1", at_s=3.0, kind="crash"),
        Fault(endpoint_id="ep-1", at_s=10.0, kind="recover"),
    ]
    Cluster(steady(until_s=20.0, faults=faults), router, prober=PROBER).run()
    back = [t for t, eid, s in router.health_calls if eid == "ep-1" and s is HealthStatus.HEALTHY]
    # Re-probed every second while unhealthy; two successes needed.
    assert back[-1] == pytest.approx(11.0, abs=1.0)
    assert any(eid == "ep-1" for t, eid in router.decisions if t > back[-1])


def test_slow_fault_slows_an_endpoint_that_stays_healthy(router, new_router):
    fast = Cluster(steady(until_s=10.0), router, prober=PROBER).run()
    faults = [Fault(endpoint_id=f"ep-{i}", at_s=0.0, kind="slow", factor=3.0) for i in range(3)]
    slow = Cluster(steady(until_s=10.0, faults=faults), new_router(), prober=PROBER).run()
    assert slow.e2e_p50_s == pytest.approx(3 * fast.e2e_p50_s, rel=0.2)
    assert slow.failed == 0


def test_every_workload_builds_deterministically():
    for name, build in WORKLOADS.items():
        a, b = build(1, scale=0.05), build(1, scale=0.05)
        assert a == b, name
        assert a.request_count > 0, name
        assert all(s.turns for s in a.sessions)


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 90) == 90.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))


def test_imbalance_is_the_ratio_of_time_averaged_max_and_mean():
    imb = Imbalance()
    imb.sample("m", [4, 0])
    imb.sample("m", [0, 0])  # idle moments do not count
    imb.sample("m", [2, 2])
    assert imb.by_group() == {"m": pytest.approx((4 + 2) / (2 + 2))}
    imb.sample("other", [1, 1])
    assert imb.worst() == pytest.approx(1.5)


def test_oracle_never_sends_to_a_dead_endpoint_and_asks_the_router_nothing(router):
    workload = steady(until_s=10.0, faults=[Fault(endpoint_id="ep-1", at_s=3.0, kind="crash")])
    result = Cluster(workload, router, strategy=ORACLE, prober=PROBER).run()
    assert router.decisions == [] and router.outcomes == []
    assert result.sent_to_dead == 0
    # Only the requests running on ep-1 when it died and already streaming are lost.
    assert result.completed + result.failed == result.requests == 100
    assert result.completed >= 95


def test_oracle_sends_a_prompt_where_its_prefix_is_cached(router):
    params = ServerParams(block_tokens=16, cache_blocks=400)
    long_prefix = (1, 1600)

    def session(i: int, start_s: float, prefix: tuple[int, int]) -> Session:
        turn = Turn(segments=(prefix, (100 + i, 32)), output_tokens=5, response_key=200 + i)
        return Session(id=f"s{i}", start_s=start_s, model="m", tenant="t", turns=(turn,))

    workload = Workload(
        name="two",
        description="",
        endpoints=tuple(EndpointSpec(id=f"ep-{i}", model="m", params=params) for i in range(3)),
        sessions=(session(0, 0.0, long_prefix), session(1, 1.0, long_prefix)),
        arrival_window_s=1.0,
    )
    cluster = Cluster(workload, router, strategy=ORACLE, prober=PROBER)
    result = cluster.run()
    assert result.completed == 2
    assert [s.completed for s in cluster.servers.values()] == [2, 0, 0]
    assert result.cache_hit_rate > 0.45
