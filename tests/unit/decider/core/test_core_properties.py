"""Property tests of the engine's invariants over random sequences of registrations, decisions,
outcomes, health changes and ticks, through the Engine facade only.

Two engines built alike take the same steps; one of them also answers explain requests. Each
step checks the invariants on the first engine and that both still agree, so an explain that
changed anything (a rotation step, a random draw, an in-flight count, a quota charge) shows up as
the engines drifting apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from decider.core.engine import Engine
from decider.core.model import (
    BreakerState,
    Decision,
    Endpoint,
    EndpointState,
    HealthStatus,
    Outcome,
    Refusal,
    RefusalKind,
    Result,
    RouteRequest,
)
from decider.core.settings import EngineSettings

IN_FLIGHT_TIMEOUT_S = 30.0
# Decisions expire between the timeout and one expiry bucket later; allow a second.
EXPIRY_SLACK_S = 1.0
TENANT_RPM = 5
ENDPOINT_RPM = 4
COOLDOWN_S = 5.0

_DOC: dict = {
    "routing": {
        "in_flight_timeout_s": IN_FLIGHT_TIMEOUT_S,
        "rate_limited_cooldown_s": COOLDOWN_S,
        "max_fallbacks": 2,
    },
    # Breakers that open and half-open within a short sequence.
    "breaker": {"consecutive_failures": 2, "open_s": 3.0, "max_open_s": 10.0},
    "quotas": {"tenants": {"t1": {"requests_per_minute": TENANT_RPM}}},
    "affinity": {"ttl_s": 20.0, "max_sessions": 3},
    "cache": {"blocks_per_endpoint": 4, "max_blocks_per_request": 4},
}
SETTINGS = EngineSettings.parse(_DOC)


def _endpoint(eid: str, *, weight: int = 1, **kwargs: object) -> Endpoint:
    return Endpoint(id=eid, address=f"10.0.0.{eid[1:]}:8000", weight=weight, **kwargs)  # type: ignore[arg-type]


# The universe of endpoints a sequence registers from.
SPECS: dict[str, dict[str, object]] = {
    "e0": {"model": "m"},
    "e1": {"model": "m", "health_url": "http://10.0.0.1/health"},
    "e2": {
        "model": "m",
        "health_url": "http://10.0.0.2/health",
        "requests_per_minute": ENDPOINT_RPM,
    },
    "e3": {"model": "m", "capabilities": frozenset({"tools"})},
    "e4": {"model": "m", "health_url": "http://10.0.0.4/health", "max_in_flight": 2},
    "e5": {"model": "n", "health_url": "http://10.0.0.5/health"},
}
IDS = sorted(SPECS)
STRATEGIES = Engine(EngineSettings(), rng=random.Random(0)).strategy_names
BAD = (HealthStatus.UNHEALTHY, HealthStatus.DRAINING)


@dataclass
class Open:
    """A decision the test has not reported yet."""

    decision: Decision
    issued_at: float
    # The chosen endpoint's registration generation at issue time.
    generation: int
    tenant: str


class EngineMachine(RuleBasedStateMachine):
    settings = SETTINGS

    @initialize(seed=st.integers(0, 2**32 - 1))
    def build(self, seed: int) -> None:
        self.now = 1000.0
        self.engine = Engine(self.settings, rng=random.Random(seed))
        # The twin takes every step except explain requests.
        self.twin = Engine(self.settings, rng=random.Random(seed))
        self.registered: dict[str, Endpoint] = {}
        self.generation = dict.fromkeys(IDS, 0)
        self.open: list[Open] = []
        # Decisions possibly still pending (reported ones are gone, expired ones may linger).
        self.tenant_admitted: list[float] = []
        # (endpoint id, generation) -> admission times, and refunds by a fallback's outcome.
        self.endpoint_admitted: dict[tuple[str, int], list[float]] = {}
        self.endpoint_refunds: dict[tuple[str, int], int] = {}
        self.cooling_until: dict[str, float] = {}
        self.last_tick = self.now

    # -- steps -----------------------------------------------------------------------------------

    @rule(
        ids=st.sets(st.sampled_from(IDS)),
        heavier=st.sets(st.sampled_from(IDS)),
    )
    def register(self, ids: set[str], heavier: set[str]) -> None:
        endpoints = [
            _endpoint(eid, weight=3 if eid in heavier else 1, **SPECS[eid]) for eid in sorted(ids)
        ]
        for eid in set(self.registered) - ids:
            self.generation[eid] += 1
        self.registered = {e.id: e for e in endpoints}
        self.engine.set_endpoints(endpoints, now=self.now)
        self.twin.set_endpoints(endpoints, now=self.now)

    @rule(
        model=st.sampled_from(["m", "m", "m", "n", "x"]),
        tenant=st.sampled_from(["", "t1", "t1", "t2"]),
        session=st.sampled_from(["", "s1", "s2", "s3", "s4"]),
        strategy=st.sampled_from(("", *STRATEGIES)),
        caps=st.sets(st.just("tools")),
        exclude=st.sets(st.sampled_from(IDS), max_size=3),
        prefix=st.lists(st.integers(0, 6), max_size=5),
        max_fallbacks=st.integers(0, 3),
        explain_first=st.booleans(),
    )
    def decide(
        self,
        model: str,
        tenant: str,
        session: str,
        strategy: str,
        caps: set[str],
        exclude: set[str],
        prefix: list[int],
        max_fallbacks: int,
        explain_first: bool,
    ) -> None:
        request = RouteRequest(
            model=model,
            session_id=session,
            tenant=tenant,
            required_capabilities=frozenset(caps),
            prefix_hashes=tuple(prefix),
            exclude_endpoint_ids=frozenset(exclude),
            strategy=strategy,
            max_fallbacks=max_fallbacks,
            estimated_input_tokens=10,
        )
        states = self._states()
        if explain_first:
            explained = self.engine.decide(_explain(request), now=self.now)
            if isinstance(explained, Decision):
                assert explained.decision_id == ""
                self._check_choice(request, explained, states)
        result = self.engine.decide(request, now=self.now)
        assert self.twin.decide(request, now=self.now) == result, "explain changed state"
        self._check_answer(request, result, states)
        if isinstance(result, Decision):
            chosen = result.endpoint.id
            generation = self.generation[chosen]
            self.open.append(
                Open(
                    decision=result,
                    issued_at=self.now,
                    generation=generation,
                    tenant=tenant,
                )
            )
            if tenant == "t1":
                self.tenant_admitted.append(self.now)
            if SPECS[chosen].get("requests_per_minute"):
                self.endpoint_admitted.setdefault((chosen, generation), []).append(self.now)

    @rule(times=st.integers(2, 8), strategy=st.sampled_from(("round_robin", "composite")))
    def burst(self, times: int, strategy: str) -> None:
        """Several decisions in a row with no outcome: what fills the pending decisions."""
        for _ in range(times):
            self.decide("m", "", "", strategy, set(), set(), [1, 2, 3], 0, False)

    @precondition(lambda self: self.open)
    @rule(
        data=st.data(),
        result=st.sampled_from(list(Result)),
        latency_s=st.sampled_from([0.0, 0.05, 0.5, 3.0]),
        tokens=st.integers(0, 50),
    )
    def report(self, data: st.DataObject, result: Result, latency_s: float, tokens: int) -> None:
        index = data.draw(st.integers(0, len(self.open) - 1))
        item = self.open.pop(index)
        decision = item.decision
        target = data.draw(
            st.sampled_from([decision.endpoint.id, *(e.id for e in decision.fallbacks)])
        )
        outcome = Outcome(
            decision_id=decision.decision_id,
            endpoint_id=target,
            result=result,
            latency_s=latency_s,
            output_tokens=tokens,
        )
        found = self.engine.record_outcome(outcome, now=self.now)
        assert self.twin.record_outcome(outcome, now=self.now) == found
        age_s = self.now - item.issued_at
        if age_s <= IN_FLIGHT_TIMEOUT_S and self.settings is SETTINGS:
            assert found, f"{decision.decision_id} forgotten after {age_s:.2f} s"
        elif age_s >= IN_FLIGHT_TIMEOUT_S + EXPIRY_SLACK_S and self.last_tick - item.issued_at >= (
            IN_FLIGHT_TIMEOUT_S + EXPIRY_SLACK_S
        ):
            assert not found, f"{decision.decision_id} still pending after {age_s:.2f} s"
        chosen = decision.endpoint.id
        current = self.generation[chosen] == item.generation and chosen in self.registered
        if found and current and target != chosen:
            key = (chosen, item.generation)
            self.endpoint_refunds[key] = self.endpoint_refunds.get(key, 0) + 1
        if result is Result.RATE_LIMITED:
            for eid in (target, chosen):
                self.cooling_until[eid] = self.now + COOLDOWN_S

    @rule(decision_id=st.sampled_from(["", "nope", "0-1"]), endpoint_id=st.sampled_from(IDS))
    def report_unknown(self, decision_id: str, endpoint_id: str) -> None:
        outcome = Outcome(decision_id=decision_id, endpoint_id=endpoint_id, result=Result.ERROR)
        assert not self.engine.record_outcome(outcome, now=self.now)
        assert not self.twin.record_outcome(outcome, now=self.now)

    @rule(eid=st.sampled_from(IDS), status=st.sampled_from(list(HealthStatus)))
    def set_health(self, eid: str, status: HealthStatus) -> None:
        self.engine.set_health(eid, status, reason="test", now=self.now)
        self.twin.set_health(eid, status, reason="test", now=self.now)

    @rule(dt=st.sampled_from([0.0, 0.01, 0.3, 1.0, 4.0, 12.0, 31.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.engine.tick(now=self.now)
        self.twin.tick(now=self.now)
        self.last_tick = self.now

    @rule(report_all=st.booleans())
    def settle(self, report_all: bool) -> None:
        """Every decision gets its outcome, or all expire: nothing stays in flight."""
        if report_all:
            for item in self.open:
                outcome = Outcome(
                    decision_id=item.decision.decision_id,
                    endpoint_id=item.decision.endpoint.id,
                    result=Result.SUCCESS,
                    latency_s=0.1,
                )
                self.engine.record_outcome(outcome, now=self.now)
                self.twin.record_outcome(outcome, now=self.now)
        else:
            self.now += IN_FLIGHT_TIMEOUT_S + EXPIRY_SLACK_S
            self.engine.tick(now=self.now)
            self.twin.tick(now=self.now)
            self.last_tick = self.now
        self.open.clear()
        assert all(s.in_flight == 0 for s in self._states().values()), self._states()

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def in_flight_counts_match_the_open_decisions(self) -> None:
        if not hasattr(self, "engine"):
            return
        states = self._states()
        assert states == self._twin_states(), "the engines drifted apart"
        for eid, state in states.items():
            assert state.in_flight >= 0
            mine = [
                o
                for o in self.open
                if o.decision.endpoint.id == eid and o.generation == self.generation[eid]
            ]
            surely_open = [o for o in mine if self.now - o.issued_at <= IN_FLIGHT_TIMEOUT_S]
            if self.settings is SETTINGS:
                assert len(surely_open) <= state.in_flight, (eid, state.in_flight)
            assert state.in_flight <= len(mine), (eid, state.in_flight)
        limit = self.settings.routing.max_pending_decisions
        assert sum(s.in_flight for s in states.values()) <= limit
        usage = self.engine.state_usage()
        assert usage["pending_decisions"].entries <= limit
        assert usage["sessions"].entries <= self.settings.affinity.max_sessions
        assert usage["prefix_blocks"].entries <= self.settings.cache.max_blocks

    @invariant()
    def quotas_admit_no_more_than_their_budget(self) -> None:
        if not hasattr(self, "engine"):
            return
        _check_bucket(self.tenant_admitted, TENANT_RPM, refunds=0)
        for key, times in self.endpoint_admitted.items():
            _check_bucket(times, ENDPOINT_RPM, refunds=self.endpoint_refunds.get(key, 0))

    # -- checks ----------------------------------------------------------------------------------

    def _states(self) -> dict[str, EndpointState]:
        return {s.endpoint.id: s for s in self.engine.endpoint_states(now=self.now)}

    def _twin_states(self) -> dict[str, EndpointState]:
        return {s.endpoint.id: s for s in self.twin.endpoint_states(now=self.now)}

    def _eligible(self, request: RouteRequest, state: EndpointState) -> bool:
        endpoint = state.endpoint
        return (
            endpoint.model == request.model
            and request.required_capabilities <= endpoint.capabilities
            and endpoint.id not in request.exclude_endpoint_ids
        )

    def _surely_usable(self, request: RouteRequest, state: EndpointState) -> bool:
        """Usable whatever the engine's hidden state (trial slots, buckets) holds."""
        endpoint = state.endpoint
        return (
            self._eligible(request, state)
            and state.health not in BAD
            and state.breaker_state is BreakerState.CLOSED
            and self.cooling_until.get(endpoint.id, -1.0) <= self.now
            and not endpoint.requests_per_minute
            and (not endpoint.max_in_flight or state.in_flight < endpoint.max_in_flight)
        )

    def _check_choice(
        self, request: RouteRequest, decision: Decision, states: dict[str, EndpointState]
    ) -> None:
        primary = states[decision.endpoint.id]
        assert self._eligible(request, primary), decision
        assert primary.health not in BAD, (primary, decision.reason)
        assert primary.breaker_state is not BreakerState.OPEN, (primary, decision.reason)
        ids = [e.id for e in decision.fallbacks]
        assert len(set(ids)) == len(ids), ids
        assert decision.endpoint.id not in ids
        assert len(ids) <= (request.max_fallbacks or SETTINGS.routing.max_fallbacks)
        for eid in ids:
            fallback = states[eid]
            assert self._eligible(request, fallback), (eid, decision)
            assert fallback.health not in BAD, (fallback, decision.reason)
            assert fallback.breaker_state is not BreakerState.OPEN, (fallback, decision.reason)

    def _check_answer(
        self,
        request: RouteRequest,
        result: Decision | Refusal,
        states: dict[str, EndpointState],
    ) -> None:
        if isinstance(result, Decision):
            self._check_choice(request, result, states)
            return
        served = any(s.endpoint.model == request.model for s in states.values())
        assert (result.kind is RefusalKind.MODEL_NOT_FOUND) == (not served), result
        usable = [s for s in states.values() if self._surely_usable(request, s)]
        if usable:
            assert result.kind is RefusalKind.QUOTA_EXHAUSTED and request.tenant == "t1", (
                result,
                [s.endpoint.id for s in usable],
            )


def _explain(request: RouteRequest) -> RouteRequest:
    return RouteRequest(
        model=request.model,
        session_id=request.session_id,
        tenant=request.tenant,
        required_capabilities=request.required_capabilities,
        prefix_hashes=request.prefix_hashes,
        exclude_endpoint_ids=request.exclude_endpoint_ids,
        strategy=request.strategy,
        max_fallbacks=request.max_fallbacks,
        estimated_input_tokens=request.estimated_input_tokens,
        explain=True,
    )


def _check_bucket(times: list[float], per_minute: int, *, refunds: int) -> None:
    """A bucket of `per_minute` refilled at per_minute/60 a second admits at most
    per_minute + rate * (b - a) in any window [a, b] (plus any requests handed back)."""
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            admitted = j - i + 1
            budget = per_minute + per_minute * (times[j] - start) / 60.0 + refunds
            assert admitted <= budget + 1e-9, (admitted, budget, times[i : j + 1])


EngineMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_engine_invariants = EngineMachine.TestCase


class BoundedEngineMachine(EngineMachine):
    """The same steps with tight size bounds: evicted decisions release their in-flight slots
    and nothing outgrows its bound."""

    settings = EngineSettings.parse(
        {
            **{k: v for k, v in _DOC.items() if k not in ("routing", "cache")},
            "routing": {**_DOC["routing"], "max_pending_decisions": 4},
            "cache": {**_DOC["cache"], "max_blocks": 6},
        }
    )


BoundedEngineMachine.TestCase.settings = EngineMachine.TestCase.settings
test_bounded_engine_invariants = BoundedEngineMachine.TestCase
