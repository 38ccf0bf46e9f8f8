"""DeciderClient: Decide, try the endpoint and its fallbacks, report outcomes; fail open.

The same flow as the Go client (clients/go/decider): a local health view fed by WatchHealth
and the endpoints seen in decisions, so that when Decider is unreachable a fail-open client
keeps routing to the last known healthy endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

import grpc

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import decider_service_pb2_grpc as dgrpc
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb
from decider.v1 import registry_service_pb2_grpc as rgrpc
from decider_client._errors import DeciderClientError, DeciderUnreachable, rpc_errors
from decider_client._options import ClientOptions
from decider_client._results import AttemptFn, Decision, Outcome, Routed, Stats
from decider_client._route import route
from decider_client._stream import DecideStream
from decider_client._view import HealthView, LocalView
from decider_client._watch import watch_health

log = logging.getLogger("decider_client")


class DeciderClient:
    """An asyncio client for one Decider. Use as `async with DeciderClient(target) as c:`.

    `channel` brings a channel the caller owns (and closes); the client then ignores
    `options.tls` and `options.channel_options`, which describe the channel it opens itself.
    """

    def __init__(
        self,
        target: str,
        options: ClientOptions | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.options = options if options is not None else ClientOptions()
        self._own_channel = channel is None
        self._channel = channel if channel is not None else self.options.open_channel(target)
        self._api = dgrpc.DeciderServiceStub(self._channel)
        self._registry = rgrpc.RegistryServiceStub(self._channel)
        self._view = LocalView(scope_model=self.options.watch_model)
        self._view.learn(self.options.seed_endpoints)
        self._reports: set[asyncio.Task[None]] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self._stream = (
            DecideStream(self._api, on_late=self._cancel_late) if self.options.stream else None
        )
        self.stats = Stats()

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
        if self.options.watch and self._watch_task is None:
            self._watch_task = asyncio.create_task(
                watch_health(
                    self._api,
                    self._view,
                    model=self.options.watch_model,
                    max_age_s=self.options.watch_max_age_s,
                ),
                name="decider-watch",
            )

    async def close(self) -> None:
        """Stops the watch loop and the stream, waits (bounded) for pending reports, and
        closes the channel if the client opened it."""
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        if self._stream is not None:
            await self._stream.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), self.options.report_timeout_s)
        if self._own_channel:
            await self._channel.close()

    # -- decisions ---------------------------------------------------------------------------

    async def decide(self, request: dpb.DecideRequest) -> Decision:
        """Asks Decider within `decide_timeout_s`; fails open when configured and unreachable.

        Decider's refusals raise a `Refused` subclass (NotFound, QuotaExceeded,
        InvalidRequest, NoHealthyEndpoint); an unreachable Decider raises DeciderUnreachable
        when fail-open is off or knows no usable endpoint.
        """
        timeout_s = self.options.decide_timeout_s
        try:
            if self._stream is not None:
                resp = await self._stream.decide(request, timeout_s=timeout_s)
            else:
                with rpc_errors():
                    resp = await self._api.Decide(request, timeout=timeout_s)
        except DeciderUnreachable as err:
            return self._decide_locally(request, err)
        self._view.learn([resp.endpoint, *resp.fallbacks])
        return Decision.from_proto(resp)

    def _decide_locally(self, request: dpb.DecideRequest, err: DeciderUnreachable) -> Decision:
        if not self.options.fail_open:
            raise err
        usable = self._view.usable(request)
        if not usable:
            raise DeciderUnreachable(
                f"{err}; no last known healthy endpoint for model {request.model!r}", err.status
            ) from err
        self.stats.fail_open_decisions += 1
        return Decision(
            endpoint=usable[0],
            fallbacks=tuple(usable[1:]),
            reason=f"fail-open: {err}; {len(usable)} last known healthy",
            strategy="fail_open",
            fail_open=True,
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

    # -- outcomes ----------------------------------------------------------------------------

    async def report_outcome(self, outcome: Outcome) -> bool:
        """Sends one outcome within `report_timeout_s`; returns Decider's `decision_found`."""
        with rpc_errors():
            resp = await self._api.ReportOutcome(
                outcome.to_proto(), timeout=self.options.report_timeout_s
            )
        return resp.decision_found

    def report_outcome_nowait(self, outcome: Outcome) -> None:
        """Reports in the background; drops (and counts) when too many are in flight."""
        if len(self._reports) >= self.options.max_pending_reports:
            self.stats.dropped_reports += 1
            return
        task = asyncio.create_task(self._report_quietly(outcome))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report_quietly(self, outcome: Outcome) -> None:
        try:
            await self.report_outcome(outcome)
        except DeciderClientError as err:
            self.stats.failed_reports += 1
            log.debug("decider_client: report failed: %s", err)

    async def flush(self) -> None:
        """Waits for every background report started so far."""
        if self._reports:
            await asyncio.gather(*self._reports, return_exceptions=True)

    # -- the whole flow ----------------------------------------------------------------------

    async def route(self, request: dpb.DecideRequest, attempt: AttemptFn) -> Routed:
        """Decide, try the endpoint then its fallbacks, Decide again excluding what was tried
        when they run out, and report every attempt. Raises AttemptsExhausted when all fail.
        """
        return await route(
            request,
            attempt,
            decide=self.decide,
            report=self.report_outcome_nowait,
            max_attempts=self.options.max_attempts,
            max_backoff_s=self.options.max_backoff_s,
        )

    # -- the local view ----------------------------------------------------------------------

    def health(self, endpoint_id: str) -> HealthView | None:
        return self._view.health(endpoint_id)

    @property
    def health_snapshots(self) -> int:
        """WatchHealth snapshots received; 0 means the view has not synced yet."""
        return self._view.snapshots

    def known_endpoints(self, model: str = "") -> list[epb.Endpoint]:
        return self._view.known_endpoints(model)

    async def refresh_endpoints(self) -> None:
        """Replaces the known endpoints of `watch_model` ("" = all) with the registry's list."""
        token = self.options.admin_token
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        with rpc_errors():
            resp = await self._registry.ListEndpoints(
                rpb.ListEndpointsRequest(model=self.options.watch_model),
                timeout=self.options.decide_timeout_s,
                metadata=metadata,
            )
        self._view.replace_endpoints(resp.endpoints)
