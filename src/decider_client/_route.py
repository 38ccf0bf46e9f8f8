"""The gateway flow: decide, try the endpoint then its fallbacks, decide again without what
was tried, and report every attempt."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider_client._errors import AttemptsExhausted, DeciderClientError
from decider_client._results import AttemptFn, Decision, Outcome, Routed

# A misconfigured retry policy must not spin one request for long.
MAX_ATTEMPTS_CAP = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPlan:
    """How many attempts and how long to pause between them, for one routed request."""

    max_attempts: int
    backoff_s: float
    multiplier: float
    max_backoff_s: float

    @classmethod
    def of(
        cls, policy: dpb.RetryPolicy | None, *, max_attempts: int, max_backoff_s: float
    ) -> RetryPlan:
        """The decision's policy where it says something, the client's options otherwise;
        the client's max_backoff_s caps whatever the policy says."""
        attempts, multiplier, cap = max_attempts, 2.0, max_backoff_s
        if policy is None:
            return cls(
                max_attempts=attempts, backoff_s=0.0, multiplier=multiplier, max_backoff_s=cap
            )
        if policy.max_attempts > 0:
            attempts = min(policy.max_attempts, MAX_ATTEMPTS_CAP)
        if policy.backoff_multiplier >= 1:
            multiplier = policy.backoff_multiplier
        policy_cap = policy.max_backoff.ToTimedelta().total_seconds()
        if policy_cap > 0:
            cap = min(cap, policy_cap)
        initial = min(policy.initial_backoff.ToTimedelta().total_seconds(), cap)
        return cls(
            max_attempts=attempts,
            backoff_s=max(initial, 0.0),
            multiplier=multiplier,
            max_backoff_s=cap,
        )


async def route(
    request: dpb.DecideRequest,
    attempt: AttemptFn,
    *,
    decide: Callable[[dpb.DecideRequest], Awaitable[Decision]],
    report: Callable[[Outcome], None],
    max_attempts: int,
    max_backoff_s: float,
) -> Routed:
    """Raises AttemptsExhausted when every attempt fails, and what `decide` raises for the
    first decision."""
    decision = await decide(request)
    plan = RetryPlan.of(decision.retry, max_attempts=max_attempts, max_backoff_s=max_backoff_s)
    backoff_s = plan.backoff_s
    routed = Routed(decision_id=decision.decision_id, fail_open=decision.fail_open)
    queue: list[epb.Endpoint] = [decision.endpoint, *decision.fallbacks]
    decides = 1
    while len(routed.tried) < plan.max_attempts:
        if not queue:
            if decides >= plan.max_attempts:
                break  # Decider keeps naming endpoints already tried.
            decides += 1
            again = dpb.DecideRequest()
            again.CopyFrom(request)
            again.exclude_endpoint_ids.extend(routed.tried)
            try:
                decision = await decide(again)
            except DeciderClientError as err:
                raise AttemptsExhausted(
                    f"{len(routed.tried)} attempts failed; no endpoint left: {err}", routed
                ) from err
            routed.decision_id, routed.fail_open = decision.decision_id, decision.fail_open
            queue = [decision.endpoint, *decision.fallbacks]
        ep = queue.pop(0)
        if ep.id in routed.tried:
            continue
        if routed.tried and backoff_s > 0:
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * plan.multiplier, plan.max_backoff_s)
        start = time.perf_counter()
        try:
            result = await attempt(ep)
        except asyncio.CancelledError:
            # The caller gave up, which says nothing about the endpoint: CANCELLED frees the
            # decision's in-flight slot without a breaker failure or latency sample.
            report(
                Outcome(
                    decision_id=decision.decision_id,
                    endpoint_id=ep.id,
                    result=dpb.RESULT_CANCELLED,
                    latency_s=time.perf_counter() - start,
                )
            )
            raise
        latency_s = time.perf_counter() - start
        routed.tried.append(ep.id)
        routed.endpoint, routed.attempt = ep, result
        report(
            Outcome(
                decision_id=decision.decision_id,
                endpoint_id=ep.id,
                result=result.result,
                latency_s=latency_s,
                input_tokens=result.input_tokens,
                output_tokens=result.output_tokens,
                time_to_first_token_s=result.time_to_first_token_s,
                load=result.load,
            )
        )
        if result.result == dpb.RESULT_SUCCESS or result.final:
            return routed
    last = routed.attempt.error if routed.attempt else "none tried"
    raise AttemptsExhausted(f"{len(routed.tried)} attempts failed (last: {last})", routed)
