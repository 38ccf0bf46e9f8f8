"""`make soak`: does Decider's memory stay bounded under sustained full-speed traffic?

Three scenarios, each against a fresh `decider serve` (100 endpoints of one model, the affinity
strategy, tenant quotas on, default limits otherwise) driven at full speed by the compiled load
generator `decider-load` (clients/go/cmd/decider-load) for `--seconds`:

  no_outcomes       Decide only, never ReportOutcome (a gateway whose reports are lost)
  outcomes          Decide, then ReportOutcome for every decision
  distinct_keys     Decide only, with a new session id and a new tenant on every request

The server's RSS is sampled every second from /proc. Reported per scenario: peak RSS, RSS
growth over the last third of the run (target < 5%: the median of the last tenth's samples
against the median around two thirds), and what /metrics says the bounded state held and
evicted at the end. Writes bench/results/soak.json, docs/img/soak_rss.png and the
"Memory under sustained load" section of docs/BENCHMARKS.md (between its markers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.request import urlopen

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
RESULTS = ROOT / "bench" / "results" / "soak.json"
PLOT = ROOT / "docs" / "img" / "soak_rss.png"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
ENDPOINTS = 100

SCENARIOS: dict[str, tuple[str, list[str]]] = {
    "no_outcomes": (
        "Decide only, never an outcome (1,000 sessions, 16 shared prompts)",
        ["-sessions", "1000", "-tenants", "50"],
    ),
    "outcomes": (
        "Decide, then ReportOutcome for every decision (1,000 sessions, 16 shared prompts)",
        ["-sessions", "1000", "-tenants", "50", "-outcomes"],
    ),
    "distinct_keys": (
        "Decide only, a new session id and a new tenant on every request",
        ["-sessions", "-1", "-tenants", "-1"],
    ),
}


@dataclass
class Run:
    scenario: str
    description: str
    seconds: float
    load: dict[str, object]
    # (seconds since start, RSS MB)
    rss: list[tuple[float, float]] = field(default_factory=list)
    state: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def peak_mb(self) -> float:
        return max(mb for _, mb in self.rss)

    @property
    def growth_last_third(self) -> float:
        """RSS over the last tenth of the run against RSS around two thirds of it (medians of
        the samples in each window, so one sample taken mid-allocation does not decide)."""
        end = self.rss[-1][0]

        def median_between(lo: float, hi: float) -> float:
            window = sorted(mb for t, mb in self.rss if lo <= t <= hi)
            return window[len(window) // 2]

        at_two_thirds = median_between(end * 0.62, end * 0.72)
        at_end = median_between(end * 0.9, end)
        return at_end / at_two_thirds - 1.0


def config(path: Path) -> None:
    lines = [
        "[server]",
        'data_dir = ""',
        "[routing]",
        'default_strategy = "affinity"',
        "[quotas]",
        # High enough never to refuse; every tenant gets a bucket.
        "requests_per_minute = 100000000",
    ]
    for i in range(ENDPOINTS):
        lines += [
            "[[endpoints]]",
            f'id = "ep-{i:03d}"',
            f'address = "10.1.{i // 250}.{i % 250 + 1}:8000"',
            'model = "m"',
        ]
    path.write_text("\n".join(lines) + "\n")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def pinned(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and os.cpu_count() else []


def state_figures(metrics_port: int) -> dict[str, dict[str, float]]:
    text = urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, dict[str, float]] = {}
    names = {
        "decider_state_entries": "entries",
        "decider_state_limit": "limit",
        "decider_state_evictions_total": "evicted",
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = names.get(sample.name)
            if key:
                out.setdefault(sample.labels["state"], {})[key] = sample.value
    return out


def run_scenario(name: str, seconds: float, load_bin: str, workdir: Path) -> Run:
    description, flags = SCENARIOS[name]
    conf = workdir / "soak.toml"
    config(conf)
    port_file = workdir / f"{name}.port"
    metrics_port = free_port()
    server = subprocess.Popen(
        [
            *pinned(0),
            str(ROOT / ".venv" / "bin" / "decider"),
            "serve",
            "--config",
            str(conf),
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().strip())
        started = time.monotonic()
        load = subprocess.Popen(
            [
                *pinned(1),
                load_bin,
                "-target",
                f"127.0.0.1:{port}",
                "-duration",
                f"{seconds}s",
                "-concurrency",
                "32",
                "-connections",
                "4",
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        run = Run(scenario=name, description=description, seconds=seconds, load={})
        while load.poll() is None:
            run.rss.append((round(time.monotonic() - started, 1), round(rss_mb(server.pid), 1)))
            time.sleep(1.0)
        out, err = load.communicate()
        if load.returncode != 0:
            raise RuntimeError(f"decider-load failed: {err.decode()[-2000:]}")
        run.load = json.loads(out)
        run.rss.append((round(time.monotonic() - started, 1), round(rss_mb(server.pid), 1)))
        run.state = state_figures(metrics_port)
        return run
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def plot(runs: list[Run]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        ax.plot([t for t, _ in run.rss], [mb for _, mb in run.rss], label=run.scenario)
    ax.axhline(150, color="grey", linestyle="--", linewidth=0.8, label="150 MB target")
    ax.set_xlabel("seconds of full-speed load")
    ax.set_ylabel("server RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title("Decider RSS under sustained Decide load, default limits")
    ax.legend(loc="lower right")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=100)


def section(runs: list[Run], command: str) -> str:
    lines = [
        BEGIN,
        "## Memory under sustained load",
        "",
        "Does a gateway that never reports outcomes, or one that sends a new session and tenant "
        "on every request, grow Decider's memory? Each scenario runs against a fresh `decider "
        f"serve` ({ENDPOINTS} endpoints of one model, the affinity strategy, tenant quotas on, "
        "every limit at its default) driven at full speed by the compiled load generator "
        "`decider-load` (32 calls in flight on 4 connections; server and load generator "
        "pinned to one core each), with the server's RSS sampled every second.",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {platform.machine()}, nproc {os.cpu_count()}, Python "
        f"{platform.python_version()}; other work shared the machine.",
        "",
        "| scenario | decisions/s | outcomes | peak RSS (MB) | RSS growth, last third | "
        "pending decisions (evicted) | sessions (evicted) | tenant buckets (evicted) | "
        "prefix blocks (evicted) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:

        def held(state: str, run: Run = run) -> str:
            figures = run.state.get(state, {})
            return f"{figures.get('entries', 0):,.0f} ({figures.get('evicted', 0):,.0f})"

        load = run.load
        lines.append(
            f"| {run.scenario}: {run.description} | {float(load['decisions_per_s']):,.0f} | "
            f"{int(load['outcomes']):,} | {run.peak_mb:.0f} | {run.growth_last_third:+.1%} | "
            f"{held('pending_decisions')} | {held('sessions')} | {held('tenant_buckets')} | "
            f"{held('prefix_blocks')} |"
        )
    worst_peak = max(r.peak_mb for r in runs)
    worst_growth = max(r.growth_last_third for r in runs)
    lines += [
        "",
        f"Targets: peak RSS under 150 MB ({'met' if worst_peak < 150 else 'missed'}: "
        f"{worst_peak:.0f} MB at most); RSS growth over the last third of each run under 5% "
        f"({'met' if worst_growth < 0.05 else 'missed'}: {worst_growth:+.1%} at most). "
        "Load errors: "
        + ", ".join(f"{r.scenario} {r.load['errors']}" for r in runs)
        + ". The bounds and what happens at each are in "
        "[OBSERVABILITY.md](OBSERVABILITY.md#metrics).",
        "",
        "![Server RSS over time in each soak scenario](img/soak_rss.png)",
        END,
    ]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    if BEGIN in doc:
        head, _, rest = doc.partition(BEGIN)
        _, _, tail = rest.partition(END)
        doc = head + text + tail
    else:
        marker = "<!-- failure-detection:begin -->"
        doc = doc.replace(marker, text + "\n\n" + marker, 1)
    DOC.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="per scenario")
    parser.add_argument("--load", default=str(ROOT / ".tools" / "bin" / "decider-load"))
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    parser.add_argument(
        "--from-results",
        action="store_true",
        help=f"render the doc section and plot again from {RESULTS.relative_to(ROOT)}",
    )
    args = parser.parse_args()
    if args.from_results:
        saved = json.loads(RESULTS.read_text())
        runs = [
            Run(
                scenario=r["scenario"],
                description=r["description"],
                seconds=r["seconds"],
                load=r["load"],
                rss=[(t, mb) for t, mb in r["rss"]],
                state=r["state"],
            )
            for r in saved
        ]
        text = section(
            runs, f"make soak   # = .venv/bin/python -m bench.soak --seconds {runs[0].seconds:.0f}"
        )
        print(text)
        if not args.no_doc:
            plot(runs)
            write_doc(text)
        return
    names = args.only or list(SCENARIOS)
    runs = []
    with tempfile.TemporaryDirectory(prefix="decider-soak-") as tmp:
        for name in names:
            print(f"soak: {name} for {args.seconds:.0f} s", file=sys.stderr, flush=True)
            run = run_scenario(name, args.seconds, args.load, Path(tmp))
            print(
                f"soak: {name}: {run.load['decisions_per_s']:.0f} decisions/s, peak "
                f"{run.peak_mb:.0f} MB, last third {run.growth_last_third:+.1%}",
                file=sys.stderr,
                flush=True,
            )
            runs.append(run)
    command = f"make soak   # = .venv/bin/python -m bench.soak --seconds {args.seconds:.0f}"
    text = section(runs, command)
    print(text)
    if args.no_doc:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            [
                {**asdict(r), "peak_mb": r.peak_mb, "growth_last_third": r.growth_last_third}
                for r in runs
            ],
            indent=1,
        )
    )
    plot(runs)
    write_doc(text)


if __name__ == "__main__":
    main()
