"""Workloads: the cluster, the sessions that arrive, and the faults, all drawn from one seed.

A workload is plain data built before the run, so every strategy sees exactly the same
requests. Independent requests are one-turn sessions; a multi-turn session's next turn is
sent when the previous one finishes (plus think time), so its prompt can include the answer.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

from .cache import Segment
from .server import ServerParams

FaultKind = Literal["crash", "recover", "slow"]


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSpec:
    id: str
    model: str
    capabilities: frozenset[str] = frozenset()
    slow_factor: float = 1.0
    params: ServerParams = field(default_factory=ServerParams)


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    endpoint_id: str
    at_s: float
    kind: FaultKind
    # For "slow": the new slow factor (1.0 is normal speed).
    factor: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Turn:
    # The whole prompt, history included.
    segments: tuple[Segment, ...]
    output_tokens: int
    # Content key of the answer, so the next turn's prompt can contain it.
    response_key: int
    # Delay after the previous turn finished; the first turn starts at the session start.
    think_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    id: str
    start_s: float
    model: str
    tenant: str
    turns: tuple[Turn, ...]
    required_capabilities: frozenset[str] = frozenset()
    # Whether the gateway sends session_id (multi-turn chat) or not (independent requests).
    sticky: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    name: str
    description: str
    endpoints: tuple[EndpointSpec, ...]
    sessions: tuple[Session, ...]
    faults: tuple[Fault, ...] = ()
    # Arrivals happen in [0, arrival_window_s); the run lasts until every request is done.
    arrival_window_s: float
    # Shown in the parameters section of the report.
    parameters: tuple[tuple[str, str], ...] = ()

    @property
    def request_count(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


# -- building blocks ----------------------------------------------------------------------


class _Keys:
    """Content keys: system prompts by tenant, everything else unique."""

    def __init__(self) -> None:
        self._unique = itertools.count(10_000_000)

    @staticmethod
    def system(tenant: int) -> int:
        return 1_000_000 + tenant

    def fresh(self) -> int:
        return next(self._unique)


def _poisson(rng: random.Random, rate_per_s: float, window_s: float) -> Iterator[float]:
    t = rng.expovariate(rate_per_s)
    while t < window_s:
        yield t
        t += rng.expovariate(rate_per_s)


def _modulated(
    rng: random.Random, rate_at: Callable[[float], float], peak_per_s: float, window_s: float
) -> Iterator[float]:
    # Thinning (Lewis and Shedler): candidates at the peak rate, kept with rate(t) / peak.
    for t in _poisson(rng, peak_per_s, window_s):
        if rng.random() * peak_per_s < rate_at(t):
            yield t


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k + 1) ** s for k in range(n)]


def _endpoints(
    count: int, *, model: str = "llama-3-8b", params: ServerParams | None = None, first: int = 0
) -> list[EndpointSpec]:
    p = params or ServerParams()
    return [EndpointSpec(id=f"ep-{first + i}", model=model, params=p) for i in range(count)]


def _one_turn(
    *,
    sid: str,
    start_s: float,
    model: str,
    tenant: str,
    segments: tuple[Segment, ...],
    output_tokens: int,
    keys: _Keys,
    capabilities: frozenset[str] = frozenset(),
) -> Session:
    turn = Turn(segments=segments, output_tokens=output_tokens, response_key=keys.fresh())
    return Session(
        id=sid,
        start_s=start_s,
        model=model,
        tenant=tenant,
        turns=(turn,),
        required_capabilities=capabilities,
    )


# -- the workloads ------------------------------------------------------------------------


def uniform(seed: int, *, scale: float = 1.0) -> Workload:
    """Independent prompts with nothing shared: pure load balancing."""
    rng = random.Random(f"uniform/{seed}")
    keys = _Keys()
    rate, window = 16.0, 90.0 * scale
    sessions = [
        _one_turn(
            sid=f"u{i}",
            start_s=t,
            model="llama-3-8b",
            tenant=f"t{rng.randrange(20)}",
            segments=((keys.fresh(), rng.randint(500, 3000)),),
            output_tokens=rng.randint(50, 350),
            keys=keys,
        )
        for i, t in enumerate(_poisson(rng, rate, window))
    ]
    return Workload(
        name="uniform",
        description="8 endpoints, independent 500-3000-token prompts, Poisson arrivals",
        endpoints=tuple(_endpoints(8)),
        sessions=tuple(sessions),
        arrival_window_s=window,
        parameters=(("arrivals", f"Poisson {rate:g}/s"), ("output tokens", "50-350")),
    )


def shared_prefix(seed: int, *, scale: float = 1.0) -> Workload:
    """Many tenants, each with a long system prompt shared by all its requests."""
    rng = random.Random(f"shared_prefix/{seed}")
    keys = _Keys()
    tenants, system_tokens, rate, window = 150, 6000, 24.0, 90.0 * scale
    weights = _zipf_weights(tenants, 0.5)
    sessions = []
    for i, t in enumerate(_poisson(rng, rate, window)):
        tenant = rng.choices(range(tenants), weights)[0]
        segments = ((keys.system(tenant), system_tokens), (keys.fresh(), rng.randint(100, 400)))
        sessions.append(
            _one_turn(
                sid=f"s{i}",
                start_s=t,
                model="llama-3-8b",
                tenant=f"tenant-{tenant}",
                segments=segments,
                output_tokens=rng.randint(50, 250),
                keys=keys,
            )
        )
    return Workload(
        name="shared_prefix",
        description=(
            f"8 endpoints, {tenants} tenants with {system_tokens}-token system prompts "
            "(Zipf 0.5 popularity), 100-400 new tokens per request"
        ),
        endpoints=tuple(_endpoints(8)),
        sessions=tuple(sessions),
        arrival_window_s=window,
        parameters=(("arrivals", f"Poisson {rate:g}/s"), ("output tokens", "50-250")),
    )


def multi_turn(seed: int, *, scale: float = 1.0) -> Workload:
    """Chat sessions whose prompt grows by the last answer and a new message every turn."""
    rng = random.Random(f"multi_turn/{seed}")
    keys = _Keys()
    apps, system_tokens, rate, window = 12, 1500, 3.0, 90.0 * scale
    sessions = []
    for i, start in enumerate(_poisson(rng, rate, window)):
        app = rng.randrange(apps)
        history: list[Segment] = [(keys.system(app), system_tokens)]
        turns = []
        for k in range(rng.randint(5, 12)):
            first = k == 0
            # The first message brings a document; later ones are short follow-ups.
            user = rng.randint(300, 1500) if first else rng.randint(50, 300)
            history.append((keys.fresh(), user))
            out = rng.randint(200, 500)
            turn = Turn(
                segments=tuple(history),
                output_tokens=out,
                response_key=keys.fresh(),
                think_s=0.0 if first else rng.uniform(5.0, 30.0),
            )
            turns.append(turn)
            history.append((turn.response_key, out))
        sessions.append(
            Session(
                id=f"chat-{i}",
                start_s=start,
                model="llama-3-8b",
                tenant=f"app-{app}",
                turns=tuple(turns),
                sticky=True,
            )
        )
    return Workload(
        name="multi_turn",
        description=(
            f"8 endpoints, chat sessions of 5-12 turns ({apps} apps with {system_tokens}-token "
            "system prompts, a 300-1500-token first message, 50-300-token "
            "follow-ups); each prompt holds the whole conversation so far"
        ),
        endpoints=tuple(_endpoints(8)),
        sessions=tuple(sessions),
        arrival_window_s=window,
        parameters=(
            ("session arrivals", f"Poisson {rate:g}/s"),
            ("think time", "5-30 s"),
            ("output tokens", "200-500"),
        ),
    )


def bursty(seed: int, *, scale: float = 1.0) -> Workload:
    """On/off bursts: 5 s at 3x the mean rate, then 15 s at a third of it."""
    rng = random.Random(f"bursty/{seed}")
    keys = _Keys()
    tenants, system_tokens, mean, window = 40, 2000, 14.0, 100.0 * scale
    period_s, on_s, on_mult = 20.0, 5.0, 3.0
    off_mult = (1.0 - on_mult * on_s / period_s) / (1.0 - on_s / period_s)

    def rate_at(t: float) -> float:
        return mean * (on_mult if t % period_s < on_s else off_mult)

    sessions = []
    for i, t in enumerate(_modulated(rng, rate_at, mean * on_mult, window)):
        tenant = rng.randrange(tenants)
        segments = ((keys.system(tenant), system_tokens), (keys.fresh(), rng.randint(200, 1500)))
        sessions.append(
            _one_turn(
                sid=f"b{i}",
                start_s=t,
                model="llama-3-8b",
                tenant=f"tenant-{tenant}",
                segments=segments,
                output_tokens=rng.randint(50, 300),
                keys=keys,
            )
        )
    return Workload(
        name="bursty",
        description=(
            f"8 endpoints, {tenants} tenants with {system_tokens}-token system prompts, "
            f"bursts of {on_s:g} s at {on_mult:g}x the mean every {period_s:g} s"
        ),
        endpoints=tuple(_endpoints(8)),
        sessions=tuple(sessions),
        arrival_window_s=window,
        parameters=(
            ("arrivals", f"mean {mean:g}/s, {on_mult:g}x for {on_s:g} s every {period_s:g} s"),
        ),
    )


def crash(seed: int, *, scale: float = 1.0) -> Workload:
    """Shared prefixes at moderate load; one endpoint dies a third of the way in and comes back."""
    rng = random.Random(f"crash/{seed}")
    keys = _Keys()
    tenants, system_tokens, rate, window = 60, 3000, 16.0, 120.0 * scale
    sessions = []
    for i, t in enumerate(_poisson(rng, rate, window)):
        tenant = rng.randrange(tenants)
        segments = ((keys.system(tenant), system_tokens), (keys.fresh(), rng.randint(100, 800)))
        sessions.append(
            _one_turn(
                sid=f"c{i}",
                start_s=t,
                model="llama-3-8b",
                tenant=f"tenant-{tenant}",
                segments=segments,
                output_tokens=rng.randint(50, 300),
                keys=keys,
            )
        )
    crash_s, recover_s = round(window / 3, 3), round(2 * window / 3, 3)
    return Workload(
        name="crash",
        description=(
            f"8 endpoints, {tenants} tenants with {system_tokens}-token system prompts; ep-3 "
            f"crashes at {crash_s:g} s and restarts (cold cache) at {recover_s:g} s"
        ),
        endpoints=tuple(_endpoints(8)),
        sessions=tuple(sessions),
        faults=(
            Fault(endpoint_id="ep-3", at_s=crash_s, kind="crash"),
            Fault(endpoint_id="ep-3", at_s=recover_s, kind="recover"),
        ),
        arrival_window_s=window,
        parameters=(("arrivals", f"Poisson {rate:g}/s"),),
    )


def slow_endpoint(seed: int, *, scale: float = 1.0) -> Workload:
    """Independent prompts; one endpoint slows to a third of its speed but answers its probes."""
    rate, window = 13.0, 90.0 * scale
    rng = random.Random(f"slow_endpoint/{seed}")
    keys = _Keys()
    sessions = [
        _one_turn(
            sid=f"w{i}",
            start_s=t,
            model="llama-3-8b",
            tenant=f"t{rng.randrange(20)}",
            segments=((keys.fresh(), rng.randint(500, 3000)),),
            output_tokens=rng.randint(50, 350),
            keys=keys,
        )
        for i, t in enumerate(_poisson(rng, rate, window))
    ]
    slow_at_s = 20.0
    return Workload(
        name="slow_endpoint",
        description=(
            f"8 endpoints; ep-7 drops to a third of its speed at {slow_at_s:g} s and stays there, "
            "answering every probe (slow but alive); independent 500-3000-token prompts"
        ),
        endpoints=tuple(_endpoints(8)),
        faults=(Fault(endpoint_id="ep-7", at_s=slow_at_s, kind="slow", factor=3.0),),
        sessions=tuple(sessions),
        arrival_window_s=window,
        parameters=(("arrivals", f"Poisson {rate:g}/s"), ("slow factor of ep-7", "3")),
    )


def two_models(seed: int, *, scale: float = 1.0) -> Workload:
    """Two models; a fifth of the small model's requests need vision, which two endpoints have."""
    rng = random.Random(f"two_models/{seed}")
    keys = _Keys()
    tenants, system_tokens, rate, window = 30, 1500, 12.0, 90.0 * scale
    small = _endpoints(6, model="llama-3-8b")
    for i in (0, 1):
        small[i] = replace(small[i], capabilities=frozenset({"vision"}))
    large = [
        replace(e, slow_factor=2.0, capabilities=frozenset({"tools"}))
        for e in _endpoints(3, model="qwen-2.5-32b", first=6)
    ]
    sessions = []
    for i, t in enumerate(_poisson(rng, rate, window)):
        is_large = rng.random() < 0.3
        tenant = rng.randrange(tenants)
        caps: frozenset[str] = frozenset()
        if is_large:
            caps = frozenset({"tools"})
        elif rng.random() < 0.2:
            caps = frozenset({"vision"})
        segments = ((keys.system(tenant), system_tokens), (keys.fresh(), rng.randint(100, 1500)))
        sessions.append(
            _one_turn(
                sid=f"m{i}",
                start_s=t,
                model="qwen-2.5-32b" if is_large else "llama-3-8b",
                tenant=f"tenant-{tenant}",
                segments=segments,
                output_tokens=rng.randint(50, 300),
                keys=keys,
                capabilities=caps,
            )
        )
    return Workload(
        name="two_models",
        description=(
            "6 endpoints of llama-3-8b (ep-0 and ep-1 with vision) and 3 of qwen-2.5-32b at half "
            "the speed; 30% of requests for qwen (needing tools), 20% of the rest need vision"
        ),
        endpoints=tuple(small + large),
        sessions=tuple(sessions),
        arrival_window_s=window,
        parameters=(("arrivals", f"Poisson {rate:g}/s"),),
    )


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "uniform": uniform,
    "shared_prefix": shared_prefix,
    "multi_turn": multi_turn,
    "bursty": bursty,
    "crash": crash,
    "slow_endpoint": slow_endpoint,
    "two_models": two_models,
}

# Workloads whose requests share long prefixes: where cache-aware routing must pay off.
PREFIX_HEAVY = ("shared_prefix", "multi_turn")
