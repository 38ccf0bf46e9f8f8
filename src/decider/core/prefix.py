"""How a prompt becomes prefix-cache block hashes: the one definition Decider's Envoy path, the
Go, Python and Zig clients and the simulator share (docs/PREFIX_HASH.md, vectors in
testdata/prefix_hash_vectors.json). Pure: parsed JSON in, integers out.

Two prompts that share their first k blocks of text share their first k hashes, so the prefix
index matches a shared system prompt however the rest of the request differs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Final

# 64 bytes of text is about 16 tokens: one KV-cache block of vLLM and SGLang.
BLOCK_BYTES: Final = 64
# 1024 blocks (64 KiB of prompt) is the engine's default cache.max_blocks_per_request.
MAX_BLOCKS: Final = 1024
# The usual estimate for English text under BPE tokenizers.
BYTES_PER_TOKEN: Final = 4

_TEXT_PART_TYPES: Final = frozenset({"text", "input_text", "output_text"})


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping)
            and part.get("type") in _TEXT_PART_TYPES
            and isinstance(part.get("text"), str)
        )
    return ""


def _messages_text(messages: Sequence[Any]) -> str:
    lines = []
    for message in messages:
        if isinstance(message, Mapping):
            role = message.get("role")
            role = role if isinstance(role, str) else ""
            lines.append(f"{role}: {_content_text(message.get('content'))}\n")
    return "".join(lines)


def _strings_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    return ""  # token-id arrays carry no text to hash


def prompt_text(body: Mapping[str, Any]) -> str:
    """The canonical prompt text of an OpenAI-compatible request body, by the field it carries:
    `messages` (chat completions), `instructions` + `input` (responses), `prompt` (completions),
    `input` (embeddings). Each message is `role + ": " + text + "\\n"`; text parts of an array
    content are joined; anything that is not text is left out."""
    messages = body.get("messages")
    if isinstance(messages, Sequence) and not isinstance(messages, str):
        return _messages_text(messages)
    if "prompt" in body:
        return _strings_text(body["prompt"])
    instructions = body.get("instructions")
    head = f"system: {instructions}\n" if isinstance(instructions, str) and instructions else ""
    value = body.get("input")
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and any(isinstance(v, Mapping) for v in value)
    ):
        return head + _messages_text(value)
    if head:
        return head + (f"user: {value}\n" if isinstance(value, str) else "")
    return _strings_text(value)


def prefix_hashes(text: str | bytes, *, max_blocks: int = MAX_BLOCKS) -> tuple[int, ...]:
    """Chained hashes of the full 64-byte blocks of the text's UTF-8 bytes, at most `max_blocks`:
    h[i] = first 8 bytes, big-endian, of SHA-256(h[i-1] as 8 bytes big-endian || block[i]), with
    h[-1] = 0. A last partial block is not hashed (servers cache full blocks only)."""
    data = text.encode() if isinstance(text, str) else text
    blocks = min(len(data) // BLOCK_BYTES, max_blocks)
    out = []
    prev = bytes(8)
    sha256 = hashlib.sha256
    for i in range(0, blocks * BLOCK_BYTES, BLOCK_BYTES):
        prev = sha256(prev + data[i : i + BLOCK_BYTES]).digest()[:8]
        out.append(int.from_bytes(prev, "big"))
    return tuple(out)


def estimate_tokens(text: str | bytes) -> int:
    """Input tokens estimated from the prompt's size: ceil(utf8 bytes / 4)."""
    size = len(text.encode()) if isinstance(text, str) else len(text)
    return -(-size // BYTES_PER_TOKEN)
