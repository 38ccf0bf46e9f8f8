"""Cluster: simulated servers, a gateway and a prober around one router (the real Engine).

The gateway turns every request into a decide() at simulated `now`, sends it where the
decision says, retries on the fallbacks when the connection fails, and reports every attempt
with record_outcome(). The prober reaches the router only through set_health() and
record_load(), on the schedule and with the thresholds the real prober has (ProbeSettings).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from decider.core.model import (
    Decision,
    Endpoint,
    HealthStatus,
    LoadReport,
    MetricsKind,
    Outcome,
    Refusal,
    Result,
    RouteRequest,
)

from .cache import block_hashes, token_count
from .events import EventLoop
from .metrics import Imbalance, RunResult, percentile
from .server import Job, SimServer
from .workloads import Session, Workload

# The simulator's own strategy name: the oracle reads the servers' true queues and caches (no
# router can) and sends each request where its predicted time to first token is lowest, its own
# prefill counted twice: once as its wait, once as the wait it puts on the requests behind it.
# Counted once (pure greedy TTFT), it sent a tenant to an idle server with a cold cache rather
# than wait for a warm one, duplicated 6000-token prefills, and lost to the engine on
# shared_prefix (TTFT p90 2.72 s against 2.22 s at seed 7). It is the yardstick every strategy
# is read against, not a strategy of the engine.
ORACLE = "oracle"
ORACLE_PREFILL_WEIGHT = 2.0


class Router(Protocol):
    """The part of decider.core.engine.Engine the simulator calls."""

    def set_endpoints(self, endpoints: Sequence[Endpoint], *, now: float) -> None: ...
    def decide(self, request: RouteRequest, *, now: float) -> Decision | Refusal: ...
    def record_outcome(self, outcome: Outcome, *, now: float) -> bool: ...
    def set_health(
        self, endpoint_id: str, status: HealthStatus, *, reason: str, now: float
    ) -> None: ...
    def record_load(self, endpoint_id: str, load: LoadReport, *, now: float) -> None: ...
    def tick(self, *, now: float) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ProberParams:
    """The prober's schedule and thresholds; `from_probe_settings` copies the real defaults."""

    interval_s: float = 30.0
    jitter_fraction: float = 0.1
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    unhealthy_interval_s: float = 1.0
    liveness_interval_s: float = 2.0
    metrics_interval_s: float = 2.0
    degraded_queue_depth: int = 32
    degraded_kv_cache_utilization: float = 0.98
    # A reported failed request makes the prober check that endpoint at once (issue 4).
    probe_on_error: bool = True

    @classmethod
    def from_probe_settings(cls) -> ProberParams:
        """The defaults of probe.settings.ProbeSettings where it has them, else ours."""
        try:
            from probe.settings import ProbeSettings
        except ImportError:
            return cls()
        real = ProbeSettings()
        ours = cls()
        return cls(
            **{
                name: getattr(real, name, getattr(ours, name))
                for name in cls.__dataclass_fields__
                if name != "probe_on_error"
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayParams:
    # A connection to a dead server is refused after this long.
    connect_fail_s: float = 0.002
    # Used when the decision gives no retry advice.
    max_attempts: int = 3
    tick_interval_s: float = 0.1
    sample_interval_s: float = 0.25


class _Flight:
    """One request at the gateway, across its attempts."""

    __slots__ = (
        "arrival_s",
        "attempts",
        "decision",
        "first_token_s",
        "job",
        "next_target",
        "sent_s",
        "session",
        "targets",
        "tried",
        "turn",
    )

    def __init__(self, session: Session, turn: int, arrival_s: float) -> None:
        self.session = session
        self.turn = turn
        self.arrival_s = arrival_s
        self.attempts = 0
        self.decision: Decision | None = None
        self.targets: list[Endpoint] = []
        self.next_target = 0
        self.tried: set[str] = set()
        self.job: Job | None = None
        self.sent_s = 0.0
        self.first_token_s = -1.0


class _ProbeState:
    __slots__ = (
        "chain",
        "failures",
        "http_due_s",
        "http_started_s",
        "load_reason",
        "published",
        "successes",
        "verdict",
    )

    def __init__(self) -> None:
        self.verdict = HealthStatus.UNKNOWN
        self.failures = 0
        self.successes = 0
        self.load_reason = ""
        self.published = HealthStatus.UNKNOWN
        # Generation of the scheduled HTTP check; rescheduling makes the old event a no-op.
        self.chain = 0
        self.http_due_s = math.inf
        self.http_started_s = -math.inf

    @property
    def failing(self) -> bool:
        return self.failures > 0 or self.verdict is HealthStatus.UNHEALTHY


class Cluster:
    """One workload, one strategy, one router: run() returns what was measured."""

    def __init__(
        self,
        workload: Workload,
        router: Router,
        *,
        strategy: str = "",
        seed: int = 0,
        prober: ProberParams | None = None,
        gateway: GatewayParams | None = None,
    ) -> None:
        self.workload = workload
        self.router = router
        self.strategy = strategy
        self.loop = EventLoop()
        self.prober = prober or ProberParams.from_probe_settings()
        self.gateway = gateway or GatewayParams()
        # Probe phases and jitter only; the workload has its own seed and the router its own.
        self._rng = random.Random(f"prober/{seed}")
        self.servers = {
            e.id: SimServer(e.id, e.params, self.loop, self, slow_factor=e.slow_factor)
            for e in workload.endpoints
        }
        self.endpoints = {
            e.id: Endpoint(
                id=e.id,
                address=f"10.0.0.{i + 1}:8000",
                model=e.model,
                health_url=f"http://10.0.0.{i + 1}:8000/health",
                metrics_url=f"http://10.0.0.{i + 1}:8000/metrics",
                metrics_kind=MetricsKind.VLLM,
                capabilities=e.capabilities,
            )
            for i, e in enumerate(workload.endpoints)
        }
        self._groups: dict[str, list[str]] = {}
        for e in workload.endpoints:
            self._groups.setdefault(e.model, []).append(e.id)
        self._probe = {eid: _ProbeState() for eid in self.servers}
        self._block_tokens = {e.id: e.params.block_tokens for e in workload.endpoints}
        # Crash time of each endpoint that is down, and when the prober then told the router
        # it is UNHEALTHY (absent until it does).
        self._down_since: dict[str, float] = {}
        self._detected_at: dict[str, float] = {}
        self._detection_delays: list[float] = []
        self._open_sessions = len(workload.sessions)
        self._imbalance = Imbalance()
        self._ttft: list[float] = []
        self._e2e: list[float] = []
        self._output_tokens = 0
        self._completed = 0
        self._failed = 0
        self._retries = 0
        self._sent_to_dead = 0
        self._sent_to_dead_after = 0
        self._last_done_s = 0.0
        self._request_seq = 0

    # -- running -----------------------------------------------------------------------

    def run(self) -> RunResult:
        loop = self.loop
        self.router.set_endpoints(list(self.endpoints.values()), now=0.0)
        for eid in self.servers:
            # Every endpoint passes a full check before traffic (the Decider was already up),
            # then liveness checks and scrapes start at random phases.
            self._schedule_http(eid, 0.0)
            loop.at(self._rng.uniform(0, self.prober.liveness_interval_s), self._liveness, eid)
            loop.at(self._rng.uniform(0, self.prober.metrics_interval_s), self._scrape, eid)
        for fault in self.workload.faults:
            loop.at(fault.at_s, self._fault, fault.endpoint_id, fault.kind, fault.factor)
        for session in self.workload.sessions:
            loop.at(session.start_s, self._arrive_turn, session, 0)
        loop.at(0.0, self._tick)
        loop.at(0.0, self._sample)
        if not self.workload.sessions:
            self._open_sessions = 0
        loop.run()
        return self._result()

    @property
    def _active(self) -> bool:
        return self._open_sessions > 0

    def _tick(self, now: float) -> None:
        self.router.tick(now=now)
        if self._active:
            self.loop.at(now + self.gateway.tick_interval_s, self._tick)

    def _sample(self, now: float) -> None:
        for group, ids in self._groups.items():
            alive = [self.servers[i] for i in ids if self.servers[i].alive]
            self._imbalance.sample(group, [s.in_flight for s in alive])
        if self._active:
            self.loop.at(now + self.gateway.sample_interval_s, self._sample)

    def _fault(self, endpoint_id: str, kind: str, factor: float, now: float) -> None:
        server = self.servers[endpoint_id]
        if kind == "crash":
            self._down_since[endpoint_id] = now
            server.crash(now)
        elif kind == "recover":
            self._down_since.pop(endpoint_id, None)
            self._detected_at.pop(endpoint_id, None)
            server.recover(now)
        else:
            server.set_slow_factor(factor, now)

    # -- gateway -----------------------------------------------------------------------

    def _arrive_turn(self, session: Session, turn: int, now: float) -> None:
        self._decide(_Flight(session, turn, now), now)

    def _decide(self, flight: _Flight, now: float) -> None:
        if self.strategy == ORACLE:
            self._decide_oracle(flight, now)
            return
        session = flight.session
        spec = session.turns[flight.turn]
        self._request_seq += 1
        # Blocks are hashed at the size of the endpoints' cache blocks (the same everywhere
        # in our workloads), as a gateway hashing for vLLM would.
        block = next(iter(self._block_tokens.values()))
        request = RouteRequest(
            model=session.model,
            request_id=f"r{self._request_seq}",
            session_id=session.id if session.sticky else "",
            tenant=session.tenant,
            required_capabilities=session.required_capabilities,
            estimated_input_tokens=token_count(spec.segments),
            prefix_hashes=block_hashes(spec.segments, block),
            exclude_endpoint_ids=frozenset(flight.tried),
            strategy=self.strategy,
        )
        answer = self.router.decide(request, now=now)
        if isinstance(answer, Refusal):
            self._give_up(flight, now)
            return
        flight.decision = answer
        flight.targets = [answer.endpoint, *answer.fallbacks]
        flight.next_target = 0
        self._send(flight, now)

    def _decide_oracle(self, flight: _Flight, now: float) -> None:
        """The live endpoint of the model, with the capabilities, that answers first (its
        prefill weighted as ORACLE_PREFILL_WEIGHT says)."""
        session = flight.session
        spec = session.turns[flight.turn]
        tokens = token_count(spec.segments)
        hashes: dict[int, tuple[int, ...]] = {}
        best: tuple[float, int, int] | None = None
        chosen = ""
        for order, eid in enumerate(self._groups.get(session.model, ())):
            server = self.servers[eid]
            endpoint = self.endpoints[eid]
            if (
                not server.alive
                or eid in flight.tried
                or not session.required_capabilities <= endpoint.capabilities
            ):
                continue
            b = server.params.block_tokens
            blocks = hashes.get(b)
            if blocks is None:
                blocks = hashes[b] = block_hashes(spec.segments, b)
            wait_s, prefill_s = server.predict_ttft(tokens, blocks, now)
            key = (wait_s + ORACLE_PREFILL_WEIGHT * prefill_s, server.in_flight, order)
            if best is None or key < best:
                best, chosen = key, eid
        if not chosen:
            self._give_up(flight, now)
            return
        flight.decision = None
        flight.targets = [self.endpoints[chosen]]
        flight.next_target = 0
        self._send(flight, now)

    def _max_attempts(self, flight: _Flight) -> int:
        d = flight.decision
        if d is not None and d.retry.max_attempts > 0:
            return d.retry.max_attempts
        return self.gateway.max_attempts

    def _send(self, flight: _Flight, now: float) -> None:
        endpoint = flight.targets[flight.next_target]
        flight.next_target += 1
        flight.attempts += 1
        flight.tried.add(endpoint.id)
        flight.sent_s = now
        server = self.servers[endpoint.id]
        if not server.alive:
            self._sent_to_dead += 1
            if now >= self._detected_at.get(endpoint.id, math.inf):
                self._sent_to_dead_after += 1
            self.loop.at(now + self.gateway.connect_fail_s, self._refused, flight, endpoint.id)
            return
        spec = flight.session.turns[flight.turn]
        b = server.params.block_tokens
        job = Job(
            prompt_tokens=token_count(spec.segments),
            output_tokens=spec.output_tokens,
            prompt_blocks=block_hashes(spec.segments, b),
            sequence_blocks=block_hashes(
                (*spec.segments, (spec.response_key, spec.output_tokens)), b
            ),
            owner=flight,
        )
        flight.job = job
        server.submit(job, now)

    def _refused(self, flight: _Flight, endpoint_id: str, now: float) -> None:
        self._report(flight, endpoint_id, Result.ERROR, now)
        self._retry(flight, now)

    def _retry(self, flight: _Flight, now: float) -> None:
        if flight.attempts >= self._max_attempts(flight):
            self._give_up(flight, now)
            return
        self._retries += 1
        if flight.next_target < len(flight.targets):
            self._send(flight, now)
        else:
            # Fallbacks used up: ask again, leaving out every endpoint already tried.
            self._decide(flight, now)

    def _report(self, flight: _Flight, endpoint_id: str, result: Result, now: float) -> None:
        if flight.decision is not None:
            self._record_outcome(flight, flight.decision, endpoint_id, result, now)
        if result is not Result.SUCCESS and self.prober.probe_on_error:
            self._probe_now(endpoint_id, now)

    def _record_outcome(
        self, flight: _Flight, decision: Decision, endpoint_id: str, result: Result, now: float
    ) -> None:
        job = flight.job
        ok = result is Result.SUCCESS and job is not None
        self.router.record_outcome(
            Outcome(
                decision_id=decision.decision_id,
                endpoint_id=endpoint_id,
                result=result,
                latency_s=now - flight.sent_s,
                ttft_s=job.first_token_s - flight.sent_s if ok and job is not None else 0.0,
                input_tokens=job.prompt_tokens if ok and job is not None else 0,
                output_tokens=job.output_tokens if ok and job is not None else 0,
            ),
            now=now,
        )

    def _give_up(self, flight: _Flight, now: float) -> None:
        self._failed += 1
        self._last_done_s = max(self._last_done_s, now)
        self._session_done()

    def _session_done(self) -> None:
        self._open_sessions -= 1

    # ServerListener: the servers call these.

    def on_first_token(self, job: Job, now: float) -> None:
        flight: _Flight = job.owner
        flight.first_token_s = now

    def on_complete(self, job: Job, now: float) -> None:
        flight: _Flight = job.owner
        self._report(flight, self._endpoint_of(flight), Result.SUCCESS, now)
        self._ttft.append(flight.first_token_s - flight.arrival_s)
        self._e2e.append(now - flight.arrival_s)
        self._output_tokens += job.output_tokens
        self._completed += 1
        self._last_done_s = max(self._last_done_s, now)
        nxt = flight.turn + 1
        if nxt < len(flight.session.turns):
            think = flight.session.turns[nxt].think_s
            self.loop.at(now + think, self._arrive_turn, flight.session, nxt)
        else:
            self._session_done()

    def on_fail(self, job: Job, now: float) -> None:
        flight: _Flight = job.owner
        endpoint_id = self._endpoint_of(flight)
        streamed = job.first_token_s >= 0
        self._report(flight, endpoint_id, Result.ERROR, now)
        if streamed:
            # Tokens already reached the client: a gateway cannot retry transparently.
            self._give_up(flight, now)
        else:
            self.loop.at(now, self._retry_later, flight)

    def _retry_later(self, flight: _Flight, now: float) -> None:
        self._retry(flight, now)

    @staticmethod
    def _endpoint_of(flight: _Flight) -> str:
        return flight.targets[flight.next_target - 1].id

    # -- prober ------------------------------------------------------------------------

    def _jittered(self, interval_s: float) -> float:
        return interval_s * (1.0 - self._rng.uniform(0.0, self.prober.jitter_fraction))

    # The schedule follows probe.prober.Prober: full checks every interval_s (jittered
    # shorter), liveness checks in between that are skipped while the endpoint is failing,
    # HTTP re-checks every unhealthy_interval_s while failing, and probe_soon() for a failed
    # request, at most once per unhealthy_interval_s.

    def _schedule_http(self, endpoint_id: str, due_s: float) -> None:
        state = self._probe[endpoint_id]
        state.chain += 1
        state.http_due_s = due_s
        self.loop.at(due_s, self._http_check, endpoint_id, state.chain)

    def _http_check(self, endpoint_id: str, chain: int, now: float) -> None:
        state = self._probe[endpoint_id]
        if chain != state.chain:
            return
        state.http_due_s = math.inf
        state.http_started_s = now
        self._observe(endpoint_id, ok=self.servers[endpoint_id].alive, http=True, now=now)
        if self._active:
            p = self.prober
            delay = p.unhealthy_interval_s if state.failing else self._jittered(p.interval_s)
            self._schedule_http(endpoint_id, now + delay)

    def _probe_now(self, endpoint_id: str, now: float) -> None:
        state = self._probe[endpoint_id]
        due = max(now, state.http_started_s + self.prober.unhealthy_interval_s)
        if due < state.http_due_s:
            self._schedule_http(endpoint_id, due)

    def _liveness(self, endpoint_id: str, now: float) -> None:
        state = self._probe[endpoint_id]
        # A live port proves nothing (only a 2xx does), and a failing endpoint is already
        # re-checked over HTTP: only a dead port of a passing endpoint is news.
        if not state.failing and not self.servers[endpoint_id].alive:
            self._observe(endpoint_id, ok=False, http=False, now=now)
            due = now + self.prober.unhealthy_interval_s
            if due < state.http_due_s:
                self._schedule_http(endpoint_id, due)
        if self._active:
            self.loop.at(
                now + self._jittered(self.prober.liveness_interval_s), self._liveness, endpoint_id
            )

    def _observe(self, endpoint_id: str, *, ok: bool, http: bool, now: float) -> None:
        # Envoy's thresholds, as probe.health.EndpointHealth applies them: any failure counts,
        # only a full HTTP success counts toward health, and a new endpoint's first success
        # makes it healthy at once.
        state = self._probe[endpoint_id]
        p = self.prober
        if not ok:
            state.successes = 0
            state.failures += 1
            if state.failures >= p.unhealthy_threshold:
                state.verdict = HealthStatus.UNHEALTHY
        elif http:
            state.failures = 0
            state.successes += 1
            if (
                state.verdict is not HealthStatus.UNHEALTHY
                or state.successes >= p.healthy_threshold
            ):
                state.verdict = HealthStatus.HEALTHY
        self._publish(endpoint_id, now)

    def _publish(self, endpoint_id: str, now: float) -> None:
        state = self._probe[endpoint_id]
        status = state.verdict
        reason = "probe"
        if status is HealthStatus.HEALTHY and state.load_reason:
            status, reason = HealthStatus.DEGRADED, state.load_reason
        if status is state.published:
            return
        state.published = status
        self.router.set_health(endpoint_id, status, reason=reason, now=now)
        down = endpoint_id in self._down_since and endpoint_id not in self._detected_at
        if status is HealthStatus.UNHEALTHY and down:
            self._detected_at[endpoint_id] = now
            self._detection_delays.append(now - self._down_since[endpoint_id])

    def _scrape(self, endpoint_id: str, now: float) -> None:
        server = self.servers[endpoint_id]
        if server.alive:
            load = LoadReport(
                queue_depth=server.waiting,
                running=server.running,
                kv_cache_utilization=server.kv_cache_utilization(),
            )
            self.router.record_load(endpoint_id, load, now=now)
            p = self.prober
            state = self._probe[endpoint_id]
            if p.degraded_queue_depth and load.queue_depth >= p.degraded_queue_depth:
                state.load_reason = f"queue depth {load.queue_depth}"
            elif (
                p.degraded_kv_cache_utilization
                and load.kv_cache_utilization >= p.degraded_kv_cache_utilization
            ):
                state.load_reason = f"KV cache {load.kv_cache_utilization:.0%}"
            else:
                state.load_reason = ""
            self._publish(endpoint_id, now)
        if self._active:
            self.loop.at(
                now + self._jittered(self.prober.metrics_interval_s), self._scrape, endpoint_id
            )

    # -- results -----------------------------------------------------------------------

    def _result(self) -> RunResult:
        prompt = sum(s.prompt_tokens for s in self.servers.values())
        cached = sum(s.cached_tokens for s in self.servers.values())
        first = min((s.start_s for s in self.workload.sessions), default=0.0)
        makespan = max(self._last_done_s - first, 1e-9)
        return RunResult(
            workload=self.workload.name,
            strategy=self.strategy,
            requests=self._completed + self._failed,
            completed=self._completed,
            failed=self._failed,
            ttft_p50_s=percentile(self._ttft, 50),
            ttft_p90_s=percentile(self._ttft, 90),
            ttft_p99_s=percentile(self._ttft, 99),
            e2e_p50_s=percentile(self._e2e, 50),
            e2e_p99_s=percentile(self._e2e, 99),
            output_tokens_per_s=self._output_tokens / makespan,
            cache_hit_rate=cached / prompt if prompt else 0.0,
            imbalance=self._imbalance.worst(),
            sent_to_dead=self._sent_to_dead,
            sent_to_dead_after_detection=self._sent_to_dead_after,
            detection_delay_s=max(self._detection_delays) if self._detection_delays else math.nan,
            retries=self._retries,
            makespan_s=makespan,
            events=self.loop.processed,
        )
