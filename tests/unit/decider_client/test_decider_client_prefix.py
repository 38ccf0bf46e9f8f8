"""decider_client's prompt signals match the shared prefix-hash vectors (docs/PREFIX_HASH.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from decider.core.prefix import MAX_BLOCKS
from decider_client import decide_request, prompt_signals

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[3] / "testdata" / "prefix_hash_vectors.json").read_text()
)


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["name"])
def test_signals_match_the_vectors(vector):
    max_blocks = vector.get("max_blocks", MAX_BLOCKS)
    signals = prompt_signals(vector["body"], max_blocks=max_blocks)
    assert signals.prefix_hashes == tuple(int(h) for h in vector["hashes"])
    assert signals.estimated_input_tokens == vector["estimated_tokens"]

    request = decide_request(vector["body"], max_blocks=max_blocks, session_id="u42")
    assert list(request.prefix_hashes) == [int(h) for h in vector["hashes"]]
    assert request.estimated_input_tokens == vector["estimated_tokens"]
    assert request.session_id == "u42"
    model = vector["body"].get("model")
    assert request.model == (model if isinstance(model, str) else "")


def test_shared_system_prompt_shares_leading_hashes():
    by_name = {v["name"]: v["body"] for v in VECTORS["vectors"]}
    a = prompt_signals(by_name["chat_system_and_user"]).prefix_hashes
    b = prompt_signals(by_name["chat_same_system_other_user"]).prefix_hashes
    assert a[:3] == b[:3] and a != b


def test_other_fields_pass_through_and_bad_ones_are_refused():
    request = decide_request(
        {"model": "m", "prompt": "x" * 200}, tenant="acme", required_capabilities=["vision"]
    )
    assert (request.tenant, list(request.required_capabilities)) == ("acme", ["vision"])
    assert len(request.prefix_hashes) == 3 and request.estimated_input_tokens == 50
    with pytest.raises(ValueError):
        decide_request({"model": "m"}, no_such_field=1)
