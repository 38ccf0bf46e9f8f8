"""One probe of one endpoint -> ProbeResult; transport errors become data here, in one place."""

from __future__ import annotations

import asyncio
import enum
import errno
import ipaddress
import os
import socket
import struct
import time
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


_Address = tuple[socket.AddressFamily, tuple[str, int]]


class TcpConnector:
    """The default Connector: open a TCP connection and close it with a reset.

    The reset (SO_LINGER 0, as HAProxy's TCP checks do) leaves no TIME_WAIT socket behind:
    1000 endpoints checked every 2 s would otherwise pin ~30000 sockets at any moment. The
    socket is driven by hand (connect_ex, then one writer callback when the connect is still in
    progress) rather than through loop.sock_connect, which resolves the address again on every
    call. Host names are resolved once per `resolve_every_s` and again after any failure, not
    on each check (getaddrinfo runs in a thread).
    """

    def __init__(
        self, *, resolve_every_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._resolve_every_s = resolve_every_s
        self._clock = clock
        self._resolved: dict[tuple[str, int], tuple[float, list[_Address]]] = {}

    async def __call__(self, host: str, port: int, timeout_s: float) -> None:
        try:
            addresses = await self._addresses(host, port)
            # Every address in order, as socket.create_connection does: "localhost" may list
            # ::1 first for a server that listens on 127.0.0.1 only.
            for i, (family, address) in enumerate(addresses):
                try:
                    await _connect_and_reset(family, address, timeout_s)
                    return
                except OSError:
                    if i == len(addresses) - 1:
                        raise
        except OSError:
            self._resolved.pop((host, port), None)
            raise

    async def _addresses(self, host: str, port: int) -> list[_Address]:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [((socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (host, port))]
        now = self._clock()
        cached = self._resolved.get((host, port))
        if cached is not None and now < cached[0]:
            return cached[1]
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses: list[_Address] = [
            (info[0], (str(info[4][0]), int(info[4][1]))) for info in infos
        ]
        if not addresses:
            raise OSError(f"no address for {host}")
        self._resolved[(host, port)] = (now + self._resolve_every_s, addresses)
        return addresses


async def _connect_and_reset(
    family: socket.AddressFamily, address: tuple[str, int], timeout_s: float
) -> None:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            # Not on loopback, where connect() finishes at once; over a network it does not.
            loop = asyncio.get_running_loop()
            writable: asyncio.Future[None] = loop.create_future()
            loop.add_writer(sock.fileno(), _resolve, writable)
            try:
                async with asyncio.timeout(timeout_s):
                    await writable
            finally:
                loop.remove_writer(sock.fileno())
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


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
