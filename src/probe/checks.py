"""One probe of one endpoint -> ProbeResult; transport errors become data here, in one place."""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import httpx

# (host, port, timeout_s) -> None; raises OSError or TimeoutError when the port does not answer.
Connector = Callable[[str, int, float], Awaitable[None]]


class CheckKind(enum.Enum):
    HTTP = "http"
    LIVENESS = "liveness"
    METRICS = "metrics"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeResult:
    endpoint_id: str
    kind: CheckKind
    healthy: bool
    latency_s: float
    # Short and free of secrets: status code or error class, never headers or URL userinfo.
    reason: str
    status_code: int = 0
    # Response body for METRICS results; empty otherwise.
    body: str = ""


async def http_check(
    client: httpx.AsyncClient,
    *,
    endpoint_id: str,
    url: str,
    headers: Mapping[str, str],
    timeout_s: float,
    kind: CheckKind,
    clock: Callable[[], float],
) -> ProbeResult:
    """GET url; healthy means a 2xx response, whole body read, within timeout_s."""
    started = clock()
    try:
        # The overall deadline also covers a server that sends headers and then stalls the
        # body, which httpx's per-read timeout alone would let run on.
        async with asyncio.timeout(timeout_s):
            response = await client.get(url, headers=headers, timeout=timeout_s)
    except (TimeoutError, httpx.TimeoutException):
        return _failed(endpoint_id, kind, clock() - started, f"timeout after {timeout_s:g} s")
    except httpx.HTTPError as exc:
        # Transport errors, and request errors such as a body that fails to decode.
        return _failed(endpoint_id, kind, clock() - started, describe_error(exc))
    except httpx.InvalidURL:
        return _failed(endpoint_id, kind, clock() - started, "invalid URL")
    latency_s = clock() - started
    code = response.status_code
    ok = 200 <= code < 300
    return ProbeResult(
        endpoint_id=endpoint_id,
        kind=kind,
        healthy=ok,
        latency_s=latency_s,
        reason=f"HTTP {code} in {latency_s * 1000:.0f} ms",
        status_code=code,
        body=response.text if ok and kind is CheckKind.METRICS else "",
    )


async def liveness_connect(
    connect: Connector,
    *,
    endpoint_id: str,
    host: str,
    port: int,
    timeout_s: float,
    clock: Callable[[], float],
) -> ProbeResult:
    started = clock()
    try:
        await connect(host, port, timeout_s)
    except TimeoutError:
        return _failed(
            endpoint_id,
            CheckKind.LIVENESS,
            clock() - started,
            f"connect timeout after {timeout_s:g} s",
        )
    except OSError as exc:
        return _failed(endpoint_id, CheckKind.LIVENESS, clock() - started, describe_error(exc))
    latency_s = clock() - started
    return ProbeResult(
        endpoint_id=endpoint_id,
        kind=CheckKind.LIVENESS,
        healthy=True,
        latency_s=latency_s,
        reason=f"connect in {latency_s * 1000:.0f} ms",
    )


async def tcp_connect(host: str, port: int, timeout_s: float) -> None:
    """Open a TCP connection and close it with a reset.

    The reset (SO_LINGER 0, as HAProxy's tcp checks do) leaves no TIME_WAIT socket behind:
    1000 endpoints checked every 2 s would otherwise pin ~30000 sockets at any moment.
    Raw non-blocking sockets skip the StreamReader/transport objects open_connection builds.
    """
    loop = asyncio.get_running_loop()
    family, address = await _resolve(loop, host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


async def _resolve(
    loop: asyncio.AbstractEventLoop, host: str, port: int
) -> tuple[socket.AddressFamily, tuple[str, int]]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"no address for {host}") from None
        family, _, _, _, sockaddr = infos[0]
        return family, (str(sockaddr[0]), int(sockaddr[1]))
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, (host, port)


def describe_error(exc: BaseException) -> str:
    """A short reason for a failed probe: the OS error name when there is one."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ConnectionResetError):
            return "connection reset"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.RemoteProtocolError):
        return "connection closed without a response"
    # Some transports raise without chaining the OS error; its text is still there.
    message = str(exc).lower()
    for needle, reason in (("refused", "connection refused"), ("reset", "connection reset")):
        if needle in message:
            return reason
    return type(exc).__name__


def _failed(endpoint_id: str, kind: CheckKind, latency_s: float, reason: str) -> ProbeResult:
    return ProbeResult(
        endpoint_id=endpoint_id, kind=kind, healthy=False, latency_s=latency_s, reason=reason
    )
