"""`python -m bench.sim`: every workload under every strategy, then the table and the plots.

Runs are independent and each is fully determined by the seed, so they are spread over
worker processes without changing a single number.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script (bench/sim/run.py): make `bench` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sim.cluster import ORACLE, Cluster, GatewayParams, ProberParams, Router
from bench.sim.metrics import RunResult
from bench.sim.report import write_report
from bench.sim.workloads import WORKLOADS, Workload

DEFAULT_STRATEGIES = (
    "",
    ORACLE,
    "round_robin",
    "random",
    "least_request",
    "latency",
    "cache_aware",
    "affinity",
)
# With the main seed (7): six draws of every workload, so no target rests on one lucky draw.
OTHER_SEEDS = (11, 23, 31, 43, 59)
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    workload: str
    strategy: str
    seed: int
    scale: float
    engine_tables: Mapping[str, Any]


def make_engine(tables: Mapping[str, Any], seed: int) -> Router:
    """The real decision core, configured as an operator would for the simulated cluster."""
    from decider.core.engine import Engine
    from decider.core.settings import EngineSettings

    engine: Router = Engine(EngineSettings.parse(tables), rng=random.Random(f"engine/{seed}"))
    return engine


def known_strategies() -> tuple[str, str]:
    """(default strategy name, comma-separated wire names) of the engine."""
    from decider.core.settings import RoutingSettings
    from decider.core.strategies import STRATEGIES

    return RoutingSettings().default_strategy, ",".join(sorted(STRATEGIES))


def engine_tables_for(workload: Workload, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Size the engine's prefix index like the servers' KV cache, then apply overrides."""
    blocks = max(e.params.cache_blocks for e in workload.endpoints)
    tables: dict[str, Any] = {"cache": {"blocks_per_endpoint": max(2, blocks)}}
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(tables.get(key), Mapping):
            tables[key] = {**tables[key], **value}
        else:
            tables[key] = value
    return tables


def run_one(spec: RunSpec) -> RunResult:
    workload = WORKLOADS[spec.workload](spec.seed, scale=spec.scale)
    engine = make_engine(engine_tables_for(workload, spec.engine_tables), spec.seed)
    cluster = Cluster(
        workload,
        engine,
        strategy=spec.strategy,
        seed=spec.seed,
        prober=ProberParams.from_probe_settings(),
        gateway=GatewayParams(),
    )
    return cluster.run()


def sweep(specs: Sequence[RunSpec], *, jobs: int) -> list[RunResult]:
    if jobs <= 1:
        return [run_one(s) for s in specs]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(run_one, specs))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sim", description=__doc__)
    parser.add_argument("--seed", type=int, default=7, help="one seed for everything (7)")
    parser.add_argument(
        "--other-seeds",
        default=",".join(str(x) for x in OTHER_SEEDS),
        help="more seeds to sweep, for the targets and the table across seeds "
        "(comma-separated, '' for none)",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="arrival window multiplier (0.2 for a quick look)"
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, from {', '.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--strategies",
        default=",".join(DEFAULT_STRATEGIES),
        help="wire names; an empty name is the configured default strategy",
    )
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes"
    )
    parser.add_argument(
        "--engine-config", type=Path, help="TOML file whose engine tables override the defaults"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "SIMULATION.md")
    parser.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument(
        "--replicas",
        type=int,
        default=4,
        help="also spread requests over N replicas, sharing on and off (bench/sim/replicas.py;"
        " 0 skips)",
    )
    args = parser.parse_args(argv)

    default_name, available = known_strategies()
    strategies = list(dict.fromkeys(s.strip() for s in args.strategies.split(",")))
    unknown = [s for s in strategies if s and s != ORACLE and s not in available.split(",")]
    if unknown:
        print(f"skipping strategies the engine does not have: {', '.join(unknown)}")
        strategies = [s for s in strategies if s not in unknown]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"--workloads: unknown {w!r} (known: {', '.join(WORKLOADS)})")
    overrides: dict[str, Any] = {}
    if args.engine_config is not None:
        with args.engine_config.open("rb") as f:
            overrides = tomllib.load(f)

    other_seeds = [int(x) for x in args.other_seeds.split(",") if x.strip()]
    seeds = [args.seed, *(x for x in other_seeds if x != args.seed)]
    specs = [
        RunSpec(workload=w, strategy=s, seed=seed, scale=args.scale, engine_tables=overrides)
        for seed in seeds
        for w in workloads
        for s in strategies
    ]
    started = time.perf_counter()
    results = sweep(specs, jobs=args.jobs)
    elapsed = time.perf_counter() - started
    per_seed = len(workloads) * len(strategies)
    by_seed = {seed: results[i * per_seed : (i + 1) * per_seed] for i, seed in enumerate(seeds)}
    text = write_report(
        by_seed[args.seed],
        other_seeds={seed: r for seed, r in by_seed.items() if seed != args.seed},
        seed=args.seed,
        scale=args.scale,
        default_strategy=default_name,
        workloads=[WORKLOADS[w](args.seed, scale=args.scale) for w in workloads],
        engine_overrides=overrides,
        out=None if args.no_write else args.out,
        img_dir=None if args.no_write else args.img_dir,
    )
    print(text)
    if args.replicas:
        from bench.sim import replicas

        body, _ = replicas.table(
            seed=args.seed, scale=args.scale, replicas=args.replicas, jobs=args.jobs
        )
        print(body)
        if not args.no_write:
            replicas.write_section(args.out, body)
    workers = max(1, min(args.jobs, len(specs)))
    print(f"{len(specs)} runs in {elapsed:.1f} s of wall time with {workers} processes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
