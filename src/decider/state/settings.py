"""The `[state]` table: where state shared by workers and replicas lives ("memory" or "redis"),
and how to reach Redis (URL, timeouts, TLS files). Checked with the shared table schema, so
every problem of the table is reported at once, each naming the key, the value and what is
allowed; the TLS files are read and checked at start, before anything connects."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit, urlunsplit

from decider.core.validation import Problems, allowed, from_text, position, schema, show

BACKENDS: Final = ("memory", "redis")
URL_SCHEMES: Final = ("redis", "rediss", "unix")
ENV_PREFIX: Final = "DECIDER_STATE_"
_KEY_PREFIX_MAX: Final = 200
_TLS_KEYS: Final = ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_check_hostname")


@dataclass(frozen=True, slots=True, kw_only=True)
class StateSettings:
    """Each key can also be set as DECIDER_STATE_<KEY> (the URL with its password, say)."""

    # "memory": this process alone (the default). "redis": shared through Redis 7 or Valkey.
    backend: str = field(default="memory", metadata=allowed(choices=BACKENDS, any_case=True))
    # redis://[user:password@]host:port/db, rediss:// for TLS, unix:///path.sock.
    url: str = field(
        default="redis://127.0.0.1:6379/0",
        metadata=allowed(what="a redis://, rediss:// or unix:// URL"),
    )
    # Prepended to every key and channel, so several fleets can share one Redis.
    key_prefix: str = field(
        default="decider:",
        metadata=allowed(what=f"a string of up to {_KEY_PREFIX_MAX} non-space chars"),
    )
    connect_timeout_ms: int = field(default=1000, metadata=allowed(ge=1, le=60_000))
    # A Redis command that takes longer counts as Redis being down.
    command_timeout_ms: int = field(default=1000, metadata=allowed(ge=1, le=60_000))
    # How often shared health and load are pushed and pulled in the background.
    sync_interval_ms: int = field(default=100, metadata=allowed(ge=10, le=60_000))
    # The active-probing lease: its holder probes for the fleet; another replica takes over
    # at most this long after the holder dies.
    probe_lease_s: float = field(default=5.0, metadata=allowed(ge=1, le=300, finite=True))
    # rediss:// only. PEM bundle of the CAs Redis' certificate must chain to; empty: the
    # system's trusted CAs.
    tls_ca_file: str = ""
    # rediss:// only: a client certificate and its unencrypted key, for a Redis that requires
    # them (`tls-auth-clients yes`).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # rediss:// only: the certificate must name the URL's host (a DNS SAN for a name, an IP
    # SAN for an address). Turn off only for a certificate that cannot; the CA still counts.
    tls_check_hostname: bool = True

    @property
    def shared(self) -> bool:
        return self.backend == "redis"

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "rediss"

    def redacted_url(self) -> str:
        """The URL with any password replaced by ***, for logs and error messages."""
        return redact(self.url)

    def redis_tls_options(self) -> dict[str, Any]:
        """redis-py's connection options for TLS; empty for a redis:// or unix:// URL."""
        if not self.tls:
            return {}
        return {
            "ssl_cert_reqs": "required",
            # redis-py's default changed between versions; a user expects the host checked.
            "ssl_check_hostname": self.tls_check_hostname,
            "ssl_ca_certs": self.tls_ca_file or None,
            "ssl_certfile": self.tls_cert_file or None,
            "ssl_keyfile": self.tls_key_file or None,
        }

    @classmethod
    def parse(cls, table: Mapping[str, Any]) -> StateSettings:
        """The `[state]` table; raises ConfigErrors listing every problem."""
        problems = Problems()
        # Given `failed`, the keys that parsed come back too, so their own checks still run.
        failed: set[str] = set()
        values = schema(cls).validate(table, "state", problems, failed=failed)
        if values is not None:
            for key in ("url", "key_prefix"):
                text = "" if key in failed else _value_problem(key, values[key])
                if text:
                    problems.add((position(table, key),), f"state.{key}: {text}")
        problems.raise_any()
        assert values is not None
        return cls(**values)

    def with_env(self, env: Mapping[str, str]) -> StateSettings:
        """These settings with DECIDER_STATE_<KEY> variables applied over them; raises
        ConfigErrors listing every variable that is wrong."""
        table = schema(StateSettings)
        problems = Problems()
        changes: dict[str, Any] = {}
        for i, f in enumerate(fields(self)):
            name = ENV_PREFIX + f.name.upper()
            raw = env.get(name)
            if raw is None:
                continue
            where = f"environment {name}"
            kind = table.specs[f.name].kind
            value = table.check_value(
                f.name, from_text(raw, kind), where, problems, (i,), shown=repr(redact(raw))
            )
            if value is dataclasses.MISSING:
                continue
            text = _value_problem(f.name, value)
            if text:
                problems.add((i,), f"{where}: {text}")
                continue
            changes[f.name] = value
        problems.raise_any()
        return replace(self, **changes)

    def check(self) -> None:
        """Errors in the combination of keys, then in the TLS files of the redis backend (read
        and checked now, so a bad file stops the start rather than every connection); raises
        ConfigErrors."""
        problems = Problems()
        given = [key for key in _TLS_KEYS if getattr(self, key) != _DEFAULTS[key]]
        if given and not self.tls:
            names = ", ".join(f"state.{key}" for key in given)
            problems.add(
                (0,),
                f"{names}: set, but state.url {self.redacted_url()!r} is not a rediss:// URL; "
                "TLS to Redis needs rediss://host:port (or drop the TLS keys)",
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            have, lack = (
                ("tls_cert_file", "tls_key_file")
                if self.tls_cert_file
                else ("tls_key_file", "tls_cert_file")
            )
            problems.add((1,), f"state.{have} is set, so state.{lack} must be too")
        # The memory backend never connects: its files are not read.
        if not problems and self.tls and self.shared:
            for text in _file_problems(self):
                problems.add((2,), text)
        problems.raise_any()


_DEFAULTS: Final = {f.name: f.default for f in fields(StateSettings)}


def _value_problem(key: str, value: Any) -> str:
    """What is wrong with a value beyond its type (`url`, `key_prefix`); empty when fine."""
    if key == "url":
        problem = url_problem(value)
        return f"{redact(value)!r}: {problem}" if problem else ""
    if key == "key_prefix" and (len(value) > _KEY_PREFIX_MAX or any(c.isspace() for c in value)):
        return f"{show(value)}, must be a string of up to {_KEY_PREFIX_MAX} non-space chars"
    return ""


def _file_problems(settings: StateSettings) -> list[str]:
    """Each TLS file read and parsed as OpenSSL will at connect time; a problem names the key
    and the file."""
    out: list[str] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca = settings.tls_ca_file
    if ca and not _readable(ca, "tls_ca_file", out):
        ca = ""
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, ValueError) as exc:
            out.append(f"state.tls_ca_file: {ca}: not a PEM certificate bundle ({_why(exc)})")
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if not cert:
        return out
    cert_ok = _readable(cert, "tls_cert_file", out)
    key_ok = _readable(key, "tls_key_file", out)
    if not (cert_ok and key_ok):
        return out
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except (ssl.SSLError, ValueError) as exc:
        out.append(f"state.tls_cert_file: {cert}: not a PEM certificate ({_why(exc)})")
        return out
    with open(key, "rb") as f:
        if b"ENCRYPTED" in f.read():
            out.append(
                f"state.tls_key_file: {key}: the key is encrypted; Decider needs an "
                "unencrypted PEM key (protect it with file permissions)"
            )
            return out
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            out.append(
                f"state.tls_key_file: {key}: the key does not match the certificate in {cert}"
            )
        else:
            out.append(f"state.tls_key_file: {key}: not a PEM private key ({_why(exc)})")
    return out


def _readable(path: str, key: str, out: list[str]) -> bool:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        out.append(f"state.{key}: {path}: cannot read: {exc.strerror or exc}")
        return False
    if not data.strip():
        out.append(f"state.{key}: {path}: the file is empty")
        return False
    return True


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else str(exc)


def url_problem(url: str) -> str:
    """What is wrong with a Redis URL; empty when it is usable."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme not in URL_SCHEMES:
        return f"scheme must be one of {', '.join(s + '://' for s in URL_SCHEMES)}"
    if parts.scheme == "unix":
        return "" if parts.path else "unix:// needs a socket path"
    if not parts.hostname:
        return "needs a host (redis://host:port/db)"
    if port == 0:
        return "port must be 1-65535"
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        return f"database {db!r} must be a number"
    return _query_problem(parts.query)


# redis-py takes these from a URL's query over the options Decider passes, which would skip
# the checks of [state]'s own keys (or turn certificate verification off).
_QUERY_OPTION_KEYS: Final = {
    "ssl_ca_certs": "tls_ca_file",
    "ssl_ca_path": "tls_ca_file",
    "ssl_certfile": "tls_cert_file",
    "ssl_keyfile": "tls_key_file",
    "ssl_check_hostname": "tls_check_hostname",
    "socket_connect_timeout": "connect_timeout_ms",
    "socket_timeout": "command_timeout_ms",
}


def _query_problem(query: str) -> str:
    for name in parse_qs(query, keep_blank_values=True):
        if name == "ssl_cert_reqs":
            return (
                "query option ssl_cert_reqs is not taken: Redis' certificate is always "
                "verified; set state.tls_ca_file to the CA that signed it"
            )
        key = _QUERY_OPTION_KEYS.get(name)
        if key is not None:
            return f"query option {name} is not taken: set state.{key} instead"
        if name.startswith("ssl_"):
            return f"query option {name} is not taken: TLS is set with the state.tls_* keys"
    return ""


def redact(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
