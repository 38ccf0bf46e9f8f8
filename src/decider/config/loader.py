"""Settings from a TOML file, DECIDER_* environment variables and CLI flags, validated once.

Precedence: flags > environment > file > defaults. An empty file is valid. `[server]` and
`[[endpoints]]` are checked here, with the same pydantic schemas and formatter as the engine's
tables (decider.core.validation); the engine tables go to `EngineSettings.collect` and `[probe]`
to `ProbeSettings.parse`. A bad configuration is one ConfigError listing every problem, each
naming the file, the key path, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from decider.config.extproc import ExtProcSettings
from decider.config.listen import parse_listen
from decider.config.tls import TLSSettings
from decider.core.model import Endpoint, MetricsKind
from decider.core.settings import EngineSettings
from decider.core.validation import (
    ConfigErrors,
    Problems,
    allowed,
    from_text,
    position,
    schema,
    show,
)
from decider.errors import ConfigError
from decider.state.registry import SOURCE_CONFIG, check_endpoint
from decider.state.settings import StateSettings
from probe import ProbeSettings

ENGINE_TABLES = ("routing", "breaker", "quotas", "affinity", "cache")
ENV_PREFIX = "DECIDER_"

T = TypeVar("T")
# [server] event_loop: runtime/event_loop.py runs the server on one of these.
EVENT_LOOPS = ("uvloop", "asyncio")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """The `[server]` table; each key can also be set as DECIDER_<KEY> in the environment."""

    listen: str = "127.0.0.1:50051"
    # Empty: RegistryService needs no token. Set one whenever the port is reachable by others.
    # Never shown: not in repr, logs, spans or errors.
    admin_token: str = field(default="", repr=False, metadata=allowed(secret=True))
    # A file holding the token (read at start, surrounding whitespace dropped), so it is not
    # in argv or in the environment of every child process.
    admin_token_file: str = ""
    # SQLite store for registered endpoints; empty keeps them in memory only.
    data_dir: str = "data"
    # How long in-flight RPCs may take to finish after SIGTERM.
    grace_period_s: float = field(default=10.0, metadata=allowed(ge=0, le=3600, finite=True))
    # Largest request or response message, both directions.
    max_message_bytes: int = field(default=4 * 1024 * 1024, metadata=allowed(ge=1024, le=1 << 30))
    # Unary RPCs served at once; more get RESOURCE_EXHAUSTED. WatchHealth streams count apart.
    max_concurrent_rpcs: int = field(default=1000, metadata=allowed(ge=1, le=1_000_000))
    max_watchers: int = field(default=10_000, metadata=allowed(ge=0, le=1_000_000))
    # Changes buffered per watcher; a watcher that falls further behind gets a fresh snapshot.
    watch_queue_size: int = field(default=256, metadata=allowed(ge=1, le=1_000_000))
    # Engine housekeeping period (in-flight expiry, breaker half-open, session expiry).
    tick_interval_ms: int = field(default=100, metadata=allowed(ge=1, le=60_000))
    log_level: str = field(
        default="INFO",
        metadata=allowed(choices=("DEBUG", "INFO", "WARNING", "ERROR"), any_case=True),
    )
    # HOST:PORT of the Prometheus /metrics endpoint; empty serves none.
    metrics_listen: str = ""
    # One log line per Decide (off: gateways call Decide for every request).
    log_decisions: bool = False
    # "uvloop" (measured cheaper per RPC; asyncio where uvloop is not installed) or "asyncio".
    event_loop: str = field(default="uvloop", metadata=allowed(choices=EVENT_LOOPS, any_case=True))
    # HTTP/2 keepalive: the server pings a connection idle this long, calls or not, and drops
    # it when no answer comes within keepalive_timeout_s, so dead gateways are reaped.
    keepalive_time_s: float = field(default=60.0, metadata=allowed(ge=1, le=86_400, finite=True))
    keepalive_timeout_s: float = field(default=20.0, metadata=allowed(ge=1, le=3600, finite=True))
    # Clients may ping this often (gRPC's default of 5 min makes a gateway with a 10-30 s
    # keepalive get GOAWAY too_many_pings); faster pingers are disconnected.
    keepalive_min_client_interval_s: float = field(
        default=10.0, metadata=allowed(ge=1, le=86_400, finite=True)
    )
    # Close connections with no RPC for this long (0 = never: idle gateway connections cost
    # little and are reaped by keepalive when dead).
    max_connection_idle_s: float = field(
        default=0.0, metadata=allowed(ge=0, le=86_400 * 30, finite=True)
    )
    # Ask clients to reconnect after this long (0 = never), e.g. to rebalance across replicas
    # behind a layer-4 load balancer; RPCs in flight get max_connection_age_grace_s to finish.
    max_connection_age_s: float = field(
        default=0.0, metadata=allowed(ge=0, le=86_400 * 30, finite=True)
    )
    max_connection_age_grace_s: float = field(
        default=30.0, metadata=allowed(ge=0, le=86_400, finite=True)
    )
    # [server.tls]: certificate and key (TLS), client CA (mTLS), admin client names.
    tls: TLSSettings = field(default_factory=TLSSettings)


@dataclass(frozen=True, slots=True, kw_only=True)
class _TlsTable:
    """`[server.tls]` as written; each key is also DECIDER_TLS_<KEY>, the files --tls-<key>."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    admin_client_names: list[str] = field(
        default_factory=list, metadata=allowed(what="a list of non-empty strings")
    )


# `tls` is a table of its own, checked by _TlsTable.
_SERVER_TABLE = {"exclude": ("tls",)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    server: ServerSettings
    endpoints: tuple[Endpoint, ...]
    engine: EngineSettings
    probe: ProbeSettings
    # [state]: in this process ("memory") or shared through Redis.
    state: StateSettings = field(default_factory=StateSettings)
    # [ext_proc]: Envoy's endpoint-picker protocol on a listener of its own.
    ext_proc: ExtProcSettings = field(default_factory=ExtProcSettings)
    # Where the settings came from, for messages: the file path or "<defaults>".
    source: str = "<defaults>"


_METRICS_KINDS = {kind.name.lower(): kind for kind in MetricsKind if kind.value}
_UINT32 = 2**32 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class _EndpointTable:
    """An `[[endpoints]]` table as written; becomes an Endpoint (decider.core.model)."""

    id: str = ""
    address: str = ""
    model: str = ""
    health_url: str = ""
    # 0 counts as 1.
    weight: int = field(default=1, metadata=allowed(ge=0, le=_UINT32))
    capabilities: list[str] = field(
        default_factory=list, metadata=allowed(what="a list of strings")
    )
    cost_per_1k_tokens: float = field(default=0.0, metadata=allowed(ge=0, finite=True))
    labels: dict[str, str] = field(default_factory=dict)
    metrics_url: str = ""
    metrics_kind: str = field(
        default="",
        metadata=allowed(
            choices=("", *_METRICS_KINDS), any_case=True, what=f"one of {', '.join(_METRICS_KINDS)}"
        ),
    )
    # Header values are secrets (API keys): errors name the header, never the value.
    probe_headers: dict[str, str] = field(default_factory=dict, metadata=allowed(secret=True))
    max_in_flight: int = field(default=0, metadata=allowed(ge=0, le=_UINT32))
    requests_per_minute: int = field(default=0, metadata=allowed(ge=0, le=_UINT32))
    tokens_per_minute: int = field(default=0, metadata=allowed(ge=0, le=_UINT32))


def load(
    path: str | Path | None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Reads, merges and validates everything. Raises ConfigError listing every problem: the
    file's, in file order, each line starting with the file name, then the environment's and
    the flags'."""
    source = str(path) if path else "<defaults>"
    doc: dict[str, Any] = {}
    if path:
        doc = read_toml(path)
    problems = Problems()
    settings = _collect(doc, source, problems)
    flags = dict(flags or {})
    ext_proc = _ext_proc_flags(settings.ext_proc, flags, problems, (len(doc) + 2,))
    server_schema = schema(ServerSettings, **_SERVER_TABLE)
    tls_schema = schema(_TlsTable)
    changes: dict[str, Any] = {}
    # After the file's problems: the environment's, then the flags'.
    after = len(doc) + 1
    for i, key in enumerate(server_schema.specs):
        name = ENV_PREFIX + key.upper()
        raw = (env or {}).get(name)
        if raw is None:
            continue
        where = f"environment {name}"
        spec = server_schema.specs[key]
        value = server_schema.check_value(
            key, from_text(raw, spec.kind), where, problems, (after, i), shown=repr(raw)
        )
        if value is not dataclasses.MISSING:
            changes[key] = value
            _check_metrics_listen(key, value, where, problems, (after, i))
    tls_changes: dict[str, Any] = {}
    for i, key in enumerate(tls_schema.specs):
        name = f"{ENV_PREFIX}TLS_{key.upper()}"
        raw = (env or {}).get(name)
        if raw is None:
            continue
        text: Any = _names(raw) if key == "admin_client_names" else raw
        value = tls_schema.check_value(
            key,
            text,
            f"environment {name}",
            problems,
            (after, len(server_schema.specs) + i),
            shown=repr(raw),
        )
        if value is not dataclasses.MISSING:
            tls_changes[key] = value
    for i, (key, value) in enumerate((flags or {}).items()):
        if value is None:
            continue
        where = f"flag --{key.replace('_', '-')}"
        tls_key = key.removeprefix("tls_")
        if key.startswith("tls_") and tls_key in tls_schema.specs:
            value = tls_schema.check_value(tls_key, value, where, problems, (after + 1, i))
            if value is not dataclasses.MISSING:
                tls_changes[tls_key] = value
            continue
        if key not in server_schema.specs:
            problems.add((after + 1, i), f"{where}: not a server setting")
            continue
        value = server_schema.check_value(key, value, where, problems, (after + 1, i))
        if value is not dataclasses.MISSING:
            changes[key] = value
            _check_metrics_listen(key, value, where, problems, (after + 1, i))
    state = _state_env(
        settings.state,
        env or {},
        problems,
        (after, len(server_schema.specs) + len(tls_schema.specs)),
    )
    server = replace(settings.server, **changes)
    if tls_changes:
        server = replace(server, tls=_tls(_tls_values(server.tls, tls_changes)))
    if "listen" in changes:
        _check_listen(server.listen, "listen", problems, (after + 2,))
    if state is not None and not problems:
        # Whole, with the environment applied; reads the TLS files, as serve would.
        try:
            state.check()
        except ConfigError as exc:
            problems.extend(exc, (after + 3,))
    problems.raise_any()
    assert state is not None
    # Checked whole once the environment and flags may have completed the table.
    server.tls.check()
    return replace(
        settings,
        server=_with_token_file(server),
        ext_proc=ext_proc,
        state=state,
    )


def _state_env(
    state: StateSettings, env: Mapping[str, str], problems: Problems, order: tuple[int, ...]
) -> StateSettings | None:
    """`[state]` with the DECIDER_STATE_* variables applied; None (problems added) if any is
    wrong."""
    try:
        return state.with_env(env)
    except ConfigError as exc:
        problems.extend(exc, order)
        return None


def _ext_proc_flags(
    ext_proc: ExtProcSettings, flags: dict[str, Any], problems: Problems, order: tuple[int, ...]
) -> ExtProcSettings:
    """--ext-proc-listen and --ext-proc-single-endpoint, taken out of `flags`."""
    listen = flags.pop("ext_proc_listen", None)
    if listen is not None:
        try:
            parse_listen(listen, name="flag --ext-proc-listen")
        except ConfigError as exc:
            problems.add(order, str(exc))
        else:
            ext_proc = replace(ext_proc, listen=listen)
    if flags.pop("ext_proc_single_endpoint", None):
        ext_proc = replace(ext_proc, fallbacks=False)
    return ext_proc


def _tls_values(tls: TLSSettings, changes: Mapping[str, Any]) -> dict[str, Any]:
    values = {f.name: getattr(tls, f.name) for f in dataclasses.fields(TLSSettings)}
    values.update(changes)
    return values


def _tls(values: Mapping[str, Any]) -> TLSSettings:
    return TLSSettings(**{**values, "admin_client_names": tuple(values["admin_client_names"])})


def _names(raw: str) -> list[str]:
    return [name.strip() for name in raw.split(",") if name.strip()]


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


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        # TOML is UTF-8; tomllib decodes before parsing and lets this through.
        raise ConfigError(
            f"{path}: invalid TOML: not UTF-8 (byte {exc.start}: {exc.object[exc.start]:#04x})"
        ) from exc


def parse(doc: Mapping[str, Any], *, source: str = "<defaults>") -> Settings:
    """Settings from a parsed TOML document. Raises ConfigError listing every problem, in file
    order, each line starting with `source`."""
    problems = Problems()
    settings = _collect(doc, source, problems)
    problems.raise_any()
    return settings


def _collect(doc: Mapping[str, Any], source: str, problems: Problems) -> Settings:
    """Settings from a document, its problems added to `problems` (each starting with
    `source`); the result is only meaningful when no problem was added."""
    found = Problems()
    known = {"server", "endpoints", "probe", "ext_proc", "state", *ENGINE_TABLES}
    for i, key in enumerate(doc):
        if key not in known:
            found.add((i,), f"{key}: unknown table or key (known: {', '.join(sorted(known))})")
    server = _parse_server(doc.get("server", {}), found, (position(doc, "server"),))
    endpoints = _parse_endpoints(doc.get("endpoints", []), found, (position(doc, "endpoints"),))
    engine = EngineSettings.collect(doc, found)
    probe = _own_table(doc, "probe", ProbeSettings.parse, ProbeSettings(), found)
    state = _own_table(doc, "state", StateSettings.parse, StateSettings(), found)
    ext_proc = _own_table(doc, "ext_proc", ExtProcSettings.parse, ExtProcSettings(), found)
    if found:
        try:
            found.raise_any()
        except ConfigErrors as exc:
            problems.extend(exc.prefixed(source), ())
    return Settings(
        server=server,
        endpoints=endpoints,
        engine=engine,
        probe=probe,
        ext_proc=ext_proc,
        state=state,
        source=source,
    )


def _own_table(
    doc: Mapping[str, Any],
    name: str,
    parse: Callable[[Mapping[str, Any]], T],
    default: T,
    problems: Problems,
) -> T:
    """A table its owner validates (`[probe]`, `[state]`, `[ext_proc]`): its problems join the
    file's at the table's place in the file."""
    raw = doc.get(name, {})
    where = (position(doc, name),)
    if not isinstance(raw, Mapping):
        problems.add(where, f"{name}: {show(raw)}, must be a table")
        return default
    try:
        return parse(raw)
    except ConfigError as exc:
        problems.extend(exc, where)
        return default


def _parse_server(value: Any, problems: Problems, order: tuple[int, ...]) -> ServerSettings:
    values = schema(ServerSettings, **_SERVER_TABLE).validate(
        value, "server", problems, order, skip=("tls",)
    )
    if values is None:
        return ServerSettings()
    raw_tls = value.get("tls", {})
    tls = schema(_TlsTable).validate(
        raw_tls, "server.tls", problems, (*order, position(value, "tls"))
    )
    if tls is not None and not all(tls["admin_client_names"]):
        problems.add(
            (*order, position(value, "tls")),
            f"server.tls.admin_client_names: {show(raw_tls['admin_client_names'])}, "
            "must be a list of non-empty strings",
        )
    elif tls is not None:
        values["tls"] = _tls(tls)
    if "listen" in value:
        _check_listen(
            values["listen"], "server.listen", problems, (*order, position(value, "listen"))
        )
    if values["metrics_listen"]:
        where = (*order, position(value, "metrics_listen"))
        _check_metrics_listen(
            "metrics_listen", values["metrics_listen"], "server.metrics_listen", problems, where
        )
    return ServerSettings(**values)


def _check_metrics_listen(
    key: str, value: Any, where: str, problems: Problems, order: tuple[int, ...]
) -> None:
    if key == "metrics_listen" and value:
        try:
            parse_listen(value, name=where)
        except ConfigError as exc:
            problems.add(order, str(exc))


def _check_listen(listen: str, where: str, problems: Problems, order: tuple[int, ...]) -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        problems.add(order, f"{where}: {listen!r}, must be HOST:PORT (port 0 picks a free one)")


def _parse_endpoints(
    value: Any, problems: Problems, order: tuple[int, ...]
) -> tuple[Endpoint, ...]:
    if not isinstance(value, list):
        problems.add(order, f"endpoints: {show(value)}, must be an array of tables [[endpoints]]")
        return ()
    seen: set[str] = set()
    out: list[Endpoint] = []
    for i, item in enumerate(value):
        endpoint = _parse_endpoint(item, f"endpoints[{i}]", problems, (*order, i))
        if endpoint is None:
            continue
        if endpoint.id in seen:
            problems.add(
                (*order, i, position(item, "id")),
                f"endpoints[{i}].id: {endpoint.id!r} is used by an earlier endpoint",
            )
            continue
        seen.add(endpoint.id)
        out.append(endpoint)
    return tuple(out)


def _parse_endpoint(
    table: Any, where: str, problems: Problems, order: tuple[int, ...]
) -> Endpoint | None:
    # Name the endpoint by its id too: "endpoints[3]" alone is hard to find in a long file.
    raw_id = table.get("id") if isinstance(table, Mapping) else None
    suffix = f" (endpoint {raw_id!r})" if isinstance(raw_id, str) and raw_id else ""
    failed: set[str] = set()
    values = schema(_EndpointTable).validate(
        table, where, problems, order, suffix=suffix, failed=failed
    )
    if values is None:
        return None
    endpoint = Endpoint(
        id=values["id"],
        address=values["address"],
        model=values["model"],
        health_url=values["health_url"],
        weight=values["weight"] or 1,
        capabilities=frozenset(values["capabilities"]),
        cost_per_1k_tokens=values["cost_per_1k_tokens"],
        labels=MappingProxyType(dict(values["labels"])),
        metrics_url=values["metrics_url"],
        metrics_kind=_METRICS_KINDS.get(values["metrics_kind"], MetricsKind.UNSPECIFIED),
        probe_headers=MappingProxyType(dict(values["probe_headers"])),
        max_in_flight=values["max_in_flight"],
        requests_per_minute=values["requests_per_minute"],
        tokens_per_minute=values["tokens_per_minute"],
        source=SOURCE_CONFIG,
    )
    # The registry's checks too (address, URLs, required ids), on the keys that parsed.
    bad = [p for p in check_endpoint(endpoint) if p.field not in failed]
    for problem in bad:
        value = table.get(problem.field, "")
        problems.add(
            (*order, position(table, problem.field)),
            f"{where}.{problem.field}: {show(value)}: {problem.description}{suffix}",
        )
    return None if bad or failed else endpoint
