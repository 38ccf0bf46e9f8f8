"""Settings from a TOML file, DECIDER_* environment variables and CLI flags, validated once.

Precedence: flags > environment > file > defaults. An empty file is valid. `[server]` and
`[[endpoints]]` are parsed here; the engine tables go to `EngineSettings.parse` and `[probe]`
to `ProbeSettings.parse`. Every error is a ConfigError naming the file, the key and the value.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from decider.config.listen import parse_listen
from decider.config.tls import TLSSettings
from decider.core.model import Endpoint, MetricsKind
from decider.core.settings import EngineSettings
from decider.errors import ConfigError
from decider.state.registry import SOURCE_CONFIG, check_endpoint
from decider.state.settings import StateSettings
from probe import ProbeSettings

ENGINE_TABLES = ("routing", "breaker", "quotas", "affinity", "cache")
ENV_PREFIX = "DECIDER_"
# [server] event_loop: runtime/event_loop.py runs the server on one of these.
EVENT_LOOPS = ("uvloop", "asyncio")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """The `[server]` table; each key can also be set as DECIDER_<KEY> in the environment."""

    listen: str = "127.0.0.1:50051"
    # Empty: RegistryService needs no token. Set one whenever the port is reachable by others.
    # Never shown: not in repr, logs, spans or errors.
    admin_token: str = field(default="", repr=False)
    # A file holding the token (read at start, surrounding whitespace dropped), so it is not
    # in argv or in the environment of every child process.
    admin_token_file: str = ""
    # SQLite store for registered endpoints; empty keeps them in memory only.
    data_dir: str = "data"
    # How long in-flight RPCs may take to finish after SIGTERM.
    grace_period_s: float = 10.0
    # Largest request or response message, both directions.
    max_message_bytes: int = 4 * 1024 * 1024
    # Unary RPCs served at once; more get RESOURCE_EXHAUSTED. WatchHealth streams count apart.
    max_concurrent_rpcs: int = 1000
    max_watchers: int = 10_000
    # Changes buffered per watcher; a watcher that falls further behind gets a fresh snapshot.
    watch_queue_size: int = 256
    # Engine housekeeping period (in-flight expiry, breaker half-open, session expiry).
    tick_interval_ms: int = 100
    log_level: str = "INFO"
    # HOST:PORT of the Prometheus /metrics endpoint; empty serves none.
    metrics_listen: str = ""
    # One log line per Decide (off: gateways call Decide for every request).
    log_decisions: bool = False
    # "uvloop" (measured cheaper per RPC; asyncio where uvloop is not installed) or "asyncio".
    event_loop: str = "uvloop"
    # HTTP/2 keepalive: the server pings a connection idle this long, calls or not, and drops
    # it when no answer comes within keepalive_timeout_s, so dead gateways are reaped.
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # Clients may ping this often (gRPC's default of 5 min makes a gateway with a 10-30 s
    # keepalive get GOAWAY too_many_pings); faster pingers are disconnected.
    keepalive_min_client_interval_s: float = 10.0
    # Close connections with no RPC for this long (0 = never: idle gateway connections cost
    # little and are reaped by keepalive when dead).
    max_connection_idle_s: float = 0.0
    # Ask clients to reconnect after this long (0 = never), e.g. to rebalance across replicas
    # behind a layer-4 load balancer; RPCs in flight get max_connection_age_grace_s to finish.
    max_connection_age_s: float = 0.0
    max_connection_age_grace_s: float = 30.0
    # [server.tls]: certificate and key (TLS), client CA (mTLS), admin client names.
    tls: TLSSettings = field(default_factory=TLSSettings)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    server: ServerSettings
    endpoints: tuple[Endpoint, ...]
    engine: EngineSettings
    probe: ProbeSettings
    # [state]: in this process ("memory") or shared through Redis.
    state: StateSettings = field(default_factory=StateSettings)
    # Where the settings came from, for messages: the file path or "<defaults>".
    source: str = "<defaults>"


@dataclass(frozen=True, slots=True)
class _Key:
    kind: type
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()


_SERVER_KEYS: Mapping[str, _Key] = {
    "listen": _Key(str),
    "admin_token": _Key(str),
    "admin_token_file": _Key(str),
    "data_dir": _Key(str),
    "grace_period_s": _Key(float, 0, 3600),
    "max_message_bytes": _Key(int, 1024, 1 << 30),
    "max_concurrent_rpcs": _Key(int, 1, 1_000_000),
    "max_watchers": _Key(int, 0, 1_000_000),
    "watch_queue_size": _Key(int, 1, 1_000_000),
    "tick_interval_ms": _Key(int, 1, 60_000),
    "log_level": _Key(str, choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    "metrics_listen": _Key(str),
    "log_decisions": _Key(bool),
    "event_loop": _Key(str, choices=EVENT_LOOPS),
    "keepalive_time_s": _Key(float, 1, 86_400),
    "keepalive_timeout_s": _Key(float, 1, 3600),
    "keepalive_min_client_interval_s": _Key(float, 1, 86_400),
    "max_connection_idle_s": _Key(float, 0, 86_400 * 30),
    "max_connection_age_s": _Key(float, 0, 86_400 * 30),
    "max_connection_age_grace_s": _Key(float, 0, 86_400),
}
assert set(_SERVER_KEYS) == {f.name for f in fields(ServerSettings)} - {"tls"}

# [server.tls]; each key is also DECIDER_TLS_<KEY>, and the files are flags --tls-<key>.
_TLS_KEYS: Mapping[str, _Key] = {
    "cert_file": _Key(str),
    "key_file": _Key(str),
    "client_ca_file": _Key(str),
    "admin_client_names": _Key(list),
}
assert set(_TLS_KEYS) == {f.name for f in fields(TLSSettings)}

_ENDPOINT_KEYS = frozenset(
    {
        "id",
        "address",
        "model",
        "health_url",
        "weight",
        "capabilities",
        "cost_per_1k_tokens",
        "labels",
        "metrics_url",
        "metrics_kind",
        "probe_headers",
        "max_in_flight",
        "requests_per_minute",
        "tokens_per_minute",
    }
)
_METRICS_KINDS = {kind.name.lower(): kind for kind in MetricsKind if kind.value}


def load(
    path: str | Path | None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Reads, merges and validates everything; raises ConfigError on the first bad key."""
    source = str(path) if path else "<defaults>"
    doc: dict[str, Any] = {}
    if path:
        doc = read_toml(path)
    settings = parse(doc, source=source)
    server = settings.server
    for key, spec in _SERVER_KEYS.items():
        raw = (env or {}).get(ENV_PREFIX + key.upper())
        if raw is not None:
            where = f"environment {ENV_PREFIX}{key.upper()}"
            server = replace(server, **{key: _coerce_text(raw, spec, where)})
            _check_metrics_listen(server, key, where)
    tls = server.tls
    for key, spec in _TLS_KEYS.items():
        raw = (env or {}).get(f"{ENV_PREFIX}TLS_{key.upper()}")
        if raw is not None:
            where = f"environment {ENV_PREFIX}TLS_{key.upper()}"
            value: Any = _names(raw) if spec.kind is list else _coerce_text(raw, spec, where)
            tls = replace(tls, **{key: value})
    for key, value in (flags or {}).items():
        if value is None or not key.startswith("tls_"):
            continue
        name = key.removeprefix("tls_")
        if name not in _TLS_KEYS or _TLS_KEYS[name].kind is list:
            raise ConfigError(f"flag --{key.replace('_', '-')}: not a TLS setting")
        tls = replace(
            tls, **{name: _check(value, _TLS_KEYS[name], f"flag --{key.replace('_', '-')}")}
        )
    server = replace(server, tls=tls)
    for key, value in (flags or {}).items():
        if value is None or key.startswith("tls_"):
            continue
        if key not in _SERVER_KEYS:
            raise ConfigError(f"flag --{key.replace('_', '-')}: not a server setting")
        where = f"flag --{key.replace('_', '-')}"
        server = replace(server, **{key: _check(value, _SERVER_KEYS[key], where)})
        _check_metrics_listen(server, key, where)
    _check_listen(server.listen, "listen")
    server.tls.check()
    server = _with_token_file(server)
    return replace(settings, server=server, state=settings.state.with_env(env or {}))


def _with_token_file(server: ServerSettings) -> ServerSettings:
    """Reads admin_token_file into admin_token; the token itself never appears in a message."""
    path = server.admin_token_file
    if not path:
        return server
    if server.admin_token:
        raise ConfigError(
            "server.admin_token and server.admin_token_file are both set; keep one "
            "(the file keeps the token out of argv and the environment)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"server.admin_token_file: {path}: cannot read: {why}") from None
    if not token:
        raise ConfigError(f"server.admin_token_file: {path}: the file is empty")
    if any(c.isspace() for c in token):
        raise ConfigError(
            f"server.admin_token_file: {path}: the token holds whitespace or several lines"
        )
    return replace(server, admin_token=token)


def _names(raw: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in raw.split(",") if name.strip())


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def parse(doc: Mapping[str, Any], *, source: str = "<defaults>") -> Settings:
    """Settings from a parsed TOML document; errors are prefixed with `source`."""
    try:
        known = {"server", "endpoints", "probe", "state", *ENGINE_TABLES}
        for key in doc:
            if key not in known:
                raise ConfigError(
                    f"{key}: unknown table or key (known: {', '.join(sorted(known))})"
                )
        server = _parse_server(doc.get("server", {}))
        endpoints = _parse_endpoints(doc.get("endpoints", []))
        engine = EngineSettings.parse({k: doc[k] for k in ENGINE_TABLES if k in doc})
        probe = ProbeSettings.parse(_table(doc.get("probe", {}), "probe"))
        state = StateSettings.parse(_table(doc.get("state", {}), "state"))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return Settings(
        server=server, endpoints=endpoints, engine=engine, probe=probe, state=state, source=source
    )


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {_show(value)}, must be a table")
    return value


def _parse_server(value: Any) -> ServerSettings:
    table = _table(value, "server")
    out: dict[str, Any] = {}
    for key, raw in table.items():
        if key == "tls":
            out["tls"] = _parse_tls(raw)
            continue
        spec = _SERVER_KEYS.get(key)
        if spec is None:
            raise ConfigError(
                f"server.{key}: unknown key (known: {', '.join(sorted([*_SERVER_KEYS, 'tls']))})"
            )
        out[key] = _check(raw, spec, f"server.{key}")
    if "listen" in out:
        _check_listen(out["listen"], "server.listen")
    if out.get("metrics_listen"):
        parse_listen(out["metrics_listen"], name="server.metrics_listen")
    return ServerSettings(**out)


def _parse_tls(value: Any) -> TLSSettings:
    table = _table(value, "server.tls")
    out: dict[str, Any] = {}
    for key, raw in table.items():
        spec = _TLS_KEYS.get(key)
        where = f"server.tls.{key}"
        if spec is None:
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(_TLS_KEYS))})")
        if spec.kind is list:
            if not isinstance(raw, list) or not all(isinstance(n, str) and n for n in raw):
                raise ConfigError(f"{where}: {_show(raw)}, must be a list of non-empty strings")
            out[key] = tuple(raw)
        else:
            out[key] = _check(raw, spec, where)
    # Checked whole in load(), once variables and flags may have completed the table.
    return TLSSettings(**out)


def _check_metrics_listen(server: ServerSettings, key: str, where: str) -> None:
    if key == "metrics_listen" and server.metrics_listen:
        parse_listen(server.metrics_listen, name=where)


def _check_listen(listen: str, where: str) -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{where}: {listen!r}, must be HOST:PORT (port 0 picks a free one)")


def _check(value: Any, spec: _Key, where: str, *, shown: str = "") -> Any:
    """The value, checked against `spec`; errors show `shown` (the raw text) when given."""
    shown = shown or _show(value)
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {shown}, must be true or false")
        return value
    if spec.kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {shown}, must be a string")
        if not spec.choices:
            return value
        # Any case is accepted; the value is spelled as in `choices` ("info" -> "INFO").
        for choice in spec.choices:
            if choice.lower() == value.lower():
                return choice
        raise ConfigError(f"{where}: {value!r}, must be one of {', '.join(spec.choices)}")
    if spec.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        what = "an integer"
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        what = "a number"
    if (
        not ok
        or (spec.low is not None and value < spec.low)
        or (spec.high is not None and value > spec.high)
    ):
        raise ConfigError(f"{where}: {shown}, must be {what}{_range(spec)}")
    return float(value) if spec.kind is float else value


def _coerce_text(raw: str, spec: _Key, where: str) -> Any:
    value: Any = raw
    if spec.kind is bool:
        value = {"true": True, "1": True, "false": False, "0": False}.get(raw.strip().lower(), raw)
    try:
        if spec.kind is int:
            value = int(raw)
        elif spec.kind is float:
            value = float(raw)
    except ValueError:
        pass
    return _check(value, spec, where, shown=repr(raw))


def _parse_endpoints(value: Any) -> tuple[Endpoint, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"endpoints: {_show(value)}, must be an array of tables [[endpoints]]")
    seen: set[str] = set()
    out: list[Endpoint] = []
    for i, item in enumerate(value):
        where = f"endpoints[{i}]"
        table = _table(item, where)
        endpoint = _parse_endpoint(table, where)
        if endpoint.id in seen:
            raise ConfigError(f"{where}.id: {endpoint.id!r} is used by an earlier endpoint")
        seen.add(endpoint.id)
        out.append(endpoint)
    return tuple(out)


def _parse_endpoint(table: Mapping[str, Any], where: str) -> Endpoint:
    for key in table:
        if key not in _ENDPOINT_KEYS:
            raise ConfigError(
                f"{where}.{key}: unknown key (known: {', '.join(sorted(_ENDPOINT_KEYS))})"
            )

    def text(key: str) -> str:
        return str(_check(table.get(key, ""), _Key(str), f"{where}.{key}"))

    def whole(key: str, default: int = 0) -> int:
        return int(_check(table.get(key, default), _Key(int, 0, 2**32 - 1), f"{where}.{key}"))

    def number(key: str) -> float:
        return float(_check(table.get(key, 0.0), _Key(float, 0), f"{where}.{key}"))

    def strings(key: str) -> Mapping[str, str]:
        raw = _table(table.get(key, {}), f"{where}.{key}")
        for k, v in raw.items():
            if not isinstance(v, str):
                raise ConfigError(f"{where}.{key}.{k}: {_show(v)}, must be a string")
        return MappingProxyType(dict(raw))

    capabilities = table.get("capabilities", [])
    if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
        raise ConfigError(f"{where}.capabilities: {_show(capabilities)}, must be a list of strings")
    kind_name = text("metrics_kind").lower()
    if kind_name and kind_name not in _METRICS_KINDS:
        raise ConfigError(
            f"{where}.metrics_kind: {kind_name!r}, must be one of {', '.join(_METRICS_KINDS)}"
        )
    weight = whole("weight", 1)
    endpoint = Endpoint(
        id=text("id"),
        address=text("address"),
        model=text("model"),
        health_url=text("health_url"),
        weight=weight or 1,
        capabilities=frozenset(capabilities),
        cost_per_1k_tokens=float(
            _check(
                table.get("cost_per_1k_tokens", 0.0), _Key(float, 0), f"{where}.cost_per_1k_tokens"
            )
        ),
        labels=strings("labels"),
        metrics_url=text("metrics_url"),
        metrics_kind=_METRICS_KINDS.get(kind_name, MetricsKind.UNSPECIFIED),
        probe_headers=strings("probe_headers"),
        max_in_flight=whole("max_in_flight"),
        requests_per_minute=whole("requests_per_minute"),
        tokens_per_minute=whole("tokens_per_minute"),
        source=SOURCE_CONFIG,
    )
    problems = check_endpoint(endpoint)
    if problems:
        first = problems[0]
        value = table.get(first.field, "")
        raise ConfigError(f"{where}.{first.field}: {_show(value)}: {first.description}")
    return endpoint


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _range(spec: _Key) -> str:
    if spec.low is not None and spec.high is not None:
        return f" from {_num(spec.low)} to {_num(spec.high)}"
    if spec.low is not None:
        return f" >= {_num(spec.low)}"
    return ""


def _num(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"
