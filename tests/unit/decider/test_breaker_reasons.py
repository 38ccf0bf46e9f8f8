from decider.core.model import BreakerState, HealthEvent, HealthStatus
from decider.state.breaker_reasons import BreakerReasons


def event(state: BreakerState, reason: str, **kw) -> HealthEvent:
    return HealthEvent(
        endpoint_id="e",
        model="m",
        status=kw.pop("status", HealthStatus.HEALTHY),
        breaker_state=state,
        reason=reason,
        **kw,
    )


def test_the_reason_of_the_last_breaker_transition_stands_until_it_closes():
    reasons = BreakerReasons()
    reasons.observe(event(BreakerState.CLOSED, "no health_url: assumed healthy"))
    assert reasons.reason("e") == ""
    reasons.observe(event(BreakerState.OPEN, "breaker open for 30 s: 5 consecutive failures"))
    # A health change while open carries the probe's reason, not the breaker's.
    reasons.observe(event(BreakerState.OPEN, "probe ok", status=HealthStatus.DEGRADED))
    assert reasons.reason("e") == "breaker open for 30 s: 5 consecutive failures"
    reasons.observe(event(BreakerState.HALF_OPEN, "half-open: admitting 3 trial requests"))
    assert reasons.reason("e") == "half-open: admitting 3 trial requests"
    reasons.observe(event(BreakerState.CLOSED, "breaker closed after 2 successful trials"))
    assert reasons.reason("e") == ""


def test_a_removed_endpoint_is_forgotten():
    reasons = BreakerReasons()
    reasons.observe(event(BreakerState.OPEN, "breaker open for 30 s: errors"))
    reasons.observe(event(BreakerState.UNKNOWN, "deregistered", removed=True))
    assert reasons.reason("e") == ""
    assert len(reasons) == 0
