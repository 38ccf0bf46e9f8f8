"""ClientOptions and TlsOptions: every setting of a DeciderClient, checked once when built, and
the channel they describe."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from decider.v1 import endpoint_pb2 as epb


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsOptions:
    """TLS to Decider. Without `ca_file` the system's roots verify the server; `cert_file`
    and `key_file` together present a client certificate (mutual TLS); `server_name` is the
    name the server's certificate must carry when it differs from the target's host (a
    target given as an IP address, for example)."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str = ""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "TlsOptions: cert_file and key_file go together "
                f"(cert_file={self.cert_file!r}, key_file={self.key_file!r})"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads the files (once, when the channel is built) into channel credentials."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read("ca_file", self.ca_file),
            private_key=_read("key_file", self.key_file),
            certificate_chain=_read("cert_file", self.cert_file),
        )


def _read(name: str, path: str | Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"TlsOptions.{name}: cannot read {str(path)!r}: {exc.strerror}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    """How a DeciderClient behaves; every field has a default (the Go client's Options)."""

    # Bounds each Decide call (and ListEndpoints).
    decide_timeout_s: float = 0.5
    # Bounds each ReportOutcome call, and close()'s wait for pending reports.
    report_timeout_s: float = 2.0
    # When Decider cannot be reached, route to the last known healthy endpoints.
    fail_open: bool = False
    # Known before any decision, so fail-open works even if Decider was never reachable.
    seed_endpoints: Sequence[epb.Endpoint] = ()
    # Keep the local health view current from a WatchHealth stream.
    watch: bool = False
    # Limits the health view (and refresh_endpoints) to one model; "" means all.
    watch_model: str = ""
    # Deadline of one WatchHealth stream; then it reconnects and gets a fresh snapshot.
    watch_max_age_s: float = 300.0
    # Attempts when a decision carries no retry policy.
    max_attempts: int = 3
    # Caps the pause between attempts, whatever the policy says.
    max_backoff_s: float = 1.0
    # ReportOutcome calls in flight; beyond it reports are dropped and counted.
    max_pending_reports: int = 1024
    # Sent as a bearer token on RegistryService calls.
    admin_token: str = ""
    # Every decide() over one shared DecideStream instead of a unary call each.
    stream: bool = False
    # None: plaintext HTTP/2 (Decider's default listener).
    tls: TlsOptions | None = None
    # Extra grpc channel arguments, e.g. (("grpc.keepalive_time_ms", 10000),).
    channel_options: Sequence[tuple[str, str | int]] = ()

    def __post_init__(self) -> None:
        # Frozen and hashable whatever sequence the caller passed.
        object.__setattr__(self, "seed_endpoints", tuple(self.seed_endpoints))
        object.__setattr__(self, "channel_options", tuple(self.channel_options))
        for name in ("decide_timeout_s", "report_timeout_s", "watch_max_age_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"ClientOptions.{name}: {value!r}, must be a number > 0")
        if not (isinstance(self.max_backoff_s, int | float) and self.max_backoff_s >= 0):
            raise ValueError(
                f"ClientOptions.max_backoff_s: {self.max_backoff_s!r}, must be a number >= 0"
            )
        for name in ("max_attempts", "max_pending_reports"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ClientOptions.{name}: {value!r}, must be an int >= 1")

    def open_channel(self, target: str) -> grpc.aio.Channel:
        """A channel to `target`: plaintext, or TLS when `tls` is set."""
        args = list(self.channel_options)
        if self.tls is None:
            return grpc.aio.insecure_channel(target, options=args)
        if self.tls.server_name:
            args.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return grpc.aio.secure_channel(target, self.tls.credentials(), options=args)
