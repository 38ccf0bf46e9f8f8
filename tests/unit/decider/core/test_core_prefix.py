"""The shared prefix-hash definition against its vectors (docs/PREFIX_HASH.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from decider.core.prefix import BLOCK_BYTES, estimate_tokens, prefix_hashes, prompt_text

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[4] / "testdata" / "prefix_hash_vectors.json").read_text()
)


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["name"])
def test_vector(vector: dict[str, Any]) -> None:
    text = prompt_text(vector["body"])
    assert text == vector["text"]
    assert estimate_tokens(text) == vector["estimated_tokens"]
    max_blocks = vector.get("max_blocks", VECTORS["default_max_blocks"])
    assert [str(h) for h in prefix_hashes(text, max_blocks=max_blocks)] == vector["hashes"]


def test_chain_matches_the_written_definition() -> None:
    data = ("a" * BLOCK_BYTES + "b" * BLOCK_BYTES).encode()
    first = hashlib.sha256(bytes(8) + data[:64]).digest()[:8]
    second = hashlib.sha256(first + data[64:]).digest()[:8]
    assert prefix_hashes(data) == (int.from_bytes(first, "big"), int.from_bytes(second, "big"))


def test_shared_system_prompt_shares_leading_hashes() -> None:
    by_name = {v["name"]: v["hashes"] for v in VECTORS["vectors"]}
    a, b = by_name["chat_system_and_user"], by_name["chat_same_system_other_user"]
    assert a[:3] == b[:3] and a[3] != b[3]


def test_bytes_and_str_agree() -> None:
    text = "é" * 100
    assert prefix_hashes(text) == prefix_hashes(text.encode())
