"""`decider serve --demo` (behind `make run`): the example config plus local stand-in model servers.

Each stand-in is a tiny OpenAI-compatible HTTP server on 127.0.0.1 answering GET /health,
GET /v1/models, GET /metrics (vLLM-style names) and POST /v1/chat/completions (streamed as
Server-Sent Events when asked), so the prober sees healthy backends and a newcomer can call
Decide, then the endpoint it names, at once. One more stand-in, SPARE, runs unregistered, for
the README's RegisterEndpoint example.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from decider import config
from decider.config import Settings
from decider.core.model import Endpoint
from decider.obs.telemetry import Tracing
from decider.runtime.server import serve

log = logging.getLogger("decider.demo")

MAX_BODY_BYTES = 1 << 20
# Served by the demo but not in its config: register it at run time (README.md).
SPARE = Endpoint(
    id="llama-d",
    address="127.0.0.1:18104",
    model="llama-3.1-8b",
    health_url="http://127.0.0.1:18104/health",
)


def load_settings(
    path: str | None, *, env: Mapping[str, str], flags: Mapping[str, Any]
) -> Settings:
    """The embedded demo config, or `path` when given; env and flags override as usual."""
    if path:
        return config.load(path, env=env, flags=flags)
    with resources.as_file(resources.files("decider") / "defaults" / "demo.toml") as demo_path:
        return config.load(demo_path, env=env, flags=flags)


class StandIn:
    """One stand-in model server for one endpoint.

    Answers as a model server would, only slower than a real one is fast: the first token after
    `first_token_s`, then one word every `per_token_s`, so requests stay in flight long enough
    to see on /metrics and in ListEndpoints. `"stream": true` gets Server-Sent Events, one
    chunk per word, a final chunk carrying the usage, then `data: [DONE]` (OpenAI's format).
    Request bodies may come with Content-Length or chunked.
    """

    def __init__(
        self, endpoint: Endpoint, *, first_token_s: float = 0.2, per_token_s: float = 0.04
    ) -> None:
        self.endpoint = endpoint
        self.first_token_s = first_token_s
        self.per_token_s = per_token_s
        self.requests = 0
        # Completions being answered now, served as vllm:num_requests_running.
        self.running = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host, _, port = self.endpoint.address.rpartition(":")
        self._server = await asyncio.start_server(self._handle, host, int(port))
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = [*lines[0].split(" "), "", ""][:3]
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            body = await asyncio.wait_for(_read_body(reader, headers), 10)
            path = target.split("?")[0]
            if method == "POST" and path == "/v1/chat/completions":
                await self._complete(body, writer)
            else:
                status, content_type, payload = self._respond(method, path)
                _write_whole(writer, status, content_type, payload)
            await writer.drain()
        except _BodyTooLarge:
            _write_whole(
                writer, "413 Payload Too Large", "application/json", b'{"error":"body too large"}'
            )
            with contextlib.suppress(OSError):
                await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    def _respond(self, method: str, path: str) -> tuple[str, str, bytes]:
        ep = self.endpoint
        if method == "GET" and path == "/health":
            return "200 OK", "application/json", b'{"status":"ok"}'
        if method == "GET" and path == "/v1/models":
            models = {"object": "list", "data": [{"id": ep.model, "object": "model"}]}
            return "200 OK", "application/json", json.dumps(models).encode()
        if method == "GET" and path == "/metrics":
            text = (
                f'vllm:num_requests_waiting{{model_name="{ep.model}"}} 0\n'
                f'vllm:num_requests_running{{model_name="{ep.model}"}} {self.running}\n'
                f'vllm:kv_cache_usage_perc{{model_name="{ep.model}"}} 0.1\n'
            )
            return "200 OK", "text/plain; version=0.0.4", text.encode()
        return "404 Not Found", "application/json", b'{"error":"not found"}'

    async def _complete(self, body: bytes, writer: asyncio.StreamWriter) -> None:
        ep = self.endpoint
        try:
            request = json.loads(body or b"{}")
            messages = request.get("messages") or [{}]
            prompt = str(messages[-1].get("content", ""))
            stream = request.get("stream") is True
        except (ValueError, AttributeError, TypeError):
            _write_whole(
                writer, "400 Bad Request", "application/json", b'{"error":"invalid JSON body"}'
            )
            return
        self.requests += 1
        self.running += 1
        try:
            words = f"Hello from {ep.id} ({ep.model} stand-in). You said: {prompt[:200]}".split()
            usage = {
                "prompt_tokens": len(prompt.split()),
                "completion_tokens": len(words),
                "total_tokens": len(prompt.split()) + len(words),
            }
            base = {"id": f"chatcmpl-{ep.id}-{self.requests}", "created": int(time.time())}
            base["model"] = ep.model
            await asyncio.sleep(self.first_token_s)
            if not stream:
                await asyncio.sleep(self.per_token_s * (len(words) - 1))
                completion = {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": " ".join(words)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
                _write_whole(writer, "200 OK", "application/json", json.dumps(completion).encode())
                return
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: close\r\n\r\n"
            )
            chunk = {**base, "object": "chat.completion.chunk"}
            for i, word in enumerate(words):
                if i:
                    await asyncio.sleep(self.per_token_s)
                delta = (
                    {"role": "assistant", "content": word} if i == 0 else {"content": " " + word}
                )
                choice = {"index": 0, "delta": delta, "finish_reason": None}
                await _send_event(writer, {**chunk, "choices": [choice]})
            stop = {"index": 0, "delta": {}, "finish_reason": "stop"}
            await _send_event(writer, {**chunk, "choices": [stop]})
            # The usage chunk OpenAI sends last with stream_options.include_usage.
            await _send_event(writer, {**chunk, "choices": [], "usage": usage})
            writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        finally:
            self.running -= 1


class _BodyTooLarge(Exception):
    pass


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
    """The request body, sent with Content-Length or chunked (RFC 9112 section 7.1)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailer fields, if any, end with an empty line.
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY_BYTES:
                raise _BodyTooLarge
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0") or 0)
    if length > MAX_BODY_BYTES:
        raise _BodyTooLarge
    return await reader.readexactly(length) if length else b""


def _write_whole(
    writer: asyncio.StreamWriter, status: str, content_type: str, payload: bytes
) -> None:
    writer.write(
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
        + payload
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _send_event(writer: asyncio.StreamWriter, event: Mapping[str, Any]) -> None:
    writer.write(_chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
    await writer.drain()


async def start_stand_ins(endpoints: tuple[Endpoint, ...]) -> list[StandIn]:
    """A stand-in for each endpoint on 127.0.0.1; a port already taken is skipped with a warning."""
    started: list[StandIn] = []
    for endpoint in endpoints:
        if not endpoint.address.startswith("127.0.0.1:"):
            continue
        stand_in = StandIn(endpoint)
        try:
            await stand_in.start()
        except OSError as exc:
            log.warning("stand-in for %s not started: %s", endpoint.id, exc)
            continue
        started.append(stand_in)
        log.info("stand-in %s (%s) on http://%s", endpoint.id, endpoint.model, endpoint.address)
    return started


async def run(settings: Settings, *, tracing: Tracing | None = None) -> None:
    spare = () if any(e.id == SPARE.id for e in settings.endpoints) else (SPARE,)
    stand_ins = await start_stand_ins((*settings.endpoints, *spare))
    try:
        await serve(settings, on_ready=lambda server: _print_hint(server.port), tracing=tracing)
    finally:
        for stand_in in stand_ins:
            await stand_in.close()


def _print_hint(port: int) -> None:
    print(hint(port, path=os.environ.get("PATH", "")), flush=True)


def hint(port: int, *, path: str) -> str:
    """What to try next; says how to get grpcurl on PATH when `path` has none."""
    lines = [
        "",
        "Decider demo is serving. Try, in another shell:",
        f'  grpcurl -plaintext -d \'{{"model": "llama-3.1-8b"}}\' '
        f"127.0.0.1:{port} decider.v1.DeciderService/Decide",
        f"  grpcurl -plaintext 127.0.0.1:{port} decider.v1.RegistryService/ListEndpoints",
    ]
    if shutil.which("grpcurl", path=path) is None:
        # The checkout's venv holds this interpreter; make tools puts grpcurl beside it.
        checkout = Path(sys.prefix).parent
        tools = checkout / ".tools" / "bin"
        where = f"{tools} (`make tools` installs it there)"
        if (tools / "grpcurl").exists():
            where = str(tools)
        lines += [
            f"grpcurl is not on your PATH; it lives in {where}. In the checkout, put it and",
            f'the decider command on PATH with:  eval "$(make -s -C {checkout} env)"',
            "or open a shell with both:  make shell",
        ]
    lines += ["Stop with Ctrl-C.", ""]
    return "\n".join(lines)
