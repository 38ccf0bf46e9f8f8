"""The benchmark's outputs: the summary, the latency plot, the "gRPC load" section of
docs/BENCHMARKS.md (between its markers; the other sections are left alone) and the JSON
results."""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

from bench.grpc.loadgen import Run
from bench.grpc.rounds import Results
from bench.grpc.servers import ROOT
from bench.grpc.workload import ENDPOINTS

RESULTS = ROOT / "bench" / "results" / "grpc_load.json"
PLOT = ROOT / "docs" / "img" / "grpc_latency.png"
DOC = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- grpc-load:begin -->", "<!-- grpc-load:end -->"
# Percentiles ghz reports; the plot draws them all.
PERCENTILES = (10, 25, 50, 75, 90, 95, 99)


def median(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def summary(res: Results) -> dict[str, float]:
    get = lambda key: [r[key] for r in res.rounds]  # noqa: E731
    s = {
        "check_rps": median(get("check"), "rps"),
        "decide_rps": median(get("decide"), "rps"),
        "check_p50_ms": median(get("check"), "p50_ms"),
        "decide_p50_ms": median(get("decide"), "p50_ms"),
        "check_p99_ms": median(get("check"), "p99_ms"),
        "decide_p99_ms": median(get("decide"), "p99_ms"),
        "check_serial_p50_ms": median(get("check_serial"), "p50_ms"),
        "decide_serial_p50_ms": median(get("decide_serial"), "p50_ms"),
        "check_serial_p99_ms": median(get("check_serial"), "p99_ms"),
        "decide_serial_p99_ms": median(get("decide_serial"), "p99_ms"),
        "check_cpu_us": median(get("check"), "server_cpu_us"),
        "decide_cpu_us": median(get("decide"), "server_cpu_us"),
    }
    if "check_h2load" in res.rounds[0]:
        for name in ("check", "decide"):
            s[f"{name}_h2load_rps"] = median(get(f"{name}_h2load"), "rps")
            s[f"{name}_h2load_cpu_us"] = median(get(f"{name}_h2load"), "server_cpu_us")
        s["h2load_throughput_ratio"] = s["decide_h2load_rps"] / s["check_h2load_rps"]
    s["throughput_ratio"] = s["decide_rps"] / s["check_rps"]
    s["serial_p50_ratio"] = s["decide_serial_p50_ms"] / s["check_serial_p50_ms"]
    if res.replay:
        rep = lambda key: [r[key] for r in res.replay]  # noqa: E731
        s["replay_throughput_ratio"] = median(rep("decide"), "rps") / median(rep("check"), "rps")
        s["replay_serial_p50_ratio"] = median(rep("decide_serial"), "p50_ms") / median(
            rep("check_serial"), "p50_ms"
        )
        s["replay_cpu_ratio"] = median(rep("decide"), "server_cpu_us") / median(
            rep("check"), "server_cpu_us"
        )
    return s


def plot(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, suffix, title in (
        (axes[0], "", "under load"),
        (axes[1], "_serial", "serial (1 in flight)"),
    ):
        for key, label, style in (
            (f"check{suffix}", "Health/Check (floor)", "o--"),
            (f"decide{suffix}", "Decide", "s-"),
        ):
            ps = list(PERCENTILES)
            ys = [
                statistics.median(r[key].percentiles_ms.get(p, 0.0) for r in res.rounds) for p in ps
            ]
            ax.plot([str(p) for p in ps], ys, style, label=label)
        ax.set_title(f"Latency percentiles, {title}")
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    c = res.rounds[0]["check"]
    fig.suptitle(
        f"Decider gRPC: Decide ({ENDPOINTS} endpoints, composite, affinity) vs transport floor; "
        f"ghz c={c.concurrency} over {c.connections} connections"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(res: Results, args: argparse.Namespace) -> str:
    s = summary(res)
    m, ro = res.many_connections, res.report_outcome
    assert m is not None and ro is not None
    c = res.rounds[0]["check"]
    tp = "meets" if s["throughput_ratio"] >= 0.85 else "misses"
    lat = "meets" if s["serial_p50_ratio"] <= 1.15 else "misses"
    mach = res.machine
    lines = [
        BEGIN,
        "## gRPC load",
        "",
        "Decider as a gateway sees it: the real server loaded by [ghz](https://ghz.sh) (compiled "
        f"Go, version pinned in the Makefile), {ENDPOINTS} endpoints of one model, the composite "
        "strategy, and requests carrying a session id (1000 sessions) and prefix hashes (16 shared "
        "system prompts x 256 conversations), so session and cache affinity are exercised.",
        "",
        "```",
        "make bench-grpc   # = .venv/bin/python -m bench.grpc --ghz .tools/bin/ghz",
        "```",
        "",
        f"Machine: {mach['cpus']} vCPU ({mach['cpu']}), {mach['python']}, grpcio {mach['grpcio']}. "
        + (
            "The server is pinned to core 0 and the load generator to core 1 (taskset). "
            if mach.get("pinned")
            else "The load generator shares the cores with the server. "
        )
        + "Other work shared the machine, so requests/s are a lower bound; server CPU per call "
        "(from /proc) is the steadier number. "
        f"Main run: `{args.arch}` server (what `decider serve` runs), medians of {len(res.rounds)} "
        "rounds in which Check and Decide alternate on the same server; under load = ghz "
        f"`-c {c.concurrency} --connections {c.connections}`; serial = one call in flight.",
        "",
        _row("", "Health/Check (floor)", "Decide", "Decide / floor"),
        _row("---", "---:", "---:", "---:"),
        _row(
            "requests/s under load",
            f"{s['check_rps']:.0f}",
            f"{s['decide_rps']:.0f}",
            f"{s['throughput_ratio']:.2f} (target >= 0.85: {tp})",
        ),
    ]
    for label, key, fmt in (
        ("p50 under load (ms)", "p50_ms", ".2f"),
        ("p99 under load (ms)", "p99_ms", ".2f"),
        ("serial p50 (ms)", "serial_p50_ms", ".3f"),
        ("serial p99 (ms)", "serial_p99_ms", ".3f"),
        ("server CPU per call (us)", "cpu_us", ".0f"),
    ):
        floor, decide = s[f"check_{key}"], s[f"decide_{key}"]
        ratio = f"{decide / floor:.2f}"
        if key == "serial_p50_ms":
            ratio += f" (target <= 1.15: {lat})"
        lines.append(_row(label, f"{floor:{fmt}}", f"{decide:{fmt}}", ratio))
    if "check_h2load_rps" in s:
        h2 = res.rounds[0]["check_h2load"]
        lines += [
            "",
            f"The same pair from h2load (nghttp2, a much lighter client than ghz: "
            f"`-c {h2.connections} -m {h2.concurrency // h2.connections}`, one fixed request "
            "each, grpc-status 0 checked with a separate call):",
            "",
            _row("", "Health/Check (floor)", "Decide", "Decide / floor"),
            _row("---", "---:", "---:", "---:"),
            _row(
                "requests/s (h2load)",
                f"{s['check_h2load_rps']:.0f}",
                f"{s['decide_h2load_rps']:.0f}",
                f"{s['h2load_throughput_ratio']:.2f}",
            ),
            _row(
                "server CPU per call (us)",
                f"{s['check_h2load_cpu_us']:.0f}",
                f"{s['decide_h2load_cpu_us']:.0f}",
                f"{s['decide_h2load_cpu_us'] / s['check_h2load_cpu_us']:.2f}",
            ),
        ]
    if res.replay:
        rep = lambda key: [r[key] for r in res.replay]  # noqa: E731
        lines += [
            "",
            "**The floor for Decide's messages.** The same comparison against a server whose "
            "Decide replays its first answer, doing no Python work per call "
            "(`launch.py --replay-decide`, a second server measured in the same rounds, "
            f"medians of {len(res.replay)} rounds): what Decide's "
            "larger request and response cost the transport and ghz, which no change to the "
            "Decide path can remove.",
            "",
            _row("", "Health/Check", "replayed Decide", "replayed / Check", "real Decide / Check"),
            _row("---", "---:", "---:", "---:", "---:"),
            _row(
                "requests/s under load",
                f"{median(rep('check'), 'rps'):.0f}",
                f"{median(rep('decide'), 'rps'):.0f}",
                f"{s['replay_throughput_ratio']:.2f}",
                f"{s['throughput_ratio']:.2f}",
            ),
            _row(
                "serial p50 (ms)",
                f"{median(rep('check_serial'), 'p50_ms'):.3f}",
                f"{median(rep('decide_serial'), 'p50_ms'):.3f}",
                f"{s['replay_serial_p50_ratio']:.2f}",
                f"{s['serial_p50_ratio']:.2f}",
            ),
            _row(
                "server CPU per call (us)",
                f"{median(rep('check'), 'server_cpu_us'):.0f}",
                f"{median(rep('decide'), 'server_cpu_us'):.0f}",
                f"{s['replay_cpu_ratio']:.2f}",
                f"{s['decide_cpu_us'] / s['check_cpu_us']:.2f}",
            ),
        ]
    if res.stream:
        st = res.stream
        lines += [
            "",
            f"**Streaming Decide** (DecideStream on the same server, "
            f"{st['messages_per_stream']:.0f} decisions per stream, h2load, every answer checked "
            f"to be a decision): {st['stream_cpu_us']:.0f} us of server CPU per decision against "
            f"{st['unary_cpu_us']:.0f} us for unary Decide, so "
            f"{1e6 / st['stream_cpu_us']:.0f} vs {1e6 / st['unary_cpu_us']:.0f} decisions/s per "
            f"core ({st['unary_cpu_us'] / st['stream_cpu_us']:.1f}x); "
            f"{st['stream_decisions_per_s']:.0f} vs {st['unary_decisions_per_s']:.0f} decisions/s "
            "measured here.",
        ]
    errors = sum(m.errors.values())
    lines += [
        "",
        "Every ghz run is checked for grpc-status 0 on every call: "
        + ("all OK." if not res.failures else "see the failures below.")
        + " Before the load, 20 requests go through the whole gateway flow with decider_client "
        "(the first endpoint fails, a fallback answers, every outcome is reported).",
        "",
        f"- **ReportOutcome**: {ro.rps:.0f} requests/s, p50 {ro.p50_ms:.2f} ms, "
        f"p99 {ro.p99_ms:.2f} ms, {ro.server_cpu_us:.0f} us server CPU per call.",
        f"- **{m.connections} concurrent HTTP/2 connections** doing Decide, one call in flight on "
        f"each ({m.count} calls; the server saw {res.peak_connections} established at once): "
        f"{m.rps:.0f} requests/s, p50 {m.p50_ms:.1f} ms, p99 "
        f"{m.p99_ms:.1f} ms, status {', '.join(f'{k} {v}' for k, v in m.status.items())}, "
        f"{errors} errors.",
        f"- **Server RSS**: {res.rss_idle_mb:.0f} MB idle with {ENDPOINTS} endpoints, peak "
        f"{res.rss_peak_mb:.0f} MB during the {m.connections}-connection run.",
        "",
        "![Latency percentiles, Health/Check vs Decide](img/grpc_latency.png)",
        "",
    ]
    if res.architectures:
        by_h2load = "check_h2load" in next(iter(res.architectures.values()))
        lines += [
            "### Server architectures",
            "",
            "The same calls on each architecture, built by bench/grpc/launch.py from the server's "
            "own parts. Requests/s and server CPU per call come from "
            + ("h2load (`-c 8 -m 4`)" if by_h2load else f"ghz ({args.arch_calls} calls)")
            + "; latencies from ghz under load and serially. Each cell is the median of "
            + f"{args.arch_rounds} rounds over all the variants, in alternating order:",
            "",
            _row(
                "architecture",
                "Check req/s",
                "Decide req/s",
                "Decide / Check",
                "server CPU us per Check / Decide",
                "Decide p50 / p99 (ms)",
                "serial Decide p50 (ms)",
                "RSS (MB)",
            ),
            _row("---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"),
        ]
        for label, runs in res.architectures.items():
            check_ = runs["check_h2load" if by_h2load else "check"]
            decide_ = runs["decide_h2load" if by_h2load else "decide"]
            d = runs["decide"]
            lines.append(
                _row(
                    label,
                    f"{check_.rps:.0f}",
                    f"{decide_.rps:.0f}",
                    f"{decide_.rps / check_.rps:.2f}",
                    f"{check_.server_cpu_us:.0f} / {decide_.server_cpu_us:.0f}",
                    f"{d.p50_ms:.2f} / {d.p99_ms:.2f}",
                    f"{runs['decide_serial'].p50_ms:.3f}",
                    f"{res.architecture_rss_mb.get(label, 0.0):.0f}",
                )
            )
        lines.append("")
    if res.failures:
        lines += ["Failures:", "", *[f"- {f}" for f in res.failures], ""]
    if res.notes:
        lines += ["Notes:", "", *[f"- {f}" for f in res.notes], ""]
    lines.append(END)
    return "\n".join(lines)


def update_doc(section: str, doc: Path = DOC) -> None:
    """Replaces the text between the markers (or appends the section); the rest stays."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)


def write_results(res: Results, section: str, elapsed_s: float) -> None:
    """The JSON results, the plot and the doc section."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"summary": summary(res), **asdict(res), "elapsed_s": elapsed_s}, indent=1, default=str
        )
    )
    plot(res, PLOT)
    update_doc(section)
