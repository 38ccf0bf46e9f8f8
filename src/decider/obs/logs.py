"""Structured logs: one JSON object per line, with the current trace and span ids, for state
changes (health, breaker, registry, config). Decisions are logged only when asked for.

Loggers: `decider.health` (health and breaker transitions), `decider.state.registry`,
`decider.config`, `decider.decisions` (off unless `log_decisions`), plus whatever else logs
through the root logger (grpc, opentelemetry), which gets the same format.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Final, Literal, TextIO

from opentelemetry import trace

from decider.core.model import (
    BreakerState,
    Decision,
    Endpoint,
    HealthEvent,
    HealthStatus,
    Refusal,
    RouteRequest,
)
from decider.errors import ConfigError

__all__ = [
    "JsonFormatter",
    "configure_logging",
    "log_config_loaded",
    "log_decision",
    "log_event",
    "log_health_event",
    "log_registry_change",
    "parse_level",
]

HEALTH: Final = "decider.health"
REGISTRY: Final = "decider.registry"
CONFIG: Final = "decider.config"
DECISIONS: Final = "decider.decisions"

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# Above CRITICAL: the decision logger says nothing unless log_decisions is on.
_OFF: Final = logging.CRITICAL + 10

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD_ATTRS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
) | {"message", "asctime", "taskName"}

_decision_log: Final = logging.getLogger(DECISIONS)


def parse_level(value: str | int, *, name: str = "log_level") -> int:
    """ "debug" | "info" | "warning" | "error" | "critical" (any case) -> logging level."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    level = _LEVELS.get(str(value).strip().lower())
    if level is None:
        raise ConfigError(f"{name}: {value!r}, must be one of {', '.join(_LEVELS)}")
    return level


def _trace_ids() -> tuple[str, str] | None:
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ...extra fields, "trace_id", "span_id"}`."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        # Stamped when the record was made; otherwise the span current now (same thread).
        ids = getattr(record, "_trace_ids", None) or _trace_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _TraceIdFilter(logging.Filter):
    """Stamps trace ids on the record in the emitting thread, before any queue hand-off."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "_trace_ids"):
            record._trace_ids = _trace_ids()
        return True


class _DeciderHandler(logging.StreamHandler[TextIO]):
    """Marks the handler configure_logging installed, so a second call replaces it."""


def configure_logging(
    *,
    level: str | int = "info",
    log_decisions: bool = False,
    json_format: bool = True,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Installs one handler on the root logger (replacing a previous one from here).

    `log_decisions` turns on one `decider.decisions` line per Decide at INFO, whatever
    `level` is; off by default because gateways call Decide for every request.
    Returns the handler (tests remove it with `logging.getLogger().removeHandler(h)`).
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _DeciderHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _DeciderHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(_TraceIdFilter())
    handler.setFormatter(
        JsonFormatter()
        if json_format
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root_level = parse_level(level)
    root.setLevel(root_level)
    # httpx logs every probe request at INFO; the prober reports what matters itself.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root_level))
    _decision_log.setLevel(logging.INFO if log_decisions else _OFF)
    return handler


# --------------------------------------------------------------------------- state changes


def log_event(
    logger: str,
    event: str,
    message: str,
    *,
    level: int = logging.INFO,
    fields: Mapping[str, object] | None = None,
) -> None:
    """One structured line: `event` names what happened, `fields` become JSON keys."""
    log = logging.getLogger(logger)
    if log.isEnabledFor(level):
        log.log(level, message, extra={"event": event, **(fields or {})})


def log_health_event(event: HealthEvent) -> None:
    """A health or breaker transition (what the engine's on_event receives)."""
    if event.removed:
        log_event(
            HEALTH,
            "endpoint_removed",
            f"endpoint {event.endpoint_id} removed",
            fields={"endpoint_id": event.endpoint_id, "model": event.model},
        )
        return
    health = event.status.name.lower()
    breaker = event.breaker_state.name.lower()
    bad = event.status is HealthStatus.UNHEALTHY or event.breaker_state is BreakerState.OPEN
    log_event(
        HEALTH,
        "endpoint_state",
        f"endpoint {event.endpoint_id} is {health}, breaker {breaker}"
        + (f": {event.reason}" if event.reason else ""),
        level=logging.WARNING if bad else logging.INFO,
        fields={
            "endpoint_id": event.endpoint_id,
            "model": event.model,
            "health": health,
            "breaker_state": breaker,
            "reason": event.reason,
        },
    )


def log_registry_change(
    action: Literal["registered", "updated", "deregistered"],
    endpoint: Endpoint | str,
) -> None:
    """An endpoint added, replaced or removed (by RegisterEndpoint or the config file)."""
    if isinstance(endpoint, str):
        fields: dict[str, object] = {"endpoint_id": endpoint}
    else:
        fields = {
            "endpoint_id": endpoint.id,
            "model": endpoint.model,
            "address": endpoint.address,
            "source": endpoint.source,
        }
    log_event(
        REGISTRY, f"endpoint_{action}", f"endpoint {fields['endpoint_id']} {action}", fields=fields
    )


def log_config_loaded(path: str | None, *, fields: Mapping[str, object] | None = None) -> None:
    """The validated configuration in effect (file path, or the built-in defaults)."""
    source = path or "built-in defaults"
    log_event(
        CONFIG,
        "config_loaded",
        f"configuration loaded from {source}",
        fields={"path": path or "", **(fields or {})},
    )


# --------------------------------------------------------------------------- decisions


def log_decision(request: RouteRequest, result: Decision | Refusal, *, elapsed_s: float) -> None:
    """One line per Decide when log_decisions is on; returns at once otherwise."""
    if not _decision_log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, object] = {
        "event": "decision",
        "request_id": request.request_id,
        "model": request.model,
        "tenant": request.tenant,
        "elapsed_us": round(elapsed_s * 1e6, 1),
    }
    if isinstance(result, Decision):
        fields.update(
            decision_id=result.decision_id,
            strategy=result.strategy,
            endpoint_id=result.endpoint.id,
            fallback_ids=[e.id for e in result.fallbacks],
            reason=result.reason,
        )
        message = f"{request.model} -> {result.endpoint.id}: {result.reason}"
    else:
        fields.update(result=result.kind.value.lower(), reason=result.message)
        message = f"{request.model} refused: {result.message}"
    _decision_log.info(message, extra=fields)
