"""Tracing overhead end to end: Decide throughput through the real server, loaded by ghz, with
tracing disabled, a 1% ratio sampler and always-on sampling, in one run on one machine.

    make bench-tracing     # or: .venv/bin/python -m bench.bench_tracing_grpc --ghz .tools/bin/ghz

One `decider serve` process per mode, started together, configured only through the standard
OTEL_* variables (what an operator sets). Spans really leave the process: every traced mode
exports over OTLP/gRPC to a collector in this process (tests/otlp_receiver.py), which counts
what arrived. Modes run alternately, round by round in a rotating order, each round the same
fixed number of Decide calls (100 endpoints, composite strategy, sessions and prefix hashes, as
`make bench-grpc`), so drift in machine load spreads over every mode. With two or more CPUs the
servers are pinned to CPU 0 and ghz to CPU 1.

Modes (ghz sends no traceparent unless said):
- disabled                    no OTEL_* variables: tracing off
- 1% parentbased_traceidratio OTEL_TRACES_SAMPLER=parentbased_traceidratio, _ARG=0.01
- 1% traceidratio             OTEL_TRACES_SAMPLER=traceidratio, _ARG=0.01
- 1%, unsampled parent        parentbased_traceidratio 0.01, every call with a traceparent whose
                              sampled flag is off (a gateway that did not sample)
- always_on                   OTEL_TRACES_SAMPLER=always_on: a span exported per call

Writes bench/results/tracing_grpc.json and prints the table that docs/BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.grpc.loadgen import Ghz, Run
from bench.grpc.servers import ROOT, Server, free_port, pinned, running_server
from bench.grpc.workload import DECIDE, DECIDE_DATA, write_config, write_protoset
from tests.otlp_receiver import OtlpReceiver

RESULTS = ROOT / "bench" / "results" / "tracing_grpc.json"
UNSAMPLED_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


@dataclass(frozen=True)
class Mode:
    name: str
    env: dict[str, str]
    # ghz sends UNSAMPLED_PARENT as traceparent with every call.
    unsampled_parent: bool = False


def modes(ratio: float) -> list[Mode]:
    arg = f"{ratio:g}"
    parent_ratio = {
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": arg,
    }
    return [
        Mode("disabled", {}),
        Mode(f"{ratio:.0%} parentbased_traceidratio", parent_ratio),
        Mode(
            f"{ratio:.0%} traceidratio",
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": arg},
        ),
        Mode(f"{ratio:.0%}, unsampled parent", parent_ratio, unsampled_parent=True),
        Mode("always_on", {"OTEL_TRACES_SAMPLER": "always_on"}),
    ]


def ghz_with_metadata(binary: str, metadata: str, workdir: Path) -> str:
    """A wrapper script: ghz with `--metadata` on every call (the traceparent a gateway sends)."""
    script = workdir / "ghz-with-metadata"
    script.write_text(
        f'#!/bin/sh\nexec {shlex.quote(binary)} --metadata {shlex.quote(metadata)} "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


@contextmanager
def decider(config: Path, mode: Mode, collector: str, *, cpus: str | None) -> Iterator[Server]:
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_") and not k.startswith("DECIDER_")
    }
    env.update(PYTHONPATH=str(ROOT / "src"), DECIDER_LOG_LEVEL="INFO")
    if mode.env:
        env.update(mode.env)
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector, OTEL_SERVICE_NAME=mode.name)
    argv = [sys.executable, "-m", "decider", "serve", "--config", str(config)]
    argv += ["--listen", f"127.0.0.1:{port}", "--data-dir", ""]
    with running_server(pinned(argv, cpus), env, name=mode.name, port=port) as srv:
        yield srv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ghz", default=str(ROOT / ".tools" / "bin" / "ghz"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=0, help="per run (0: about --seconds)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    args = parser.parse_args(argv)
    if not Path(args.ghz).exists() and not shutil.which(args.ghz):
        print(f"ghz not found at {args.ghz}: `make .tools/bin/ghz` installs it", file=sys.stderr)
        return 2
    pin = bool(args.pin and shutil.which("taskset") and (os.cpu_count() or 1) >= 2)
    all_modes = modes(args.ratio)
    c, conns = args.concurrency, args.connections
    results: dict[str, list[Run]] = {m.name: [] for m in all_modes}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, OtlpReceiver() as receiver, ExitStack() as stack:
        config = Path(tmp) / "bench.toml"
        write_config(config)
        protoset = Path(tmp) / "decider.protoset"
        write_protoset(protoset)
        plain = Ghz(args.ghz, protoset)
        with_parent = Ghz(
            ghz_with_metadata(args.ghz, json.dumps({"traceparent": UNSAMPLED_PARENT}), Path(tmp)),
            protoset,
        )
        for ghz in (plain, with_parent):
            ghz.cpus = "1" if pin else None
        servers = {
            m.name: stack.enter_context(
                decider(config, m, receiver.endpoint, cpus="0" if pin else None)
            )
            for m in all_modes
        }

        def run(mode: Mode, n: int) -> Run:
            ghz = with_parent if mode.unsampled_parent else plain
            return ghz.run(servers[mode.name], DECIDE, DECIDE_DATA, n=n, c=c, conns=conns)

        # Warm every server up; size runs from the disabled one so each takes about --seconds.
        for mode in all_modes:
            run(mode, max(500, c * 20))
        n = args.calls or max(1000, int(run(all_modes[0], 2000).rps * args.seconds))
        # Warm-up spans still queued in the batch processors (default delay 5 s) must not count.
        time.sleep(6)
        spans_before = len(receiver.spans)
        for r in range(args.rounds):
            order = all_modes[r % len(all_modes) :] + all_modes[: r % len(all_modes)]
            line = []
            for mode in order:
                result = run(mode, n)
                if not result.ok:
                    print(f"{mode.name}: not all OK: {result.status} {result.errors}")
                results[mode.name].append(result)
                line.append(f"{mode.name} {result.rps:.0f}/s")
            print(f"round {r + 1}: " + ", ".join(line), flush=True)
        # Let the batch processors export what they still hold (default delay 5 s).
        time.sleep(6)
        spans = receiver.spans[spans_before:]
    elapsed = time.monotonic() - started

    base = statistics.median(r.rps for r in results["disabled"])
    base_cpu = statistics.median(r.server_cpu_us for r in results["disabled"])
    calls_per_mode = n * args.rounds
    rows = []
    for mode in all_modes:
        runs = results[mode.name]
        rps = statistics.median(r.rps for r in runs)
        cpu = statistics.median(r.server_cpu_us for r in runs)
        exported = sum(1 for s in spans if s.resource.get("service.name") == mode.name)
        # Each round's run against the disabled run of the same round: less exposed to load
        # that drifts over minutes than a ratio of medians.
        paired = statistics.median(
            r.rps / d.rps for r, d in zip(runs, results["disabled"], strict=True)
        )
        rows.append(
            {
                "mode": mode.name,
                "rps_median": round(rps, 1),
                "rps_runs": [round(r.rps, 1) for r in runs],
                "vs_disabled": round(rps / base, 3),
                "vs_disabled_paired": round(paired, 3),
                "p50_ms": round(statistics.median(r.p50_ms for r in runs), 2),
                "p99_ms": round(statistics.median(r.p99_ms for r in runs), 2),
                "server_cpu_us_per_call": round(cpu, 1),
                "added_cpu_us_per_call": round(cpu - base_cpu, 1),
                "spans_exported": exported,
                "spans_per_call": round(exported / calls_per_mode, 4),
                "all_ok": all(r.ok for r in runs),
            }
        )
    command = "make bench-tracing"
    doc = {
        "command": command,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
            "pinned": pin,
        },
        "calls_per_run": n,
        "rounds": args.rounds,
        "concurrency": c,
        "connections": conns,
        "elapsed_s": round(elapsed),
        "modes": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    print(
        f"\n{args.rounds} rounds x {n} Decide calls per mode, c={c} over {conns} connections, "
        f"{'server on CPU 0, ghz on CPU 1' if pin else 'unpinned'}; medians\n"
    )
    print(
        "| mode | Decide/s | vs disabled | same-round ratio | p50 ms | p99 ms "
        "| server CPU us/call | spans/call |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['mode']} | {row['rps_median']:,.0f} | {row['vs_disabled']:.3f} | "
            f"{row['vs_disabled_paired']:.3f} | "
            f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['server_cpu_us_per_call']:.0f} | "
            f"{row['spans_per_call']:.4f} |"
        )
    print(f"\n{elapsed:.0f} s; wrote {RESULTS.relative_to(ROOT)}")
    failed = [row["mode"] for row in rows if not row["all_ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
