"""StandIn: a tiny scriptable HTTP backend on loopback, for prober tests and benchmarks.

It answers every GET with `status` (or hangs when `hang` is set), serves `metrics_text` on
/metrics, keeps connections alive as model servers do, and `kill()` drops the listener and
every open connection at once, as a crashed process would.
"""

from __future__ import annotations

import asyncio
import contextlib


class StandIn:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.status = 200
        self.hang = False
        self.metrics_text = ""
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> StandIn:
        # Restarting on the same port after kill() revives the backend where probes expect it.
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def kill(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if self.hang:
                    # Accept, read, never answer: only a timeout can tell. Reading on until
                    # the peer (or kill()) closes ends the handler instead of leaking it.
                    while await reader.read(65536):
                        pass
                    return
                path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
                if path.startswith(b"/metrics"):
                    status, body = 200, self.metrics_text.encode()
                else:
                    status, body = self.status, b"ok" if self.status < 300 else b"failing"
                writer.write(
                    b"HTTP/1.1 %d X\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                    % (status, len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
