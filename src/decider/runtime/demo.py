"""`decider serve --demo` (behind `make run`): the example config plus local stand-in model servers.

Each stand-in is a tiny OpenAI-compatible HTTP server on 127.0.0.1 answering GET /health,
GET /v1/models, GET /metrics (vLLM-style names) and POST /v1/chat/completions, so the prober
sees healthy backends and a newcomer can call Decide, then the endpoint it names, at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from importlib import resources
from typing import Any

from decider import config
from decider.config import Settings
from decider.core.model import Endpoint
from decider.obs.telemetry import Tracing
from decider.runtime.server import serve
from decider.runtime.standin import read_body

log = logging.getLogger("decider.demo")

MAX_BODY_BYTES = 1 << 20


def load_settings(
    path: str | None, *, env: Mapping[str, str], flags: Mapping[str, Any]
) -> Settings:
    """The embedded demo config, or `path` when given; env and flags override as usual."""
    if path:
        return config.load(path, env=env, flags=flags)
    with resources.as_file(resources.files("decider") / "defaults" / "demo.toml") as demo_path:
        return config.load(demo_path, env=env, flags=flags)


class StandIn:
    """One stand-in model server for one endpoint."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.requests = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host, _, port = self.endpoint.address.rpartition(":")
        self._server = await asyncio.start_server(self._handle, host, int(port))

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
            # Chunked too: Envoy streams bodies chunked in ext_proc duplex mode (make run-envoy).
            body = await asyncio.wait_for(read_body(reader, headers, max_bytes=MAX_BODY_BYTES), 10)
            status, content_type, payload = self._respond(method, target.split("?")[0], body)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    def _respond(self, method: str, path: str, body: bytes) -> tuple[str, str, bytes]:
        ep = self.endpoint
        if method == "GET" and path == "/health":
            return "200 OK", "application/json", b'{"status":"ok"}'
        if method == "GET" and path == "/v1/models":
            models = {"object": "list", "data": [{"id": ep.model, "object": "model"}]}
            return "200 OK", "application/json", json.dumps(models).encode()
        if method == "GET" and path == "/metrics":
            text = (
                f'vllm:num_requests_waiting{{model_name="{ep.model}"}} 0\n'
                f'vllm:num_requests_running{{model_name="{ep.model}"}} 0\n'
                f'vllm:kv_cache_usage_perc{{model_name="{ep.model}"}} 0.1\n'
            )
            return "200 OK", "text/plain; version=0.0.4", text.encode()
        if method == "POST" and path == "/v1/chat/completions":
            self.requests += 1
            try:
                request = json.loads(body or b"{}")
                messages = request.get("messages") or [{}]
                prompt = str(messages[-1].get("content", ""))
            except (ValueError, AttributeError, TypeError):
                return "400 Bad Request", "application/json", b'{"error":"invalid JSON body"}'
            answer = f"Hello from {ep.id} ({ep.model} stand-in). You said: {prompt[:200]}"
            completion = {
                "id": f"chatcmpl-{ep.id}-{self.requests}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": ep.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": len(prompt.split()),
                    "completion_tokens": len(answer.split()),
                    "total_tokens": len(prompt.split()) + len(answer.split()),
                },
            }
            return "200 OK", "application/json", json.dumps(completion).encode()
        return "404 Not Found", "application/json", b'{"error":"not found"}'


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
    stand_ins = await start_stand_ins(settings.endpoints)
    try:
        await serve(settings, on_ready=lambda server: _print_hint(server.port), tracing=tracing)
    finally:
        for stand_in in stand_ins:
            await stand_in.close()


def _print_hint(port: int) -> None:
    print(
        "\nDecider demo is serving. Try, in another shell:\n"
        f'  grpcurl -plaintext -d \'{{"model": "llama-3.1-8b"}}\' '
        f"127.0.0.1:{port} decider.v1.DeciderService/Decide\n"
        f"  grpcurl -plaintext 127.0.0.1:{port} decider.v1.RegistryService/ListEndpoints\n"
        "Stop with Ctrl-C.\n",
        flush=True,
    )
