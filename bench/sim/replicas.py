"""The replica dimension: the gateway spreads requests over N Decider replicas, sharing on or off.

`Replicas` is a Router (cluster.Router) made of N real engines. Each request goes to the next
replica in turn; its outcome goes back to the replica that decided it; the prober's verdicts
and load scrapes reach every replica (one prober per fleet, or each its own: same verdicts).
With sharing on, each engine holds the shared owners of decider.state.shared_engine, and
their batches travel over a simulated bus that delivers them `sync_delay_s` after they are
sent, as StateSync does over Redis (flushed when the event loop is free, here after every
call). With sharing off, every replica routes from what it saw itself.

    python -m bench.sim.replicas            # the table for docs/SIMULATION.md
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sim.cluster import Cluster, GatewayParams, ProberParams
from bench.sim.metrics import RunResult
from bench.sim.workloads import WORKLOADS
from decider.core.engine import Engine
from decider.core.model import (
    Decision,
    Endpoint,
    HealthStatus,
    LoadReport,
    Outcome,
    Refusal,
    RouteRequest,
)
from decider.core.settings import EngineSettings
from decider.core.state import EngineState

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "SIMULATION.md"
BEGIN, END = "<!-- sim-replicas:begin -->", "<!-- sim-replicas:end -->"
# Redis on the same network: a PUBLISH reaches the other replicas in about a millisecond
# (bench-scale measures the registry's delay at a few milliseconds end to end).
SYNC_DELAY_S = 0.005
LOAD_SYNC_EVERY_S = 0.1
WORKLOADS_SHOWN = ("shared_prefix", "multi_turn")


class SimBus:
    """Batches in transit between replicas, delivered in send order once their time comes."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._in_transit: list[tuple[float, int, int, dict[str, list[Any]]]] = []
        self._seq = itertools.count()
        self.syncs: list[SimSync] = []

    def send(self, sender: int, batch: dict[str, list[Any]], now: float) -> None:
        heapq.heappush(self._in_transit, (now + self.delay_s, next(self._seq), sender, batch))

    def deliver(self, now: float) -> None:
        while self._in_transit and self._in_transit[0][0] <= now:
            _, _, sender, batch = heapq.heappop(self._in_transit)
            for index, sync in enumerate(self.syncs):
                if index != sender:
                    sync.receive(batch, now)


class SimSync:
    """StateSync's interface over the simulated bus (what the shared owners call)."""

    def __init__(self, bus: SimBus, index: int, *, interval_s: float) -> None:
        self._interval_s = interval_s
        self._bus = bus
        self._index = index
        self._items: dict[str, list[Any]] = {}
        self._charges: dict[tuple[str, str], list[int]] = {}
        self._appliers: dict[str, Callable[[list[Any], float], None]] = {}
        self._providers: dict[str, Callable[[], Any]] = {}
        bus.syncs.append(self)

    @property
    def interval_s(self) -> float:
        return self._interval_s

    def register(
        self,
        topic: str,
        apply: Callable[[list[Any], float], None],
        *,
        resend: Callable[[], None] | None = None,
        keep_while_down: int = 0,
    ) -> None:
        # The simulated bus never goes down: nothing is ever resent or kept for later.
        self._appliers[topic] = apply

    def queue(self, topic: str, item: Any) -> None:
        self._items.setdefault(topic, []).append(item)

    def provide(self, topic: str, provider: Callable[[], Any]) -> None:
        self._providers[topic] = provider

    def poke(self) -> None:
        """Batches go out after every call (flush) anyway."""

    def charge(self, kind: str, subject: str, requests: int, tokens: int) -> None:
        summed = self._charges.setdefault((kind, subject), [0, 0])
        summed[0] += requests
        summed[1] += tokens

    def flush(self, now: float) -> None:
        for topic, provider in self._providers.items():
            item = provider()
            if item is not None:
                self._items.setdefault(topic, []).append(item)
        if not self._items and not self._charges:
            return
        batch = self._items
        if self._charges:
            batch["charges"] = [[k, s, r, t] for (k, s), (r, t) in self._charges.items()]
        self._items, self._charges = {}, {}
        self._bus.send(self._index, batch, now)

    def receive(self, batch: dict[str, list[Any]], now: float) -> None:
        for topic, apply in self._appliers.items():
            items = batch.get(topic)
            if items:
                apply(items, now)


class Replicas:
    """N engines behind one Router; `shared` wires them through the simulated bus."""

    def __init__(
        self,
        tables: dict[str, Any],
        *,
        count: int,
        shared: bool,
        seed: int,
        load_sync_s: float = LOAD_SYNC_EVERY_S,
    ) -> None:
        from decider.state.shared_engine import SharedLoad, shared_state

        settings = EngineSettings.parse(tables)
        self._bus = SimBus(SYNC_DELAY_S) if shared else None
        self.engines: list[Engine] = []
        self._syncs: list[SimSync] = []
        self._loads: list[SharedLoad] = []
        for index in range(count):
            rng = random.Random(f"engine/{seed}/{index}")
            state: EngineState | None = None
            if self._bus is not None:
                sync = SimSync(self._bus, index, interval_s=load_sync_s)
                clock = self._now
                state, load = shared_state(
                    EngineState.in_memory(settings, rng=rng),
                    sync,  # type: ignore[arg-type]
                    clock=clock,
                    ttl_s=settings.affinity.ttl_s,
                    replica_id=f"replica-{index}",
                )
                self._syncs.append(sync)
                self._loads.append(load)
            engine = Engine(settings, rng=rng, state=state)
            if self._loads and len(self._loads) == index + 1:
                self._loads[index].on_change = lambda ids, now, e=engine: e.rescore_load(
                    ids, now=now
                )
            self.engines.append(engine)
        self._turn = 0
        self._decided_by: dict[str, int] = {}
        self._time = 0.0
        self._next_load_sync = 0.0
        self._load_sync_s = load_sync_s

    def _now(self) -> float:
        return self._time

    def _before(self, now: float) -> None:
        self._time = now
        if self._bus is not None:
            self._bus.deliver(now)

    def _after(self, index: int, now: float) -> None:
        if self._bus is not None:
            self._syncs[index].flush(now)

    # -- cluster.Router ---------------------------------------------------------------------------

    def set_endpoints(self, endpoints: Sequence[Endpoint], *, now: float) -> None:
        for engine in self.engines:
            engine.set_endpoints(endpoints, now=now)

    def decide(self, request: RouteRequest, *, now: float) -> Decision | Refusal:
        self._before(now)
        index = self._turn
        self._turn = (self._turn + 1) % len(self.engines)
        answer = self.engines[index].decide(request, now=now)
        if isinstance(answer, Decision):
            self._decided_by[answer.decision_id] = index
        self._after(index, now)
        return answer

    def record_outcome(self, outcome: Outcome, *, now: float) -> bool:
        self._before(now)
        index = self._decided_by.pop(outcome.decision_id, 0)
        found = self.engines[index].record_outcome(outcome, now=now)
        self._after(index, now)
        return found

    def set_health(
        self, endpoint_id: str, status: HealthStatus, *, reason: str, now: float
    ) -> None:
        self._before(now)
        for engine in self.engines:
            engine.set_health(endpoint_id, status, reason=reason, now=now)

    def record_load(self, endpoint_id: str, load: LoadReport, *, now: float) -> None:
        self._before(now)
        for engine in self.engines:
            engine.record_load(endpoint_id, load, now=now)

    def tick(self, *, now: float) -> None:
        self._before(now)
        for index, engine in enumerate(self.engines):
            engine.tick(now=now)
            if self._loads and now >= self._next_load_sync:
                self._loads[index].sync_once(now)
            self._after(index, now)
        if now >= self._next_load_sync:
            self._next_load_sync = now + self._load_sync_s


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaSpec:
    workload: str
    replicas: int
    shared: bool
    seed: int
    scale: float
    load_sync_s: float = LOAD_SYNC_EVERY_S


def run_one(spec: ReplicaSpec) -> RunResult:
    from bench.sim.run import engine_tables_for

    workload = WORKLOADS[spec.workload](spec.seed, scale=spec.scale)
    router = Replicas(
        engine_tables_for(workload, {}),
        count=spec.replicas,
        shared=spec.shared,
        seed=spec.seed,
        load_sync_s=spec.load_sync_s,
    )
    cluster = Cluster(
        workload,
        router,
        strategy="",
        seed=spec.seed,
        prober=ProberParams.from_probe_settings(),
        gateway=GatewayParams(),
    )
    return cluster.run()


def table(
    *,
    seed: int = 7,
    scale: float = 1.0,
    replicas: int = 4,
    jobs: int = 2,
    load_sync_s: float = LOAD_SYNC_EVERY_S,
) -> tuple[str, list[tuple[ReplicaSpec, RunResult]]]:
    specs = [
        ReplicaSpec(
            workload=w,
            replicas=n,
            shared=shared,
            seed=seed,
            scale=scale,
            load_sync_s=load_sync_s,
        )
        for w in WORKLOADS_SHOWN
        for n, shared in ((1, False), (replicas, True), (replicas, False))
    ]
    if jobs <= 1:
        results = [run_one(s) for s in specs]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(run_one, specs))
    rows = list(zip(specs, results, strict=True))
    lines = [
        f"The default strategy with the gateway spreading requests over {replicas} replicas in "
        f"turn, against one replica (seed {seed}, scale {scale:g}; shared state delivered "
        f"{SYNC_DELAY_S * 1000:g} ms after it changes). `python -m bench.sim.replicas`.",
        "",
        "| workload | replicas | sharing | TTFT p50 s | TTFT p90 s | p90 vs one replica |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for workload in WORKLOADS_SHOWN:
        mine = [(s, r) for s, r in rows if s.workload == workload]
        one = next(r for s, r in mine if s.replicas == 1)
        for spec, result in mine:
            sharing = "-" if spec.replicas == 1 else ("on" if spec.shared else "off")
            ratio = result.ttft_p90_s / one.ttft_p90_s if one.ttft_p90_s else float("nan")
            lines.append(
                f"| {workload} | {spec.replicas} | {sharing} | {result.ttft_p50_s:.3f} "
                f"| {result.ttft_p90_s:.3f} | {ratio:.2f}x |"
            )
    return "\n".join(lines), rows


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Several replicas\n\n" + block + "\n"
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sim.replicas", description=__doc__)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--load-sync-ms",
        type=float,
        default=LOAD_SYNC_EVERY_S * 1000,
        help="[state] sync_interval_ms: how often replicas send their in-flight counts",
    )
    parser.add_argument("--out", type=Path, default=DOC)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    body, _ = table(
        seed=args.seed,
        scale=args.scale,
        replicas=args.replicas,
        jobs=args.jobs,
        load_sync_s=args.load_sync_ms / 1000,
    )
    print(body)
    if not args.no_write:
        write_section(args.out, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
