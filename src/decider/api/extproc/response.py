"""What an upstream response says about its endpoint: HTTP status -> Result, latency, time to
first token of an SSE stream, and usage tokens from a JSON body or the final SSE usage event.
Pure: it reads the bytes Envoy shows it and keeps only what it needs (a JSON body up to a cap,
the last incomplete SSE line)."""

from __future__ import annotations

import json
from typing import Any, Final

from decider.core.model import Result

# A JSON answer larger than this is not parsed for usage (embeddings of long inputs can be).
MAX_JSON_BYTES: Final = 1 << 20
_DATA: Final = b"data:"


def result_for_status(status: int) -> Result:
    """5xx an error (504, the gateway's upstream timeout, a timeout), 429 rate limited, anything
    else a success: a 4xx is the caller's mistake, not the endpoint's."""
    if status == 429:
        return Result.RATE_LIMITED
    if status == 504:
        return Result.TIMEOUT
    if status >= 500 or status < 100:
        return Result.ERROR
    return Result.SUCCESS


def _usage(event: Any) -> tuple[int, int] | None:
    """(input, output) tokens from an OpenAI `usage` object, at the top level (chat, completions,
    embeddings) or under `response` (the Responses API's final event)."""
    if not isinstance(event, dict):
        return None
    usage = event.get("usage")
    if not isinstance(usage, dict):
        inner = event.get("response")
        usage = inner.get("usage") if isinstance(inner, dict) else None
        if not isinstance(usage, dict):
            return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return max(prompt, 0), max(completion, 0)


class ResponseMeter:
    """Follows one response from its headers to its last byte."""

    __slots__ = (
        "_json",
        "_line",
        "_sse",
        "_started",
        "ended_at",
        "first_byte_at",
        "input_tokens",
        "output_tokens",
        "status",
    )

    def __init__(self, *, started: float) -> None:
        self._started = started
        self.status = 0
        self._sse = False
        self._json: bytearray | None = None
        self._line = b""
        self.first_byte_at = 0.0
        self.ended_at = 0.0
        self.input_tokens = 0
        self.output_tokens = 0

    def headers(self, status: int, content_type: str, *, end: bool, now: float) -> None:
        self.status = status
        kind = content_type.split(";", 1)[0].strip().lower()
        self._sse = kind == "text/event-stream"
        if kind == "application/json" or kind.endswith("+json"):
            self._json = bytearray()
        if end:
            self.ended_at = now

    def body(self, chunk: bytes, *, end: bool, now: float) -> None:
        if chunk and not self.first_byte_at:
            self.first_byte_at = now
        if self._sse:
            self._sse_lines(chunk)
        elif self._json is not None:
            if len(self._json) + len(chunk) > MAX_JSON_BYTES:
                self._json = None
            else:
                self._json += chunk
        if end:
            self.ended_at = now
            if self._json:
                self._take_usage(self._json)
            self._json = None

    def _sse_lines(self, chunk: bytes) -> None:
        data = self._line + chunk
        lines = data.split(b"\n")
        # The last piece is an incomplete line (or empty after a newline): keep it for later.
        self._line = lines.pop()[-MAX_JSON_BYTES:]
        for line in lines:
            if line.startswith(_DATA) and b'"usage"' in line:
                self._take_usage(line[len(_DATA) :])

    def _take_usage(self, payload: bytes | bytearray) -> None:
        try:
            usage = _usage(json.loads(payload))
        except (ValueError, UnicodeDecodeError):
            return
        if usage is not None:
            self.input_tokens, self.output_tokens = usage

    @property
    def ended(self) -> bool:
        return self.ended_at > 0.0

    @property
    def result(self) -> Result:
        return result_for_status(self.status)

    @property
    def latency_s(self) -> float:
        return max(self.ended_at - self._started, 0.0) if self.ended_at else 0.0

    @property
    def ttft_s(self) -> float:
        """For SSE streams only: a JSON answer's first byte is its last token."""
        if not (self._sse and self.first_byte_at):
            return 0.0
        return max(self.first_byte_at - self._started, 0.0)
