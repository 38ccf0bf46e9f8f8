"""OpenAI-compatible request bodies and headers -> RouteRequest. Pure: bytes and strings in,
a value or a RequestError out; the prompt is read for its hashes and size and never kept.

The four bodies (/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses) differ
only in where the prompt is; decider.core.prefix.prompt_text knows each shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from decider.api.extproc.settings import HeaderNames
from decider.codec.validate import MAX_CAPABILITIES, MAX_STRING_CHARS
from decider.core.model import RouteRequest
from decider.core.prefix import estimate_tokens, prefix_hashes, prompt_text


class RequestError(Exception):
    """A request Decider cannot route, answered with `status` and an OpenAI-style error. The
    message names the field, never the prompt."""

    def __init__(self, status: int, message: str, *, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    route: RouteRequest
    stream: bool


def _bad(message: str, code: str = "invalid_request") -> RequestError:
    return RequestError(400, message, code=code)


def _string(value: str, field: str) -> str:
    if len(value) > MAX_STRING_CHARS:
        raise _bad(f"{field}: {len(value)} characters, at most {MAX_STRING_CHARS}")
    return value


def parse_request(
    body: bytes,
    headers: Mapping[str, str],
    names: HeaderNames,
    *,
    exclude: frozenset[str] = frozenset(),
) -> ParsedRequest:
    """The RouteRequest for one HTTP request: `model`, `stream` and `user` from the JSON body
    (an empty body takes the model from the `names.model` header), the rest from headers;
    the session falls back to the body's `user`. Raises RequestError (400) when malformed."""
    parsed: dict[str, Any] = {}
    if body:
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _bad("the request body is not valid JSON", "invalid_json") from None
        if not isinstance(value, dict):
            raise _bad("the request body must be a JSON object", "invalid_json")
        parsed = value
    model = parsed.get("model", headers.get(names.model, ""))
    if not isinstance(model, str) or not model:
        raise _bad("model: required, a non-empty string", "missing_model")
    stream = parsed.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream: must be true or false")
    user = parsed.get("user", "")
    if not isinstance(user, str):
        raise _bad("user: must be a string")
    capabilities = frozenset(
        c.strip() for c in headers.get(names.capabilities, "").split(",") if c.strip()
    )
    if len(capabilities) > MAX_CAPABILITIES:
        raise _bad(f"{names.capabilities}: {len(capabilities)} entries, at most {MAX_CAPABILITIES}")
    for capability in capabilities:
        _string(capability, names.capabilities)
    text = prompt_text(parsed).encode() if parsed else b""
    route = RouteRequest(
        model=_string(model, "model"),
        request_id=_string(headers.get(names.request_id, ""), names.request_id),
        session_id=_string(headers.get(names.session, "") or user, names.session),
        tenant=_string(headers.get(names.tenant, ""), names.tenant),
        required_capabilities=capabilities,
        estimated_input_tokens=estimate_tokens(text),
        prefix_hashes=prefix_hashes(text),
        exclude_endpoint_ids=exclude,
        strategy=_string(headers.get(names.strategy, ""), names.strategy),
    )
    return ParsedRequest(route, stream)
