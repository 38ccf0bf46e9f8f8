"""The decision core's facade: decide(request) -> Decision | Refusal, and the feedback that keeps
the next decision good. Pure: no gRPC, no I/O; time comes in as `now`, randomness as `rng`.

decide = candidates (per-model index) -> filters (health, breaker, cooldown, capacity, tenant
quota) -> strategy pick -> fallbacks -> in-flight and quota accounting. The usable endpoints of a
(model, capabilities) pair are cached in a Pool (pool.py), rebuilt only when health, breakers,
cooldowns or membership change, so a decision costs O(1) for the rotation and sampling strategies
and O(log n) for the scoring ones. Every piece of mutable state has its own owner behind a
Protocol (state.py); the engine sequences calls to them. See docs/ENGINE.md.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence

from decider.core.accounting import Settlement
from decider.core.model import (
    Decision,
    Endpoint,
    EndpointState,
    HealthEvent,
    HealthStatus,
    LoadReport,
    Outcome,
    Refusal,
    RefusalKind,
    Result,
    RetryAdvice,
    RouteRequest,
    StateUsage,
    make_decision,
)
from decider.core.pool import EMPTY_POOL, Pools
from decider.core.reasons import SKIP_PHRASES, Explainer, model_not_found, over_quota, summary
from decider.core.settings import EngineSettings
from decider.core.state import EngineState
from decider.core.stats import EndpointStats, ScoreParams, Scorer
from decider.core.strategies import STRATEGIES, Strategy
from decider.core.strategies.base import PickContext, ShapesScores, Splitter
from decider.core.verdicts import Verdicts
from decider.errors import InvalidArgument

# How often tick() refreshes every endpoint's scores (stale load reports, quota refill) and each
# model's latency reference.
_REFRESH_EVERY_S = 1.0
# How often tick() drops tenant buckets that have refilled (a bucket refills within a minute).
_TENANT_SWEEP_S = 60.0
# Fallbacks a request may ask for; more would only make decisions slower.
_MAX_FALLBACKS = 16


class Engine:
    """The one object the adapters, the prober and the simulator call. Not thread-safe: call it
    from one thread (the server's event loop). `state` defaults to in-memory owners."""

    def __init__(
        self,
        settings: EngineSettings,
        *,
        rng: random.Random,
        on_event: Callable[[HealthEvent], None] | None = None,
        state: EngineState | None = None,
    ) -> None:
        self._settings = settings
        routing = settings.routing
        self._rng = rng
        self._strategies: dict[str, Strategy] = {
            name: factory(routing.config(name), rng) for name, factory in STRATEGIES.items()
        }
        # The hooks, asked once: strategies that shape the shared scores, and splitters, which
        # route over several targets with another strategy inside each.
        params = ScoreParams()
        for strategy in self._strategies.values():
            if isinstance(strategy, ShapesScores):
                params = strategy.shape_scores(params)
        self._ttft_weight = params.ttft_weight
        self._scorer = Scorer(
            params.weights,
            load_reference=routing.load_reference,
            max_report_age_s=routing.load_report_max_age_s,
            ttft_weight=params.ttft_weight,
            decay_s=routing.latency_decay_s,
        )
        # name -> (strategy, splitter or None): one lookup per decision.
        self._plans: dict[str, tuple[Strategy, Splitter | None]] = {
            name: (strategy, strategy if isinstance(strategy, Splitter) else None)
            for name, strategy in self._strategies.items()
        }
        self._max_fallbacks = routing.max_fallbacks
        self._retry = RetryAdvice(
            max_attempts=routing.retry_max_attempts,
            initial_backoff_s=routing.retry_initial_backoff_s,
            max_backoff_s=routing.retry_max_backoff_s,
            backoff_multiplier=routing.retry_backoff_multiplier,
        )
        state = state if state is not None else EngineState.in_memory(settings, rng=rng)
        self._pending = state.pending
        self._breakers = state.breakers
        self._tenants = state.tenant_budgets
        self._budgets = state.endpoint_budgets
        self._sessions = state.sessions
        self._index = state.prefixes
        self._stats = state.stats
        self._quotas_on = bool(
            settings.quotas.default.requests_per_minute
            or settings.quotas.default.tokens_per_minute
            or settings.quotas.tenants
        )
        self._settlement = Settlement(
            tenants=self._tenants,
            budgets=self._budgets,
            stats=self._stats,
            quotas_on=self._quotas_on,
        )
        self._pools = Pools(
            breakers=self._breakers,
            budgets=self._budgets,
            panic_threshold=routing.panic_threshold,
        )
        # Endpoints some live heap ranks: a decision reorders only those (see Pools.reorder).
        self._ranked = self._pools.ranked
        self._verdicts = Verdicts(
            breakers=self._breakers, stats=self._stats, pools=self._pools, on_event=on_event
        )
        self._explainer = Explainer(
            breakers=self._breakers, has_room=self._pools.has_room, retry=self._retry
        )
        self._ctx = PickContext(
            scorer=self._scorer,
            index=self._index,
            sessions=self._sessions,
            strategies=self._strategies,
            pool=EMPTY_POOL,
        )
        self._refresh_at = -math.inf
        self._tenants_at = -math.inf

    @property
    def settings(self) -> EngineSettings:
        return self._settings

    @property
    def strategy_names(self) -> tuple[str, ...]:
        return tuple(self._strategies)

    # -- membership ------------------------------------------------------------------------------

    def set_endpoints(self, endpoints: Sequence[Endpoint], *, now: float) -> None:
        """Replace the endpoint set with a full snapshot. Live stats of ids that stay are kept."""
        added, removed = self._stats.replace(endpoints)
        for s in added:
            self._verdicts.added(s, now=now)
        for endpoint in endpoints:
            self._budgets.set_endpoint_limits(
                endpoint.id,
                requests_per_minute=endpoint.requests_per_minute,
                tokens_per_minute=endpoint.tokens_per_minute,
                now=now,
            )
        for s in removed:
            self._budgets.remove_endpoint(s.id)
            self._index.remove_endpoint(s.id)
            self._verdicts.removed(s)
        self._pools.drop_all(removed)
        self._refresh(now)

    # -- decide ----------------------------------------------------------------------------------

    def decide(self, request: RouteRequest, *, now: float) -> Decision | Refusal:
        name = request.strategy or self._settings.routing.default_strategy
        plan = self._plans.get(name)
        if plan is None:
            raise InvalidArgument.one(
                "strategy", f"{name!r} is not a strategy; known: {', '.join(self._strategies)}"
            )
        if now >= self._breakers.next_deadline:
            self._verdicts.advance(now)
        if now >= self._pending.next_expiry:
            self._expire(now)

        strategy, splitter = plan
        if splitter is not None:
            within = self._strategies[splitter.within]
            first: Decision | Refusal | None = None
            for route in splitter.routes(request):
                result = self._decide(
                    request, within, name, now, route.note, route.model, route.capabilities
                )
                if isinstance(result, Decision) or result.kind is RefusalKind.QUOTA_EXHAUSTED:
                    return result
                if first is None:
                    first = result
            assert first is not None
            return first
        return self._decide(
            request, strategy, name, now, "", request.model, request.required_capabilities
        )

    def _decide(
        self,
        request: RouteRequest,
        strategy: Strategy,
        name: str,
        now: float,
        arm_note: str,
        model: str,
        caps: frozenset[str],
    ) -> Decision | Refusal:
        group = self._stats.group(model)
        if not group:
            return model_not_found(model, sorted(self._stats.models()))
        tokens = request.estimated_input_tokens
        if self._quotas_on:
            check = self._tenants.check_tenant(request.tenant, tokens, now)
            if check is not None:
                return over_quota(request.tenant, model, check)

        pools = self._pools
        pool = pools.get(model, caps, group, now)
        items: Sequence[EndpointStats] = pool.items
        skipped = pool.skipped
        tier = 0
        if request.exclude_endpoint_ids or pool.has_limits or not items:
            items, skipped, tier = pools.filter(pool, request, now)
        if not items:
            return self._explainer.no_usable(pool, request, caps, skipped, now)

        wanted = request.max_fallbacks
        wanted = (wanted if wanted < _MAX_FALLBACKS else _MAX_FALLBACKS) or self._max_fallbacks
        # One context object serves every decision (the engine is single-threaded).
        ctx = self._ctx
        ctx.request = request
        ctx.pool = pool
        ctx.items = items
        ctx.filtered = items is not pool.items
        ctx.count = 1 + wanted
        ctx.commit = not request.explain
        ctx.now = now
        if request.explain:
            return self._explainer.explain(ctx, strategy, name, skipped, arm_note)

        choice = strategy.choose(ctx)
        picked = choice.picked
        if len(picked) <= wanted and (tier or pool.standby):
            pools.fill_standby(picked, pool, tier, request, 1 + wanted, now)
        chosen = picked[0]

        # Accounting, inline: this is the hot path.
        # Only the blocks the index records are kept with the open decision, and none once the
        # open decisions hold their share (pending.py): then this prompt is neither pending nor
        # indexed, so nothing is left for an outcome to settle.
        hashes = self._pending.keepable(request.prefix_hashes[: self._index.max_blocks])
        decision_id = self._pending.record(chosen, request.tenant, tokens, hashes, now)
        if hashes:
            # The prompt's blocks count for the endpoint at once, as pending (affinity.py).
            self._index.add_pending(chosen.id, hashes)
        if self._breakers.half_open and self._breakers.on_pick(chosen.id):
            pools.drop(chosen.model)
        if self._quotas_on:
            self._tenants.charge_tenant(request.tenant, requests=1, tokens=tokens, now=now)
        endpoint = chosen.endpoint
        if endpoint.requests_per_minute or endpoint.tokens_per_minute:
            self._budgets.charge_endpoint(chosen.id, requests=1, tokens=tokens, now=now)
            self._stats.set_quota_score(chosen, self._budgets.endpoint_headroom(chosen.id, now))
            self._scorer.rescore(chosen, now)
        else:
            self._scorer.rescore_load(chosen, now)
        if chosen in self._ranked:
            pools.reorder(chosen)

        if skipped is pool.skipped and not tier:
            text = pool.summary
        else:
            text = summary(len(items), len(pool.candidates), skipped)
            if pool.panic:
                text = "panic mode, health ignored: " + text
        return make_decision(
            decision_id,
            endpoint,
            _endpoints_after_first(picked),
            name,
            f"{arm_note}{choice.detail}; {text}",
            choice.scores,
            self._retry,
            choice.affinity_hit,
            len(pool.candidates),
            skipped,
        )

    # -- feedback --------------------------------------------------------------------------------

    def record_outcome(self, outcome: Outcome, *, now: float) -> bool:
        """Count an outcome. Returns False when decision_id is unknown or expired; the endpoint's
        stats and breaker are still updated from endpoint_id."""
        pending = self._pending.resolve(outcome.decision_id) if outcome.decision_id else None
        stats = self._stats
        target = stats.get(outcome.endpoint_id)
        actual = outcome.input_tokens + outcome.output_tokens
        if pending is not None:
            chosen = pending[0]
            live = stats.is_live(chosen)
            if target is None and live:
                target = chosen
            self._settlement.settle(pending, target, actual=actual, live=live, now=now)
            hashes = pending[3]
            if hashes and live and (outcome.result is not Result.SUCCESS or target is not chosen):
                # Failed, timed out, cancelled or served elsewhere: the pending blocks go.
                self._index.drop(chosen.id, hashes)
            if live and target is not chosen:
                self._rescore(chosen, now)
        if target is None:
            return pending is not None
        if pending is None or target is not pending[0]:
            self._settlement.charge_served(target, actual=actual, now=now)
        result = outcome.result
        if result is Result.SUCCESS:
            stats.record_latency(
                target, latency_s=outcome.latency_s, ttft_s=outcome.ttft_s, now=now
            )
            if target.latency_ref_s <= 0.0 < target.latency_ewma_s:
                # The model's first latency report: give it a reference now, not at the next
                # refresh, so unmeasured endpoints stop looking infinitely fast.
                self._refresh_group(stats.group(target.model) or [], now)
            self._verdicts.record(target, ok=True, now=now)
            if pending is not None and pending[3]:
                if target is pending[0]:
                    self._index.confirm(target.id, pending[3])
                else:
                    self._index.record(target.id, pending[3])
        elif result is Result.ERROR or result is Result.TIMEOUT:
            if result is Result.TIMEOUT:
                # A timeout is a latency sample too; a fast error is not (it would look good).
                stats.record_latency(target, latency_s=outcome.latency_s, ttft_s=0.0, now=now)
            self._verdicts.record(target, ok=False, now=now)
        elif result is Result.RATE_LIMITED:
            # A 429 says "not now", not "broken": cool down briefly instead of counting a failure.
            cooldown = self._settings.routing.rate_limited_cooldown_s
            if cooldown > 0.0:
                stats.cool_down(target, now + cooldown)
                self._pools.drop(target.model)
            self._verdicts.release(target)
        elif result is Result.CANCELLED:
            # No verdict on the endpoint: no breaker failure, no latency sample; a half-open
            # trial it held is handed back for another request to make.
            self._verdicts.release(target)
        if outcome.load is not None:
            stats.record_load(target, outcome.load, now)
        limited = target.endpoint.requests_per_minute or target.endpoint.tokens_per_minute
        if target.latency_at == now or limited:
            # A latency sample or a quota change moves the factors rescore_load keeps.
            self._rescore(target, now)
        else:
            self._scorer.rescore_load(target, now)
            self._pools.reorder(target)
        return pending is not None

    def _rescore(self, s: EndpointStats, now: float) -> None:
        self._scorer.rescore(s, now)
        self._pools.reorder(s)

    def set_health(
        self, endpoint_id: str, status: HealthStatus, *, reason: str, now: float
    ) -> None:
        """A prober verdict (after its thresholds). Publishes an event when the status changes."""
        s = self._stats.get(endpoint_id)
        if s is not None and self._verdicts.set_health(s, status, reason):
            self._rescore(s, now)

    def record_load(self, endpoint_id: str, load: LoadReport, *, now: float) -> None:
        s = self._stats.get(endpoint_id)
        if s is None:
            return
        self._stats.record_load(s, load, now)
        self._scorer.rescore_load(s, now)
        self._pools.reorder(s)

    def rescore_load(self, endpoint_ids: Iterable[str], *, now: float) -> None:
        """In-flight counts changed outside a decision or outcome here (a shared state added
        other replicas' counts): rescore those endpoints' load."""
        for endpoint_id in endpoint_ids:
            s = self._stats.get(endpoint_id)
            if s is not None:
                self._scorer.rescore_load(s, now)
                self._pools.reorder(s)

    # -- housekeeping ----------------------------------------------------------------------------

    def tick(self, *, now: float) -> None:
        """Expire in-flight decisions with no outcome, move open breakers to half-open, expire
        sessions, and about once a second refresh scores that drift with time."""
        self._verdicts.advance(now)
        self._expire(now)
        self._sessions.expire(now)
        if now >= self._refresh_at:
            self._refresh(now)
        if now >= self._tenants_at:
            # A bucket refills within a minute: sweeping once a minute drops every idle one.
            self._tenants_at = now + _TENANT_SWEEP_S
            self._tenants.expire_tenants(now)

    def _expire(self, now: float) -> None:
        stats = self._stats
        for s, hashes in self._pending.expire(now):
            if stats.is_live(s):
                if hashes:
                    self._index.drop(s.id, hashes)
                self._verdicts.release(s)
                self._scorer.rescore_load(s, now)
                self._pools.reorder(s)

    def _refresh(self, now: float) -> None:
        """Per-model latency reference (median of reported EWMAs) and cheapest cost, then every
        endpoint's scores (stale load reports drop out, quota headroom refills)."""
        self._refresh_at = now + _REFRESH_EVERY_S
        for group in self._stats.groups():
            self._refresh_group(group, now)

    def _refresh_group(self, group: Sequence[EndpointStats], now: float) -> None:
        stats = self._stats
        stats.refresh_references(group, ttft_weight=self._ttft_weight)
        for s in group:
            endpoint = s.endpoint
            if endpoint.requests_per_minute or endpoint.tokens_per_minute:
                stats.set_quota_score(s, self._budgets.endpoint_headroom(s.id, now))
            self._rescore(s, now)

    # -- live state ------------------------------------------------------------------------------

    def endpoint_states(self, *, model: str = "", now: float) -> list[EndpointState]:
        if model:
            group: Sequence[EndpointStats] = self._stats.group(model) or ()
        else:
            group = list(self._stats.values())
        max_age = self._settings.routing.load_report_max_age_s
        return [
            EndpointState(
                endpoint=s.endpoint,
                health=s.health,
                breaker_state=self._breakers.state(s.id),
                in_flight=s.in_flight,
                latency_ewma_s=s.latency_ewma_s,
                health_reason=s.health_reason,
                load=s.load_report if now - s.load_at <= max_age else None,
            )
            for s in group
        ]

    def in_flight(self, endpoint_id: str) -> int:
        s = self._stats.get(endpoint_id)
        return s.in_flight if s is not None else 0

    @property
    def pending_decisions(self) -> int:
        return len(self._pending)

    def state_usage(self) -> dict[str, StateUsage]:
        """How full each piece of traffic-driven state is, and what its bound evicted."""
        return {
            "pending_decisions": self._pending.usage(),
            "sessions": self._sessions.usage(),
            "prefix_blocks": self._index.usage(),
            "tenant_buckets": self._tenants.usage(),
        }

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def indexed_blocks(self) -> int:
        return self._index.block_count


def _endpoints_after_first(picked: list[EndpointStats]) -> tuple[Endpoint, ...]:
    n = len(picked)
    if n == 3:  # the default: two fallbacks
        return (picked[1].endpoint, picked[2].endpoint)
    return tuple([s.endpoint for s in picked[1:]])


__all__ = ["SKIP_PHRASES", "Engine", "EngineSettings", "EngineState"]
