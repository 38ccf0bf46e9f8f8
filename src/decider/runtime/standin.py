"""A stand-in OpenAI-compatible model server for demos, tests and benchmarks behind a proxy.

HTTP/1.1 with keep-alive, request bodies by Content-Length or chunked (Envoy streams bodies
chunked in ext_proc duplex mode), TCP_NODELAY, JSON answers with `usage`, and SSE streams that
end with a usage chunk and `data: [DONE]`. Every answer names the server (`x-served-by`) and the
SHA-256 of the request body it read (`x-request-body-sha256`), so a test can prove what arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import time
from collections.abc import Mapping
from typing import Final

MAX_BODY_BYTES: Final = 64 << 20
_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests"}


class BadRequest(ValueError):
    pass


async def read_body(
    reader: asyncio.StreamReader, headers: Mapping[str, str], *, max_bytes: int = MAX_BODY_BYTES
) -> bytes:
    """An HTTP/1.1 request body, by Content-Length or chunked; BadRequest above `max_bytes`."""
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
                raise BadRequest("body too large")
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0") or 0)
    if length > max_bytes:
        raise BadRequest("body too large")
    return await reader.readexactly(length) if length else b""


class StandIn:
    """One model server on `host:port` (port 0 picks one). `fail_status` makes every model call
    answer that status (500 to trip a breaker, 429 to say "not now")."""

    def __init__(self, name: str, *, model: str = "demo-model", host: str = "127.0.0.1") -> None:
        self.name = name
        self.model = model
        self.host = host
        self.port = 0
        self.requests = 0
        self.fail_status = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

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
                    body = await read_body(reader, headers)
                except (BadRequest, ValueError):
                    await self._send(writer, 400, b'{"error":"bad body"}', b"")
                    return
                await self._answer(writer, method, target.split("?", 1)[0], body)
                if headers.get("connection", "").lower() == "close":
                    return
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _send(
        self, writer: asyncio.StreamWriter, status: int, payload: bytes, body: bytes
    ) -> None:
        writer.write(
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n"
            f"x-served-by: {self.name}\r\n"
            f"x-request-body-sha256: {hashlib.sha256(body).hexdigest()}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()

    async def _answer(
        self, writer: asyncio.StreamWriter, method: str, path: str, body: bytes
    ) -> None:
        if method == "GET" and path == "/health":
            await self._send(writer, 200, b'{"status":"ok"}', body)
            return
        if method != "POST" or not path.startswith("/v1/"):
            await self._send(writer, 404, b'{"error":"not found"}', body)
            return
        self.requests += 1
        if self.fail_status:
            error = {"error": {"message": f"{self.name} failing", "code": self.fail_status}}
            await self._send(writer, self.fail_status, json.dumps(error).encode(), body)
            return
        try:
            request = json.loads(body or b"{}")
            stream = bool(request.get("stream", False))
        except (ValueError, AttributeError):
            await self._send(writer, 400, b'{"error":"invalid JSON body"}', body)
            return
        prompt_tokens = max(1, len(body) // 4)
        words = ["Hello", " from", f" {self.name}", "."]
        if not stream:
            answer = {
                "id": f"cmpl-{self.name}-{self.requests}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(words)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(words),
                    "total_tokens": prompt_tokens + len(words),
                },
            }
            await self._send(writer, 200, json.dumps(answer).encode(), body)
            return
        await self._stream(writer, words, prompt_tokens, body)

    async def _stream(
        self, writer: asyncio.StreamWriter, words: list[str], prompt_tokens: int, body: bytes
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n"
            + f"x-served-by: {self.name}\r\n".encode()
            + f"x-request-body-sha256: {hashlib.sha256(body).hexdigest()}\r\n\r\n".encode()
        )
        base = {"id": f"cmpl-{self.name}-{self.requests}", "object": "chat.completion.chunk"}
        events: list[dict[str, object]] = [
            {**base, "choices": [{"index": 0, "delta": {"content": w}}]} for w in words
        ]
        events.append(
            {
                **base,
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(words),
                    "total_tokens": prompt_tokens + len(words),
                },
            }
        )
        for event in events:
            data = f"data: {json.dumps(event)}\n\n".encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
        done = b"data: [DONE]\n\n"
        writer.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
        await writer.drain()
