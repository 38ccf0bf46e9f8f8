"""The grpc.aio process: wires registry -> engine <- prober, watch hub, servicers; owns lifecycle.

Start: registry snapshot -> engine and prober; gRPC server with health, reflection and the
interceptors; the engine tick loop (which also expires stale standalone-prober reports) and the
embedded prober run as tasks.
Stop (SIGTERM/SIGINT or the shutdown trigger): health NOT_SERVING, new RPCs refused, watch and
DecideStream streams ended cleanly, in-flight RPCs given `grace_period_s` to finish, then tasks
closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from decider.api import decider_service, reflection
from decider.api.decider_service import DeciderService
from decider.api.interceptors import (
    AdminClientInterceptor,
    AdminTokenInterceptor,
    AdmissionInterceptor,
)
from decider.api.ports import Clock, Observer
from decider.api.registry_service import RegistryService
from decider.codec.convert import health_event_from_state
from decider.config import ServerSettings, Settings
from decider.config.listen import parse_listen
from decider.config.tls import CertificateFiles
from decider.core.engine import Engine
from decider.core.model import Endpoint, HealthEvent, HealthStatus
from decider.core.state import EngineState
from decider.errors import ConfigError
from decider.obs.logs import log_health_event
from decider.obs.metrics import Metrics, MetricsServer
from decider.obs.telemetry import TelemetryObserver, Tracing
from decider.state.breaker_reasons import BreakerReasons
from decider.state.probe_reports import ProbeReports
from decider.state.registry import EndpointStore, Membership, Registry
from decider.state.watch import WatchHub
from decider.v1 import decider_service_pb2, registry_service_pb2
from decider.v1 import registry_service_pb2_grpc as rgrpc
from probe import HealthSink, Prober

if TYPE_CHECKING:
    # Imported where they are built, and only when configured: redis-py and the ext_proc
    # service (Envoy's protos) add about 10 MB to a process's RSS, wanted or not.
    from decider.api.extproc.listener import ExtProcListener
    from decider.state.fleet_probing import FleetProbing
    from decider.state.redis_link import RedisLink
    from decider.state.shared_engine import SharedLoad, StateSync

log = logging.getLogger("decider.server")

DECIDER_SERVICE = decider_service_pb2.DESCRIPTOR.services_by_name["DeciderService"].full_name
REGISTRY_SERVICE = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
HEALTH_SERVICES = ("", DECIDER_SERVICE, REGISTRY_SERVICE)
# stop() gives everything but the gRPC drain (the probing lease, background tasks, prober,
# /metrics, Redis, span export) this long in all, and the drain its grace period plus this
# long; a step still running then is named in the log and left behind, so one stuck
# dependency cannot hold the process.
STOP_STEPS_S = 5.0
_LAST_CHANCE_S = 0.25


class DeciderServer:
    """One Decider process. `start()` binds and serves; `stop()` drains and releases."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        observer: Observer | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        tracing: Tracing | None = None,
        metrics: Metrics | None = None,
        metrics_listen: str | None = None,
        reuse_port: bool = False,
    ) -> None:
        """`observer` and `interceptors` are the telemetry seams: the observer sees every
        decision and outcome (default: spans, metrics and the decision log); the interceptors
        run after admission and the admin token. `tracing` is shut down by stop();
        `metrics_listen` (default `[server] metrics_listen`) serves `metrics` on /metrics.
        `reuse_port`: one of `decider serve --workers N`, sharing the port with the others."""
        self.settings = settings
        self._clock = clock
        srv = settings.server
        self.tracing = tracing or Tracing.disabled()
        self.metrics = metrics or Metrics()
        listen_metrics = srv.metrics_listen if metrics_listen is None else metrics_listen
        self._metrics_address = parse_listen(listen_metrics) if listen_metrics else None
        self.metrics_server: MetricsServer | None = None
        # Read (and checked) before anything else starts: a bad file is a start-up error.
        self.tls = CertificateFiles(srv.tls) if srv.tls.enabled else None
        # [state] backend = "redis": registered endpoints live in Redis, shared by every
        # replica; otherwise in this process (SQLite under data_dir, or memory).
        self.link: RedisLink | None = None
        membership: Membership | None = None
        if settings.state.shared:
            from decider.obs.shared_metrics import SharedStateCollector
            from decider.state.redis_link import RedisLink
            from decider.state.shared_registry import SharedRegistry

            self.link = RedisLink(settings.state, replica_id=replica_id())
            self.registry = Registry(settings.endpoints)
            membership = SharedRegistry(self.registry, self.link)
            self.metrics.registry.register(SharedStateCollector(self.link))
        else:
            store = EndpointStore(srv.data_dir) if srv.data_dir else None
            self.registry = Registry(settings.endpoints, store=store)
        self.breaker_reasons = BreakerReasons()
        self.hub = WatchHub(
            self._health_snapshot, queue_size=srv.watch_queue_size, max_watchers=srv.max_watchers
        )
        rng = rng or random.Random()
        # With a shared state, breakers, sessions, the prefix index and budgets are synced
        # with the other replicas in the background (StateSync); Decide reads local copies.
        self.sync: StateSync | None = None
        self.shared_load: SharedLoad | None = None
        state: EngineState | None = None
        if self.link is not None:
            from decider.state.shared_engine import StateSync, shared_state

            self.sync = StateSync(self.link, clock=clock)
            state, self.shared_load = shared_state(
                EngineState.in_memory(settings.engine, rng=rng),
                self.sync,
                clock=clock,
                ttl_s=settings.engine.affinity.ttl_s,
                replica_id=self.link.replica_id,
            )
        self.engine = Engine(settings.engine, rng=rng, on_event=self._on_event, state=state)
        if self.shared_load is not None:
            self.shared_load.on_change = lambda ids, now: self.engine.rescore_load(ids, now=now)
        # [probe] embedded = false: a standalone decider-probe reports instead. With a shared
        # state, one replica of the fleet probes (FleetProbing holds its prober).
        self.prober: Prober | None = None
        self.fleet_probing: FleetProbing | None = None
        if settings.probe.embedded and self.link is not None:
            from decider.state.fleet_probing import FleetProbing

            self.fleet_probing = FleetProbing(self.link, self.engine, self._new_prober, clock=clock)
        elif settings.probe.embedded:
            self.prober = self._new_prober(self.engine)
        self.probe_reports = ProbeReports()
        self._members: frozenset[str] = frozenset()
        self.registry.subscribe(self._on_membership)
        self._on_membership(self.registry.snapshot())
        self.metrics.bind_endpoint_states(lambda: self.engine.endpoint_states(now=self._clock()))
        self.metrics.bind_watcher_count(lambda: self.hub.watcher_count)
        self.metrics.add_state_usage(self.engine.state_usage)
        self.metrics.add_state_usage(lambda: {"watch_events": self.hub.usage()})
        self.metrics.add_state_usage(self.tracing.state_usage)

        self.admission = AdmissionInterceptor(max_concurrent=srv.max_concurrent_rpcs)
        chain: list[grpc.aio.ServerInterceptor] = [self.admission]
        if srv.admin_token:
            chain.append(AdminTokenInterceptor(srv.admin_token))
        if srv.tls.admin_client_names:
            chain.append(AdminClientInterceptor(srv.tls.admin_client_names))
        chain.extend(interceptors)
        self._server = grpc.aio.server(
            interceptors=chain, options=grpc_options(srv, reuse_port=reuse_port)
        )
        self._decider = DeciderService(
            self.engine,
            self.hub,
            clock=clock,
            on_failure=self._probe_soon_callback(),
            observer=observer
            or TelemetryObserver(self.metrics, annotate_spans=self.tracing.enabled),
            tracing=self.tracing,
        )
        decider_service.add_to_server(self._decider, self._server)
        # [ext_proc] listen: Envoy's endpoint picker, through the same DecidePath as Decide.
        self.ext_proc: ExtProcListener | None = None
        if settings.ext_proc.listen:
            from decider.api.extproc.listener import ExtProcListener

            self.ext_proc = ExtProcListener(
                self._decider.path, settings.ext_proc, tracing=self.tracing
            )
        rgrpc.add_RegistryServiceServicer_to_server(
            RegistryService(
                self.registry,
                self.engine,
                clock=clock,
                reports=self.probe_reports,
                breaker_reasons=self.breaker_reasons,
                tracing=self.tracing,
                membership=membership,
                health_note=self.link.health_note if self.link is not None else None,
            ),
            self._server,
        )
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable(
            (
                DECIDER_SERVICE,
                REGISTRY_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._server,
        )
        self.port = 0
        self.ext_proc_port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self._stop_now: asyncio.Future[None] | None = None

    async def start(self) -> int:
        """Binds, starts serving and returns the bound port (useful with port 0)."""
        listen = self.settings.server.listen
        try:
            if self.tls is not None:
                self.port = self._server.add_secure_port(listen, self.tls.grpc_credentials())
            else:
                self.port = self._server.add_insecure_port(listen)
        except RuntimeError as exc:
            # grpc says only "Failed to bind"; binding once more ourselves says why.
            raise ConfigError(_bind_failure(listen, "server.listen", str(exc))) from exc
        if self.link is not None:
            from decider.state.redis_link import LINK_ERRORS

            # The fleet's registry before the first decision; if Redis is down, start from
            # the config endpoints and catch up when it answers (run() keeps trying).
            with contextlib.suppress(*LINK_ERRORS):
                await self.link.reconcile()
        await self._server.start()
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.ext_proc is not None:
            ext_proc_listen = self.settings.ext_proc.listen
            try:
                self.ext_proc_port = await self.ext_proc.start(
                    ext_proc_listen,
                    credentials=self.tls.grpc_credentials() if self.tls is not None else None,
                )
            except RuntimeError as exc:
                raise ConfigError(
                    _bind_failure(ext_proc_listen, "ext_proc.listen", str(exc))
                ) from exc
            await self.health.set(
                self.ext_proc.service_name, health_pb2.HealthCheckResponse.SERVING
            )
            log.info("ext_proc endpoint picker on %s", self.settings.ext_proc.listen)
        self._tasks = [asyncio.create_task(self._tick_loop(), name="decider-tick")]
        if self.prober is not None:
            self._tasks.append(asyncio.create_task(self.prober.run(), name="decider-prober"))
        if self.link is not None:
            self._tasks.append(asyncio.create_task(self.link.run(), name="decider-shared-state"))
        if self.fleet_probing is not None:
            self._tasks.append(asyncio.create_task(self.fleet_probing.run(), name="decider-fleet"))
        if self.sync is not None:
            self._tasks.append(asyncio.create_task(self.sync.run(), name="decider-state-sync"))
        if self.shared_load is not None:
            self._tasks.append(asyncio.create_task(self.shared_load.run(), name="decider-load"))
        if self._metrics_address is not None:
            host, port = self._metrics_address
            self.metrics_server = MetricsServer(
                self.metrics,
                host=host,
                port=port,
                ssl_context=self.tls.ssl_context() if self.tls is not None else None,
            )
            try:
                bound = await self.metrics_server.start()
            except OSError as exc:
                self.metrics_server = None
                if exc.errno == errno.EADDRINUSE:
                    message = f"address already in use: {host}:{port} (server.metrics_listen)"
                else:
                    message = (
                        f"metrics_listen: cannot listen on {host}:{port}: {exc.strerror or exc}"
                    )
                raise ConfigError(message) from exc
            scheme = "https" if self.tls is not None else "http"
            log.info("metrics on %s://%s:%d/metrics", scheme, host or "0.0.0.0", bound)
        if self.tls is not None:
            tls = self.settings.server.tls
            log.info(
                "TLS on: certificate %s%s",
                tls.cert_file,
                f", client certificates required (CA {tls.client_ca_file})" if tls.mutual else "",
            )
        log.info("decider serving on %s (port %d)", listen, self.port)
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Drains: NOT_SERVING, refuse new RPCs, end watch streams, let in-flight ones finish;
        then releases the rest, every step bounded (STOP_STEPS_S)."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.server.grace_period_s if grace_s is None else grace_s
        log.info("decider draining (grace %.1fs)", grace)
        loop = asyncio.get_running_loop()
        steps_end = loop.time() + STOP_STEPS_S
        self.admission.draining = True
        await self.health.enter_graceful_shutdown()
        self.hub.close()
        self._decider.drain()
        if self.fleet_probing is not None:
            # Hand the probing over now rather than when the lease runs out.
            await _bounded("releasing the probing lease", self.fleet_probing.release(), steps_end)
        drains = [self._server.stop(grace)]
        if self.ext_proc is not None:
            drains.append(self.ext_proc.stop(grace))
        drain_start = loop.time()
        await _bounded("draining RPCs", asyncio.gather(*drains), loop.time() + grace + STOP_STEPS_S)
        # The drain's time does not count against the other steps.
        steps_end += loop.time() - drain_start
        for task in self._tasks:
            task.cancel()
        if self.prober is not None:
            await _bounded("closing the prober", self.prober.aclose(), steps_end)
        await self._await_tasks(steps_end)
        if self.metrics_server is not None:
            await _bounded("stopping /metrics", self.metrics_server.stop(), steps_end)
        if self.link is not None:
            await _bounded("closing the Redis link", self.link.aclose(), steps_end)
        self.registry.close()
        # Flushes spans still queued; the exporter blocks, so off the event loop.
        await _bounded(
            "exporting the last spans", asyncio.to_thread(self.tracing.shutdown), steps_end
        )
        log.info("decider stopped")

    async def _await_tasks(self, until: float) -> None:
        """Waits for the cancelled background tasks until `until` (loop time): a loop that does
        not end when cancelled must not hold the process, and the log names it."""
        if not self._tasks:
            return
        timeout = max(until - asyncio.get_running_loop().time(), _LAST_CHANCE_S)
        done, stuck = await asyncio.wait(self._tasks, timeout=timeout)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("background task %s had failed", task.get_name(),
                          exc_info=task.exception())  # fmt: skip
        if stuck:
            log.warning(
                "stopping without background tasks still running after being cancelled: %s",
                ", ".join(sorted(task.get_name() for task in stuck)),
            )

    def stop_now(self) -> None:
        """Ends a drain in progress at once: RPCs still running are cancelled."""
        log.warning("decider stopping now, cancelling RPCs still in flight")
        self._stop_now = asyncio.ensure_future(self._server.stop(None))

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    def _new_prober(self, sink: HealthSink) -> Prober:
        return Prober(
            self.settings.probe,
            sink,
            clock=self._clock,
            on_result=self.metrics.record_probe_result,
            on_scrape_error=self._on_scrape_error,
        )

    def _probe_soon_callback(self) -> Callable[[str], None] | None:
        if self.fleet_probing is not None:
            return self.fleet_probing.probe_soon
        return self.prober.probe_soon if self.prober is not None else None

    def _on_membership(self, endpoints: Sequence[Endpoint]) -> None:
        self.engine.set_endpoints(endpoints, now=self._clock())
        if self.prober is not None:
            self.prober.set_endpoints(endpoints)
        if self.fleet_probing is not None:
            self.fleet_probing.set_endpoints(endpoints)
        self.probe_reports.retain({e.id for e in endpoints})
        members = frozenset(e.id for e in endpoints)
        for gone in self._members - members:
            self.metrics.forget_endpoint(gone)
        self.metrics.set_endpoints({e.id: e.model for e in endpoints})
        self._members = members

    def _on_event(self, event: HealthEvent) -> None:
        # Called by the engine mid-method: only enqueue (watch.py never blocks) and log.
        self.hub.publish(event)
        self.breaker_reasons.observe(event)
        log_health_event(event)

    def _on_scrape_error(self, endpoint_id: str, reason: str) -> None:
        self.metrics.record_scrape_error(endpoint_id, reason=reason)

    def _health_snapshot(self, model: str) -> list[HealthEvent]:
        states = self.engine.endpoint_states(model=model, now=self._clock())
        return [health_event_from_state(s) for s in sorted(states, key=lambda s: s.endpoint.id)]

    async def _tick_loop(self) -> None:
        interval_s = self.settings.server.tick_interval_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            try:
                now = self._clock()
                self.engine.tick(now=now)
                for stale in self.probe_reports.expire(now=now):
                    self.engine.set_health(
                        stale.endpoint_id, HealthStatus.UNKNOWN, reason=stale.reason, now=now
                    )
            except Exception:
                log.exception("engine tick failed")


def replica_id() -> str:
    """This process's name in the shared state: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def grpc_options(srv: ServerSettings, *, reuse_port: bool = False) -> list[tuple[str, Any]]:
    """Channel arguments of the gRPC server: message limits, keepalive and connection age.
    `reuse_port`: one of `decider serve --workers N`, sharing the port with the others."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", srv.max_message_bytes),
        ("grpc.max_send_message_length", srv.max_message_bytes),
        # Two servers must never share a port by accident; workers share one on purpose.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.keepalive_time_ms", _ms(srv.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(srv.keepalive_timeout_s)),
        # The timeout chttp2 puts on the ping it sends (60 s by default, whatever the keepalive
        # timeout says, in grpc 1.85): without it a dead peer is dropped a minute late.
        ("grpc.http2.ping_timeout_ms", _ms(srv.keepalive_timeout_s)),
        # Ping idle connections too: an idle gateway that died is found and its connection freed.
        ("grpc.keepalive_permit_without_calls", 1),
        # No cap on the server's own pings between data frames (the default, 2, stops them).
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(srv.keepalive_min_client_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if srv.max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", _ms(srv.max_connection_idle_s)))
    if srv.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", _ms(srv.max_connection_age_s)))
        options.append(("grpc.max_connection_age_grace_ms", _ms(srv.max_connection_age_grace_s)))
    return options


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _bind_failure(listen: str, key: str, grpc_message: str) -> str:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        return f"{key}: cannot listen on {listen!r}: {exc}"
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return (
                        f"address already in use: {listen} ({key}); another process listens there"
                    )
                return f"{key}: cannot listen on {listen!r}: {exc.strerror or exc}"
    return f"{key}: cannot listen on {listen!r}: {grpc_message}"


async def serve(
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    on_ready: Callable[[DeciderServer], None] | None = None,
    observer: Observer | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    tracing: Tracing | None = None,
    reuse_port: bool = False,
) -> None:
    """Serves until `shutdown_trigger` returns; without one, until SIGTERM or SIGINT."""
    server = DeciderServer(
        settings,
        observer=observer,
        interceptors=interceptors,
        tracing=tracing,
        reuse_port=reuse_port,
    )
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    # What start-up built (modules, settings, the engine's tables) lives as long as the
    # process: frozen, it is no longer walked by every full collection, which took tens of
    # milliseconds with a large registry (a latency spike for the calls in flight).
    gc.freeze()
    if on_ready is not None:
        on_ready(server)
    signals: tuple[signal.Signals, ...] = ()
    reload_signals: tuple[signal.Signals, ...] = ()
    loop = asyncio.get_running_loop()
    if shutdown_trigger is None:
        stop = asyncio.Event()
        signals = (signal.SIGTERM, signal.SIGINT)
        for signum in signals:
            loop.add_signal_handler(signum, stop.set)
        shutdown_trigger = stop.wait
        if server.tls is not None:
            # Certificate rotators (cert-manager sidecars, Vault agent) can send SIGHUP after
            # writing new files; a changed file is also noticed at the next connection.
            loop.add_signal_handler(signal.SIGHUP, server.tls.request_reload)
            reload_signals = (signal.SIGHUP,)
    try:
        await shutdown_trigger()
    finally:
        # A second signal while draining cuts the grace period short (Ctrl-C twice).
        for signum in signals:
            loop.add_signal_handler(signum, server.stop_now)
        await server.stop()
        for signum in (*signals, *reload_signals):
            loop.remove_signal_handler(signum)


async def _bounded(step: str, work: Awaitable[Any], until: float) -> None:
    """Runs one step of stop() until `until` (loop time). A step still running then is
    cancelled and named in the log; an error it raised is logged. Either way stop() goes on."""
    task = asyncio.ensure_future(work)
    # Once the budget is spent, the steps left still get a moment: most take milliseconds.
    timeout = max(until - asyncio.get_running_loop().time(), _LAST_CHANCE_S)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        log.warning("stopping: %s did not finish in time; going on without it", step)
    elif not task.cancelled() and task.exception() is not None:
        log.error("stopping: %s failed", step, exc_info=task.exception())
