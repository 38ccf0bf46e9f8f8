"""What the engine says: the filters' part of a reason, refusal messages, why a candidate was
skipped, and explain mode's per-candidate answer. Reads state, never changes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from decider.core.model import (
    BreakerState,
    CandidateExplanation,
    Decision,
    HealthStatus,
    Refusal,
    RefusalKind,
    RetryAdvice,
    RouteRequest,
)
from decider.core.quota import QuotaCheck
from decider.core.stats import LABEL_TAG, EndpointStats
from decider.core.strategies.base import Ranked

if TYPE_CHECKING:
    from decider.core.pool import Pool
    from decider.core.state import Breakers
    from decider.core.strategies.base import PickContext, Strategy

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
# Models named in a MODEL_NOT_FOUND message before "and N more".
_MODELS_NAMED = 10
# Candidates named in a NO_HEALTHY_ENDPOINT message before "and N more".
_CANDIDATES_NAMED = 20


def summary(usable: int, candidates: int, skipped: Mapping[str, int]) -> str:
    """The filters' part of a reason: "3 of 5 candidates, 1 unhealthy, 1 breaker open"."""
    parts = [f"{usable} of {candidates} candidates"]
    for key, count in skipped.items():
        if count:
            parts.append(f"{count} {SKIP_PHRASES.get(key, key)}")
    return ", ".join(parts)


def model_not_found(model: str, served: list[str]) -> Refusal:
    # Name what is served, so a typo in the model name is obvious from the error alone.
    if not served:
        message = f"no endpoint serves model {model!r}; no endpoints are registered"
    else:
        shown = ", ".join(repr(m) for m in served[:_MODELS_NAMED])
        more = f" and {len(served) - _MODELS_NAMED} more" if len(served) > _MODELS_NAMED else ""
        message = f"no endpoint serves model {model!r}; models served: {shown}{more}"
    return Refusal(kind=RefusalKind.MODEL_NOT_FOUND, message=message, model=model)


def over_quota(tenant: str, model: str, check: QuotaCheck) -> Refusal:
    return Refusal(
        kind=RefusalKind.QUOTA_EXHAUSTED,
        message=(
            f"tenant {tenant!r} is over quota: "
            + "; ".join(v.description for v in check.violations)
            + f"; retry in {check.retry_after_s:.1f} s"
        ),
        model=model,
        retry_after_s=check.retry_after_s,
        violations=check.violations,
    )


class Explainer:
    """Refusals that say why each candidate was skipped, and explain mode."""

    __slots__ = ("_breakers", "_has_room", "_retry")

    def __init__(
        self,
        *,
        breakers: Breakers,
        has_room: Callable[[EndpointStats, int, float], bool],
        retry: RetryAdvice,
    ) -> None:
        self._breakers = breakers
        self._has_room = has_room
        self._retry = retry

    def no_usable(
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
        for s in pool.candidates[:_CANDIDATES_NAMED]:
            whys.append(f"{s.id} {self.skip_reason(s, request, now)}")
        more = len(pool.candidates) - _CANDIDATES_NAMED
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

    def skip_reason(self, s: EndpointStats, request: RouteRequest, now: float) -> str:
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

    def explain(
        self,
        ctx: PickContext,
        strategy: Strategy,
        name: str,
        skipped: Mapping[str, int],
        arm_note: str,
    ) -> Decision:
        """Explain mode: every candidate ranked or with its skip reason; changes no state."""
        ranking: list[Ranked] = strategy.rank(ctx)
        pool, request, now = ctx.pool, ctx.request, ctx.now
        ranked_ids = {r.stats.id for r in ranking}
        # Worse health tiers rank after the strategy's own ranking, as fallbacks would.
        for s in pool.standby:
            if s.id not in ranked_ids and not self.skip_reason(s, request, now):
                ranking.append(Ranked(s, {"health": s.health_score}, 0.0))
                ranked_ids.add(s.id)
        explanations = []
        for rank, r in enumerate(ranking, start=1):
            explanations.append(self._explanation(r.stats, rank, r.scores, "", r.total))
        for s in pool.candidates:
            if s.id not in ranked_ids:
                why = self.skip_reason(s, request, now) or "not in the usable health tier"
                explanations.append(self._explanation(s, 0, {}, why, 0.0))
        top = ranking[0]
        fallbacks = tuple(r.stats.endpoint for r in ranking[1 : ctx.count])
        text = summary(len(ctx.items), len(pool.candidates), skipped)
        return Decision(
            decision_id="",
            endpoint=top.stats.endpoint,
            fallbacks=fallbacks,
            strategy=name,
            reason=f"{arm_note}explain: {strategy.name} ranks {top.stats.id} first; {text}",
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
