"""Listen addresses as the config file, variables and flags spell them."""

from __future__ import annotations

import re
from typing import Final

from decider.errors import ConfigError

_LISTEN: Final = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})")


def parse_listen(value: str, *, name: str = "--metrics-listen") -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT`, or `:PORT` (all interfaces) -> (host, port)."""
    match = _LISTEN.fullmatch(value.strip())
    port = int(match["port"]) if match else -1
    if match is None or port > 65535:
        raise ConfigError(f"{name}: {value!r}, must be HOST:PORT (e.g. 127.0.0.1:9464)")
    return (match["v6"] if match["v6"] is not None else match["host"]), port
