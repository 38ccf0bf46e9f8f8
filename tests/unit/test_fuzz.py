"""Fuzzing inside the test run: every seed and every input a fuzzer once crashed on is replayed
through the targets, and each target gets a short, bounded coverage-guided run with atheris.
`make fuzz` runs the same targets for minutes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import targets

ROOT = Path(__file__).resolve().parents[2]
REGRESSIONS = ROOT / "fuzz" / "regressions"


def _replays() -> list[tuple[str, Path | int]]:
    cases: list[tuple[str, Path | int]] = []
    for name in targets.TARGETS:
        cases += [(name, i) for i in range(len(targets.seeds(name)))]
        folder = REGRESSIONS / name
        if folder.is_dir():
            cases += [(name, path) for path in sorted(folder.iterdir())]
    return cases


@pytest.mark.parametrize(("name", "case"), _replays(), ids=str)
def test_seeds_and_regressions_replay_cleanly(name, case):
    data = case.read_bytes() if isinstance(case, Path) else targets.seeds(name)[case]
    targets.TARGETS[name](data)


def test_every_rpc_seed_reaches_the_engine():
    # The seeds are what the fuzzer mutates from: each must get past decoding and validation.
    s = targets.stack()
    before = s.engine.pending_decisions
    for seed in targets.seeds("rpc"):
        targets.rpc(seed)
    assert s.engine.pending_decisions > before


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_a_short_coverage_guided_run_finds_nothing(name, tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz.run",
            name,
            "-runs=4000",
            "-max_total_time=60",
            "-seed=1",
            "-max_len=2048",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Done 4000 runs" in run.stderr
