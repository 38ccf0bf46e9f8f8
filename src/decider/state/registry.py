"""Endpoint membership: endpoints from the config file plus those added over RegistryService.

The registry is the only writer of membership. It publishes immutable `tuple[Endpoint, ...]`
snapshots (every change replaces the whole reference) and persists registered endpoints in
SQLite under the data directory, so they survive a restart. Each write is one transaction
committed with synchronous=FULL before the call returns: an acknowledged change is on disk.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from decider.core.model import Endpoint, MetricsKind
from decider.errors import (
    ConfigError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    StorageUnavailable,
)

log = logging.getLogger("decider.registry")

SOURCE_CONFIG = "config"
SOURCE_REGISTRY = "registry"

# Bounds on endpoint fields; generous for real deployments, small enough that one
# request cannot make the registry or a snapshot large.
MAX_ID_CHARS = 128
MAX_TEXT_CHARS = 1024
MAX_LIST_ITEMS = 64
MAX_WEIGHT = 10_000

Snapshot = tuple[Endpoint, ...]
Listener = Callable[[Snapshot], None]


class Membership(Protocol):
    """What RegistryService writes through: this process's registry, or the shared one."""

    async def register(self, endpoint: Endpoint) -> bool:
        """Adds or replaces an endpoint; True when the id was new. Stored before returning."""
        ...

    async def deregister(self, endpoint_id: str) -> None: ...


class LocalMembership:
    """Membership of this process alone (the SQLite store, or memory)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def register(self, endpoint: Endpoint) -> bool:
        return self._registry.register(endpoint)

    async def deregister(self, endpoint_id: str) -> None:
        self._registry.deregister(endpoint_id)


def check_endpoint(endpoint: Endpoint) -> list[FieldViolation]:
    """Every problem with an endpoint's fields, named by field; empty when it is valid."""
    out: list[FieldViolation] = []

    def bad(name: str, description: str) -> None:
        out.append(FieldViolation(name, description))

    if not endpoint.id:
        bad("id", "required")
    elif len(endpoint.id) > MAX_ID_CHARS:
        bad("id", f"{len(endpoint.id)} characters, at most {MAX_ID_CHARS}")
    elif any(c.isspace() for c in endpoint.id):
        bad("id", f"{endpoint.id!r} contains whitespace")
    if not endpoint.address:
        bad("address", "required (host:port the gateway dials)")
    else:
        problem = _address_problem(endpoint.address)
        if problem:
            bad("address", problem)
    if not endpoint.model:
        bad("model", "required")
    elif len(endpoint.model) > MAX_TEXT_CHARS:
        bad("model", f"{len(endpoint.model)} characters, at most {MAX_TEXT_CHARS}")
    for name, url in (("health_url", endpoint.health_url), ("metrics_url", endpoint.metrics_url)):
        if url and not url.startswith(("http://", "https://")):
            bad(name, f"{url[:100]!r} must start with http:// or https://")
        elif len(url) > MAX_TEXT_CHARS:
            bad(name, f"{len(url)} characters, at most {MAX_TEXT_CHARS}")
    if not 1 <= endpoint.weight <= MAX_WEIGHT:
        bad("weight", f"{endpoint.weight}, must be between 1 and {MAX_WEIGHT} (0 means 1)")
    if not math.isfinite(endpoint.cost_per_1k_tokens) or endpoint.cost_per_1k_tokens < 0:
        bad("cost_per_1k_tokens", f"{endpoint.cost_per_1k_tokens}, must be a finite number >= 0")
    for name, items in (
        ("capabilities", tuple(endpoint.capabilities)),
        ("labels", tuple(endpoint.labels) + tuple(endpoint.labels.values())),
        ("probe_headers", tuple(endpoint.probe_headers) + tuple(endpoint.probe_headers.values())),
    ):
        if len(items) > 2 * MAX_LIST_ITEMS:
            bad(name, f"too many entries, at most {MAX_LIST_ITEMS}")
        elif any(len(item) > MAX_TEXT_CHARS for item in items):
            bad(name, f"an entry is longer than {MAX_TEXT_CHARS} characters")
    for name, number in (
        ("max_in_flight", endpoint.max_in_flight),
        ("requests_per_minute", endpoint.requests_per_minute),
        ("tokens_per_minute", endpoint.tokens_per_minute),
    ):
        if number < 0:
            bad(name, f"{number}, must be >= 0 (0 means unlimited)")
    return out


def _address_problem(address: str) -> str:
    if len(address) > MAX_TEXT_CHARS:
        return f"{len(address)} characters, at most {MAX_TEXT_CHARS}"
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        return f"{address!r} is not host:port"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{address!r} has no valid port (1-65535)"
    return ""


def validated(endpoint: Endpoint, *, prefix: str = "") -> Endpoint:
    """The endpoint, or InvalidArgument naming each bad field (under `prefix`)."""
    problems = check_endpoint(endpoint)
    if problems:
        raise InvalidArgument([FieldViolation(prefix + v.field, v.description) for v in problems])
    return endpoint


class Registry:
    """Owns membership; listeners get the new snapshot after every change."""

    def __init__(
        self,
        config_endpoints: Iterable[Endpoint] = (),
        *,
        store: EndpointStore | None = None,
    ) -> None:
        self._config = {e.id: e for e in config_endpoints}
        self._store = store
        self._registered: dict[str, Endpoint] = {}
        if store is not None:
            self._registered = {e.id: e for e in store.load()}
        self._listeners: list[Listener] = []
        self._snapshot: Snapshot = ()
        self._rebuild()

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def get(self, endpoint_id: str) -> Endpoint | None:
        return self._registered.get(endpoint_id) or self._config.get(endpoint_id)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def register(self, endpoint: Endpoint) -> bool:
        """Adds or replaces an endpoint; True when the id was new. Persisted before returning."""
        endpoint = validated(_with_source(endpoint, SOURCE_REGISTRY))
        created = self.get(endpoint.id) is None
        if self._store is not None:
            self._store.put(endpoint)
        self._registered[endpoint.id] = endpoint
        self._publish()
        return created

    def deregister(self, endpoint_id: str) -> None:
        """Removes an endpoint. A config endpoint is removed until the next start, when the
        config file (its source of truth) brings it back."""
        if self.get(endpoint_id) is None:
            raise NotFound(f"no endpoint with id {endpoint_id!r} is registered")
        if endpoint_id in self._registered and self._store is not None:
            self._store.delete(endpoint_id)
        self._registered.pop(endpoint_id, None)
        self._config.pop(endpoint_id, None)
        self._publish()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    # Changes already stored elsewhere (the shared store): applied here, never written back.

    def apply_put(self, endpoint: Endpoint) -> None:
        endpoint = _with_source(endpoint, SOURCE_REGISTRY)
        if self._registered.get(endpoint.id) != endpoint:
            self._registered[endpoint.id] = endpoint
            self._publish()

    def apply_delete(self, endpoint_id: str) -> None:
        if self.get(endpoint_id) is not None:
            self._registered.pop(endpoint_id, None)
            self._config.pop(endpoint_id, None)
            self._publish()

    def replace_registered(self, endpoints: Iterable[Endpoint]) -> None:
        registered = {e.id: _with_source(e, SOURCE_REGISTRY) for e in endpoints}
        if registered != self._registered:
            self._registered = registered
            self._publish()

    def _rebuild(self) -> None:
        merged = dict(self._config)
        # A registered endpoint replaces a config one with the same id.
        merged.update(self._registered)
        self._snapshot = tuple(sorted(merged.values(), key=lambda e: e.id))

    def _publish(self) -> None:
        self._rebuild()
        snapshot = self._snapshot
        for listener in self._listeners:
            listener(snapshot)


def _with_source(endpoint: Endpoint, source: str) -> Endpoint:
    if endpoint.source == source:
        return endpoint
    fields = {name: getattr(endpoint, name) for name in Endpoint.__dataclass_fields__}
    fields["source"] = source
    return Endpoint(**fields)


class EndpointStore:
    """Registered endpoints in one SQLite table, one row per endpoint as JSON.

    SQLite's journal makes each statement atomic: a crash mid-write leaves the previous
    row, never a torn one, and synchronous=FULL makes a committed write durable.
    """

    FILENAME = "registry.sqlite3"

    def __init__(self, data_dir: str | Path) -> None:
        """Opens (creating) the store; a directory or file that cannot be used is a
        ConfigError naming the path and the cause, as a bad config value is."""
        directory = Path(data_dir)
        self.path = directory / self.FILENAME
        if directory.exists() and not directory.is_dir():
            raise ConfigError(f"server.data_dir: {directory}: exists and is not a directory")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"server.data_dir: {directory}: cannot create the directory: {exc.strerror or exc}"
            ) from None
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(_open_failure(directory, self.path, exc)) from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS endpoints (id TEXT PRIMARY KEY, body TEXT NOT NULL)"
            )
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if _corrupt(exc):
                raise ConfigError(_corrupt_message(self.path, exc)) from None
            raise ConfigError(_open_failure(directory, self.path, exc)) from None

    def load(self) -> list[Endpoint]:
        try:
            rows = self._db.execute("SELECT id, body FROM endpoints ORDER BY id").fetchall()
        except sqlite3.DatabaseError as exc:
            raise ConfigError(_corrupt_message(self.path, exc)) from None
        out = []
        for endpoint_id, body in rows:
            try:
                out.append(endpoint_from_json(json.loads(body)))
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    _corrupt_message(self.path, f"the row of endpoint {endpoint_id!r}: {exc!r}")
                ) from None
        return out

    def put(self, endpoint: Endpoint) -> None:
        """Raises StorageUnavailable (nothing written) when the row cannot be made durable."""
        body = json.dumps(endpoint_to_json(endpoint), sort_keys=True)
        try:
            with self._db:
                self._db.execute(
                    "INSERT INTO endpoints (id, body) VALUES (?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET body = excluded.body",
                    (endpoint.id, body),
                )
        except sqlite3.Error as exc:
            raise StorageUnavailable(
                self._write_failure(f"register {endpoint.id!r}", exc)
            ) from None

    def delete(self, endpoint_id: str) -> None:
        try:
            with self._db:
                self._db.execute("DELETE FROM endpoints WHERE id = ?", (endpoint_id,))
        except sqlite3.Error as exc:
            raise StorageUnavailable(
                self._write_failure(f"deregister {endpoint_id!r}", exc)
            ) from None

    def _write_failure(self, what: str, exc: sqlite3.Error) -> str:
        cause = str(exc)
        try:
            # sqlite reports a read-only file system as "disk I/O error"; the OS says which.
            with tempfile.TemporaryFile(dir=self.path.parent) as probe:
                probe.write(b"\0" * 4096)
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as probe_error:
            cause = f"{exc}: {probe_error.strerror or probe_error}"
        log.error("registry store %s: cannot %s: %s", self.path, what, cause)
        return (
            f"cannot {what}: the registry store {self.path} cannot be written ({cause}); "
            "nothing was changed"
        )

    def close(self) -> None:
        self._db.close()


def _corrupt(exc: sqlite3.DatabaseError) -> bool:
    return "not a database" in str(exc) or "malformed" in str(exc)


def _corrupt_message(path: Path, cause: object) -> str:
    return (
        f"server.data_dir: {path}: the registry store is unreadable or corrupted ({cause}). "
        "To start without the endpoints registered at run time, move the file aside (config "
        "endpoints are unaffected); gateways or operators then register them again"
    )


def _open_failure(directory: Path, path: Path, exc: sqlite3.Error) -> str:
    why = str(exc)
    try:
        # sqlite says only "unable to open database file"; writing a file here says why.
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as probe:
        why = f"the directory is not writable: {probe.strerror or probe}"
    else:
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            why = "the file is not readable and writable"
    return f"server.data_dir: {path}: cannot open the registry store: {why}"


def endpoint_to_json(endpoint: Endpoint) -> dict[str, Any]:
    return {
        "id": endpoint.id,
        "address": endpoint.address,
        "model": endpoint.model,
        "health_url": endpoint.health_url,
        "weight": endpoint.weight,
        "capabilities": sorted(endpoint.capabilities),
        "cost_per_1k_tokens": endpoint.cost_per_1k_tokens,
        "labels": dict(endpoint.labels),
        "metrics_url": endpoint.metrics_url,
        "metrics_kind": int(endpoint.metrics_kind),
        "probe_headers": dict(endpoint.probe_headers),
        "max_in_flight": endpoint.max_in_flight,
        "requests_per_minute": endpoint.requests_per_minute,
        "tokens_per_minute": endpoint.tokens_per_minute,
        "source": endpoint.source,
    }


def endpoint_from_json(data: Mapping[str, Any]) -> Endpoint:
    return Endpoint(
        id=str(data["id"]),
        address=str(data["address"]),
        model=str(data["model"]),
        health_url=str(data.get("health_url", "")),
        weight=int(data.get("weight", 1)),
        capabilities=frozenset(data.get("capabilities", ())),
        cost_per_1k_tokens=float(data.get("cost_per_1k_tokens", 0.0)),
        labels=MappingProxyType(dict(data.get("labels", {}))),
        metrics_url=str(data.get("metrics_url", "")),
        metrics_kind=MetricsKind(int(data.get("metrics_kind", 0))),
        probe_headers=MappingProxyType(dict(data.get("probe_headers", {}))),
        max_in_flight=int(data.get("max_in_flight", 0)),
        requests_per_minute=int(data.get("requests_per_minute", 0)),
        tokens_per_minute=int(data.get("tokens_per_minute", 0)),
        source=str(data.get("source", SOURCE_REGISTRY)),
    )
