"""Typed readers for TOML tables: each returns a checked value or raises ConfigError naming the
key path, the bad value and what is allowed. A leaf module: the settings and every strategy's
config parser use it, and it imports nothing from the core.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from decider.errors import ConfigError


def check_keys(table: Mapping[str, Any], allowed: frozenset[str] | set[str], path: str) -> None:
    """Raise ConfigError for the first key of `table` that is not in `allowed`."""
    for key in table:
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(f"{path}.{key}: unknown key (known keys: {known})")


def as_table(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: {value!r}, must be a table")
    return value


def get_int(
    table: Mapping[str, Any], key: str, default: int, path: str, *, minimum: int = 0
) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{path}.{key}: {value!r}, must be an int >= {minimum}")
    return value


def get_float(
    table: Mapping[str, Any],
    key: str,
    default: float,
    path: str,
    *,
    minimum: float = 0.0,
    maximum: float = math.inf,
    exclusive_minimum: bool = False,
) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}.{key}: {value!r}, must be a number")
    number = float(value)
    too_low = number <= minimum if exclusive_minimum else number < minimum
    if math.isnan(number) or too_low or number > maximum:
        low = f"> {minimum:g}" if exclusive_minimum else f">= {minimum:g}"
        high = "" if maximum == math.inf else f" and <= {maximum:g}"
        raise ConfigError(f"{path}.{key}: {value!r}, must be a number {low}{high}")
    return number


def get_bool(table: Mapping[str, Any], key: str, default: bool, path: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}.{key}: {value!r}, must be true or false")
    return value


def get_str(
    table: Mapping[str, Any],
    key: str,
    default: str,
    path: str,
    *,
    choices: frozenset[str] | None = None,
) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{path}.{key}: {value!r}, must be a string")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}.{key}: {value!r}, must be one of {', '.join(sorted(choices))}")
    return value
