"""A stand-in OpenAI-compatible model server: the demo's backends (`make run`, `make run-envoy`),
and the model servers of tests and benchmarks behind a proxy.

HTTP/1.1 with keep-alive, request bodies by Content-Length or chunked (Envoy streams bodies
chunked in ext_proc duplex mode), TCP_NODELAY. Serves GET /health, GET /v1/models, GET /metrics
(vLLM's names, with the requests in flight) and POST /v1/... completions: JSON with `usage`, or
with `"stream": true` Server-Sent Events ending in a usage chunk and `data: [DONE]` (OpenAI's
format). Every answer names the server (`x-served-by`) and the SHA-256 of the request body it
read (`x-request-body-sha256`), so a test can prove what arrived. `first_token_s` and
`per_token_s` pace answers like a model (the demo sets them so load shows); both are 0 for tests
and benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import time
from collections.abc import Mapping
from typing import Any, Final

MAX_BODY_BYTES: Final = 64 << 20
# Once a request's head has arrived, its body must follow within this; an idle keep-alive
# connection between requests may wait as long as the client likes.
BODY_TIMEOUT_S: Final = 10.0
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class BadRequest(ValueError):
    pass


class BodyTooLarge(BadRequest):
    pass


async def read_body(
    reader: asyncio.StreamReader, headers: Mapping[str, str], *, max_bytes: int = MAX_BODY_BYTES
) -> bytes:
    """An HTTP/1.1 request body, by Content-Length or chunked; BodyTooLarge above `max_bytes`."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailers, if any, end with an empty line.
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return bytes(body)
            if len(body) + size > max_bytes:
                raise BodyTooLarge(f"body over {max_bytes} bytes")
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0") or 0)
    if length > max_bytes:
        raise BodyTooLarge(f"body over {max_bytes} bytes")
    return await reader.readexactly(length) if length else b""


class StandIn:
    """One model server named `name` serving `model` on `host:port` (port 0 picks one).

    `fail_status` makes every model call answer that status (500 to trip a breaker, 429 to say
    "not now"); `requests` counts model calls and `running` those being answered now.
    """

    def __init__(
        self,
        name: str,
        *,
        model: str = "demo-model",
        host: str = "127.0.0.1",
        first_token_s: float = 0.0,
        per_token_s: float = 0.0,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.name = name
        self.model = model
        self.host = host
        self.first_token_s = first_token_s
        self.per_token_s = per_token_s
        self.max_body_bytes = max_body_bytes
        self.port = 0
        self.requests = 0
        self.running = 0
        self.fail_status = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, port or self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stops listening and drops open connections (a dead endpoint, as a proxy sees one)."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Headers and body go out in one write, but a stream's chunks must not wait on
            # Nagle (about 40 ms per chunk against a delayed ACK).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, *_ = [*lines[0].split(" "), "", ""]
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                try:
                    body = await asyncio.wait_for(
                        read_body(reader, headers, max_bytes=self.max_body_bytes), BODY_TIMEOUT_S
                    )
                except BodyTooLarge:
                    await self._send(writer, 413, b'{"error":"body too large"}', b"", close=True)
                    return
                except (BadRequest, ValueError):
                    await self._send(writer, 400, b'{"error":"bad body"}', b"", close=True)
                    return
                await self._answer(writer, method, target.split("?", 1)[0], body)
                if headers.get("connection", "").lower() == "close":
                    return
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        payload: bytes,
        body: bytes,
        *,
        content_type: str = "application/json",
        close: bool = False,
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"content-type: {content_type}\r\n"
            f"content-length: {len(payload)}\r\n"
            f"x-served-by: {self.name}\r\n"
            f"x-request-body-sha256: {hashlib.sha256(body).hexdigest()}\r\n"
        )
        if close:
            head += "connection: close\r\n"
        writer.write(head.encode() + b"\r\n" + payload)
        await writer.drain()

    async def _answer(
        self, writer: asyncio.StreamWriter, method: str, path: str, body: bytes
    ) -> None:
        if method == "GET" and path == "/health":
            await self._send(writer, 200, b'{"status":"ok"}', body)
        elif method == "GET" and path == "/v1/models":
            models = {"object": "list", "data": [{"id": self.model, "object": "model"}]}
            await self._send(writer, 200, json.dumps(models).encode(), body)
        elif method == "GET" and path == "/metrics":
            labels = f'{{model_name="{self.model}"}}'
            text = (
                f"vllm:num_requests_waiting{labels} 0\n"
                f"vllm:num_requests_running{labels} {self.running}\n"
                f"vllm:kv_cache_usage_perc{labels} 0.1\n"
            )
            await self._send(
                writer, 200, text.encode(), body, content_type="text/plain; version=0.0.4"
            )
        elif method == "POST" and path.startswith("/v1/"):
            self.requests += 1
            self.running += 1
            try:
                await self._complete(writer, body)
            finally:
                self.running -= 1
        else:
            await self._send(writer, 404, b'{"error":"not found"}', body)

    async def _complete(self, writer: asyncio.StreamWriter, body: bytes) -> None:
        if self.fail_status:
            error = {"error": {"message": f"{self.name} failing", "code": self.fail_status}}
            await self._send(writer, self.fail_status, json.dumps(error).encode(), body)
            return
        try:
            request = json.loads(body or b"{}")
            stream = request.get("stream") is True
            messages = request.get("messages") or [{}]
            prompt = str(messages[-1].get("content", ""))
        except (ValueError, AttributeError, TypeError):
            await self._send(writer, 400, b'{"error":"invalid JSON body"}', body)
            return
        words = f"Hello from {self.name} ({self.model} stand-in). You said: {prompt[:200]}".split()
        # About four bytes of request per token, as tokenizers average on English text.
        prompt_tokens = max(1, len(body) // 4)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        base = {
            "id": f"chatcmpl-{self.name}-{self.requests}",
            "created": int(time.time()),
            "model": self.model,
        }
        if self.first_token_s:
            await asyncio.sleep(self.first_token_s)
        if not stream:
            if self.per_token_s:
                await asyncio.sleep(self.per_token_s * (len(words) - 1))
            answer = {
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
            await self._send(writer, 200, json.dumps(answer).encode(), body)
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
            + f"x-served-by: {self.name}\r\n".encode()
            + f"x-request-body-sha256: {hashlib.sha256(body).hexdigest()}\r\n\r\n".encode()
        )
        chunk = {**base, "object": "chat.completion.chunk"}
        for i, word in enumerate(words):
            if i and self.per_token_s:
                await asyncio.sleep(self.per_token_s)
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": " " + word}
            await _send_event(
                writer, {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            )
        stop = {"index": 0, "delta": {}, "finish_reason": "stop"}
        await _send_event(writer, {**chunk, "choices": [stop]})
        # The usage chunk OpenAI sends last with stream_options.include_usage.
        await _send_event(writer, {**chunk, "choices": [], "usage": usage})
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _send_event(writer: asyncio.StreamWriter, event: Mapping[str, Any]) -> None:
    writer.write(_chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
    await writer.drain()
