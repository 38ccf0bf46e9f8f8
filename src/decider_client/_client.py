"""DeciderClient: Decide, try the endpoint and its fallbacks, report outcomes; fail-open.

The same flow as the Go client (clients/go/decider): a local health view fed by WatchHealth
and the endpoints seen in decisions, so that when Decider is unreachable a fail-open client
keeps routing to the last known healthy endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import decider_service_pb2_grpc as dgrpc
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb
from decider.v1 import registry_service_pb2_grpc as rgrpc

log = logging.getLogger("decider_client")

# ErrorInfo reasons Decider sets (README, "Status codes").
REASON_NO_HEALTHY_ENDPOINT = "NO_HEALTHY_ENDPOINT"
REASON_SHUTTING_DOWN = "SHUTTING_DOWN"
REASON_SERVER_OVERLOADED = "SERVER_OVERLOADED"
_DETAILS_KEY = "grpc-status-details-bin"
# Codes that mean Decider itself did not answer; UNKNOWN and INTERNAL come from a broken hop
# or a crashed handler. UNAVAILABLE and RESOURCE_EXHAUSTED depend on the ErrorInfo.
_UNREACHABLE_CODES = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
# A misconfigured retry policy must not spin one request for long.
_MAX_ATTEMPTS_CAP = 16


class DeciderUnreachable(Exception):
    """Decider could not be reached and fail-open had no endpoint (or is off)."""


class AttemptsExhausted(Exception):
    """Every attempt failed; `routed` says what was tried."""

    def __init__(self, message: str, routed: Routed) -> None:
        super().__init__(message)
        self.routed = routed


def _status_details(err: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    for key, value in err.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def _error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    status = _status_details(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def is_unreachable(err: BaseException) -> bool:
    """True when `err` means Decider did not answer, rather than answered with a refusal."""
    if not isinstance(err, grpc.aio.AioRpcError):
        return isinstance(err, (OSError, asyncio.TimeoutError))
    code = err.code()
    info = _error_info(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        # Only NO_HEALTHY_ENDPOINT is an answer; no ErrorInfo (transport) or SHUTTING_DOWN is not.
        return info is None or info.reason != REASON_NO_HEALTHY_ENDPOINT
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # A tenant over quota is an answer; a server out of capacity is not.
        return info is not None and info.reason == REASON_SERVER_OVERLOADED
    return code in _UNREACHABLE_CODES


def is_no_healthy_endpoint(err: BaseException) -> bool:
    """True when Decider answered UNAVAILABLE because no endpoint is usable."""
    if not isinstance(err, grpc.aio.AioRpcError) or err.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    info = _error_info(err)
    return info is not None and info.reason == REASON_NO_HEALTHY_ENDPOINT


def retry_after_s(err: BaseException) -> float:
    """The RetryInfo delay on a RESOURCE_EXHAUSTED (tenant over quota), or 0."""
    if not isinstance(err, grpc.aio.AioRpcError):
        return 0.0
    status = _status_details(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthView:
    """The last health Decider published for one endpoint."""

    endpoint_id: str
    model: str
    status: epb.HealthStatus.ValueType
    breaker_state: epb.BreakerState.ValueType
    reason: str = ""

    @property
    def usable(self) -> bool:
        # Mirrors Decider's filter: unhealthy, draining and breaker-open are out.
        if self.status in (epb.HEALTH_STATUS_UNHEALTHY, epb.HEALTH_STATUS_DRAINING):
            return False
        return self.breaker_state != epb.BREAKER_STATE_OPEN


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
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
    fail_open_decisions: int = 0
    dropped_reports: int = 0
    failed_reports: int = 0


AttemptFn = Callable[[epb.Endpoint], Awaitable[Attempt]]


def _rpc_error(code: grpc.StatusCode, details: str, status: bytes = b"") -> grpc.aio.AioRpcError:
    """The error a unary call would raise; `status` is a serialized google.rpc.Status."""
    trailing = grpc.aio.Metadata((_DETAILS_KEY, status)) if status else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(slots=True)
class _LiveStream:
    call: grpc.aio.StreamStreamCall[dpb.DecideStreamRequest, dpb.DecideStreamResponse]
    pending: dict[int, asyncio.Future[dpb.DecideStreamResponse]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None


class _DecideStream:
    """Concurrent decide() calls multiplexed over one DecideStream by correlation id.

    A broken stream fails every call waiting on it with the stream's status, so callers see
    the same errors (and fail open the same way) as with unary calls; the next call opens a
    new stream. A decision that arrives after its caller gave up goes to `on_late`.
    """

    def __init__(
        self,
        api: dgrpc.DeciderServiceAsyncStub,
        *,
        on_late: Callable[[dpb.DecideResponse], None],
    ) -> None:
        self._api = api
        self._on_late = on_late
        self._live: _LiveStream | None = None
        self._ids = itertools.count(1)
        # grpc.aio allows one write at a time on a stream.
        self._write_lock = asyncio.Lock()

    async def decide(self, request: dpb.DecideRequest, *, timeout_s: float) -> dpb.DecideResponse:
        live = self._open()
        correlation_id = next(self._ids)
        answer: asyncio.Future[dpb.DecideStreamResponse] = (
            asyncio.get_running_loop().create_future()
        )
        live.pending[correlation_id] = answer
        try:
            async with asyncio.timeout(timeout_s):
                async with self._write_lock:
                    await live.call.write(
                        dpb.DecideStreamRequest(correlation_id=correlation_id, decide=request)
                    )
                response = await answer
        except TimeoutError:
            live.pending.pop(correlation_id, None)
            raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "decide timed out") from None
        except grpc.aio.UsageError:
            # The stream was already finished: its reader fails `answer` with the reason.
            response = await answer
        if response.HasField("error"):
            error = response.error
            code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
            raise _rpc_error(code, error.message, error.SerializeToString())
        return response.decide

    def _open(self) -> _LiveStream:
        if self._live is None:
            live = _LiveStream(call=self._api.DecideStream())
            live.reader = asyncio.create_task(self._read(live), name="decider-decide-stream")
            self._live = live
        return self._live

    async def _read(self, live: _LiveStream) -> None:
        error = _rpc_error(grpc.StatusCode.UNAVAILABLE, "the decide stream ended")
        try:
            async for response in live.call:
                answer = live.pending.pop(response.correlation_id, None)
                if answer is not None and not answer.done():
                    answer.set_result(response)
                elif response.HasField("decide"):
                    self._on_late(response.decide)
        except grpc.aio.AioRpcError as err:
            error = err
        finally:
            if self._live is live:
                self._live = None
            for answer in live.pending.values():
                if not answer.done():
                    answer.set_exception(error)
            live.pending.clear()

    async def close(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.call.cancel()
            if live.reader is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await live.reader


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(max(0, round(seconds * 1e9)))
    return d


class DeciderClient:
    """An asyncio client for one Decider. Use as `async with DeciderClient(target) as c:`."""

    def __init__(
        self,
        target: str,
        *,
        decide_timeout_s: float = 0.5,
        report_timeout_s: float = 2.0,
        fail_open: bool = False,
        seed_endpoints: Iterable[epb.Endpoint] = (),
        watch: bool = False,
        watch_model: str = "",
        watch_max_age_s: float = 300.0,
        max_attempts: int = 3,
        max_backoff_s: float = 1.0,
        max_pending_reports: int = 1024,
        admin_token: str = "",
        channel: grpc.aio.Channel | None = None,
        stream: bool = False,
    ) -> None:
        """`stream=True` sends every decide() over one shared DecideStream instead of a unary
        call each (for high-volume gateways: less than half Decider's CPU per decision), with
        the same answers, errors, timeouts and fail-open; a decision that arrives after its
        caller gave up is reported as RESULT_CANCELLED so its in-flight slot is freed."""
        self._own_channel = channel is None
        self._channel = channel if channel is not None else grpc.aio.insecure_channel(target)
        self._api = dgrpc.DeciderServiceStub(self._channel)
        self._registry = rgrpc.RegistryServiceStub(self._channel)
        self._decide_timeout_s = decide_timeout_s
        self._report_timeout_s = report_timeout_s
        self._fail_open = fail_open
        self._watch = watch
        self._watch_model = watch_model
        self._watch_max_age_s = watch_max_age_s
        self._max_attempts = max_attempts
        self._max_backoff_s = max_backoff_s
        self._max_pending_reports = max_pending_reports
        self._admin_token = admin_token
        self._endpoints: dict[str, epb.Endpoint] = {}
        self._health: dict[str, HealthView] = {}
        self._snapshots = 0
        self._rotation = itertools.count()
        self._reports: set[asyncio.Task[None]] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self._stream = _DecideStream(self._api, on_late=self._cancel_late) if stream else None
        self.stats = Stats()
        self._learn(seed_endpoints)

    async def __aenter__(self) -> DeciderClient:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def start(self) -> None:
        """Starts the WatchHealth loop when `watch` is set (needs a running event loop)."""
        if self._watch and self._watch_task is None:
            self._watch_task = asyncio.create_task(self._watch_loop(), name="decider-watch")

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        if self._stream is not None:
            await self._stream.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), self._report_timeout_s)
        if self._own_channel:
            await self._channel.close()

    # -- decisions ---------------------------------------------------------------------------

    async def decide(self, request: dpb.DecideRequest) -> Decision:
        """Asks Decider within `decide_timeout_s`; fails open when configured and unreachable.

        Decider's refusals (NOT_FOUND, RESOURCE_EXHAUSTED, INVALID_ARGUMENT, UNAVAILABLE with
        NO_HEALTHY_ENDPOINT) are raised as `grpc.aio.AioRpcError`.
        """
        try:
            if self._stream is not None:
                resp = await self._stream.decide(request, timeout_s=self._decide_timeout_s)
            else:
                resp = await self._api.Decide(request, timeout=self._decide_timeout_s)
        except grpc.aio.AioRpcError as err:
            if not is_unreachable(err):
                raise
            return self._decide_locally(request, err)
        self._learn([resp.endpoint, *resp.fallbacks])
        return Decision(
            endpoint=resp.endpoint,
            fallbacks=tuple(resp.fallbacks),
            decision_id=resp.decision_id,
            retry=resp.retry if resp.HasField("retry") else None,
            reason=resp.reason,
            strategy=resp.strategy,
        )

    def _cancel_late(self, response: dpb.DecideResponse) -> None:
        self.report_outcome_nowait(
            Outcome(
                decision_id=response.decision_id,
                endpoint_id=response.endpoint.id,
                result=dpb.RESULT_CANCELLED,
                latency_s=0.0,
            )
        )

    def _decide_locally(self, request: dpb.DecideRequest, err: grpc.aio.AioRpcError) -> Decision:
        why = f"{err.code().name}: {err.details()}"
        if not self._fail_open:
            raise DeciderUnreachable(f"decider unreachable ({why})") from err
        usable = self._usable(request)
        if not usable:
            raise DeciderUnreachable(
                f"decider unreachable ({why}); no last known healthy endpoint "
                f"for model {request.model!r}"
            ) from err
        self.stats.fail_open_decisions += 1
        return Decision(
            endpoint=usable[0],
            fallbacks=tuple(usable[1:]),
            reason=f"fail-open: decider unreachable ({why}); {len(usable)} last known healthy",
            strategy="fail_open",
            fail_open=True,
        )

    def _usable(self, request: dpb.DecideRequest) -> list[epb.Endpoint]:
        healthy: list[epb.Endpoint] = []
        degraded: list[epb.Endpoint] = []
        excluded = set(request.exclude_endpoint_ids)
        wanted = set(request.required_capabilities)
        for ep_id in sorted(self._endpoints):
            ep = self._endpoints[ep_id]
            if ep.model != request.model or ep_id in excluded:
                continue
            if not wanted <= set(ep.capabilities):
                continue
            health = self._health.get(ep_id)
            if health is None:
                healthy.append(ep)
            elif not health.usable:
                continue
            elif health.status == epb.HEALTH_STATUS_DEGRADED:
                degraded.append(ep)
            else:
                healthy.append(ep)
        if len(healthy) > 1:
            # Rotate so fail-open traffic spreads over the healthy endpoints.
            k = next(self._rotation) % len(healthy)
            healthy = healthy[k:] + healthy[:k]
        return healthy + degraded

    def _learn(self, endpoints: Iterable[epb.Endpoint]) -> None:
        for ep in endpoints:
            if ep.id and ep.address:
                self._endpoints[ep.id] = ep

    # -- outcomes ----------------------------------------------------------------------------

    async def report_outcome(self, outcome: Outcome) -> bool:
        """Sends one outcome within `report_timeout_s`; returns Decider's `decision_found`."""
        resp = await self._api.ReportOutcome(outcome.to_proto(), timeout=self._report_timeout_s)
        return resp.decision_found

    def report_outcome_nowait(self, outcome: Outcome) -> None:
        """Reports in the background; drops (and counts) when too many are in flight."""
        if len(self._reports) >= self._max_pending_reports:
            self.stats.dropped_reports += 1
            return
        task = asyncio.create_task(self._report_quietly(outcome))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report_quietly(self, outcome: Outcome) -> None:
        try:
            await self.report_outcome(outcome)
        except grpc.aio.AioRpcError as err:
            self.stats.failed_reports += 1
            log.debug("decider_client: report failed: %s", err.code().name)

    async def flush(self) -> None:
        """Waits for every background report started so far."""
        if self._reports:
            await asyncio.gather(*self._reports, return_exceptions=True)

    # -- the whole flow ----------------------------------------------------------------------

    async def route(self, request: dpb.DecideRequest, attempt: AttemptFn) -> Routed:
        """Decide, try the endpoint then its fallbacks, Decide again excluding what was tried
        when they run out, and report every attempt. Raises AttemptsExhausted when all fail.
        """
        decision = await self.decide(request)
        max_attempts, backoff_s, multiplier, max_backoff_s = self._retry_plan(decision.retry)
        routed = Routed(decision_id=decision.decision_id, fail_open=decision.fail_open)
        queue = [decision.endpoint, *decision.fallbacks]
        decides = 1
        while len(routed.tried) < max_attempts:
            if not queue:
                if decides >= max_attempts:
                    break  # Decider keeps naming endpoints already tried.
                decides += 1
                again = dpb.DecideRequest()
                again.CopyFrom(request)
                again.exclude_endpoint_ids.extend(routed.tried)
                try:
                    decision = await self.decide(again)
                except (grpc.aio.AioRpcError, DeciderUnreachable) as err:
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
                backoff_s = min(backoff_s * multiplier, max_backoff_s)
            start = time.perf_counter()
            try:
                result = await attempt(ep)
            except asyncio.CancelledError:
                # The caller gave up, which says nothing about the endpoint: CANCELLED frees
                # the decision's in-flight slot without a breaker failure or latency sample.
                self.report_outcome_nowait(
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
            self.report_outcome_nowait(
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

    def _retry_plan(self, policy: dpb.RetryPolicy | None) -> tuple[int, float, float, float]:
        attempts, multiplier, cap = self._max_attempts, 2.0, self._max_backoff_s
        if policy is None:
            return attempts, 0.0, multiplier, cap
        if policy.max_attempts > 0:
            attempts = min(policy.max_attempts, _MAX_ATTEMPTS_CAP)
        if policy.backoff_multiplier >= 1:
            multiplier = policy.backoff_multiplier
        policy_cap = policy.max_backoff.ToTimedelta().total_seconds()
        if policy_cap > 0:
            cap = min(cap, policy_cap)
        initial = min(policy.initial_backoff.ToTimedelta().total_seconds(), cap)
        return attempts, max(initial, 0.0), multiplier, cap

    # -- the local view ----------------------------------------------------------------------

    def health(self, endpoint_id: str) -> HealthView | None:
        return self._health.get(endpoint_id)

    @property
    def health_snapshots(self) -> int:
        """WatchHealth snapshots received; 0 means the view has not synced yet."""
        return self._snapshots

    def known_endpoints(self, model: str = "") -> list[epb.Endpoint]:
        return [ep for _, ep in sorted(self._endpoints.items()) if not model or ep.model == model]

    async def refresh_endpoints(self) -> None:
        """Replaces the known endpoints of `watch_model` ("" = all) with the registry's list."""
        metadata = (("authorization", f"Bearer {self._admin_token}"),) if self._admin_token else ()
        resp = await self._registry.ListEndpoints(
            rpb.ListEndpointsRequest(model=self._watch_model),
            timeout=self._decide_timeout_s,
            metadata=metadata,
        )
        for ep_id in [i for i, ep in self._endpoints.items() if self._in_scope(ep.model)]:
            del self._endpoints[ep_id]
        self._learn(resp.endpoints)

    def _in_scope(self, model: str) -> bool:
        return not self._watch_model or model == self._watch_model

    def _apply(self, resp: dpb.WatchHealthResponse) -> None:
        if resp.snapshot:
            for ep_id in [i for i, h in self._health.items() if self._in_scope(h.model)]:
                del self._health[ep_id]
        for ev in resp.events:
            if ev.removed:
                self._health.pop(ev.endpoint_id, None)
                self._endpoints.pop(ev.endpoint_id, None)
                continue
            self._health[ev.endpoint_id] = HealthView(
                endpoint_id=ev.endpoint_id,
                model=ev.model,
                status=ev.status,
                breaker_state=ev.breaker_state,
                reason=ev.reason,
            )
        if resp.snapshot:
            self._snapshots += 1

    async def _watch_loop(self) -> None:
        backoff_s = 0.1
        while True:
            got = False
            try:
                # Each stream has a deadline, so a silently dead one gets replaced.
                stream = self._api.WatchHealth(
                    dpb.WatchHealthRequest(model=self._watch_model), timeout=self._watch_max_age_s
                )
                async for resp in stream:
                    got = True
                    self._apply(resp)
            except grpc.aio.AioRpcError as err:
                log.debug("decider_client: health stream ended: %s", err.code().name)
            except Exception:
                # The view must outlive a bad message; the next stream starts with a snapshot.
                log.exception("decider_client: health stream failed")
            backoff_s = 0.1 if got else min(backoff_s * 2, 5.0)
            await asyncio.sleep(backoff_s)
