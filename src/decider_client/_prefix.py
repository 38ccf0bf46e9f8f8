"""Prefix hashes and the input-token estimate of an OpenAI-compatible body, by the shared
definition (docs/PREFIX_HASH.md, decider.core.prefix), ready for a DecideRequest."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from decider.core.prefix import MAX_BLOCKS, estimate_tokens, prefix_hashes, prompt_text
from decider.v1 import decider_service_pb2 as dpb

# DecideRequest.estimated_input_tokens is a uint32.
_UINT32_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptSignals:
    """What a gateway sends Decider about a prompt: its block hashes and estimated tokens."""

    prefix_hashes: tuple[int, ...]
    estimated_input_tokens: int


def prompt_signals(body: Mapping[str, Any], *, max_blocks: int = MAX_BLOCKS) -> PromptSignals:
    """The prefix hashes (at most `max_blocks`) and token estimate of a parsed request body
    (chat completions, completions, responses or embeddings)."""
    text = prompt_text(body)
    return PromptSignals(
        prefix_hashes=prefix_hashes(text, max_blocks=max_blocks),
        estimated_input_tokens=min(estimate_tokens(text), _UINT32_MAX),
    )


def decide_request(
    body: Mapping[str, Any], *, max_blocks: int = MAX_BLOCKS, **fields: Any
) -> dpb.DecideRequest:
    """A DecideRequest for a parsed request body: its `model`, prefix hashes and token
    estimate, plus any other DecideRequest fields given (session_id, tenant, ...)."""
    signals = prompt_signals(body, max_blocks=max_blocks)
    model = body.get("model")
    request = dpb.DecideRequest(
        model=model if isinstance(model, str) else "",
        estimated_input_tokens=signals.estimated_input_tokens,
        prefix_hashes=signals.prefix_hashes,
    )
    if fields:
        request.MergeFrom(dpb.DecideRequest(**fields))
    return request
