"""The values the client hands back and takes in: Decision, Attempt, Outcome, Routed, Stats."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from google.protobuf import duration_pb2

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Where to send a request: `endpoint` first, then `fallbacks` in order."""

    endpoint: epb.Endpoint
    fallbacks: tuple[epb.Endpoint, ...] = ()
    # Goes back in ReportOutcome; empty for fail-open decisions.
    decision_id: str = ""
    retry: dpb.RetryPolicy | None = None
    reason: str = ""
    strategy: str = ""
    fail_open: bool = False

    @classmethod
    def from_proto(cls, resp: dpb.DecideResponse) -> Decision:
        return cls(
            endpoint=resp.endpoint,
            fallbacks=tuple(resp.fallbacks),
            decision_id=resp.decision_id,
            retry=resp.retry if resp.HasField("retry") else None,
            reason=resp.reason,
            strategy=resp.strategy,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """What an attempt function learned from one endpoint."""

    result: dpb.Result.ValueType
    input_tokens: int = 0
    output_tokens: int = 0
    time_to_first_token_s: float = 0.0
    load: epb.LoadReport | None = None
    # Stop retrying although the result is not a success (the response already went out,
    # or the failure is the request's own fault).
    final: bool = False
    error: str = ""


AttemptFn = Callable[[epb.Endpoint], Awaitable[Attempt]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """One attempt's result, as ReportOutcome carries it."""

    decision_id: str
    endpoint_id: str
    result: dpb.Result.ValueType
    latency_s: float
    input_tokens: int = 0
    output_tokens: int = 0
    time_to_first_token_s: float = 0.0
    load: epb.LoadReport | None = None

    def to_proto(self) -> dpb.ReportOutcomeRequest:
        req = dpb.ReportOutcomeRequest(
            decision_id=self.decision_id,
            endpoint_id=self.endpoint_id,
            result=self.result,
            latency=_duration(self.latency_s),
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
        )
        if self.time_to_first_token_s > 0:
            req.time_to_first_token.CopyFrom(_duration(self.time_to_first_token_s))
        if self.load is not None:
            req.load.CopyFrom(self.load)
        return req


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(max(0, round(seconds * 1e9)))
    return d


@dataclass(slots=True)
class Routed:
    """What `route` did: the last endpoint tried and what it returned."""

    tried: list[str] = field(default_factory=list)
    endpoint: epb.Endpoint | None = None
    attempt: Attempt | None = None
    decision_id: str = ""
    fail_open: bool = False


@dataclass(slots=True)
class Stats:
    """What the client did without Decider's help."""

    # Decisions made locally because Decider was unreachable.
    fail_open_decisions: int = 0
    # Reports not sent because max_pending_reports were in flight.
    dropped_reports: int = 0
    # Reports sent that came back with an error.
    failed_reports: int = 0
