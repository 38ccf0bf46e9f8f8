"""The ext_proc listener: a grpc.aio server of its own carrying only ExternalProcessor and the
standard health service (Envoy health-checks the picker on the port it calls).

Its own server, not the main port, because each Process stream lives as long as its HTTP
request (minutes for a long SSE answer): on the main port those streams would go through the
admission interceptor meant for short Decide calls, and the prompt bodies need a larger message
limit than Decide does (docs/ENVOY.md).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from decider.api.decide_path import DecidePath
from decider.api.extproc.service import SERVICE, ExtProcService, add_to_server
from decider.api.extproc.settings import ExtProcSettings
from decider.obs.telemetry import Tracing

# Room for a body of max_body_bytes plus the message around it.
_MESSAGE_SLACK_BYTES = 64 << 10


class ExtProcListener:
    """Build, `start(listen)`, `stop(grace_s)`."""

    # The name it serves under, and reports health for on both ports.
    service_name = SERVICE

    def __init__(
        self, path: DecidePath, settings: ExtProcSettings, *, tracing: Tracing | None = None
    ) -> None:
        limit = settings.max_body_bytes + _MESSAGE_SLACK_BYTES
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        self.service = ExtProcService(path, settings, tracing=tracing)
        add_to_server(self.service, self._server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = 0

    async def start(self, listen: str, *, credentials: grpc.ServerCredentials | None = None) -> int:
        """Binds `listen` (HOST:PORT, port 0 picks one), with TLS when `credentials` are given
        (the main listener's `[server.tls]`), serves, returns the bound port."""
        # grpc raises RuntimeError("Failed to bind ..."); the runtime says why.
        if credentials is not None:
            self.port = self._server.add_secure_port(listen, credentials)
        else:
            self.port = self._server.add_insecure_port(listen)
        await self._server.start()
        for service in ("", SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING first, so Envoy's health check moves away, then in-flight streams get
        `grace_s` to finish."""
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
