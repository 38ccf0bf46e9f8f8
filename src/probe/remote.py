"""The standalone prober's link to a decider: endpoints in over ListEndpoints and WatchHealth,
verdicts out over RegistryService.ReportProbeResults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import grpc
import grpc.aio

from decider.codec.convert import REDACTED, endpoint_from_proto, load_to_proto, to_duration
from decider.core.model import Endpoint, HealthStatus, LoadReport
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import decider_service_pb2_grpc as dgrpc
from decider.v1 import registry_service_pb2 as rpb
from decider.v1 import registry_service_pb2_grpc as rgrpc

from .prober import Prober
from .settings import ProbeSettings

log = logging.getLogger("decider.probe")

# Backoff between failed RPCs to the decider; it may be restarting.
_RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(slots=True)
class _Verdict:
    status: HealthStatus
    reason: str


class ReportingSink:
    """A HealthSink that keeps the latest verdict and load per endpoint for the next report."""

    def __init__(self) -> None:
        self.verdicts: dict[str, _Verdict] = {}
        self.loads: dict[str, LoadReport] = {}
        self.changed = asyncio.Event()

    def set_health(
        self, endpoint_id: str, status: HealthStatus, *, reason: str, now: float
    ) -> None:
        self.verdicts[endpoint_id] = _Verdict(status, reason)
        self.changed.set()

    def record_load(self, endpoint_id: str, load: LoadReport, *, now: float) -> None:
        self.loads[endpoint_id] = load

    def expire_load(self, endpoint_id: str, *, now: float) -> None:
        self.loads.pop(endpoint_id, None)

    def keep_only(self, endpoint_ids: set[str]) -> None:
        for table in (self.verdicts, self.loads):
            for endpoint_id in [e for e in table if e not in endpoint_ids]:
                del table[endpoint_id]


def local_headers(endpoints: Sequence[Endpoint]) -> dict[str, Mapping[str, str]]:
    """Probe headers by endpoint id from a local config file's [[endpoints]]."""
    return {e.id: e.probe_headers for e in endpoints if e.probe_headers}


def with_local_headers(
    endpoint: Endpoint, local: Mapping[str, Mapping[str, str]], warned: set[str]
) -> Endpoint:
    """ListEndpoints redacts header values; use the local ones, drop the redacted rest."""
    headers = {k: v for k, v in endpoint.probe_headers.items() if v != REDACTED}
    headers.update(local.get(endpoint.id, {}))
    missing = sorted(k for k in endpoint.probe_headers if k not in headers)
    if missing and endpoint.id not in warned:
        warned.add(endpoint.id)
        log.warning(
            "endpoint %s declares probe headers %s whose values the decider does not share; "
            "set them under probe.headers.%s in --config",
            endpoint.id,
            ", ".join(missing),
            endpoint.id,
        )
    return replace(endpoint, probe_headers=MappingProxyType(headers))


def build_report(
    prober_id: str, prober: Prober, sink: ReportingSink, settings: ProbeSettings
) -> rpb.ReportProbeResultsRequest:
    results = []
    for endpoint_id, verdict in sorted(sink.verdicts.items()):
        result = rpb.ProbeResult(
            endpoint_id=endpoint_id,
            status=int(verdict.status),  # type: ignore[arg-type]
            reason=verdict.reason,
        )
        last = prober.last_result(endpoint_id)
        if last is not None:
            result.latency.CopyFrom(to_duration(last.latency_s))
        load = sink.loads.get(endpoint_id)
        if load is not None:
            result.load.CopyFrom(load_to_proto(load))
        results.append(result)
    return rpb.ReportProbeResultsRequest(
        prober_id=prober_id, results=results, valid_for=to_duration(settings.report_valid_for_s)
    )


class StandaloneProber:
    """Probes a remote decider's endpoints and reports back until cancelled."""

    def __init__(
        self,
        settings: ProbeSettings,
        *,
        target: str,
        prober_id: str,
        admin_token: str = "",
        local: Mapping[str, Mapping[str, str]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """`credentials` (and `channel_options`, such as a TLS server name) say how to reach
        the decider; without them the channel is plaintext."""
        self._settings = settings
        self._target = target
        self._credentials = credentials
        self._channel_options = list(channel_options)
        self._prober_id = prober_id
        self._metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()
        self._local = local or {}
        self._warned: set[str] = set()
        self.sink = ReportingSink()
        self.prober = Prober(settings, self.sink)
        self._known: set[str] = set()
        self._relist = asyncio.Event()
        self.reports_sent = 0
        self.listed = asyncio.Event()

    async def run(self) -> None:
        channel = (
            grpc.aio.secure_channel(self._target, self._credentials, self._channel_options)
            if self._credentials is not None
            else grpc.aio.insecure_channel(self._target, self._channel_options)
        )
        async with channel:
            registry = rgrpc.RegistryServiceStub(channel)
            decider = dgrpc.DeciderServiceStub(channel)
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self.prober.run())
                    group.create_task(self._list_loop(registry))
                    group.create_task(self._watch_loop(decider))
                    group.create_task(self._report_loop(registry))
            finally:
                await self.prober.aclose()

    async def _list_loop(self, registry: rgrpc.RegistryServiceAsyncStub) -> None:
        failures = 0
        while True:
            self._relist.clear()
            try:
                response = await registry.ListEndpoints(
                    rpb.ListEndpointsRequest(), metadata=self._metadata, timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                log.warning("ListEndpoints on %s failed: %s", self._target, exc.code().name)
                await asyncio.sleep(_RETRY_S[min(failures, len(_RETRY_S) - 1)])
                failures += 1
                continue
            failures = 0
            endpoints = [
                with_local_headers(endpoint_from_proto(p), self._local, self._warned)
                for p in response.endpoints
            ]
            self._known = {e.id for e in endpoints}
            self.sink.keep_only(self._known)
            self.prober.set_endpoints(endpoints)
            self.listed.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._relist.wait(), self._settings.relist_interval_s)

    async def _watch_loop(self, decider: dgrpc.DeciderServiceAsyncStub) -> None:
        """Registry changes show on WatchHealth as unknown ids or removed=true: re-list then."""
        failures = 0
        while True:
            try:
                stream = decider.WatchHealth(dpb.WatchHealthRequest(), metadata=self._metadata)
                async for response in stream:
                    failures = 0
                    if any(e.removed or e.endpoint_id not in self._known for e in response.events):
                        self._relist.set()
            except grpc.aio.AioRpcError as exc:
                log.info("WatchHealth on %s ended: %s", self._target, exc.code().name)
            # The stream ended (decider restart or shutdown): its registry may have changed.
            self._relist.set()
            await asyncio.sleep(_RETRY_S[min(failures, len(_RETRY_S) - 1)])
            failures += 1

    async def _report_loop(self, registry: rgrpc.RegistryServiceAsyncStub) -> None:
        """Report every report_interval_s (a heartbeat that keeps results valid) and at once
        after a verdict changes."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.sink.changed.wait(), self._settings.report_interval_s)
            # Let verdicts that change together (a host with many endpoints) share one report.
            await asyncio.sleep(0.02)
            self.sink.changed.clear()
            if not self.sink.verdicts:
                continue
            request = build_report(self._prober_id, self.prober, self.sink, self._settings)
            try:
                response = await registry.ReportProbeResults(
                    request, metadata=self._metadata, timeout=5
                )
            except grpc.aio.AioRpcError as exc:
                log.warning("ReportProbeResults on %s failed: %s", self._target, exc.code().name)
                # Try again soon rather than a whole interval later.
                await asyncio.sleep(_RETRY_S[1])
                self.sink.changed.set()
                continue
            self.reports_sent += 1
            if response.unknown_endpoint_ids:
                self._relist.set()
