import math
from typing import Any

from bench.sim.metrics import RunResult
from bench.sim.report import (
    THROUGHPUT_PLOT,
    TTFT_PLOT,
    across_seeds,
    check_targets,
    sweep_table,
    write_report,
)
from bench.sim.workloads import WORKLOADS


def result(workload: str, strategy: str, p90: float, **overrides) -> RunResult:
    values: dict[str, Any] = {
        "workload": workload,
        "strategy": strategy,
        "requests": 10,
        "completed": 10,
        "failed": 0,
        "ttft_p50_s": p90 / 2,
        "ttft_p90_s": p90,
        "ttft_p99_s": p90 * 2,
        "e2e_p50_s": 3.0,
        "e2e_p99_s": 9.0,
        "output_tokens_per_s": 1000.0,
        "cache_hit_rate": 0.5,
        "imbalance": 1.2,
        "sent_to_dead": 0,
        "sent_to_dead_after_detection": 0,
        "detection_delay_s": math.nan,
        "retries": 0,
        "makespan_s": 100.0,
        "events": 1,
    }
    values.update(overrides)
    return RunResult(**values)


def test_targets_compare_the_default_with_the_others():
    results = [
        result("shared_prefix", "", 1.0),
        result("shared_prefix", "oracle", 0.5),
        result("shared_prefix", "round_robin", 10.5),
        result("shared_prefix", "random", 2.0),
        result("uniform", "", 1.2, imbalance=2.5),
        result("uniform", "oracle", 0.1),
        result("uniform", "least_request", 1.0),
        result(
            "crash", "", 1.0, detection_delay_s=1.5, sent_to_dead=4, sent_to_dead_after_detection=1
        ),
    ]
    targets = {t.name: t for t in check_targets(results, "composite")}
    assert targets["shared_prefix: TTFT p90 at least 10x lower than round_robin"].met
    assert not targets["shared_prefix: TTFT p90 at least 10x lower than random"].met
    assert "2.0x" in targets["shared_prefix: TTFT p90 at least 10x lower than random"].detail
    assert targets["shared_prefix: TTFT p90 within 15% of the best router"].met
    assert not targets["shared_prefix: TTFT p90 within 1.5x of the oracle"].met
    assert "(2.00x)" in targets["shared_prefix: TTFT p90 within 1.5x of the oracle"].detail
    assert not targets["uniform: TTFT p90 within 15% of the best router"].met
    assert "least_request" in targets["uniform: TTFT p90 within 15% of the best router"].detail
    # The oracle is the yardstick, not a rival: it is not "the best router".
    assert "uniform: TTFT p90 within 1.5x of the oracle" not in targets
    assert not targets["uniform: imbalance under 2"].met
    assert not targets["crash: nothing sent to the dead endpoint after detection"].met
    assert "uniform: nothing sent to the dead endpoint after detection" not in targets


def test_report_writes_markdown_and_plots(tmp_path):
    results = [
        result("uniform", "", 1.0),
        result("uniform", "oracle", 0.8),
        result("uniform", "round_robin", 2.0),
    ]
    text = write_report(
        results,
        seed=1,
        scale=0.1,
        default_strategy="composite",
        workloads=[WORKLOADS["uniform"](1, scale=0.01)],
        engine_overrides={},
        out=tmp_path / "SIMULATION.md",
        img_dir=tmp_path / "img",
    )
    assert (tmp_path / "SIMULATION.md").read_text() == text
    assert "seed 1" in text and "| composite (default) |" in text
    # The report leads with the default against the oracle and round_robin.
    assert "| uniform | 1.00 | 0.80 | 2.00 | 1.25x | composite (default) (1.00) | 1.20 |" in text
    assert text.index("| uniform | 1.00 |") < text.index("## Targets")
    assert (tmp_path / "img" / TTFT_PLOT).stat().st_size > 0
    assert (tmp_path / "img" / THROUGHPUT_PLOT).stat().st_size > 0


def test_other_seeds_recheck_the_targets():
    good = [result("uniform", "", 1.0), result("uniform", "round_robin", 1.1)]
    bad = [result("uniform", "", 2.0), result("uniform", "round_robin", 1.0)]
    text = across_seeds({7: good, 11: bad}, "composite")
    assert "| 7 | 2 of 2 | - |" in text
    assert "| 11 | 1 of 2 | uniform: TTFT p90 within 15% of the best router" in text
    assert across_seeds({7: good}, "composite") == ""


def test_sweep_table_has_a_row_per_workload_and_seed():
    runs = [
        result("uniform", "", 1.0, sent_to_dead_after_detection=2),
        result("uniform", "oracle", 0.5),
        result("uniform", "round_robin", 1.1),
        result("uniform", "random", 0.9),
    ]
    text = sweep_table({7: runs, 11: runs}, "composite")
    assert "| uniform | 7 | 1.00 | 0.50 | 1.10 | 0.90 | random (0.90) | 1.20 | 2 |" in text
    assert "| uniform | 11 | 1.00 |" in text
    assert sweep_table({7: runs}, "composite") == ""
