"""Every benchmark a make target runs can be imported the way the target runs it (`python -m
bench.X` from the checkout's root): a benchmark is never part of `make test`, so an import it
lost would otherwise show only when someone next measures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_module_of_the_makefile_imports() -> None:
    modules = sorted(set(re.findall(r"-m (bench(?:\.\w+)+)", (ROOT / "Makefile").read_text())))
    assert "bench.bench_core" in modules and "bench.scale.bench_scale" in modules
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
    done = subprocess.run(
        [sys.executable, "-c", code, *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
