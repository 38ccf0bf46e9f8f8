"""Configuration: a TOML file, DECIDER_* variables and flags -> validated, immutable Settings."""

from decider.config.listen import parse_listen
from decider.config.loader import (
    ENGINE_TABLES,
    ENV_PREFIX,
    EVENT_LOOPS,
    ServerSettings,
    Settings,
    load,
    parse,
    read_toml,
)

__all__ = [
    "ENGINE_TABLES",
    "ENV_PREFIX",
    "EVENT_LOOPS",
    "ServerSettings",
    "Settings",
    "load",
    "parse",
    "parse_listen",
    "read_toml",
]
