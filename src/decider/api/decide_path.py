"""The check-decide-observe step every adapter shares: unary Decide, DecideStream and the Envoy
ext_proc processor each turn their wire format into a RouteRequest or an Outcome and call this,
so all of them reach the same engine, spans, metrics and decision log."""

from __future__ import annotations

import time
from collections.abc import Callable

from decider.api.ports import Clock, DecisionEngine, NullObserver, Observer
from decider.core.model import Decision, Endpoint, Outcome, Refusal, Result, RouteRequest
from decider.errors import InvalidArgument

# The `result` label a Decide refused for a malformed request is counted under.
INVALID_ARGUMENT = "invalid_argument"


class DecidePath:
    """Decides and records outcomes through one engine and one observer."""

    __slots__ = ("_clock", "_engine", "_observer", "_on_failure")

    def __init__(
        self,
        engine: DecisionEngine,
        *,
        clock: Clock = time.monotonic,
        observer: Observer | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._observer: Observer = observer or NullObserver()
        # Called with the endpoint id when an outcome reports ERROR or TIMEOUT (prober.probe_soon).
        self._on_failure = on_failure

    def now(self) -> float:
        return self._clock()

    def decide(self, route: RouteRequest) -> Decision | Refusal:
        """Decides and observes; raises InvalidArgument (counted as rejected) for a strategy
        name the engine does not know."""
        started = time.perf_counter()
        try:
            result = self._engine.decide(route, now=self._clock())
        except InvalidArgument:
            self._observer.decide_rejected(INVALID_ARGUMENT)
            raise
        self._observer.decided(route, result, elapsed_s=time.perf_counter() - started)
        return result

    def rejected(self, reason: str = INVALID_ARGUMENT) -> None:
        """A request refused before the engine saw it (malformed), counted as such."""
        self._observer.decide_rejected(reason)

    def record_outcome(self, outcome: Outcome) -> bool:
        """Records and observes an outcome; True when its decision was still pending."""
        found = self._engine.record_outcome(outcome, now=self._clock())
        self._observer.outcome_reported(outcome, decision_found=found)
        if self._on_failure is not None and outcome.result in (Result.ERROR, Result.TIMEOUT):
            self._on_failure(outcome.endpoint_id)
        return found

    def endpoints(self, model: str) -> list[Endpoint]:
        """The endpoints registered for `model` (for adapters that translate an address list
        into endpoint ids)."""
        return [s.endpoint for s in self._engine.endpoint_states(model=model, now=self._clock())]
