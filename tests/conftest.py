"""Shared fixtures: a real Decider server on 127.0.0.1, port 0, called through generated stubs.

pytest-grpc's fixtures build a synchronous grpc.server on a thread pool around one servicer.
What we test is Decider's own grpc.aio server (interceptors, health, reflection, drain, the
tick loop and prober tasks), so `start_server` starts the real DeciderServer in the test's
event loop and hands back aio stubs instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis_server import RedisServer

from decider import config
from decider.config import Settings
from decider.runtime.server import DeciderServer
from decider.v1 import decider_service_pb2_grpc as dgrpc
from decider.v1 import registry_service_pb2_grpc as rgrpc


@dataclass
class Running:
    server: DeciderServer
    channel: grpc.aio.Channel
    decider: dgrpc.DeciderServiceAsyncStub
    registry: rgrpc.RegistryServiceAsyncStub
    address: str


def make_settings(
    default_data_dir: Path, doc: Mapping[str, Any] | None = None, **server: Any
) -> Settings:
    """Settings from a TOML-like dict, on 127.0.0.1 port 0 with a short grace period."""
    settings = config.parse(doc or {}, source="test.toml")
    server.setdefault("listen", "127.0.0.1:0")
    server.setdefault("data_dir", str(default_data_dir))
    server.setdefault("grace_period_s", 2.0)
    return replace(settings, server=replace(settings.server, **server))


@contextlib.asynccontextmanager
async def running(
    settings: Settings, *, interceptors: Sequence[grpc.aio.ServerInterceptor] = (), **options: Any
) -> AsyncIterator[Running]:
    """`options` go to DeciderServer (tracing, metrics, metrics_listen, ...)."""
    server = DeciderServer(settings, interceptors=interceptors, **options)
    port = await server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield Running(
            server=server,
            channel=channel,
            decider=dgrpc.DeciderServiceStub(channel),  # type: ignore[arg-type]
            registry=rgrpc.RegistryServiceStub(channel),  # type: ignore[arg-type]
            address=address,
        )
    finally:
        await channel.close()
        await server.stop(0.5)


StartServer = Callable[..., contextlib.AbstractAsyncContextManager[Running]]


@pytest.fixture
def start_server(tmp_path: Path) -> StartServer:
    """`async with start_server(doc, **server_settings) as srv:` runs a server for the block."""

    def start(
        doc: Mapping[str, Any] | None = None,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        **server: Any,
    ) -> Any:
        return running(make_settings(tmp_path / "data", doc, **server), interceptors=interceptors)

    return start


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port for this test; killable and restartable."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()
