"""TLS to Redis: a real redis-server serving TLS only (certificates made at test time), real
Decider replicas and in-process servers reaching it over rediss://, mutual TLS, and what a CA,
a host name or a client certificate that does not fit looks like to an operator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import StartServer
from decider_support import ErrorInfo, detail
from redis_server import RedisServer, RedisTLS, free_port
from replicas import Replica, eventually
from tls_certs import CA, Pair

from decider.state.redis_link import RedisLink
from decider.state.settings import StateSettings
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb

ROOT = Path(__file__).resolve().parents[2]
CFG_ENDPOINT = {"id": "cfg-0", "address": "127.0.0.1:20000", "model": "m"}


class PKI:
    """The Redis CA, Redis' certificate (IP SAN 127.0.0.1), a client certificate it signed,
    and an unrelated CA."""

    def __init__(self, directory: Path) -> None:
        self.ca = CA(directory / "redis-ca", name="Redis CA")
        self.server = self.ca.issue(
            "redis.test", dns=("redis.test",), ips=("127.0.0.1",), stem="redis", client=False
        )
        self.client = self.ca.issue("decider", server=False, stem="decider-client")
        self.other_ca = CA(directory / "other-ca", name="Other CA")


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path / "pki")


StartRedis = Callable[..., RedisServer]


@pytest.fixture
def start_redis(tmp_path: Path, pki: PKI) -> Iterator[StartRedis]:
    """`start_redis(auth_clients="yes", server=pair)`: a redis-server serving TLS only."""
    started: list[RedisServer] = []

    def start(*, auth_clients: str = "no", server: Pair | None = None) -> RedisServer:
        tls = RedisTLS(server=server or pki.server, client=pki.client, auth_clients=auth_clients)
        redis = RedisServer(tmp_path / f"redis-{len(started)}", tls=tls)
        started.append(redis)
        redis.start()
        return redis

    yield start
    for redis in started:
        redis.kill()


def state(redis: RedisServer, **keys: Any) -> dict[str, Any]:
    return {"backend": "redis", "url": redis.url, "key_prefix": "tls:", **keys}


def register(endpoint_id: str) -> rpb.RegisterEndpointRequest:
    return rpb.RegisterEndpointRequest(
        endpoint=epb.Endpoint(id=endpoint_id, address="127.0.0.1:20001", model="dyn")
    )


async def routed(stub: Any, model: str) -> str | None:
    try:
        reply = await stub.Decide(dpb.DecideRequest(model=model), timeout=5)
    except grpc.aio.AioRpcError as err:
        if err.code() is grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return str(reply.endpoint.id)


async def health_reasons(stub: Any) -> str:
    listed = await stub.ListEndpoints(rpb.ListEndpointsRequest(), timeout=5)
    return " | ".join(s.health_reason for s in listed.statuses.values())


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


@contextlib.asynccontextmanager
async def link_to(settings: StateSettings) -> AsyncIterator[RedisLink]:
    """A RedisLink keeping its connection up (or failing to) in the background."""
    link = RedisLink(settings, replica_id="tls-test")

    async def ping() -> None:
        await link.client.ping()

    # The link is up once a reconcile hook has reached Redis; this one just asks it.
    link.on_connect(ping)
    task = asyncio.create_task(link.run())
    try:
        yield link
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await link.aclose()


async def settled(link: RedisLink) -> bool:
    """True once the link is up or has a cause for being down other than not having tried."""
    return link.up or link.cause != "not connected yet"


async def test_replicas_share_state_over_tls(
    tmp_path: Path, start_redis: StartRedis, pki: PKI
) -> None:
    redis = start_redis()
    doc = {"state": state(redis, tls_ca_file=str(pki.ca.ca_file)), "endpoints": [CFG_ENDPOINT]}
    a = await Replica(tmp_path, doc, name="a").start()
    b = await Replica(tmp_path, doc, name="b").start()
    try:
        assert (await a.registry.RegisterEndpoint(register("dyn-1"), timeout=10)).created

        async def b_routes_to_dyn_1() -> bool:
            return await routed(b.decider, "dyn") == "dyn-1"

        await eventually(b_routes_to_dyn_1)
        assert "shared state" not in await health_reasons(b.registry)
    finally:
        await a.stop()
        await b.stop()
    assert "Traceback" not in a.logs() + b.logs()


async def test_mutual_tls_needs_the_client_certificate(
    start_server: StartServer, start_redis: StartRedis, pki: PKI
) -> None:
    redis = start_redis(auth_clients="yes")
    with_cert = state(
        redis,
        tls_ca_file=str(pki.ca.ca_file),
        tls_cert_file=str(pki.client.cert_file),
        tls_key_file=str(pki.client.key_file),
    )
    async with start_server({"state": with_cert, "endpoints": [CFG_ENDPOINT]}) as srv:
        assert srv.server.link is not None and srv.server.link.up
        assert (await srv.registry.RegisterEndpoint(register("dyn-1"), timeout=10)).created

    without = state(redis, tls_ca_file=str(pki.ca.ca_file))
    async with start_server({"state": without, "endpoints": [CFG_ENDPOINT]}) as srv:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await srv.registry.RegisterEndpoint(register("dyn-2"), timeout=10)
        assert exc.value.code() is grpc.StatusCode.UNAVAILABLE
        assert detail(exc.value, ErrorInfo).reason == "STORAGE_UNAVAILABLE"
        # Redis' "certificate required" alert, or the reset that often overtakes it: either
        # way the cause says what to set.
        assert "client certificate" in str(exc.value.details())
        assert "set [state] tls_cert_file and tls_key_file" in str(exc.value.details())
        # It came up without Redis and decides from the config's endpoints meanwhile.
        assert await routed(srv.decider, "m") == "cfg-0"
        assert "requires a client certificate" in await health_reasons(srv.registry)


async def test_wrong_ca_is_reported_like_redis_down_with_the_cause(
    tmp_path: Path, start_redis: StartRedis, pki: PKI
) -> None:
    redis = start_redis()
    metrics_port = free_port()
    doc = {
        "state": state(redis, tls_ca_file=str(pki.other_ca.ca_file)),
        "endpoints": [CFG_ENDPOINT],
    }
    replica = await Replica(tmp_path, doc, name="wrong-ca").start(
        "--metrics-listen", f"127.0.0.1:{metrics_port}"
    )
    try:
        cause = "TLS verification of Redis' certificate failed"
        hint = "is [state] tls_ca_file the CA that signed Redis' certificate?"

        async def reasons_name_tls() -> bool:
            return cause in await health_reasons(replica.registry)

        await eventually(reasons_name_tls)
        reasons = await health_reasons(replica.registry)
        assert hint in reasons and "this replica decides from its local state" in reasons
        assert 'decider_shared_state_up{backend="redis"} 0.0' in scrape(metrics_port)
        assert await routed(replica.decider, "m") == "cfg-0"
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await replica.registry.RegisterEndpoint(register("dyn-1"), timeout=10)
        assert exc.value.code() is grpc.StatusCode.UNAVAILABLE
        assert cause in str(exc.value.details())
    finally:
        await replica.stop()
    logs = replica.logs()
    assert f"shared state unreachable at {redis.url} ({cause}" in logs
    assert "Traceback" not in logs


async def test_host_name_checked_against_the_certificate(start_redis: StartRedis, pki: PKI) -> None:
    # A certificate whose SANs spell 127.0.0.1 only as a DNS name: an IP-address URL needs an
    # IP SAN, so the check fails; by name (localhost), or with the check off, it passes.
    dns_only = pki.ca.issue(
        "redis.test", dns=("127.0.0.1", "localhost"), stem="redis-dns-only", client=False
    )
    redis = start_redis(server=dns_only)
    by_ip = StateSettings(
        backend="redis", url=redis.url, key_prefix="tls:", tls_ca_file=str(pki.ca.ca_file)
    )
    async with link_to(by_ip) as link:
        await eventually(lambda: settled(link))
        assert not link.up
        assert link.cause.startswith(
            "TLS verification of Redis' certificate failed: IP address mismatch, certificate is "
            "not valid for '127.0.0.1' (the certificate must name the host of [state] url: a DNS "
            "SAN for a name, an IP SAN for an address)"
        )
    by_name = StateSettings(
        backend="redis",
        url=redis.url.replace("127.0.0.1", "localhost"),
        tls_ca_file=str(pki.ca.ca_file),
    )
    unchecked = StateSettings(
        backend="redis", url=redis.url, tls_ca_file=str(pki.ca.ca_file), tls_check_hostname=False
    )
    for settings in (by_name, unchecked):
        async with link_to(settings) as link:
            await eventually(lambda link=link: settled(link))
            assert link.up, link.cause


async def test_without_a_ca_file_the_cause_says_to_set_one(
    start_redis: StartRedis, pki: PKI
) -> None:
    redis = start_redis()
    async with link_to(StateSettings(backend="redis", url=redis.url)) as link:
        await eventually(lambda: settled(link))
        assert not link.up
        assert link.cause.startswith("TLS verification of Redis' certificate failed: ")
        assert link.cause.endswith(
            "(set [state] tls_ca_file to the CA that signed Redis' certificate)"
        )


async def test_client_certificate_from_another_ca_is_named(
    tmp_path: Path, start_redis: StartRedis, pki: PKI
) -> None:
    redis = start_redis(auth_clients="yes")
    stranger = pki.other_ca.issue("stranger", server=False, stem="stranger")
    settings = StateSettings(
        backend="redis",
        url=redis.url,
        tls_ca_file=str(pki.ca.ca_file),
        tls_cert_file=str(stranger.cert_file),
        tls_key_file=str(stranger.key_file),
    )
    async with link_to(settings) as link:
        await eventually(lambda: settled(link))
        assert not link.up
        assert "it did not accept the client certificate in [state] tls_cert_file" in link.cause


async def test_a_redis_url_to_a_tls_port_says_to_use_rediss(start_redis: StartRedis) -> None:
    redis = start_redis()
    plaintext_url = redis.url.replace("rediss://", "redis://")
    async with link_to(StateSettings(backend="redis", url=plaintext_url)) as link:
        await eventually(lambda: settled(link))
        assert not link.up
        assert link.cause.endswith(
            "(if Redis serves TLS on this port, use a rediss:// [state] url)"
        )


async def test_a_rediss_url_to_a_plaintext_port_says_to_use_redis(tmp_path: Path, pki: PKI) -> None:
    redis = RedisServer(tmp_path / "plaintext-redis")
    redis.start()
    try:
        settings = StateSettings(
            backend="redis",
            url=redis.url.replace("redis://", "rediss://"),
            tls_ca_file=str(pki.ca.ca_file),
            connect_timeout_ms=300,
        )
        async with link_to(settings) as link:
            await eventually(lambda: settled(link))
            assert not link.up
            assert link.cause.startswith("Timeout connecting to server (")
            assert "if Redis serves this port without TLS, use a redis:// [state] url" in link.cause
    finally:
        redis.kill()


def run_decider(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "decider", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def write_config(path: Path, table: dict[str, str]) -> Path:
    lines = ["[state]", *(f"{key} = {json.dumps(value)}" for key, value in table.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_tls_keys_stop_the_start_with_exit_2(tmp_path: Path, pki: PKI) -> None:
    missing = tmp_path / "nowhere" / "ca.crt"
    config = write_config(
        tmp_path / "missing-ca.toml",
        {"backend": "redis", "url": "rediss://127.0.0.1:6380/0", "tls_ca_file": str(missing)},
    )
    for command in (
        ("check-config", str(config)),
        ("serve", "--config", str(config), "--listen", "127.0.0.1:0"),
    ):
        done = run_decider(*command)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == (
            f"decider: state.tls_ca_file: {missing}: cannot read: No such file or directory"
        )

    plain = write_config(
        tmp_path / "plain.toml",
        {
            "backend": "redis",
            "url": "redis://127.0.0.1:6379/0",
            "tls_cert_file": str(pki.client.cert_file),
        },
    )
    done = run_decider("check-config", str(plain))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "decider: state.tls_cert_file: set, but state.url 'redis://127.0.0.1:6379/0' is not a "
        "rediss:// URL; TLS to Redis needs rediss://host:port (or drop the TLS keys)",
        "state.tls_cert_file is set, so state.tls_key_file must be too",
    ]
    assert "Traceback" not in done.stderr


def test_operations_example_passes_check_config(tmp_path: Path, pki: PKI) -> None:
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    begin = text.index("<!-- operations-redis-tls begin")
    block = text[begin:].split("```toml\n", 1)[1].split("```", 1)[0]
    for doc_path, real in (
        ("/etc/decider/redis/ca.crt", pki.ca.ca_file),
        ("/etc/decider/redis/client.crt", pki.client.cert_file),
        ("/etc/decider/redis/client.key", pki.client.key_file),
    ):
        assert doc_path in block
        block = block.replace(doc_path, str(real))
    config = tmp_path / "operations.toml"
    config.write_text(block)
    done = run_decider("check-config", str(config))
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout
