"""The Envoy ext_proc adapter's settings (`[ext_proc]`): which headers carry what the body
lacks, and how the answer names endpoints. Parsed and checked once, by the config loader."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from decider.config.listen import parse_listen
from decider.core.validation import Problems, allowed, position, schema, show
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
    # The listener of its own, HOST:PORT; empty (the default) serves no ext_proc at all.
    listen: str = ""
    headers: HeaderNames = field(default_factory=HeaderNames)
    # True: the chosen endpoint then its fallbacks, comma-separated (override_host walks them
    # on retries). False: the chosen endpoint alone (an ORIGINAL_DST cluster reads one ip:port).
    fallbacks: bool = True
    # Request bodies above this are answered 413; Envoy's own buffer limit applies before it.
    max_body_bytes: int = field(default=16 << 20, metadata=allowed(ge=1024, le=1 << 30))
    # Add x-decider-endpoint, x-decider-decision-id and x-decider-reason to responses.
    explain_headers: bool = True

    @classmethod
    def parse(cls, table: Mapping[str, Any]) -> ExtProcSettings:
        """The `[ext_proc]` table; raises ConfigError listing every problem, each naming the
        key, the value and what is allowed."""
        problems = Problems()
        values = schema(cls, exclude=("headers",)).validate(
            table, "ext_proc", problems, skip=("headers",)
        )
        headers = HeaderNames()
        raw = table.get("headers", {})
        order = (position(table, "headers"),)
        names = schema(HeaderNames).validate(raw, "ext_proc.headers", problems, order)
        if names is not None:
            for key, name in names.items():
                if not _HEADER_NAME.fullmatch(name):
                    where = f"ext_proc.headers.{key}"
                    problems.add(
                        (*order, position(raw, key)),
                        f"{where}: {show(name)}, must be a lowercase HTTP header name",
                    )
            headers = HeaderNames(**names)
        if values is not None and values["listen"]:
            try:
                parse_listen(values["listen"], name="ext_proc.listen")
            except ConfigError as exc:
                problems.add((position(table, "listen"),), str(exc))
        problems.raise_any()
        assert values is not None
        return cls(**values, headers=headers)
