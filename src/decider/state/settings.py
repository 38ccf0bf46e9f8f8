"""The `[state]` table: where state shared by workers and replicas lives ("memory" or "redis")."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from decider.errors import ConfigError

BACKENDS: Final = ("memory", "redis")
URL_SCHEMES: Final = ("redis", "rediss", "unix")
ENV_PREFIX: Final = "DECIDER_STATE_"


@dataclass(frozen=True, slots=True, kw_only=True)
class StateSettings:
    """Each key can also be set as DECIDER_STATE_<KEY> (the URL with its password, say)."""

    # "memory": this process alone (the default). "redis": shared through Redis 7 or Valkey.
    backend: str = "memory"
    # redis://[user:password@]host:port/db, rediss:// for TLS, unix:///path.sock.
    url: str = "redis://127.0.0.1:6379/0"
    # Prepended to every key and channel, so several fleets can share one Redis.
    key_prefix: str = "decider:"
    connect_timeout_ms: int = 1000
    # A Redis command that takes longer counts as Redis being down.
    command_timeout_ms: int = 1000
    # How often shared health and load are pushed and pulled in the background.
    sync_interval_ms: int = 100
    # The active-probing lease: its holder probes for the fleet; another replica takes over
    # at most this long after the holder dies.
    probe_lease_s: float = 5.0

    @property
    def shared(self) -> bool:
        return self.backend == "redis"

    def redacted_url(self) -> str:
        """The URL with any password replaced by ***, for logs and error messages."""
        return redact(self.url)

    @classmethod
    def parse(cls, table: Mapping[str, Any], *, where: str = "state") -> StateSettings:
        known = {f.name for f in fields(cls)}
        out: dict[str, Any] = {}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
            out[key] = _check(key, value, f"{where}.{key}")
        return cls(**out)

    def with_env(self, env: Mapping[str, str]) -> StateSettings:
        """These settings with DECIDER_STATE_<KEY> variables applied over them."""
        out = self
        for f in fields(self):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            where = f"environment {ENV_PREFIX}{f.name.upper()}"
            value: Any = raw
            if isinstance(getattr(self, f.name), int | float):
                try:
                    value = float(raw) if f.name.endswith("_s") else int(raw)
                except ValueError:
                    raise ConfigError(f"{where}: {raw!r}, must be a number") from None
            out = replace(out, **{f.name: _check(f.name, value, where)})
        return out


_INT_RANGES: Final = {
    "connect_timeout_ms": (1, 60_000),
    "command_timeout_ms": (1, 60_000),
    "sync_interval_ms": (10, 60_000),
}


def _check(key: str, value: Any, where: str) -> Any:
    if key == "backend":
        if not isinstance(value, str) or value.lower() not in BACKENDS:
            raise ConfigError(f"{where}: {value!r}, must be one of {', '.join(BACKENDS)}")
        return value.lower()
    if key == "url":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {value!r}, must be a string")
        problem = url_problem(value)
        if problem:
            raise ConfigError(f"{where}: {redact(value)!r}: {problem}")
        return value
    if key == "key_prefix":
        if not isinstance(value, str) or len(value) > 200 or any(c.isspace() for c in value):
            raise ConfigError(f"{where}: {value!r}, must be a string of up to 200 non-space chars")
        return value
    if key == "probe_lease_s":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not 1 <= value <= 300:
            raise ConfigError(f"{where}: {value!r}, must be a number from 1 to 300")
        return float(value)
    low, high = _INT_RANGES[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}: {value!r}, must be an integer from {low} to {high}")
    return value


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
