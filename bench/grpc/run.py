"""`python -m bench.grpc`: the options, the phases in order, then the report."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from bench.grpc.loadgen import Ghz, H2load
from bench.grpc.report import PLOT, RESULTS, markdown, write_results
from bench.grpc.rounds import Results, architectures, check_runs, main_run
from bench.grpc.servers import ROOT
from bench.grpc.workload import write_config, write_protoset


def main() -> int:
    parser = argparse.ArgumentParser(description="gRPC load benchmark (ghz)")
    parser.add_argument(
        "--ghz", default=shutil.which("ghz") or str(ROOT / ".tools" / "bin" / "ghz")
    )
    parser.add_argument(
        "--arch", default="uvloop", choices=("aio", "uvloop", "sync"), help="main run's server"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="target length of one phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument(
        "--many", type=int, default=1000, help="connections in the many-connections run"
    )
    parser.add_argument("--arch-calls", type=int, default=4000)
    parser.add_argument("--arch-rounds", type=int, default=3, help="rounds over the variants")
    parser.add_argument("--skip-architectures", action="store_true")
    parser.add_argument("--skip-replay", action="store_true", help="no replayed-Decide floor")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="main run: do not pin server/client"
    )
    parser.add_argument("--h2load", default=shutil.which("h2load") or "", help="'' to skip h2load")
    parser.add_argument("--h2load-calls", type=int, default=6000)
    parser.add_argument("--stream-messages", type=int, default=100)
    parser.add_argument(
        "--no-doc", action="store_true", help="write nothing: no doc, plot or results file"
    )
    args = parser.parse_args()
    if not Path(args.ghz).exists():
        print(f"ghz not found at {args.ghz}: run `make bench-grpc` (it installs the pinned ghz)")
        return 2

    import grpc

    res = Results()
    res.machine = {
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": f"Python {platform.python_version()}",
        "grpcio": grpc.__version__,
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="decider-bench-") as tmp:
        config, protoset = Path(tmp) / "bench.toml", Path(tmp) / "decider.protoset"
        write_config(config)
        write_protoset(protoset)
        ghz = Ghz(args.ghz, protoset)
        h2load = H2load(args.h2load, Path(tmp)) if args.h2load else None
        if h2load is None:
            res.notes.append("h2load (nghttp2-client) not found: its runs were skipped")
        main_run(ghz, h2load, config, args, res)
        if not args.skip_architectures:
            architectures(ghz, h2load, config, args, res)
    check_runs(res)
    elapsed = time.monotonic() - started

    section = markdown(res, args)
    print(section)
    if args.no_doc:
        print(f"\n{elapsed:.0f} s (--no-doc: results, plot and doc left as they were)")
        return 1 if res.failures else 0
    write_results(res, section, elapsed)
    print(f"\n{elapsed:.0f} s; wrote {RESULTS.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")
    return 1 if res.failures else 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
