"""Circuit breakers, one per endpoint; the only writer of breaker state.

closed -> open after `consecutive_failures` failures in a row, or when the failure share over a
sliding window reaches `failure_rate`; open for `open_s` times the number of consecutive ejections
(capped at `max_open_s`); then half-open, admitting up to `half_open_trials` requests at a time;
`half_open_successes` successes close it, one failure opens it again. Like Envoy's outlier
detector, the ejection count decays by one for every `open_s` spent closed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from decider.core.model import BreakerState
from decider.core.settings import BreakerSettings


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerTransition:
    endpoint_id: str
    state: BreakerState
    reason: str


class _Breaker:
    __slots__ = (
        "closed_at",
        "consecutive",
        "ejections",
        "open_until",
        "prev_failures",
        "prev_total",
        "state",
        "trial_successes",
        "trials_out",
        "window_failures",
        "window_start",
        "window_total",
    )

    def __init__(self, now: float) -> None:
        self.state = BreakerState.CLOSED
        self.consecutive = 0
        self.ejections = 0
        self.open_until = 0.0
        self.closed_at = now
        self.trials_out = 0
        self.trial_successes = 0
        self.window_start = now
        self.window_failures = 0
        self.window_total = 0
        self.prev_failures = 0
        self.prev_total = 0


class CircuitBreakers:
    def __init__(self, settings: BreakerSettings) -> None:
        self._s = settings
        self._entries: dict[str, _Breaker] = {}
        # Earliest open_until among open breakers, so callers skip `advance` cheaply.
        self.next_deadline = math.inf
        # Breakers now half-open, so callers skip `on_pick` cheaply when there are none.
        self.half_open = 0

    # -- membership ------------------------------------------------------------------------------

    def add(self, endpoint_id: str, *, now: float) -> None:
        if endpoint_id not in self._entries:
            self._entries[endpoint_id] = _Breaker(now)

    def remove(self, endpoint_id: str) -> None:
        entry = self._entries.pop(endpoint_id, None)
        if entry is not None and entry.state is BreakerState.HALF_OPEN:
            self.half_open -= 1

    # -- reads -----------------------------------------------------------------------------------

    def state(self, endpoint_id: str) -> BreakerState:
        entry = self._entries.get(endpoint_id)
        return entry.state if entry is not None else BreakerState.UNKNOWN

    def allows(self, endpoint_id: str, now: float) -> bool:
        """Whether the endpoint may take a new request now (closed, or half-open with a free
        trial slot). Time-driven moves happen in `advance`, not here."""
        entry = self._entries.get(endpoint_id)
        if entry is None or entry.state is BreakerState.CLOSED:
            return True
        if entry.state is BreakerState.HALF_OPEN:
            return entry.trials_out < self._s.half_open_trials
        return False

    def open_remaining_s(self, endpoint_id: str, now: float) -> float:
        entry = self._entries.get(endpoint_id)
        if entry is None or entry.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, entry.open_until - now)

    # -- writes ----------------------------------------------------------------------------------

    def on_pick(self, endpoint_id: str) -> bool:
        """A decision chose the endpoint; in half-open this takes a trial slot. Returns True when
        that changed whether the endpoint is admitted (its last free slot was taken)."""
        entry = self._entries.get(endpoint_id)
        if entry is None or entry.state is not BreakerState.HALF_OPEN:
            return False
        entry.trials_out += 1
        return entry.trials_out == self._s.half_open_trials

    def release_trial(self, endpoint_id: str) -> bool:
        """A half-open trial ended with no outcome (expired); frees its slot."""
        entry = self._entries.get(endpoint_id)
        if entry is None or entry.state is not BreakerState.HALF_OPEN or entry.trials_out == 0:
            return False
        entry.trials_out -= 1
        return entry.trials_out == self._s.half_open_trials - 1

    def record(self, endpoint_id: str, *, ok: bool, now: float) -> BreakerTransition | None:
        """Count one outcome; returns the transition it caused, if any."""
        s = self._s
        entry = self._entries.get(endpoint_id)
        if entry is None or not s.enabled:
            return None
        if entry.state is BreakerState.HALF_OPEN:
            entry.trials_out = max(0, entry.trials_out - 1)
            if not ok:
                return self._open(endpoint_id, entry, now, "half-open trial failed")
            entry.trial_successes += 1
            if entry.trial_successes >= s.half_open_successes:
                return self._close(endpoint_id, entry, now)
            return None
        if entry.state is BreakerState.OPEN:
            # A late outcome of a request sent before the breaker opened.
            return None
        self._count(entry, ok=ok, now=now)
        if ok:
            entry.consecutive = 0
            return None
        entry.consecutive += 1
        if entry.consecutive >= s.consecutive_failures:
            return self._open(endpoint_id, entry, now, f"{entry.consecutive} consecutive failures")
        if s.failure_rate > 0.0:
            total, failures = self._window(entry, now)
            if total >= s.min_requests and failures >= s.failure_rate * total:
                return self._open(
                    endpoint_id,
                    entry,
                    now,
                    f"failure rate {failures / total:.0%} over {s.window_s:g} s"
                    f" ({failures:.0f} of {total:.0f})",
                )
        return None

    def advance(self, now: float) -> list[BreakerTransition]:
        """Move open breakers whose time is up to half-open."""
        if now < self.next_deadline:
            return []
        moved: list[BreakerTransition] = []
        deadline = math.inf
        for endpoint_id, entry in self._entries.items():
            if entry.state is not BreakerState.OPEN:
                continue
            if entry.open_until <= now:
                entry.state = BreakerState.HALF_OPEN
                self.half_open += 1
                entry.trials_out = 0
                entry.trial_successes = 0
                moved.append(
                    BreakerTransition(
                        endpoint_id=endpoint_id,
                        state=BreakerState.HALF_OPEN,
                        reason=f"half-open: admitting {self._s.half_open_trials} trial requests",
                    )
                )
            else:
                deadline = min(deadline, entry.open_until)
        self.next_deadline = deadline
        return moved

    # -- internals -------------------------------------------------------------------------------

    def _count(self, entry: _Breaker, *, ok: bool, now: float) -> None:
        window = self._s.window_s
        if now - entry.window_start >= window:
            # Two fixed buckets weighted by overlap approximate a sliding window cheaply.
            if now - entry.window_start >= 2 * window:
                entry.prev_total = entry.prev_failures = 0
            else:
                entry.prev_total, entry.prev_failures = entry.window_total, entry.window_failures
            entry.window_start = now
            entry.window_total = entry.window_failures = 0
        entry.window_total += 1
        if not ok:
            entry.window_failures += 1

    def _window(self, entry: _Breaker, now: float) -> tuple[float, float]:
        overlap = max(0.0, 1.0 - (now - entry.window_start) / self._s.window_s)
        return (
            entry.window_total + entry.prev_total * overlap,
            entry.window_failures + entry.prev_failures * overlap,
        )

    def _open(self, endpoint_id: str, entry: _Breaker, now: float, why: str) -> BreakerTransition:
        s = self._s
        if entry.state is BreakerState.HALF_OPEN:
            self.half_open -= 1
        if entry.state is BreakerState.CLOSED:
            # Healthy time since the last close earns the multiplier back, one step per open_s.
            entry.ejections = max(0, entry.ejections - int((now - entry.closed_at) // s.open_s))
        entry.ejections += 1
        open_for_s = min(s.open_s * entry.ejections, s.max_open_s)
        entry.state = BreakerState.OPEN
        entry.open_until = now + open_for_s
        entry.trials_out = entry.trial_successes = 0
        entry.consecutive = 0
        entry.window_total = entry.window_failures = entry.prev_total = entry.prev_failures = 0
        entry.window_start = now
        self.next_deadline = min(self.next_deadline, entry.open_until)
        return BreakerTransition(
            endpoint_id=endpoint_id,
            state=BreakerState.OPEN,
            reason=f"breaker open for {open_for_s:g} s: {why} (ejection {entry.ejections})",
        )

    def _close(self, endpoint_id: str, entry: _Breaker, now: float) -> BreakerTransition:
        if entry.state is BreakerState.HALF_OPEN:
            self.half_open -= 1
        entry.state = BreakerState.CLOSED
        entry.closed_at = now
        entry.consecutive = 0
        entry.trials_out = entry.trial_successes = 0
        return BreakerTransition(
            endpoint_id=endpoint_id,
            state=BreakerState.CLOSED,
            reason=f"breaker closed after {self._s.half_open_successes} successful trials",
        )
