"""The results as markdown (docs/SIMULATION.md) and PNG plots (docs/img/sim_*.png)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .cluster import ORACLE, GatewayParams, ProberParams
from .metrics import RunResult
from .server import ServerParams
from .workloads import PREFIX_HEAVY, Workload

TTFT_PLOT = "sim_ttft.png"
THROUGHPUT_PLOT = "sim_throughput.png"


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    name: str
    met: bool
    detail: str


def label(strategy: str, default_strategy: str) -> str:
    return f"{default_strategy} (default)" if strategy == "" else strategy


def _s(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def table(results: Sequence[RunResult], default_strategy: str) -> str:
    head = (
        "| strategy | TTFT p50 s | TTFT p90 s | TTFT p99 s | e2e p50 s | e2e p99 s "
        "| output tok/s | cache hit | imbalance | failed | to dead (after detection) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    rows = []
    for r in results:
        rows.append(
            f"| {label(r.strategy, default_strategy)} | {_s(r.ttft_p50_s)} | {_s(r.ttft_p90_s)} "
            f"| {_s(r.ttft_p99_s)} | {_s(r.e2e_p50_s)} | {_s(r.e2e_p99_s)} "
            f"| {r.output_tokens_per_s:.0f} | {r.cache_hit_rate:.0%} | {r.imbalance:.2f} "
            f"| {r.failed} | {r.sent_to_dead} ({r.sent_to_dead_after_detection}) |"
        )
    return head + "\n".join(rows) + "\n"


def by_workload(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = {}
    for r in results:
        out.setdefault(r.workload, []).append(r)
    return out


# The default's TTFT p90 against the oracle's on the prefix-heavy workloads (issue 16).
ORACLE_FACTOR = 1.5
# How much lower than round_robin and random the default's TTFT p90 must be.
RIVAL_FACTOR: Mapping[str, float] = {"shared_prefix": 10.0, "multi_turn": 3.0}
RIVALS = ("round_robin", "random")


def best_router(runs: Sequence[RunResult]) -> RunResult:
    """The lowest TTFT p90 among the strategies a router can run (the oracle left out)."""
    return min((r for r in runs if r.strategy != ORACLE), key=lambda r: r.ttft_p90_s)


def check_targets(results: Sequence[RunResult], default_strategy: str) -> list[Target]:
    """Issue 16's targets, each with the numbers that decide it."""
    targets: list[Target] = []
    groups = by_workload(results)
    for name, runs in groups.items():
        default = next((r for r in runs if r.strategy == ""), None)
        if default is None:
            continue
        others = {r.strategy: r for r in runs if r.strategy}
        if name in PREFIX_HEAVY and ORACLE in others:
            ratio = default.ttft_p90_s / others[ORACLE].ttft_p90_s
            targets.append(
                Target(
                    name=f"{name}: TTFT p90 within {ORACLE_FACTOR:g}x of the oracle",
                    met=ratio <= ORACLE_FACTOR,
                    detail=(
                        f"{_s(default.ttft_p90_s)} s vs {_s(others[ORACLE].ttft_p90_s)} s "
                        f"({ratio:.2f}x)"
                    ),
                )
            )
        factor = RIVAL_FACTOR.get(name)
        if factor is not None:
            for rival in RIVALS:
                if rival in others:
                    ratio = others[rival].ttft_p90_s / default.ttft_p90_s
                    targets.append(
                        Target(
                            name=f"{name}: TTFT p90 at least {factor:g}x lower than {rival}",
                            met=ratio >= factor,
                            detail=(
                                f"{_s(default.ttft_p90_s)} s vs {_s(others[rival].ttft_p90_s)} s "
                                f"({ratio:.1f}x)"
                            ),
                        )
                    )
        best = best_router(runs)
        ratio = default.ttft_p90_s / best.ttft_p90_s
        targets.append(
            Target(
                name=f"{name}: TTFT p90 within 15% of the best router",
                met=ratio <= 1.15,
                detail=(
                    f"{_s(default.ttft_p90_s)} s vs {_s(best.ttft_p90_s)} s for "
                    f"{label(best.strategy, default_strategy)} ({ratio - 1:+.0%})"
                ),
            )
        )
        targets.append(
            Target(
                name=f"{name}: imbalance under 2",
                met=default.imbalance < 2.0,
                detail=f"{default.imbalance:.2f}",
            )
        )
        if not math.isnan(default.detection_delay_s):
            targets.append(
                Target(
                    name=f"{name}: nothing sent to the dead endpoint after detection",
                    met=default.sent_to_dead_after_detection == 0,
                    detail=(
                        f"{default.sent_to_dead_after_detection} after detection "
                        f"({default.detection_delay_s:.2f} s after the crash), "
                        f"{default.sent_to_dead} before it"
                    ),
                )
            )
    return targets


def _strategy_p90(runs: Sequence[RunResult], strategy: str) -> str:
    run = next((r for r in runs if r.strategy == strategy), None)
    return _s(run.ttft_p90_s) if run is not None else "-"


def lead_table(results: Sequence[RunResult], default_strategy: str) -> str:
    """Per workload: the default's TTFT p90 against the oracle's and round_robin's."""
    rows = []
    for name, runs in by_workload(results).items():
        default = next((r for r in runs if r.strategy == ""), None)
        oracle = next((r for r in runs if r.strategy == ORACLE), None)
        if default is None:
            continue
        vs_oracle = f"{default.ttft_p90_s / oracle.ttft_p90_s:.2f}x" if oracle else "-"
        best = best_router(runs)
        rows.append(
            f"| {name} | {_s(default.ttft_p90_s)} | {_strategy_p90(runs, ORACLE)} "
            f"| {_strategy_p90(runs, 'round_robin')} | {vs_oracle} "
            f"| {label(best.strategy, default_strategy)} ({_s(best.ttft_p90_s)}) "
            f"| {default.imbalance:.2f} |"
        )
    return (
        f"| workload | {default_strategy} (default) | oracle | round_robin | default / oracle "
        "| best router | imbalance (default) |\n"
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |\n" + "\n".join(rows) + "\n"
    )


def sweep_table(by_seed: Mapping[int, Sequence[RunResult]], default_strategy: str) -> str:
    """Every seed and workload: TTFT p90 of the default, the oracle, round_robin, random and the
    best router, and the default's imbalance and sends to dead endpoints after detection."""
    if len(by_seed) < 2:
        return ""
    rows = []
    workloads = list(by_workload(next(iter(by_seed.values()))))
    for name in workloads:
        for seed, results in by_seed.items():
            runs = by_workload(results).get(name, [])
            default = next((r for r in runs if r.strategy == ""), None)
            if default is None:
                continue
            best = best_router(runs)
            rows.append(
                f"| {name} | {seed} | {_s(default.ttft_p90_s)} | {_strategy_p90(runs, ORACLE)} "
                f"| {_strategy_p90(runs, 'round_robin')} | {_strategy_p90(runs, 'random')} "
                f"| {label(best.strategy, default_strategy)} ({_s(best.ttft_p90_s)}) "
                f"| {default.imbalance:.2f} | {default.sent_to_dead_after_detection} |"
            )
    return (
        "TTFT p90 in seconds for every seed; imbalance and sends to a dead endpoint after "
        "detection are the default's:\n\n"
        "| workload | seed | default | oracle | round_robin | random | best router "
        "| imbalance | to dead after detection |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |\n" + "\n".join(rows) + "\n"
    )


def across_seeds(by_seed: Mapping[int, Sequence[RunResult]], default_strategy: str) -> str:
    """The targets checked again for every seed: the numbers above are not one lucky draw."""
    if len(by_seed) < 2:
        return ""
    rows = []
    for seed, results in by_seed.items():
        targets = check_targets(results, default_strategy)
        missed = "; ".join(f"{t.name} ({t.detail})" for t in targets if not t.met) or "-"
        rows.append(f"| {seed} | {sum(t.met for t in targets)} of {len(targets)} | {missed} |")
    return (
        "The same targets for every seed (other arrivals, prompts and probe phases):\n\n"
        "| seed | targets met | missed |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n"
    )


def findings(results: Sequence[RunResult], default_strategy: str) -> list[str]:
    """One line per workload: the default against round_robin and the best strategy."""
    lines = []
    for name, runs in by_workload(results).items():
        default = next((r for r in runs if r.strategy == ""), None)
        rr = next((r for r in runs if r.strategy == "round_robin"), None)
        if default is None:
            continue
        best = best_router(runs)
        line = f"- **{name}**: "
        if rr is not None:
            line += (
                f"default vs round_robin: TTFT p90 {_s(default.ttft_p90_s)} vs "
                f"{_s(rr.ttft_p90_s)} s, p99 {_s(default.ttft_p99_s)} vs {_s(rr.ttft_p99_s)} s, "
                f"output {default.output_tokens_per_s:.0f} vs {rr.output_tokens_per_s:.0f} tok/s, "
                f"cache hit {default.cache_hit_rate:.0%} vs {rr.cache_hit_rate:.0%}; "
            )
        line += (
            f"lowest TTFT p90 of a router: {label(best.strategy, default_strategy)} "
            f"({_s(best.ttft_p90_s)} s), oracle {_strategy_p90(runs, ORACLE)} s"
        )
        lines.append(line + ".")
    return lines


def _params(obj: object) -> str:
    return ", ".join(f"{f.name}={getattr(obj, f.name)!r}" for f in fields(obj))  # type: ignore[arg-type]


def markdown(
    results: Sequence[RunResult],
    *,
    seed: int,
    scale: float,
    default_strategy: str,
    workloads: Sequence[Workload],
    engine_overrides: Mapping[str, Any],
    with_plots: bool,
    other_seeds: Mapping[int, Sequence[RunResult]] | None = None,
) -> str:
    groups = by_workload(results)
    targets = check_targets(results, default_strategy)
    met = sum(t.met for t in targets)
    all_seeds = {seed: results, **(other_seeds or {})}
    robustness = across_seeds(all_seeds, default_strategy)
    seed_list = ", ".join(str(x) for x in all_seeds)
    all_targets = [t for r in all_seeds.values() for t in check_targets(r, default_strategy)]
    out = [
        "# Decision quality in simulation\n",
        "How close Decider's routing comes to the best any router could do, on simulated "
        "clusters of model servers with continuous batching and prefix caches, routed by the "
        "real decision core (`decider.core.engine.Engine`). TTFT p90 in seconds of simulated "
        f"time, seed {seed}, scale {scale:g}:\n",
        lead_table(results, default_strategy),
        "The **oracle** is not a router: it reads every server's true queue and prefix cache "
        "(no router can) and sends each request where its predicted time to first token is "
        "lowest, its own uncached prefill counted twice (once as its wait, once as the wait it "
        "puts on later requests; see the model below). It decides one request at a time, so it "
        "is the yardstick rather than a proven optimum: a router can beat it where the best "
        "choice now costs later requests, as on bursty. **best router** is the lowest TTFT p90 "
        "among the engine's strategies. Decider indexes a request's prefix blocks when it "
        "decides (as pending until the outcome confirms or drops them), so a burst sharing a "
        "prefix lands on the endpoint that is about to cache it.\n",
        f"Targets met: {met} of {len(targets)} at seed {seed}, "
        f"{sum(t.met for t in all_targets)} of {len(all_targets)} over seeds {seed_list}. "
        "Generated by `make sim` (`python -m bench.sim`); everything runs on simulated time, so "
        "the same seed, engine and Python give the same numbers on any machine. The model, the "
        "workloads and how to read the numbers are described after the results.\n",
        "## Targets\n",
        "| target | met | numbers |\n| --- | --- | --- |\n"
        + "\n".join(f"| {t.name} | {'yes' if t.met else 'NO'} | {t.detail} |" for t in targets)
        + "\n",
        "## Across seeds\n" if robustness else "",
        robustness,
        sweep_table(all_seeds, default_strategy),
        "## In short\n",
        "\n".join(findings(results, default_strategy)) + "\n",
        "## Results\n",
    ]
    if with_plots:
        out.append(
            f"![TTFT percentiles by strategy](img/{TTFT_PLOT})\n\n"
            f"![Output tokens per second by strategy](img/{THROUGHPUT_PLOT})\n"
        )
    for w in workloads:
        runs = groups.get(w.name, [])
        if not runs:
            continue
        extra = "; ".join(f"{k}: {v}" for k, v in w.parameters)
        out.append(f"### {w.name}\n")
        out.append(f"{w.description}; {extra}; {w.request_count} requests.\n")
        out.append(table(runs, default_strategy))
    server = workloads[0].endpoints[0].params if workloads else ServerParams()
    out += [
        "## The model\n",
        "- **Servers** (bench/sim/server.py) run like vLLM: up to `max_batch` requests in the "
        "running batch, the rest queue in FIFO order. Prefills run one at a time and take "
        "`prefill_overhead_s + uncached prompt tokens / prefill_tokens_per_s`; the first token "
        "comes at the end of the prefill. Each decode step adds a token to every running "
        "request and takes `decode_base_s + decode_per_seq_s * batch`; while a prefill runs, "
        "decode gets `decode_share_during_prefill` of the steps. A slow endpoint multiplies "
        "all of these times. The KV cache has `cache_blocks` blocks: a running request holds "
        "the blocks of its prompt and output, and a waiting request is admitted only when its "
        "blocks fit.",
        "- **Prefix cache**: the KV blocks running requests do not hold, of `block_tokens` "
        "tokens each, keyed by chained "
        "block hashes (a block's hash covers the whole prefix up to it), least recently used "
        "evicted first, a chain's tail before its head. A prompt hits its longest cached run "
        "of leading blocks; the prompt's blocks are cached when its prefill starts and the "
        "answer's blocks when it finishes, so the next turn of a chat can hit both.",
        "- **Gateway**: every request is `Engine.decide` at simulated `now` with the model, "
        "tenant, session (multi-turn only), capabilities, estimated input tokens and the "
        "prompt's block hashes; it goes to the chosen endpoint, and when the connection is "
        "refused (dead endpoint) to the fallbacks in order, then to a new decision excluding "
        "every endpoint tried, up to the decision's retry attempts. Every attempt is reported "
        "with `record_outcome` (latency, TTFT, tokens). A request cut after its first token "
        "is failed, not retried.",
        "- **Oracle** (`oracle`, simulator only): no Decide call; for every live endpoint of "
        "the model with the capabilities it predicts the wait before the request's prefill "
        "(the prefill running, then the admitted and waiting ones at their own cache hits, and "
        "a batch slot when the batch is full) and the request's own prefill (its hit counts "
        "the blocks cached now and those the prefills ahead will cache), and sends the "
        "request where wait + 2 x own prefill is lowest: the prefill counts once as its own "
        "wait and once as the wait it puts on later requests. Pure greedy TTFT (the prefill "
        "counted once) sent a tenant to an idle server with a cold cache rather than wait for "
        "a warm one and lost to the engine on shared_prefix (2.72 s against 2.22 s at seed 7).",
        "- **Prober**: the schedule and thresholds of src/probe (ProbeSettings defaults): "
        "every endpoint passes a full check before traffic starts, then full checks every "
        "`interval_s` (jittered shorter), liveness checks every `liveness_interval_s` (skipped "
        "while the endpoint is failing), re-checks every `unhealthy_interval_s` after a "
        "failure, and a check at once when a request to the endpoint fails (at most one per "
        "`unhealthy_interval_s`). UNHEALTHY after `unhealthy_threshold` failures in a row, "
        "HEALTHY after `healthy_threshold` successful full checks, DEGRADED while the scraped "
        "queue depth or KV use is over its bound. Queue depth, running requests and KV-cache "
        "use reach the engine through `record_load` every `metrics_interval_s` (jittered); "
        "`tick` runs every `tick_interval_s`.",
        "- **Metrics**: TTFT and end-to-end latency from the request's arrival at the gateway "
        "(retries included), over completed requests; output tokens/s over the time from the "
        "first arrival to the last completion (so overload shows as lower throughput); cache "
        "hit = cached prompt tokens / prompt tokens; imbalance = time average of the maximum "
        "in-flight (queued + running) over the time average of the mean, across live "
        "endpoints of a model, worst model; failed = never completed; to dead = attempts "
        "sent to a dead endpoint (after the prober reported it UNHEALTHY).\n",
        "## What the model leaves out\n",
        "- Prefills do not batch with each other (vLLM's chunked prefill packs several into one "
        "step), so a queue of prefills drains one at a time: the prefill work per second is "
        "the same, its interleaving is simplified.",
        "- A running request holds all the KV blocks of its prompt and output from admission, "
        "even blocks it shares with other running requests; there is no preemption or "
        "swapping, and decode speed does not depend on context length.",
        "- No network time between gateway, Decider and servers; a refused connection costs "
        "`connect_fail_s`. Crashed servers refuse connections at once (no hung sockets, so no "
        "timeouts).",
        "- One Decider sees every request, so its in-flight counts are exact; with several "
        "replicas each would see a share.",
        "- Token counts are given, not tokenized; block hashes are computed by the gateway at "
        "the servers' block size. Prompts are segments (content key, token count) with no "
        "text, so the simulator does not use the shared prefix-hash definition "
        "(docs/PREFIX_HASH.md, 64-byte blocks of text): it would have to make up about 24 KB "
        "of text for a 6000-token prompt and hash 375 blocks instead of 24 (0.7 ms against "
        "0.15 ms per request here), with an index sixteen times larger, to measure the same "
        "thing. What the engine relies on holds for both: block hashes are chained, so two "
        "prompts share their first k hashes exactly when they share their first k blocks.\n",
        "## Running it\n",
        "`make sim` runs the whole sweep (every workload under every strategy listed, on two "
        "processes; a few minutes on two cores) and rewrites this file and "
        "docs/img/sim_*.png. `python -m bench.sim --help` lists the options: `--seed`, "
        "`--scale` (multiplies every arrival window; 0.2 for a quick look), `--workloads`, "
        "`--strategies` (an empty name is the configured default), `--engine-config FILE` "
        "(a TOML file whose engine tables override the defaults, to try weights or "
        "thresholds), `--other-seeds` (more sweeps, for the targets and the table across "
        "seeds), `--jobs` "
        "and `--no-write` (print only). Runs share nothing and read no "
        "clock, and nothing depends on string hash order, so the numbers are the same for "
        "the same seed, engine and Python on any machine.\n",
        "## Parameters\n",
        f"- servers: {_params(server)}",
        f"- prober: {_params(ProberParams.from_probe_settings())}",
        f"- gateway: {_params(GatewayParams())}",
        "- engine: defaults, with `[cache] blocks_per_endpoint` set to the servers' "
        "`cache_blocks` (the index is sized like the caches it tracks)"
        + (f"; overrides: `{dict(engine_overrides)!r}`" if engine_overrides else ""),
        "- workloads: arrival windows are multiplied by the scale; every run lasts until the "
        "last request finishes.\n",
    ]
    return "\n".join(out)


def plots(results: Sequence[RunResult], default_strategy: str, img_dir: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    seconds = FuncFormatter(lambda v, _: f"{v:g}")

    groups = by_workload(results)
    names = list(groups)
    strategies = [r.strategy for r in groups[names[0]]] if names else []
    labels = [label(s, default_strategy) for s in strategies]
    colors = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]
    img_dir.mkdir(parents=True, exist_ok=True)

    cols = 4
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    width = 0.8 / max(1, len(strategies))
    for ax, name in zip(axes.flat, names, strict=False):
        runs = {r.strategy: r for r in groups[name]}
        for i, s in enumerate(strategies):
            r = runs[s]
            xs = [p + (i - (len(strategies) - 1) / 2) * width for p in range(3)]
            ax.bar(
                xs,
                [r.ttft_p50_s, r.ttft_p90_s, r.ttft_p99_s],
                width,
                color=colors[i % len(colors)],
                label=labels[i],
            )
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(seconds)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xticks(range(3), ["p50", "p90", "p99"])
        ax.set_title(name)
        ax.set_ylabel("TTFT (s)")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles, legend_labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, legend_labels, loc="lower right", ncol=1, fontsize="small")
    fig.suptitle("Time to first token by strategy (log scale, lower is better)")
    fig.tight_layout()
    ttft = img_dir / TTFT_PLOT
    fig.savefig(ttft, dpi=90, metadata={"Software": None})
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(12, 4.2))
    for i, s in enumerate(strategies):
        values = [next(r for r in groups[n] if r.strategy == s).output_tokens_per_s for n in names]
        xs = [p + (i - (len(strategies) - 1) / 2) * width for p in range(len(names))]
        ax.bar(xs, values, width, color=colors[i % len(colors)], label=labels[i])
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput by strategy (higher is better)")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    throughput = img_dir / THROUGHPUT_PLOT
    fig.savefig(throughput, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return ttft, throughput


def write_report(
    results: Sequence[RunResult],
    *,
    seed: int,
    scale: float,
    default_strategy: str,
    workloads: Sequence[Workload],
    engine_overrides: Mapping[str, Any],
    out: Path | None,
    img_dir: Path | None,
    other_seeds: Mapping[int, Sequence[RunResult]] | None = None,
) -> str:
    """Write the markdown (and plots when img_dir is given); returns the markdown."""
    text = markdown(
        results,
        seed=seed,
        scale=scale,
        default_strategy=default_strategy,
        workloads=workloads,
        engine_overrides=engine_overrides,
        with_plots=img_dir is not None,
        other_seeds=other_seeds,
    )
    if img_dir is not None:
        plots(results, default_strategy, img_dir)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text
