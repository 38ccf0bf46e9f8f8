"""The stand-in model servers (the demo's, and the tests' behind Envoy), through real HTTP on
127.0.0.1: streamed answers as Server-Sent Events with a final usage chunk, chunked request
bodies, a size limit, and requests that stay in flight long enough to be seen on /metrics."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from pathlib import Path

import httpx
import pytest

from decider.runtime import demo
from decider.runtime.standin import StandIn

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def stand_in():
    server = StandIn(
        "llama-x",
        model="llama-3.1-8b",
        first_token_s=0.05,
        per_token_s=0.01,
        max_body_bytes=1 << 20,
    )
    await server.start()
    yield server
    await server.close()


def url(server: StandIn, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def test_stream_true_is_answered_as_server_sent_events_ending_with_usage(stand_in):
    body = {
        "model": "llama-3.1-8b",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    events = []
    async with (
        httpx.AsyncClient(trust_env=False) as client,
        client.stream("POST", url(stand_in, "/v1/chat/completions"), json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.startswith("Hello from llama-x") and text.endswith("You said: hi")
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["completion_tokens"] == len(text.split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_a_chunked_request_body_is_read(stand_in):
    message = json.dumps({"messages": [{"role": "user", "content": "sent in pieces"}]}).encode()

    async def pieces():
        for i in range(0, len(message), 7):
            yield message[i : i + 7]

    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.post(url(stand_in, "/v1/chat/completions"), content=pieces())
    assert response.status_code == 200
    answer = response.json()
    assert answer["choices"][0]["message"]["content"].endswith("You said: sent in pieces")
    assert answer["usage"]["prompt_tokens"] == len(message) // 4
    assert response.headers["x-request-body-sha256"] == hashlib.sha256(message).hexdigest()


async def test_a_body_over_the_limit_is_refused_with_413(stand_in):
    async def big():
        for _ in range(stand_in.max_body_bytes // 65536 + 2):
            yield b"x" * 65536

    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.post(url(stand_in, "/v1/chat/completions"), content=big())
    assert response.status_code == 413
    assert response.json() == {"error": "body too large"}


async def test_requests_in_flight_show_on_metrics(stand_in):
    stand_in.first_token_s = 0.5
    running = 'vllm:num_requests_running{model_name="llama-3.1-8b"}'
    async with httpx.AsyncClient(trust_env=False) as client:
        calls = [
            asyncio.create_task(client.post(url(stand_in, "/v1/chat/completions"), json={}))
            for _ in range(2)
        ]
        for _ in range(100):
            metrics = (await client.get(url(stand_in, "/metrics"))).text
            if f"{running} 2" in metrics:
                break
            await asyncio.sleep(0.01)
        assert f"{running} 2" in metrics
        assert all(r.status_code == 200 for r in await asyncio.gather(*calls))
        assert f"{running} 0" in (await client.get(url(stand_in, "/metrics"))).text


def test_the_hint_says_how_to_get_grpcurl_on_path(tmp_path):
    without = demo.hint(50051, path=str(tmp_path))
    assert "grpcurl is not on your PATH" in without
    assert 'eval "$(make -s -C ' in without and "make shell" in without
    fake = tmp_path / "grpcurl"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert "not on your PATH" not in demo.hint(50051, path=str(tmp_path))


def test_make_run_needs_python_alone():
    # Every step `make run` would take from a fresh clone (-B: as if nothing were built).
    plan = subprocess.run(
        ["make", "-n", "-B", "run"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "decider serve --demo" in plan
    assert "go install" not in plan and "npm " not in plan, plan


def test_make_env_puts_the_venv_and_tools_on_path():
    line = subprocess.run(
        ["make", "-s", "env"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert line.startswith('export PATH="')
    assert f"{ROOT}/.venv/bin:" in line and f"{ROOT}/.tools/bin:" in line
