"""The decision core's facade: decide(request) -> Decision | Refusal, and the feedback that keeps
the next decision good. Pure: no gRPC, no I/O; time comes in as `now`, randomness as `rng`.

decide = candidates (per-model index) -> filters (health, breaker, cooldown, capacity, tenant
quota) -> strategy pick -> fallbacks -> in-flight and quota accounting. The usable endpoints of a
(model, capabilities) pair are cached in a Pool, rebuilt only when health, breakers, cooldowns or
membership change, so a decision costs O(1) for the rotation and sampling strategies and
O(log n) for the scoring ones. See docs/ENGINE.md.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from decider.core.affinity import PrefixIndex, SessionTable
from decider.core.breaker import BreakerTransition, CircuitBreakers
from decider.core.model import (
    BreakerState,
    CandidateExplanation,
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
)
from decider.core.quota import QuotaLedger
from decider.core.settings import EngineSettings
from decider.core.stats import (
    LABEL_TAG,
    RECENT_TAU_S,
    EndpointStats,
    Scorer,
    median,
    record_latency,
)
from decider.core.strategies import STRATEGIES, Strategy
from decider.core.strategies.ab_split import AbSplit
from decider.core.strategies.base import PickContext, Pool, Ranked
from decider.core.strategies.composite import Composite
from decider.core.strategies.latency import Latency
from decider.errors import InvalidArgument

# Skip reasons: wire name -> phrase used in reasons and refusal messages.
SKIP_PHRASES: Mapping[str, str] = MappingProxyType(
    {
        "unhealthy": "unhealthy",
        "draining": "draining",
        "breaker_open": "breaker open",
        "breaker_half_open": "half-open with no free trial slot",
        "cooling_down": "cooling down after rate limiting",
        "unknown_health": "not yet probed (standby)",
        "degraded": "degraded (standby)",
        "excluded": "excluded by the request",
        "at_capacity": "at capacity",
    }
)
# How often tick() refreshes every endpoint's scores (stale load reports, quota refill) and each
# model's latency reference.
_REFRESH_EVERY_S = 1.0
# In-flight expiry resolution: a decision expires between in_flight_timeout_s and this much later.
_EXPIRY_BUCKET_S = 0.1
# Fallbacks a request may ask for; more would only make decisions slower.
_MAX_FALLBACKS = 16
# Models named in a MODEL_NOT_FOUND message before "and N more".
_MODELS_NAMED = 10


# A decision waiting for its outcome: (chosen endpoint, tenant, estimated tokens, prefix hashes).
# A plain tuple: one is built per decision, and a tuple costs a seventh of a slotted object.
_Pending = tuple[EndpointStats, str, int, tuple[int, ...]]


def _summary(usable: int, candidates: int, skipped: Mapping[str, int]) -> str:
    parts = [f"{usable} of {candidates} candidates"]
    for key, count in skipped.items():
        if count:
            parts.append(f"{count} {SKIP_PHRASES.get(key, key)}")
    return ", ".join(parts)


class Engine:
    """The one object the adapters, the prober and the simulator call. Not thread-safe: call it
    from one thread (the server's event loop)."""

    def __init__(
        self,
        settings: EngineSettings,
        *,
        rng: random.Random,
        on_event: Callable[[HealthEvent], None] | None = None,
    ) -> None:
        self._settings = settings
        routing = settings.routing
        self._rng = rng
        self._on_event = on_event
        composite = Composite.parse_config(routing.options("composite"), "routing.composite")
        latency = Latency.parse_config(routing.options("latency"), "routing.latency")
        self._ttft_weight = latency.ttft_weight
        self._scorer = Scorer(
            composite.weights,
            load_reference=routing.load_reference,
            max_report_age_s=routing.load_report_max_age_s,
            ttft_weight=latency.ttft_weight,
            decay_s=routing.latency_decay_s,
        )
        self._strategies: dict[str, Strategy] = {
            name: factory(routing.options(name), rng) for name, factory in STRATEGIES.items()
        }
        self._max_fallbacks = routing.max_fallbacks
        self._retry = RetryAdvice(
            max_attempts=routing.retry_max_attempts,
            initial_backoff_s=routing.retry_initial_backoff_s,
            max_backoff_s=routing.retry_max_backoff_s,
            backoff_multiplier=routing.retry_backoff_multiplier,
        )
        self._breakers = CircuitBreakers(settings.breaker)
        self._ledger = QuotaLedger(settings.quotas)
        self._quotas_on = bool(
            settings.quotas.default.requests_per_minute
            or settings.quotas.default.tokens_per_minute
            or settings.quotas.tenants
        )
        self._sessions = SessionTable(
            ttl_s=settings.affinity.ttl_s, max_sessions=settings.affinity.max_sessions
        )
        self._index = PrefixIndex(
            blocks_per_endpoint=settings.cache.blocks_per_endpoint,
            max_blocks_per_request=settings.cache.max_blocks_per_request,
            max_matches=settings.cache.max_matches,
        )
        self._ctx = PickContext(
            scorer=self._scorer,
            index=self._index,
            sessions=self._sessions,
            ledger=self._ledger,
            strategies=self._strategies,
        )
        self._stats: dict[str, EndpointStats] = {}
        self._by_model: dict[str, list[EndpointStats]] = {}
        # model -> required capabilities -> Pool
        self._pools: dict[str, dict[frozenset[str], Pool]] = {}
        self._pending: dict[str, _Pending] = {}
        # [expires_at, first_seq, last_seq]: decisions grouped by 0.1 s of issue time, in issue
        # order (the timeout is constant, so also expiry order). Groups rather than one entry per
        # decision keep memory flat however many decisions are open.
        self._expiry: deque[list[float]] = deque()
        self._bucket_end = -math.inf
        self._id_prefix = f"{rng.getrandbits(48):012x}-"
        self._seq = 0
        self._refresh_at = -math.inf

    @property
    def settings(self) -> EngineSettings:
        return self._settings

    @property
    def strategy_names(self) -> tuple[str, ...]:
        return tuple(self._strategies)

    # -- membership ------------------------------------------------------------------------------

    def set_endpoints(self, endpoints: Sequence[Endpoint], *, now: float) -> None:
        """Replace the endpoint set with a full snapshot. Live stats of ids that stay are kept."""
        old = self._stats
        new: dict[str, EndpointStats] = {}
        for endpoint in endpoints:
            s = old.get(endpoint.id)
            if s is None:
                health = HealthStatus.UNKNOWN if endpoint.health_url else HealthStatus.HEALTHY
                s = EndpointStats(endpoint, health=health)
                s.health_reason = (
                    "not probed yet" if endpoint.health_url else "no health_url: assumed healthy"
                )
                self._breakers.add(endpoint.id, now=now)
                self._publish(s, s.health_reason)
            elif s.endpoint != endpoint:
                s.replace_endpoint(endpoint)
            new[endpoint.id] = s
            self._ledger.set_endpoint_limits(
                endpoint.id,
                requests_per_minute=endpoint.requests_per_minute,
                tokens_per_minute=endpoint.tokens_per_minute,
                now=now,
            )
        for endpoint_id, s in old.items():
            if endpoint_id not in new:
                self._breakers.remove(endpoint_id)
                self._ledger.remove_endpoint(endpoint_id)
                self._index.remove_endpoint(endpoint_id)
                self._emit(
                    HealthEvent(
                        endpoint_id=endpoint_id,
                        model=s.model,
                        status=s.health,
                        breaker_state=BreakerState.UNKNOWN,
                        reason="deregistered",
                        removed=True,
                    )
                )
        self._stats = new
        by_model: dict[str, list[EndpointStats]] = {}
        for s in new.values():
            by_model.setdefault(s.model, []).append(s)
        self._by_model = by_model
        for model in list(self._pools):
            self._drop_pools(model)
        self._refresh(now)

    # -- decide ----------------------------------------------------------------------------------

    def decide(self, request: RouteRequest, *, now: float) -> Decision | Refusal:
        name = request.strategy or self._settings.routing.default_strategy
        strategy = self._strategies.get(name)
        if strategy is None:
            raise InvalidArgument.one(
                "strategy", f"{name!r} is not a strategy; known: {', '.join(self._strategies)}"
            )
        if now >= self._breakers.next_deadline:
            self._advance_breakers(now)
        expiry = self._expiry
        if expiry and expiry[0][0] <= now:
            self._expire(now)

        if isinstance(strategy, AbSplit):
            within = self._strategies[strategy.within]
            first: Decision | Refusal | None = None
            for route in strategy.routes(request):
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

    def _model_not_found_message(self, model: str) -> str:
        # Name what is served, so a typo in the model name is obvious from the error alone.
        served = sorted(m for m, group in self._by_model.items() if group)
        if not served:
            return f"no endpoint serves model {model!r}; no endpoints are registered"
        shown = ", ".join(repr(m) for m in served[:_MODELS_NAMED])
        more = f" and {len(served) - _MODELS_NAMED} more" if len(served) > _MODELS_NAMED else ""
        return f"no endpoint serves model {model!r}; models served: {shown}{more}"

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
        group = self._by_model.get(model)
        if not group:
            return Refusal(
                kind=RefusalKind.MODEL_NOT_FOUND,
                message=self._model_not_found_message(model),
                model=model,
            )
        tokens = request.estimated_input_tokens
        if self._quotas_on:
            check = self._ledger.check_tenant(request.tenant, tokens, now)
            if check is not None:
                return Refusal(
                    kind=RefusalKind.QUOTA_EXHAUSTED,
                    message=(
                        f"tenant {request.tenant!r} is over quota: "
                        + "; ".join(v.description for v in check.violations)
                        + f"; retry in {check.retry_after_s:.1f} s"
                    ),
                    model=model,
                    retry_after_s=check.retry_after_s,
                    violations=check.violations,
                )

        pools = self._pools.get(model)
        pool = pools.get(caps) if pools is not None else None
        if pool is None or now >= pool.valid_until:
            pool = self._build_pool(model, caps, now)

        items: Sequence[EndpointStats] = pool.items
        skipped: Mapping[str, int] = pool.skipped
        tier = 0
        if request.exclude_endpoint_ids or pool.has_limits or not items:
            items, skipped, tier = self._filter(pool, request, now)
        if not items:
            return self._no_usable(pool, request, caps, skipped, now)

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
            return self._explain(ctx, strategy, name, skipped, arm_note)

        choice = strategy.choose(ctx)
        picked = choice.picked
        if len(picked) <= wanted and (tier or pool.standby):
            self._fill_standby(picked, pool, tier, request, 1 + wanted, now)
        chosen = picked[0]
        self._seq += 1
        decision_id = self._id_prefix + str(self._seq)
        self._begin(chosen, request, decision_id, now)
        if skipped is pool.skipped and not tier:
            summary = pool.summary
        else:
            summary = _summary(len(items), len(pool.candidates), skipped)
            if pool.panic:
                summary = "panic mode, health ignored: " + summary
        reason = f"{arm_note}{choice.detail}; {summary}"
        return _make_decision(
            decision_id,
            chosen.endpoint,
            _endpoints_after_first(picked),
            name,
            reason,
            choice.scores,
            self._retry,
            choice.affinity_hit,
            len(pool.candidates),
            skipped,
        )

    def _begin(
        self, chosen: EndpointStats, request: RouteRequest, decision_id: str, now: float
    ) -> None:
        chosen.in_flight += 1
        # One more recent pick, the older ones decayed (see stats.RECENT_TAU_S).
        recent = chosen.recent
        chosen.recent = (
            recent * math.exp((chosen.recent_at - now) / RECENT_TAU_S) + 1.0 if recent else 1.0
        )
        chosen.recent_at = now
        if self._breakers.half_open and self._breakers.on_pick(chosen.id):
            self._drop_pools(chosen.model)
        tokens = request.estimated_input_tokens
        if self._quotas_on:
            self._ledger.charge_tenant(request.tenant, requests=1, tokens=tokens, now=now)
        endpoint = chosen.endpoint
        if endpoint.requests_per_minute or endpoint.tokens_per_minute:
            self._ledger.charge_endpoint(chosen.id, requests=1, tokens=tokens, now=now)
            chosen.quota_score = self._ledger.endpoint_headroom(chosen.id, now)
            self._scorer.rescore(chosen, now)
        else:
            self._scorer.rescore_load(chosen, now)
        hashes = request.prefix_hashes
        if hashes:
            # The prompt's blocks count for the endpoint at once, as pending (affinity.py).
            self._index.add_pending(chosen.id, hashes)
        self._pending[decision_id] = (chosen, request.tenant, tokens, hashes)
        if now < self._bucket_end:
            self._expiry[-1][2] = self._seq
        else:
            self._bucket_end = now + _EXPIRY_BUCKET_S
            expires_at = self._bucket_end + self._settings.routing.in_flight_timeout_s
            self._expiry.append([expires_at, self._seq, self._seq])

    def _filter(
        self, pool: Pool, request: RouteRequest, now: float
    ) -> tuple[list[EndpointStats], dict[str, int], int]:
        """Per-request filters: exclusions and endpoint capacity. Falls to a worse health tier
        when every endpoint of the better one is filtered out."""
        skipped = dict(pool.skipped)
        tiers = pool.scratch.get("tiers")
        if tiers is None:
            tiers = pool.scratch["tiers"] = _tiers(pool)
        for tier, (key, members) in enumerate(tiers):
            kept = self._usable_now(members, request, skipped, now)
            if kept:
                if key:
                    skipped[key] = skipped.get(key, 0) - len(members)
                    if skipped[key] <= 0:
                        del skipped[key]
                return kept, skipped, tier
        return [], skipped, 0

    def _usable_now(
        self,
        members: Sequence[EndpointStats],
        request: RouteRequest,
        skipped: dict[str, int],
        now: float,
    ) -> list[EndpointStats]:
        excluded = request.exclude_endpoint_ids
        tokens = request.estimated_input_tokens
        kept = []
        for s in members:
            if s.id in excluded:
                skipped["excluded"] = skipped.get("excluded", 0) + 1
                continue
            if not self._has_room(s, tokens, now):
                skipped["at_capacity"] = skipped.get("at_capacity", 0) + 1
                continue
            kept.append(s)
        return kept

    def _has_room(self, s: EndpointStats, tokens: int, now: float) -> bool:
        endpoint = s.endpoint
        if endpoint.max_in_flight and s.in_flight >= endpoint.max_in_flight:
            return False
        if endpoint.requests_per_minute or endpoint.tokens_per_minute:
            return self._ledger.endpoint_has_room(s.id, tokens, now)
        return True

    def _fill_standby(
        self,
        picked: list[EndpointStats],
        pool: Pool,
        tier: int,
        request: RouteRequest,
        count: int,
        now: float,
    ) -> None:
        """Fallbacks beyond the chosen tier: worse health tiers, ranked after it."""
        tiers = pool.scratch.get("tiers")
        if tiers is None:
            tiers = pool.scratch["tiers"] = _tiers(pool)
        for _, members in tiers[tier + 1 :]:
            for s in members:
                if len(picked) >= count:
                    return
                if (
                    s not in picked
                    and s.id not in request.exclude_endpoint_ids
                    and self._has_room(s, request.estimated_input_tokens, now)
                ):
                    picked.append(s)

    def _no_usable(
        self,
        pool: Pool,
        request: RouteRequest,
        caps: frozenset[str],
        skipped: Mapping[str, int],
        now: float,
    ) -> Refusal:
        model = pool.model
        shown = sorted(c.replace(LABEL_TAG, "label ") for c in caps)
        if not pool.candidates:
            return Refusal(
                kind=RefusalKind.NO_HEALTHY_ENDPOINT,
                message=(
                    f"no usable endpoint for model {model!r}: {pool.registered} registered, none"
                    f" with every required capability ({', '.join(shown)})"
                ),
                model=model,
                registered=pool.registered,
                skipped={"missing_capability": pool.registered},
            )
        whys = []
        for s in pool.candidates[:20]:
            whys.append(f"{s.id} {self._skip_reason(s, request, now)}")
        more = len(pool.candidates) - 20
        if more > 0:
            whys.append(f"and {more} more")
        counts = ", ".join(f"{n} {SKIP_PHRASES.get(k, k)}" for k, n in skipped.items() if n)
        return Refusal(
            kind=RefusalKind.NO_HEALTHY_ENDPOINT,
            message=(
                f"no usable endpoint for model {model!r}: {pool.registered} registered,"
                f" {len(pool.candidates)} with the required capabilities, 0 usable ({counts}): "
                + "; ".join(whys)
            ),
            model=model,
            registered=pool.registered,
            skipped=dict(skipped),
        )

    def _skip_reason(self, s: EndpointStats, request: RouteRequest, now: float) -> str:
        """Why one candidate is not usable now ("" when it is)."""
        if s.health is HealthStatus.UNHEALTHY:
            return f"unhealthy ({s.health_reason})"
        if s.health is HealthStatus.DRAINING:
            return f"draining ({s.health_reason})"
        if s.cooldown_until > now:
            return f"cooling down after rate limiting ({s.cooldown_until - now:.1f} s left)"
        state = self._breakers.state(s.id)
        if state is BreakerState.OPEN:
            return f"breaker open ({self._breakers.open_remaining_s(s.id, now):.1f} s left)"
        if state is BreakerState.HALF_OPEN and not self._breakers.allows(s.id, now):
            return "breaker half-open, every trial slot taken"
        if s.id in request.exclude_endpoint_ids:
            return "excluded by the request"
        if not self._has_room(s, request.estimated_input_tokens, now):
            return "at capacity (max_in_flight, requests_per_minute or tokens_per_minute)"
        return ""

    def _explain(
        self,
        ctx: PickContext,
        strategy: Strategy,
        name: str,
        skipped: Mapping[str, int],
        arm_note: str,
    ) -> Decision:
        ranking: list[Ranked] = strategy.rank(ctx)
        pool, request, now = ctx.pool, ctx.request, ctx.now
        ranked_ids = {r.stats.id for r in ranking}
        # Worse health tiers rank after the strategy's own ranking, as fallbacks would.
        for s in pool.standby:
            if s.id not in ranked_ids and not self._skip_reason(s, request, now):
                ranking.append(Ranked(s, {"health": s.health_score}, 0.0))
                ranked_ids.add(s.id)
        explanations = []
        for rank, r in enumerate(ranking, start=1):
            explanations.append(self._explanation(r.stats, rank, r.scores, "", r.total))
        for s in pool.candidates:
            if s.id not in ranked_ids:
                why = self._skip_reason(s, request, now) or "not in the usable health tier"
                explanations.append(self._explanation(s, 0, {}, why, 0.0))
        top = ranking[0]
        fallbacks = tuple(r.stats.endpoint for r in ranking[1 : ctx.count])
        summary = _summary(len(ctx.items), len(pool.candidates), skipped)
        return Decision(
            decision_id="",
            endpoint=top.stats.endpoint,
            fallbacks=fallbacks,
            strategy=name,
            reason=f"{arm_note}explain: {strategy.name} ranks {top.stats.id} first; {summary}",
            scores=top.scores,
            retry=self._retry,
            affinity_hit=False,
            candidate_count=len(pool.candidates),
            skipped=dict(skipped),
            candidates=tuple(explanations),
        )

    def _explanation(
        self,
        s: EndpointStats,
        rank: int,
        scores: Mapping[str, float],
        skip_reason: str,
        total: float,
    ) -> CandidateExplanation:
        return CandidateExplanation(
            endpoint_id=s.id,
            rank=rank,
            scores=scores,
            skip_reason=skip_reason,
            health=s.health,
            breaker_state=self._breakers.state(s.id),
            in_flight=s.in_flight,
            total_score=total,
        )

    # -- pools -----------------------------------------------------------------------------------

    def _build_pool(self, model: str, caps: frozenset[str], now: float) -> Pool:
        group = self._by_model[model]
        candidates = [s for s in group if caps <= s.tags] if caps else group
        healthy: list[EndpointStats] = []
        unknown: list[EndpointStats] = []
        degraded: list[EndpointStats] = []
        skipped: dict[str, int] = {}
        valid_until = math.inf
        breakers = self._breakers
        for s in candidates:
            health = s.health
            why = ""
            if health is HealthStatus.UNHEALTHY:
                why = "unhealthy"
            elif health is HealthStatus.DRAINING:
                why = "draining"
            elif s.cooldown_until > now:
                why = "cooling_down"
                valid_until = min(valid_until, s.cooldown_until)
            elif not breakers.allows(s.id, now):
                open_ = breakers.state(s.id) is BreakerState.OPEN
                why = "breaker_open" if open_ else "breaker_half_open"
            if why:
                skipped[why] = skipped.get(why, 0) + 1
            elif health is HealthStatus.HEALTHY:
                healthy.append(s)
            elif health is HealthStatus.UNKNOWN:
                unknown.append(s)
            else:
                degraded.append(s)
        tiers = [t for t in (healthy, unknown, degraded) if t]
        items = tiers[0] if tiers else []
        standby = [s for t in tiers[1:] for s in t]
        for key, tier in (("unknown_health", unknown), ("degraded", degraded)):
            if tier and tier is not items:
                skipped[key] = len(tier)
        usable = len(items) + len(standby)
        threshold = self._settings.routing.panic_threshold
        panic = bool(candidates) and threshold > 0.0 and usable < threshold * len(candidates)
        if panic:
            # Envoy's panic mode: too few usable endpoints to carry the load, so spread it over
            # all of them rather than overload the few (except draining ones: an operator asked
            # for those to get nothing new).
            items = [s for s in candidates if s.health is not HealthStatus.DRAINING]
            standby = []
            skipped = (
                {"draining": len(candidates) - len(items)} if len(items) < len(candidates) else {}
            )
        summary = _summary(len(items), len(candidates), skipped)
        if panic:
            summary = "panic mode, health ignored: " + summary
        pool = Pool(
            key=(model, caps),
            summary=summary,
            items=items,
            standby=standby,
            registered=len(group),
            candidates=candidates,
            skipped=skipped,
            valid_until=valid_until,
            panic=panic,
            has_limits=any(
                s.endpoint.max_in_flight
                or s.endpoint.requests_per_minute
                or s.endpoint.tokens_per_minute
                for s in candidates
            ),
        )
        pools = self._pools.setdefault(model, {})
        old = pools.get(caps)
        if old is not None:
            old.close()
        pools[caps] = pool
        return pool

    def _drop_pools(self, model: str) -> None:
        """Health, breaker or membership of the model changed: rebuild its pools when next used."""
        pools = self._pools.pop(model, None)
        if pools:
            for pool in pools.values():
                pool.close()

    # -- feedback --------------------------------------------------------------------------------

    def record_outcome(self, outcome: Outcome, *, now: float) -> bool:
        """Count an outcome. Returns False when decision_id is unknown or expired; the endpoint's
        stats and breaker are still updated from endpoint_id."""
        pending = self._pending.pop(outcome.decision_id, None) if outcome.decision_id else None
        target = self._stats.get(outcome.endpoint_id)
        actual = outcome.input_tokens + outcome.output_tokens
        if pending is not None:
            chosen, tenant, estimate, hashes = pending
            live = self._stats.get(chosen.id) is chosen
            if live and chosen.in_flight > 0:
                chosen.in_flight -= 1
            if target is None and live:
                target = chosen
            if hashes and live and (outcome.result is not Result.SUCCESS or target is not chosen):
                # Failed, timed out, cancelled or served elsewhere: the pending blocks go.
                self._index.drop(chosen.id, hashes)
            if self._quotas_on and actual:
                # Actual tokens replace the estimate charged at decide time.
                self._ledger.charge_tenant(tenant, requests=0, tokens=actual - estimate, now=now)
            if live and (chosen.endpoint.requests_per_minute or chosen.endpoint.tokens_per_minute):
                if target is chosen:
                    delta = actual - estimate if actual else 0
                    self._ledger.charge_endpoint(chosen.id, requests=0, tokens=delta, now=now)
                else:
                    self._ledger.charge_endpoint(chosen.id, requests=-1, tokens=-estimate, now=now)
                chosen.quota_score = self._ledger.endpoint_headroom(chosen.id, now)
            if live and target is not chosen:
                self._scorer.rescore(chosen, now)
        if target is None:
            return pending is not None
        if pending is None or target is not pending[0]:
            endpoint = target.endpoint
            if (endpoint.requests_per_minute or endpoint.tokens_per_minute) and actual:
                self._ledger.charge_endpoint(target.id, requests=0, tokens=actual, now=now)
                target.quota_score = self._ledger.endpoint_headroom(target.id, now)
        result = outcome.result
        decay_s = self._settings.routing.latency_decay_s
        if result is Result.SUCCESS:
            record_latency(
                target, latency_s=outcome.latency_s, ttft_s=outcome.ttft_s, now=now, decay_s=decay_s
            )
            if target.latency_ref_s <= 0.0 < target.latency_ewma_s:
                # The model's first latency report: give it a reference now, not at the next
                # refresh, so unmeasured endpoints stop looking infinitely fast.
                self._refresh_group(self._by_model[target.model], now)
            self._record_breaker(target, ok=True, now=now)
            if pending is not None and pending[3]:
                if target is pending[0]:
                    self._index.confirm(target.id, pending[3])
                else:
                    self._index.record(target.id, pending[3])
        elif result is Result.ERROR or result is Result.TIMEOUT:
            if result is Result.TIMEOUT:
                # A timeout is a latency sample too; a fast error is not (it would look good).
                record_latency(
                    target, latency_s=outcome.latency_s, ttft_s=0.0, now=now, decay_s=decay_s
                )
            self._record_breaker(target, ok=False, now=now)
        elif result is Result.RATE_LIMITED:
            # A 429 says "not now", not "broken": cool down briefly instead of counting a failure.
            cooldown = self._settings.routing.rate_limited_cooldown_s
            if cooldown > 0.0:
                target.cooldown_until = now + cooldown
                self._drop_pools(target.model)
            self._record_breaker_release(target)
        elif result is Result.CANCELLED:
            # No verdict on the endpoint: no breaker failure, no latency sample; a half-open
            # trial it held is handed back for another request to make.
            self._record_breaker_release(target)
        if outcome.load is not None:
            target.load_report = outcome.load
            target.load_at = now
        limited = target.endpoint.requests_per_minute or target.endpoint.tokens_per_minute
        if target.latency_at == now or limited:
            # A latency sample or a quota change moves the factors rescore_load keeps.
            self._scorer.rescore(target, now)
        else:
            self._scorer.rescore_load(target, now)
        return pending is not None

    def _record_breaker(self, s: EndpointStats, *, ok: bool, now: float) -> None:
        half_open = self._breakers.state(s.id) is BreakerState.HALF_OPEN
        transition = self._breakers.record(s.id, ok=ok, now=now)
        if transition is not None:
            self._on_transition(transition)
        elif half_open:
            # A finished trial frees a slot: the pool's view of the endpoint may change.
            self._drop_pools(s.model)

    def _record_breaker_release(self, s: EndpointStats) -> None:
        if self._breakers.release_trial(s.id):
            self._drop_pools(s.model)

    def _on_transition(self, transition: BreakerTransition) -> None:
        s = self._stats.get(transition.endpoint_id)
        if s is None:
            return
        self._drop_pools(s.model)
        self._emit(
            HealthEvent(
                endpoint_id=s.id,
                model=s.model,
                status=s.health,
                breaker_state=transition.state,
                reason=transition.reason,
            )
        )

    def set_health(
        self, endpoint_id: str, status: HealthStatus, *, reason: str, now: float
    ) -> None:
        """A prober verdict (after its thresholds). Publishes an event when the status changes."""
        s = self._stats.get(endpoint_id)
        if s is None:
            return
        s.health_reason = reason
        if s.health is status:
            return
        s.health = status
        self._drop_pools(s.model)
        self._scorer.rescore(s, now)
        self._publish(s, reason)

    def record_load(self, endpoint_id: str, load: LoadReport, *, now: float) -> None:
        s = self._stats.get(endpoint_id)
        if s is None:
            return
        s.load_report = load
        s.load_at = now
        self._scorer.rescore_load(s, now)

    # -- housekeeping ----------------------------------------------------------------------------

    def tick(self, *, now: float) -> None:
        """Expire in-flight decisions with no outcome, move open breakers to half-open, expire
        sessions, and about once a second refresh scores that drift with time."""
        self._advance_breakers(now)
        self._expire(now)
        self._sessions.expire(now)
        if now >= self._refresh_at:
            self._refresh(now)

    def _advance_breakers(self, now: float) -> None:
        for transition in self._breakers.advance(now):
            self._on_transition(transition)

    def _expire(self, now: float) -> None:
        expiry = self._expiry
        pending = self._pending
        prefix = self._id_prefix
        while expiry and expiry[0][0] <= now:
            _, first, last = expiry.popleft()
            for seq in range(int(first), int(last) + 1):
                entry = pending.pop(prefix + str(seq), None)
                if entry is None:
                    continue
                s = entry[0]
                if self._stats.get(s.id) is s:
                    if s.in_flight > 0:
                        s.in_flight -= 1
                    if entry[3]:
                        self._index.drop(s.id, entry[3])
                    self._record_breaker_release(s)
                    self._scorer.rescore_load(s, now)

    def _refresh(self, now: float) -> None:
        """Per-model latency reference (median of reported EWMAs) and cheapest cost, then every
        endpoint's scores (stale load reports drop out, quota headroom refills)."""
        self._refresh_at = now + _REFRESH_EVERY_S
        for group in self._by_model.values():
            self._refresh_group(group, now)

    def _refresh_group(self, group: Sequence[EndpointStats], now: float) -> None:
        ttft_weight = self._ttft_weight
        known = [s.latency_metric_s(ttft_weight) for s in group if s.latency_ewma_s > 0.0]
        ref = median(known)
        costs = [s.cost for s in group if s.cost > 0.0]
        cost_ref = min(costs) if costs else 0.0
        for s in group:
            s.latency_ref_s = ref
            s.cost_ref = cost_ref
            endpoint = s.endpoint
            if endpoint.requests_per_minute or endpoint.tokens_per_minute:
                s.quota_score = self._ledger.endpoint_headroom(s.id, now)
            self._scorer.rescore(s, now)

    # -- live state ------------------------------------------------------------------------------

    def endpoint_states(self, *, model: str = "", now: float) -> list[EndpointState]:
        if model:
            group: Sequence[EndpointStats] = self._by_model.get(model, ())
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

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def indexed_blocks(self) -> int:
        return self._index.block_count

    # -- events ----------------------------------------------------------------------------------

    def _publish(self, s: EndpointStats, reason: str) -> None:
        self._emit(
            HealthEvent(
                endpoint_id=s.id,
                model=s.model,
                status=s.health,
                breaker_state=self._breakers.state(s.id),
                reason=reason,
            )
        )

    def _emit(self, event: HealthEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)


# Decision is a frozen dataclass; its generated __init__ sets each of its 11 fields through
# object.__setattr__, 2.3 us per decision, a fifth of a round-robin decision. Setting the slots
# through their descriptors builds the same value (equal, and frozen from then on) in 0.9 us.
# Used only while the fields are exactly these (tests/unit/decider/core checks both paths agree).
_DECISION_FIELDS = (
    "decision_id",
    "endpoint",
    "fallbacks",
    "strategy",
    "reason",
    "scores",
    "retry",
    "affinity_hit",
    "candidate_count",
    "skipped",
    "candidates",
)
FAST_DECISIONS = tuple(f.name for f in dataclasses.fields(Decision)) == _DECISION_FIELDS


def _make_decision(
    decision_id: str,
    endpoint: Endpoint,
    fallbacks: tuple[Endpoint, ...],
    strategy: str,
    reason: str,
    scores: Mapping[str, float],
    retry: RetryAdvice,
    affinity_hit: bool,
    candidate_count: int,
    skipped: Mapping[str, int],
) -> Decision:
    if not FAST_DECISIONS:
        return Decision(
            decision_id=decision_id,
            endpoint=endpoint,
            fallbacks=fallbacks,
            strategy=strategy,
            reason=reason,
            scores=scores,
            retry=retry,
            affinity_hit=affinity_hit,
            candidate_count=candidate_count,
            skipped=skipped,
        )
    d: Decision = _new(Decision)
    _set_id(d, decision_id)
    _set_endpoint(d, endpoint)
    _set_fallbacks(d, fallbacks)
    _set_strategy(d, strategy)
    _set_reason(d, reason)
    _set_scores(d, scores)
    _set_retry(d, retry)
    _set_affinity_hit(d, affinity_hit)
    _set_candidate_count(d, candidate_count)
    _set_skipped(d, skipped)
    _set_candidates(d, ())
    return d


def _slot_setter(name: str) -> Callable[[Decision, object], None]:
    setter: Callable[[Decision, object], None] = Decision.__dict__[name].__set__
    return setter


_new = object.__new__
if FAST_DECISIONS:
    (
        _set_id,
        _set_endpoint,
        _set_fallbacks,
        _set_strategy,
        _set_reason,
        _set_scores,
        _set_retry,
        _set_affinity_hit,
        _set_candidate_count,
        _set_skipped,
        _set_candidates,
    ) = (_slot_setter(name) for name in _DECISION_FIELDS)


def _endpoints_after_first(picked: list[EndpointStats]) -> tuple[Endpoint, ...]:
    n = len(picked)
    if n == 3:  # the default: two fallbacks
        return (picked[1].endpoint, picked[2].endpoint)
    return tuple([s.endpoint for s in picked[1:]])


def _tiers(pool: Pool) -> list[tuple[str, list[EndpointStats]]]:
    """The pool's usable endpoints by health tier, best first, with the skip key a tier is
    counted under while it is standby ("" for the chosen tier)."""
    tiers: list[tuple[str, list[EndpointStats]]] = [("", pool.items)] if pool.items else []
    by_health: dict[HealthStatus, list[EndpointStats]] = {}
    for s in pool.standby:
        by_health.setdefault(s.health, []).append(s)
    for health, key in (
        (HealthStatus.UNKNOWN, "unknown_health"),
        (HealthStatus.DEGRADED, "degraded"),
    ):
        members = by_health.get(health)
        if members:
            tiers.append((key, members))
    return tiers


__all__ = ["SKIP_PHRASES", "Engine", "EngineSettings"]
