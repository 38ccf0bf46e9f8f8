"""TLS for Decider's listeners and for its command-line clients.

`CertificateFiles` owns the server's certificate, key and client CA: checked at start (a bad
file is a ConfigError naming it), re-read when a file changes or on request (SIGHUP), and
handed to grpc as dynamic credentials (grpc asks before every new handshake) and to the
/metrics listener as an `ssl.SSLContext` swapped in at the ClientHello. A rotation that is
half written (a new certificate beside the old key) is refused, logged, and retried at the next
connection, so the listener keeps serving with the files it had.

`ClientTLS` is the client side (CA, client certificate and key, server name) used by
`decider endpoints`, `decider decide` and `decider-probe`.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from decider.errors import ConfigError

__all__ = [
    "CertificateFiles",
    "ClientTLS",
    "TLSSettings",
    "add_client_arguments",
    "peer_identities",
]

log = logging.getLogger("decider.tls")

# The auth-context properties grpc fills from a verified client certificate.
_IDENTITY_PROPERTIES = ("x509_subject", "x509_common_name", "x509_subject_alternative_name")


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSSettings:
    """The `[server.tls]` table. A certificate and key turn TLS on; a client CA adds mTLS."""

    cert_file: str = ""
    key_file: str = ""
    # PEM bundle of the CAs client certificates must chain to; set, every client needs one.
    client_ca_file: str = ""
    # mTLS only: client identities (subject DN, common name or a SAN, exactly) that may call
    # RegistryService. Empty: any client the CA admits may (the admin token still applies).
    admin_client_names: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)

    def check(self, where: str = "server.tls") -> None:
        """Errors in the combination of keys (the files themselves are read at start)."""
        if bool(self.cert_file) != bool(self.key_file):
            given, missing = (
                ("cert_file", "key_file") if self.cert_file else ("key_file", "cert_file")
            )
            raise ConfigError(f"{where}.{given} is set, so {where}.{missing} must be too")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError(f"{where}.client_ca_file needs {where}.cert_file and key_file")
        if self.admin_client_names and not self.client_ca_file:
            raise ConfigError(
                f"{where}.admin_client_names needs mTLS: set {where}.client_ca_file "
                "(clients without a certificate have no name to check)"
            )


@dataclass(frozen=True, slots=True)
class _Material:
    cert: bytes
    key: bytes
    client_ca: bytes | None
    # (mtime_ns, size, inode) of each file when read: what a change is measured against.
    stamp: tuple[tuple[int, int, int], ...]


class CertificateFiles:
    """The server's certificate, key and client CA, re-read when they change on disk."""

    def __init__(self, settings: TLSSettings) -> None:
        settings.check()
        self.settings = settings
        self._paths = tuple(
            p for p in (settings.cert_file, settings.key_file, settings.client_ca_file) if p
        )
        self._lock = threading.Lock()
        self._material = _load(settings)
        self._generation = 0
        self._reload_requested = False
        # The stamp of the last rotation that failed, so it is logged once, not per connection.
        self._failed_stamp: tuple[tuple[int, int, int], ...] | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._ssl_generation = -1
        self.reloads = 0

    @property
    def generation(self) -> int:
        """Bumped on every successful reload."""
        return self._generation

    def request_reload(self) -> None:
        """Re-reads the files now, changed or not (SIGHUP); a failure keeps the old ones."""
        with self._lock:
            self._reload_requested = True
        self.refresh()

    def refresh(self) -> bool:
        """Re-reads the files if they changed (or a reload was requested); True when the
        served material changed. Cheap when nothing changed: one stat per file."""
        with self._lock:
            try:
                stamp = _stamp(self._paths)
            except OSError:
                stamp = None
            forced = self._reload_requested
            self._reload_requested = False
            if not forced and (stamp is None or stamp == self._material.stamp):
                return False
            if not forced and stamp == self._failed_stamp:
                return False
            try:
                material = _load(self.settings)
            except ConfigError as exc:
                self._failed_stamp = stamp
                log.error("TLS reload failed, still serving the previous certificate: %s", exc)
                return False
            self._failed_stamp = None
            previous, self._material = self._material, material
            if _content(material) == _content(previous) and not forced:
                return False  # touched, not changed
            self._generation += 1
            self.reloads += 1
            log.info(
                "TLS certificate reloaded from %s (reload %d)",
                self.settings.cert_file,
                self.reloads,
            )
            return True

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials whose certificate follows the files: grpc calls the fetcher
        before every new handshake, and connections already open keep theirs."""
        delivered = self._generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal delivered
            try:
                self.refresh()
            except Exception:  # grpc logs and drops exceptions raised here; say why first
                log.exception("TLS certificate check failed")
                return None
            if self._generation == delivered:
                return None
            delivered = self._generation
            return self._grpc_configuration()

        return grpc.dynamic_ssl_server_credentials(
            self._grpc_configuration(),
            # grpc documents None as "no change"; its type stubs leave None out.
            fetch,  # type: ignore[arg-type]
            require_client_authentication=self.settings.mutual,
        )

    def _grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        material = self._material
        return grpc.ssl_server_certificate_configuration(
            [(material.key, material.cert)], root_certificates=material.client_ca
        )

    def ssl_context(self) -> ssl.SSLContext:
        """An SSLContext for an asyncio listener (/metrics); each handshake first checks the
        files and, after a rotation, continues on a context holding the new certificate."""
        outer = self._current_ssl_context()

        def on_hello(ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
            try:
                self.refresh()
                ssl_object.context = self._current_ssl_context()
            except Exception:
                log.exception("TLS certificate check failed")

        outer.sni_callback = on_hello
        return outer

    def _current_ssl_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ssl_context is None or self._ssl_generation != self._generation:
                try:
                    self._ssl_context = _server_ssl_context(self.settings)
                except (ssl.SSLError, OSError) as exc:
                    if self._ssl_context is None:
                        raise ConfigError(f"server.tls: {_why(exc)}") from exc
                    # Rotated again since refresh() checked them: keep the previous context.
                    log.error("TLS context for /metrics not rebuilt: %s", _why(exc))
                    return self._ssl_context
                self._ssl_generation = self._generation
            return self._ssl_context


def peer_identities(auth_context: Mapping[str, Iterable[bytes]]) -> frozenset[str]:
    """The names a verified client certificate carries: subject DN, common name and SANs."""
    names: set[str] = set()
    for prop in _IDENTITY_PROPERTIES:
        for value in auth_context.get(prop, ()):
            names.add(value.decode("utf-8", "replace"))
    return frozenset(names)


def _content(material: _Material) -> tuple[bytes, bytes, bytes | None]:
    return (material.cert, material.key, material.client_ca)


def _stamp(paths: Sequence[str]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"server.tls.{key}: {path}: cannot read: {exc.strerror or exc}") from exc
    if not data.strip():
        raise ConfigError(f"server.tls.{key}: {path}: the file is empty")
    return data


def _load(settings: TLSSettings) -> _Material:
    """Reads and checks every file; each error names the key and the file."""
    stamp_paths = [p for p in (settings.cert_file, settings.key_file, settings.client_ca_file) if p]
    try:
        before = _stamp(stamp_paths)
    except OSError:
        before = ()
    cert = _read(settings.cert_file, "cert_file")
    key = _read(settings.key_file, "key_file")
    client_ca = (
        _read(settings.client_ca_file, "client_ca_file") if settings.client_ca_file else None
    )
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.load_verify_locations(cadata=cert.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"server.tls.cert_file: {settings.cert_file}: not a PEM certificate ({_why(exc)})"
        ) from exc
    if b"ENCRYPTED" in key:
        raise ConfigError(
            f"server.tls.key_file: {settings.key_file}: the key is encrypted; "
            "Decider needs an unencrypted PEM key (protect it with file permissions)"
        )
    try:
        probe.load_cert_chain(settings.cert_file, settings.key_file, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"server.tls.key_file: {settings.key_file}: the key does not match the "
                f"certificate in {settings.cert_file}"
            ) from exc
        raise ConfigError(
            f"server.tls.key_file: {settings.key_file}: not a PEM private key ({_why(exc)})"
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"server.tls.key_file: {settings.key_file}: cannot read: {exc.strerror or exc}"
        ) from exc
    if client_ca is not None:
        try:
            probe.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"server.tls.client_ca_file: {settings.client_ca_file}: "
                f"not a PEM certificate bundle ({_why(exc)})"
            ) from exc
    try:
        stamp = _stamp(stamp_paths)
    except OSError as exc:
        raise ConfigError(f"server.tls: a file went away while being read: {exc}") from exc
    if before and stamp != before:
        raise ConfigError("server.tls: the files changed while being read; retrying later")
    return _Material(cert=cert, key=key, client_ca=client_ca, stamp=stamp)


def _server_ssl_context(settings: TLSSettings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.cert_file, settings.key_file, password=lambda: b"")
    if settings.client_ca_file:
        context.load_verify_locations(cafile=settings.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else str(exc)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientTLS:
    """TLS settings of a client of Decider: all empty means plaintext."""

    # Turn TLS on with the system's trusted CAs when no ca_file is given.
    enabled: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # The name to verify the server's certificate against, when it is not the target's host.
    server_name: str = ""

    @property
    def active(self) -> bool:
        return self.enabled or bool(
            self.ca_file or self.cert_file or self.key_file or self.server_name
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClientTLS:
        return cls(
            enabled=bool(args.tls),
            ca_file=args.tls_ca_file or "",
            cert_file=args.tls_cert_file or "",
            key_file=args.tls_key_file or "",
            server_name=args.tls_server_name or "",
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("--tls-cert-file and --tls-key-file go together")
        return grpc.ssl_channel_credentials(
            root_certificates=_client_read(self.ca_file, "--tls-ca-file") or None,
            private_key=_client_read(self.key_file, "--tls-key-file") or None,
            certificate_chain=_client_read(self.cert_file, "--tls-cert-file") or None,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A blocking channel to `target`, plaintext unless TLS is active."""
        if not self.active:
            return grpc.insecure_channel(target, options=list(options))
        return grpc.secure_channel(
            target, self.channel_credentials(), options=[*options, *self.channel_options()]
        )


def _client_read(path: str, flag: str) -> bytes:
    if not path:
        return b""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{flag}: {path}: cannot read: {exc.strerror or exc}") from exc


def add_client_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """--tls, --tls-ca-file, --tls-cert-file, --tls-key-file, --tls-server-name, defaulting
    to DECIDER_CLIENT_TLS_* in `env` (apart from the server's own DECIDER_TLS_*)."""
    group = parser.add_argument_group("TLS to the server")
    group.add_argument(
        "--tls",
        action="store_true",
        default=env.get("DECIDER_CLIENT_TLS", "").lower() in ("1", "true"),
        help="use TLS with the system's trusted CAs (implied by any --tls-* option)",
    )
    for flag, name, what in (
        ("--tls-ca-file", "CA_FILE", "PEM CA bundle to verify the server with"),
        ("--tls-cert-file", "CERT_FILE", "client certificate (PEM), for mTLS"),
        ("--tls-key-file", "KEY_FILE", "client private key (PEM), for mTLS"),
        ("--tls-server-name", "SERVER_NAME", "name the server certificate must carry"),
    ):
        variable = f"DECIDER_CLIENT_TLS_{name}"
        group.add_argument(
            flag, default=env.get(variable, ""), metavar=name, help=f"{what} (${variable})"
        )
