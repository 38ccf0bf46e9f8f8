"""A process's one link to the shared Redis: the client, key names, pub/sub and up/down.

Everything shared goes through here. Subscribers register a channel handler and a reconcile
hook; `run()` keeps one pub/sub connection, calls every reconcile hook after each (re)connect
(subscribe first, then read the full state, so no change falls between the two) and hands
each message to its handler on the event loop. Any Redis error marks the link down (logged
once, with its cause, and counted); the next successful exchange marks it up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from decider.errors import StorageUnavailable
from decider.state.settings import StateSettings

log = logging.getLogger("decider.state")

Handler = Callable[[bytes], None]
Reconcile = Callable[[], Awaitable[None]]
StatusListener = Callable[[bool, str], None]
# Errors that mean "Redis is not answering": Redis' own, and sockets failing under it.
LINK_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)

_RECONNECT_MIN_S = 0.05
_RECONNECT_MAX_S = 1.0


def describe(
    exc: BaseException, *, scheme: str = "", ca_file: str = "", client_cert: bool = False
) -> str:
    """The cause of a Redis failure for logs, health reasons and errors: TLS failures in words
    that say what to fix, anything else as the error says it (cut at 200 characters) with a
    hint when it is how a wrong URL scheme or a missing client certificate shows. `scheme`: the
    URL's (redis, rediss or unix); `ca_file`: the configured tls_ca_file; `client_cert`: whether
    one is configured."""
    tls_cause = _tls_cause(exc, ca_file=ca_file)
    if tls_cause:
        return tls_cause
    text = str(exc) or type(exc).__name__
    text = text if len(text) <= 200 else text[:197] + "..."
    hint = _hint(exc, scheme=scheme, client_cert=client_cert)
    return f"{text} ({hint})" if hint else text


def _hint(exc: BaseException, *, scheme: str, client_cert: bool) -> str:
    """What an error that is not itself a TLS error may mean for this link's settings."""
    chain = list(_chain(exc))
    reset = any(isinstance(e, ConnectionResetError) for e in chain)
    if scheme == "redis" and reset:
        # A Redis serving TLS on the port closes the connection on the first plaintext bytes.
        return "if Redis serves TLS on this port, use a rediss:// [state] url"
    if scheme == "rediss" and reset and not client_cert:
        # A TLS 1.3 server that wants a client certificate refuses it after the handshake;
        # its alert often loses the race with the reset of the connection.
        return (
            "if Redis requires a client certificate, tls-auth-clients yes, "
            "set [state] tls_cert_file and tls_key_file"
        )
    if scheme == "rediss" and any(_is_connect_timeout(e) for e in chain):
        # A plaintext Redis reads the ClientHello as a partial command and waits for the rest.
        return (
            "if Redis serves this port without TLS, use a redis:// [state] url: "
            "plaintext Redis never answers the TLS handshake"
        )
    return ""


def _is_connect_timeout(exc: BaseException) -> bool:
    # redis-py's wording for a timeout while opening a connection (TCP and TLS handshake).
    return isinstance(exc, RedisTimeoutError) and str(exc).startswith("Timeout connecting")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The error and what it was raised from or while handling (redis-py wraps socket and ssl
    errors in its ConnectionError), each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# OpenSSL's alerts for a handshake the server refused over the client's certificate.
_CERTIFICATE_REQUIRED = ("TLSV13_ALERT_CERTIFICATE_REQUIRED",)
_CERTIFICATE_REJECTED = (
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "TLSV1_ALERT_DECRYPT_ERROR",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
)


def _tls_cause(exc: BaseException, *, ca_file: str) -> str:
    """What a TLS failure under a Redis error means; empty when it is not one."""
    for current in _chain(exc):
        if isinstance(current, ssl.SSLCertVerificationError):
            why = (current.verify_message or str(current)).rstrip(".")
            if current.verify_code in _NAME_MISMATCH:
                hint = (
                    "the certificate must name the host of [state] url: a DNS SAN for a "
                    "name, an IP SAN for an address"
                )
            elif ca_file:
                hint = "is [state] tls_ca_file the CA that signed Redis' certificate?"
            else:
                hint = "set [state] tls_ca_file to the CA that signed Redis' certificate"
            return f"TLS verification of Redis' certificate failed: {why} ({hint})"
        if isinstance(current, ssl.SSLError):
            reason = current.reason or ""
            if reason in _CERTIFICATE_REQUIRED:
                return (
                    f"Redis refused the TLS handshake ({reason}): it requires a client "
                    "certificate; set [state] tls_cert_file and tls_key_file"
                )
            if reason in _CERTIFICATE_REJECTED:
                return (
                    f"Redis refused the TLS handshake ({reason}): it did not accept the "
                    "client certificate in [state] tls_cert_file"
                )
            return f"TLS to Redis failed: {reason or current}"
    return ""


# X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH in OpenSSL's x509_vfy.h.
_NAME_MISMATCH = (62, 64)


class RedisLink:
    def __init__(self, settings: StateSettings, *, replica_id: str) -> None:
        # The combination of keys and the TLS files, at start: a ConfigError, not a failed
        # connection every few seconds.
        settings.check()
        self.settings = settings
        self.replica_id = replica_id
        self.client: aioredis.Redis = aioredis.from_url(
            settings.url,
            socket_connect_timeout=settings.connect_timeout_ms / 1000,
            socket_timeout=settings.command_timeout_ms / 1000,
            # One quick retry covers a connection Redis closed while idle; more would hold an
            # admin call for seconds when Redis is really down.
            retry=Retry(NoBackoff(), 1),
            client_name=f"decider:{replica_id}"[:100].replace(" ", "_"),
            **settings.redis_tls_options(),
        )
        self.up = False
        self.cause = "not connected yet"
        self.failures = 0
        self._handlers: dict[str, Handler] = {}
        self._reconciles: list[Reconcile] = []
        self._listeners: list[StatusListener] = []

    def key(self, name: str) -> str:
        return self.settings.key_prefix + name

    def subscribe(self, channel: str, handler: Handler) -> None:
        """`handler` gets each message's payload on `key(channel)`; call before `run()`."""
        self._handlers[self.key(channel)] = handler

    def on_connect(self, reconcile: Reconcile) -> None:
        """`reconcile` reads the full shared state after every (re)connect."""
        self._reconciles.append(reconcile)

    def on_status(self, listener: StatusListener) -> None:
        """`listener(up, cause)` after every change between up and down."""
        self._listeners.append(listener)

    def mark_up(self) -> None:
        if self.up:
            return
        self.up, self.cause = True, ""
        log.info("shared state reachable at %s", self.settings.redacted_url())
        for listener in self._listeners:
            listener(True, "")

    def mark_down(self, exc: BaseException) -> None:
        self.failures += 1
        cause = self._cause(exc)
        if not self.up and self.cause == cause:
            return
        self.up, self.cause = False, cause
        log.warning(
            "shared state unreachable at %s (%s): deciding from local state until it returns",
            self.settings.redacted_url(),
            cause,
        )
        for listener in self._listeners:
            listener(False, cause)

    def health_note(self) -> str:
        """What health reasons say while Redis is down; empty while it answers."""
        if self.up:
            return ""
        return f"shared state unreachable ({self.cause}): this replica decides from its local state"

    def unavailable(self, exc: BaseException, *, doing: str) -> StorageUnavailable:
        """The error for a write that failed: marks the link down and names the cause."""
        self.mark_down(exc)
        return StorageUnavailable(
            f"shared state at {self.settings.redacted_url()} is unavailable ({self._cause(exc)}); "
            f"{doing} was not applied, retry when it is back"
        )

    def _cause(self, exc: BaseException) -> str:
        return describe(
            exc,
            scheme=urlsplit(self.settings.url).scheme,
            ca_file=self.settings.tls_ca_file,
            client_cert=bool(self.settings.tls_cert_file),
        )

    async def reconcile(self) -> None:
        """Runs every reconcile hook once; raises on a Redis error (marking the link down)."""
        try:
            for hook in self._reconciles:
                await hook()
        except LINK_ERRORS as exc:
            self.mark_down(exc)
            raise
        self.mark_up()

    async def run(self) -> None:
        """Keeps the subscription alive until cancelled, reconnecting with backoff."""
        backoff_s = _RECONNECT_MIN_S
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                if self._handlers:
                    await pubsub.subscribe(*self._handlers)
                await self.reconcile()
                backoff_s = _RECONNECT_MIN_S
                while True:
                    if not self._handlers:
                        await self.client.ping()
                        await asyncio.sleep(self.settings.sync_interval_ms / 1000)
                        continue
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._dispatch(message)
            except LINK_ERRORS as exc:
                self.mark_down(exc)
            finally:
                with contextlib.suppress(*LINK_ERRORS):
                    await pubsub.aclose()
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, _RECONNECT_MAX_S)

    async def aclose(self) -> None:
        await self.client.aclose()

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        name = channel.decode() if isinstance(channel, bytes) else str(channel)
        handler = self._handlers.get(name)
        data = message.get("data")
        if handler is None or not isinstance(data, bytes):
            return
        try:
            handler(data)
        except Exception:
            # A malformed message (another version, a stray PUBLISH) must not end the sync.
            log.exception("ignored a shared-state message on %s", name)
