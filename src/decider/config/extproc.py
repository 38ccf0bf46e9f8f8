"""The Envoy ext_proc adapter's settings (`[ext_proc]`): which headers carry what the body
lacks, and how the answer names endpoints. Parsed and checked once, by the config loader."""

from __future__ import annotations

from dataclasses import dataclass, field


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
