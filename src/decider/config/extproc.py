"""The Envoy ext_proc adapter's settings (`[ext_proc]`): which headers carry what the body
lacks, and how the answer names endpoints. Parsed and checked once, by the config loader."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from decider.config.listen import parse_listen
from decider.errors import ConfigError

# RFC 9110 token characters, lowercase: Envoy hands header names over in lowercase.
_HEADER_NAME: Final = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderNames:
    """Request headers read for what an OpenAI body does not carry, and the response header
    the route adds with the address that really served (`%UPSTREAM_REMOTE_ADDRESS%`). All
    lowercase, as Envoy hands them over."""

    session: str = "x-session-id"
    tenant: str = "x-tenant-id"
    # Comma-separated capability names the endpoint must have.
    capabilities: str = "x-decider-capabilities"
    strategy: str = "x-decider-strategy"
    request_id: str = "x-request-id"
    # The model when the request has no body to read it from.
    model: str = "x-decider-model"
    served: str = "x-gateway-destination-endpoint-served"


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtProcSettings:
    # Its own listener, HOST:PORT; empty serves ext_proc on the main gRPC port only.
    listen: str = ""
    headers: HeaderNames = field(default_factory=HeaderNames)
    # True: the chosen endpoint then its fallbacks, comma-separated (override_host walks them
    # on retries). False: the chosen endpoint alone (an ORIGINAL_DST cluster reads one ip:port).
    fallbacks: bool = True
    # Request bodies above this are answered 413; Envoy's own buffer limit applies before it.
    max_body_bytes: int = 16 << 20
    # Add x-decider-endpoint, x-decider-decision-id and x-decider-reason to responses.
    explain_headers: bool = True

    @classmethod
    def parse(cls, table: Mapping[str, Any]) -> ExtProcSettings:
        """The `[ext_proc]` table; raises ConfigError naming the key and value."""
        out: dict[str, Any] = {}
        for key, value in table.items():
            where = f"ext_proc.{key}"
            if key == "listen":
                if not isinstance(value, str):
                    raise ConfigError(f"{where}: {value!r}, must be a string HOST:PORT")
                if value:
                    parse_listen(value, name=where)
                out[key] = value
            elif key in ("fallbacks", "explain_headers"):
                if not isinstance(value, bool):
                    raise ConfigError(f"{where}: {value!r}, must be true or false")
                out[key] = value
            elif key == "max_body_bytes":
                if (
                    not isinstance(value, int)
                    or isinstance(value, bool)
                    or not (1024 <= value <= 1 << 30)
                ):
                    raise ConfigError(f"{where}: {value!r}, must be an integer from 1024 to 2^30")
                out[key] = value
            elif key == "headers":
                out[key] = _parse_headers(value)
            else:
                known = ", ".join(sorted(f.name for f in fields(cls)))
                raise ConfigError(f"{where}: unknown key (known: {known})")
        return cls(**out)


def _parse_headers(value: Any) -> HeaderNames:
    if not isinstance(value, Mapping):
        raise ConfigError(f"ext_proc.headers: {value!r}, must be a table")
    known = {f.name for f in fields(HeaderNames)}
    out: dict[str, str] = {}
    for key, name in value.items():
        where = f"ext_proc.headers.{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(known))})")
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ConfigError(f"{where}: {name!r}, must be a lowercase HTTP header name")
        out[key] = name
    return HeaderNames(**out)
