"""OpenAI bodies and headers -> RouteRequest (decider.api.extproc.openai)."""

from __future__ import annotations

import json

import pytest

from decider.api.extproc.openai import RequestError, parse_request
from decider.config.extproc import HeaderNames
from decider.core.prefix import estimate_tokens, prefix_hashes, prompt_text

NAMES = HeaderNames()
SYSTEM = "You are a careful assistant. " * 8


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [{"role": "system", "content": SYSTEM}]},
        {"model": "m", "prompt": SYSTEM},
        {"model": "m", "input": [SYSTEM, "second"]},
        {"model": "m", "instructions": SYSTEM, "input": "hello"},
    ],
    ids=["chat", "completions", "embeddings", "responses"],
)
def test_each_api_body_hashes_its_prompt_with_the_shared_definition(body):
    parsed = parse_request(json.dumps(body).encode(), {}, NAMES)
    text = prompt_text(body)
    assert parsed.route.model == "m"
    assert parsed.route.prefix_hashes == prefix_hashes(text) != ()
    assert parsed.route.estimated_input_tokens == estimate_tokens(text)


def test_headers_fill_in_what_the_body_lacks():
    headers = {
        "x-session-id": "s-1",
        "x-tenant-id": "acme",
        "x-decider-capabilities": "tools, vision,",
        "x-decider-strategy": "least_request",
        "x-request-id": "req-9",
    }
    parsed = parse_request(b'{"model": "m", "stream": true}', headers, NAMES)
    route = parsed.route
    assert parsed.stream is True
    assert (route.session_id, route.tenant, route.strategy, route.request_id) == (
        "s-1",
        "acme",
        "least_request",
        "req-9",
    )
    assert route.required_capabilities == {"tools", "vision"}


def test_the_user_field_is_the_session_when_no_header_names_one():
    assert parse_request(b'{"model": "m", "user": "u-7"}', {}, NAMES).route.session_id == "u-7"
    with_header = parse_request(b'{"model": "m", "user": "u-7"}', {"x-session-id": "s"}, NAMES)
    assert with_header.route.session_id == "s"


def test_configured_header_names_are_the_ones_read():
    names = HeaderNames(tenant="x-org", model="x-model")
    route = parse_request(b"", {"x-org": "o", "x-tenant-id": "ignored", "x-model": "m"}, names)
    assert (route.route.model, route.route.tenant) == ("m", "o")


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b"{not json", "invalid_json", "not valid JSON"),
        (b"[1, 2]", "invalid_json", "must be a JSON object"),
        (b'{"messages": []}', "missing_model", "model: required"),
        (b'{"model": 7}', "missing_model", "model: required"),
        (b'{"model": "m", "stream": 1}', "invalid_request", "stream: must be true or false"),
        (b'{"model": "m", "user": {}}', "invalid_request", "user: must be a string"),
        (b'{"model": "' + b"m" * 600 + b'"}', "invalid_request", "model: 600 characters"),
    ],
)
def test_malformed_requests_are_400_naming_the_field_not_the_prompt(body, code, message):
    with pytest.raises(RequestError) as caught:
        parse_request(body, {}, NAMES)
    assert caught.value.status == 400
    assert caught.value.code == code
    assert message in str(caught.value)


def test_a_prompt_never_appears_in_an_error():
    secret = "my secret prompt text"
    body = json.dumps({"messages": [{"role": "user", "content": secret}]}).encode()
    with pytest.raises(RequestError) as caught:
        parse_request(body, {}, NAMES)
    assert secret not in str(caught.value)
