"""Decide from the gateway side: per-call latency and client CPU of the Zig client
(clients/zig, gRPC's C core) beside the Go client (clients/go, grpc-go) and ghz (a compiled
load generator), unary and over DecideStream, against one real Decider, in one run.

    python -m bench.grpc.bench_clients --zig-bench PATH --go-bench PATH --ghz PATH

Each client makes sequential calls (one in flight), so latency is a round trip with the
server's work in it, and CPU per call is the client's own cost. The Zig and Go programs
measure themselves (getrusage over the measured calls, every thread included); ghz has no
such report, so its CPU is the child's rusage over its whole run, start-up included. Clients
take turns, round after round, so a slow spell on the machine is shared. Writes
bench/results/clients_grpc.json and prints the table docs/BENCHMARKS.md shows.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.grpc import servers, workload

RESULTS = servers.ROOT / "bench" / "results" / "clients_grpc.json"


def run_self_measuring(argv: list[str]) -> dict[str, Any]:
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_ghz(ghz: str, protoset: Path, addr: str, calls: int) -> dict[str, Any]:
    argv = [ghz, "--insecure", "--protoset", str(protoset)]
    argv += ["--call", "decider.v1.DeciderService/Decide", "-d", workload.DECIDE_DATA]
    argv += ["-n", str(calls), "-c", "1", "--connections", "1", "-O", "json", addr]
    # Reaped children's CPU accumulates in RUSAGE_CHILDREN: the difference is ghz's.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"ghz failed: {out.stderr}")
    stdout = out.stdout
    report = json.loads(stdout)
    dist = {d["percentage"]: d["latency"] for d in report.get("latencyDistribution") or []}
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "client": "ghz",
        "mode": "unary",
        "calls": calls,
        "wall_s": wall,
        "mean_us": report["average"] / 1e3,
        "p50_us": dist.get(50, 0) / 1e3,
        "p99_us": dist.get(99, 0) / 1e3,
        "cpu_us_per_call": cpu_s * 1e6 / calls,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zig-bench", required=True, help="clients/zig decider-bench (ReleaseFast)")
    ap.add_argument("--go-bench", required=True, help="bench/grpc/goclient built")
    ap.add_argument("--ghz", required=True)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "decider.toml"
        workload.write_config(config)
        protoset = Path(tmp) / "decider.protoset"
        workload.write_protoset(protoset)
        with servers.server("uvloop", config) as srv:
            for rnd in range(args.rounds):
                for mode in ("unary", "stream"):
                    for binary in (args.zig_bench, args.go_bench):
                        argv = [binary, "--target", srv.addr, "--model", workload.MODEL]
                        argv += ["--mode", mode, "--calls", str(args.calls)]
                        argv += ["--warmup", str(args.warmup)]
                        r = run_self_measuring(argv)
                        r["round"] = rnd
                        runs.append(r)
                        print(json.dumps(r), flush=True)
                r = run_ghz(args.ghz, protoset, srv.addr, args.calls)
                r["round"] = rnd
                runs.append(r)
                print(json.dumps(r), flush=True)

    table = summarize(runs)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"calls": args.calls, "runs": runs, "median": table}, indent=2))
    print("\n| client | mode | mean µs | p50 µs | p99 µs | client CPU µs/call |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in table:
        print(
            f"| {row['client']} | {row['mode']} | {row['mean_us']:.0f} | {row['p50_us']:.0f} "
            f"| {row['p99_us']:.0f} | {row['cpu_us_per_call']:.0f} |"
        )
    print(f"\nwritten to {RESULTS.relative_to(servers.ROOT)}")
    return 0


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over rounds of each figure, per client and mode."""
    out = []
    keys = sorted({(r["client"], r["mode"]) for r in runs}, key=lambda k: (k[1], k[0]))
    for client, mode in keys:
        mine = [r for r in runs if r["client"] == client and r["mode"] == mode]
        row: dict[str, Any] = {"client": client, "mode": mode}
        for field in ("mean_us", "p50_us", "p99_us", "cpu_us_per_call"):
            row[field] = statistics.median(r[field] for r in mine)
        out.append(row)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
