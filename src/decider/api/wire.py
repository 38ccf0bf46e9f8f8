"""The Decide answer written straight to protobuf wire bytes.

Building a DecideResponse message and serializing it was a quarter of the Python work of a
unary Decide: every field set through upb allocates, the cached endpoint bytes had to be parsed
back in, and the result serialized again. Here each answer is the concatenation of

- bytes cached per value that repeats: each endpoint as field `endpoint` and as `fallbacks`,
  the retry policy, each strategy name, each score and skip-count map key; and
- the few fields that change per decision (id, reason, scores, counts), encoded in place.

The encoding is the protobuf wire format (https://protobuf.dev/programming-guides/encoding/):
fields in field-number order, defaults left out, as upb writes them. Explain-mode candidates, a
rare and large answer, still go through upb. tests/unit/decider/test_api_wire.py parses the
bytes back and compares with convert.decision_to_proto for every field of DecideResponse, and
fails when the message gains a field this module does not write.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import TypeVar

from decider.codec import convert
from decider.core.model import Decision, Endpoint, RetryAdvice
from decider.v1 import decider_service_pb2 as dpb

# Field tags of DecideResponse: (field number << 3) | wire type (0 varint, 1 fixed64, 2 bytes).
_DECISION_ID = b"\x0a"  # 1, string
_REASON = b"\x22"  # 4, string
_STRATEGY = b"\x2a"  # 5, string
_SCORES = 0x32  # 6, map<string, double> entry
_AFFINITY_HIT_TRUE = b"\x40\x01"  # 8, bool
_CANDIDATE_COUNT = b"\x48"  # 9, uint32
_SKIPPED = 0x52  # 10, map<string, uint32> entry
# Map entries are messages of key = 1 (string) and value = 2.
_ENTRY_KEY = 0x0A
_DOUBLE_VALUE = 0x11  # 2, fixed64
_VARINT_VALUE = b"\x10"  # 2, varint
# DecideStreamResponse: correlation_id = 1 (uint64), decide = 2 (DecideResponse).
_CORRELATION_ID = b"\x08"
_STREAM_DECIDE = b"\x12"

WRITTEN_FIELDS = frozenset(
    {
        "decision_id",
        "endpoint",
        "fallbacks",
        "reason",
        "strategy",
        "scores",
        "retry",
        "affinity_hit",
        "candidate_count",
        "skipped",
        "candidates",
    }
)

_K = TypeVar("_K")
_V = TypeVar("_V")

_ONE_BYTE = tuple(bytes((i,)) for i in range(128))
_pack_double: Callable[[float], bytes] = struct.Struct("<d").pack


def varint(value: int) -> bytes:
    """Base-128 varint of a non-negative integer."""
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(tag: bytes, data: bytes) -> bytes:
    return tag + varint(len(data)) + data


def _entry_prefix(tag: int, key: str, value_size: int) -> bytes:
    """A map entry up to its value: tag, entry length, the key field and the value's tag."""
    k = key.encode()
    body_size = 1 + len(varint(len(k))) + len(k) + value_size
    return bytes((tag,)) + varint(body_size) + bytes((_ENTRY_KEY,)) + varint(len(k)) + k


class DecisionEncoder:
    """Decision -> DecideResponse wire bytes, for Decide and DecideStream.

    Endpoints are immutable values that a registry snapshot replaces whole, so an endpoint's
    bytes are reused while the decision names the very same Endpoint object and rebuilt when it
    does not. Every cache is cleared when it reaches `max_entries`, so ids of deregistered
    endpoints and one-off map keys cannot make it grow without bound.
    """

    def __init__(self, *, max_entries: int = 10_000) -> None:
        self._max_entries = max_entries
        # endpoint id -> (the Endpoint encoded, its bytes as field `endpoint`, as `fallbacks`)
        self._endpoints: dict[str, tuple[Endpoint, bytes, bytes]] = {}
        self._retries: dict[RetryAdvice, bytes] = {}
        self._last_retry: tuple[RetryAdvice | None, bytes] = (None, b"")
        self._strategies: dict[str, bytes] = {}
        self._score_keys: dict[str, bytes] = {}
        self._skip_keys: dict[str, bytes] = {}

    def encode(self, d: Decision) -> bytes:
        """The DecideResponse for `d`, serialized."""
        parts: list[bytes] = []
        append = parts.append
        if d.decision_id:
            data = d.decision_id.encode()
            append(_DECISION_ID + varint(len(data)))
            append(data)
        endpoints = self._endpoints
        e = d.endpoint
        hit = endpoints.get(e.id)
        append((hit if hit is not None and hit[0] is e else self._encode_endpoint(e))[1])
        for e in d.fallbacks:
            hit = endpoints.get(e.id)
            append((hit if hit is not None and hit[0] is e else self._encode_endpoint(e))[2])
        if d.reason:
            data = d.reason.encode()
            append(_REASON + varint(len(data)))
            append(data)
        if d.strategy:
            encoded = self._strategies.get(d.strategy)
            append(encoded if encoded is not None else self._encode_strategy(d.strategy))
        if d.scores:
            self._scores(d.scores, parts)
        last_retry = self._last_retry
        # The engine answers with one RetryAdvice object: compare identity before hashing the
        # dataclass (which runs Python code).
        append(last_retry[1] if last_retry[0] is d.retry else self._retry(d.retry))
        if d.affinity_hit:
            parts.append(_AFFINITY_HIT_TRUE)
        if d.candidate_count:
            parts.append(_CANDIDATE_COUNT + varint(d.candidate_count))
        if d.skipped:
            self._skipped(d.skipped, parts)
        if d.candidates:
            explained = dpb.DecideResponse(
                candidates=[convert.candidate_to_proto(c) for c in d.candidates]
            )
            parts.append(explained.SerializeToString())
        return b"".join(parts)

    def encode_stream(self, correlation_id: int, d: Decision) -> bytes:
        """A DecideStreamResponse carrying the DecideResponse for `d`, serialized."""
        decide = _length_delimited(_STREAM_DECIDE, self.encode(d))
        if correlation_id:
            return _CORRELATION_ID + varint(correlation_id) + decide
        return decide

    def _scores(self, scores: Mapping[str, float], parts: list[bytes]) -> None:
        keys = self._score_keys
        for key, value in scores.items():
            prefix = keys.get(key)
            if prefix is None:
                prefix = self._remember(
                    keys, key, _entry_prefix(_SCORES, key, 9) + bytes((_DOUBLE_VALUE,))
                )
            parts.append(prefix)
            parts.append(_pack_double(value))

    def _skipped(self, skipped: Mapping[str, int], parts: list[bytes]) -> None:
        keys = self._skip_keys
        for key, count in skipped.items():
            value = _VARINT_VALUE + varint(count)
            # The entry length includes the value, so the prefix is cached per value size too.
            prefix = keys.get(key) if len(value) == 2 else None
            if prefix is None:
                prefix = _entry_prefix(_SKIPPED, key, len(value))
                if len(value) == 2:
                    self._remember(keys, key, prefix)
            parts.append(prefix + value)

    def _encode_strategy(self, name: str) -> bytes:
        return self._remember(self._strategies, name, _length_delimited(_STRATEGY, name.encode()))

    def _encode_endpoint(self, e: Endpoint) -> tuple[Endpoint, bytes, bytes]:
        """Encodes an endpoint not seen before (or replaced by a new value) and caches it."""
        proto = convert.endpoint_to_proto(e)
        encoded = (
            e,
            dpb.DecideResponse(endpoint=proto).SerializeToString(),
            dpb.DecideResponse(fallbacks=[proto]).SerializeToString(),
        )
        return self._remember(self._endpoints, e.id, encoded)

    def _retry(self, retry: RetryAdvice) -> bytes:
        encoded = self._retries.get(retry)
        if encoded is None:
            proto = dpb.DecideResponse(retry=convert.retry_to_proto(retry))
            encoded = self._remember(self._retries, retry, proto.SerializeToString())
        self._last_retry = (retry, encoded)
        return encoded

    def _remember(self, cache: dict[_K, _V], key: _K, value: _V) -> _V:
        if len(cache) >= self._max_entries:
            cache.clear()
        cache[key] = value
        return value
