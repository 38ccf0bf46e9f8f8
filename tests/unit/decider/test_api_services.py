"""The servicers with a fake engine and a fake context: wiring, hooks and error mapping."""

from __future__ import annotations

from types import MappingProxyType

import grpc
import pytest

from decider.api.decider_service import DeciderService
from decider.core.model import (
    Decision,
    Endpoint,
    EndpointState,
    HealthStatus,
    LoadReport,
    Outcome,
    Refusal,
    RefusalKind,
    RetryAdvice,
    RouteRequest,
)
from decider.state.watch import WatchHub
from decider.v1 import decider_service_pb2 as dpb

ENDPOINT = Endpoint(id="e", address="h:1", model="m")


class FakeEngine:
    def __init__(self, answer: Decision | Refusal | Exception) -> None:
        self.answer = answer
        self.outcomes: list[Outcome] = []

    def decide(self, request: RouteRequest, *, now: float) -> Decision | Refusal:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def record_outcome(self, outcome: Outcome, *, now: float) -> bool:
        self.outcomes.append(outcome)
        return outcome.decision_id == "known"

    def set_health(self, endpoint_id: str, status: HealthStatus, *, reason: str, now: float):
        pass

    def record_load(self, endpoint_id: str, load: LoadReport, *, now: float) -> None:
        pass

    def endpoint_states(self, *, model: str = "", now: float) -> list[EndpointState]:
        return []


class Aborted(grpc.aio.AbortError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class FakeContext:
    async def abort(self, code, details="", trailing_metadata=()):
        raise Aborted(code, details)


class RecordingObserver:
    def __init__(self) -> None:
        self.decisions: list[tuple[RouteRequest, Decision | Refusal]] = []
        self.outcomes: list[tuple[Outcome, bool]] = []
        self.rejected: list[str] = []

    def decided(self, request, result, *, elapsed_s):
        assert elapsed_s >= 0
        self.decisions.append((request, result))

    def decide_rejected(self, reason):
        self.rejected.append(reason)

    def outcome_reported(self, outcome, *, decision_found):
        self.outcomes.append((outcome, decision_found))


def _decision() -> Decision:
    return Decision(
        decision_id="d1",
        endpoint=ENDPOINT,
        fallbacks=(),
        strategy="round_robin",
        reason="next in turn",
        scores=MappingProxyType({}),
        retry=RetryAdvice(
            max_attempts=3, initial_backoff_s=0.1, max_backoff_s=2, backoff_multiplier=2
        ),
        affinity_hit=False,
        candidate_count=1,
        skipped=MappingProxyType({}),
    )


def _service(engine: FakeEngine, **kw) -> DeciderService:
    return DeciderService(engine, WatchHub(lambda model: []), clock=lambda: 1.0, **kw)


async def test_decide_converts_and_tells_the_observer():
    observer = RecordingObserver()
    service = _service(FakeEngine(_decision()), observer=observer)
    encoded = await service.Decide(dpb.DecideRequest(model="m", tenant="t"), FakeContext())
    reply = dpb.DecideResponse.FromString(encoded)
    assert reply.endpoint.id == "e"
    assert reply.retry.max_backoff.seconds == 2
    ((request, result),) = observer.decisions
    assert request.tenant == "t"
    assert isinstance(result, Decision)


async def test_a_malformed_request_is_invalid_argument_and_told_to_the_observer():
    observer = RecordingObserver()
    service = _service(FakeEngine(_decision()), observer=observer)
    with pytest.raises(Aborted) as err:
        await service.Decide(dpb.DecideRequest(model=""), FakeContext())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert observer.rejected == ["invalid_argument"]
    assert observer.decisions == []


async def test_a_refusal_becomes_its_status():
    refusal = Refusal(kind=RefusalKind.MODEL_NOT_FOUND, message="nobody serves m", model="m")
    service = _service(FakeEngine(refusal))
    with pytest.raises(Aborted) as err:
        await service.Decide(dpb.DecideRequest(model="m"), FakeContext())
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert err.value.details == "nobody serves m"


async def test_an_engine_bug_is_internal_and_says_nothing_of_it(caplog):
    service = _service(FakeEngine(RuntimeError("secret detail")))
    with pytest.raises(Aborted) as err:
        await service.Decide(dpb.DecideRequest(model="m"), FakeContext())
    assert err.value.code == grpc.StatusCode.INTERNAL
    assert "secret" not in err.value.details
    assert "secret detail" in caplog.text


@pytest.mark.parametrize(
    ("result", "probed"),
    [
        (dpb.RESULT_SUCCESS, False),
        (dpb.RESULT_RATE_LIMITED, False),
        (dpb.RESULT_ERROR, True),
        (dpb.RESULT_TIMEOUT, True),
    ],
)
async def test_failed_outcomes_ask_the_prober_to_look_now(result, probed):
    engine = FakeEngine(_decision())
    asked: list[str] = []
    observer = RecordingObserver()
    service = _service(engine, on_failure=asked.append, observer=observer)
    reply = await service.ReportOutcome(
        dpb.ReportOutcomeRequest(decision_id="known", endpoint_id="e", result=result),
        FakeContext(),
    )
    assert reply.decision_found
    assert asked == (["e"] if probed else [])
    assert [o.endpoint_id for o in engine.outcomes] == ["e"]
    assert observer.outcomes[0][1] is True
