"""A stand-in OpenAI-compatible model server for the Zig tests, on 127.0.0.1.

Serves GET /health and POST /v1/chat/completions (JSON, or with "stream": true
server-sent events ending in a usage chunk and [DONE]), and prints
"backend <id> listening on 127.0.0.1:<port>" once bound. Usage is always
21 prompt and 7 completion tokens, so tests can check they reach Decider.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROMPT_TOKENS = 21
COMPLETION_TOKENS = 7


def main() -> None:
    backend_id = sys.argv[1]
    usage = {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, "text/plain", b"ok")
            else:
                self._send(404, "text/plain", b"not found")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                req = json.loads(self.rfile.read(length) or b"{}")
            except ValueError as exc:
                self._send(400, "application/json", json.dumps({"error": str(exc)}).encode())
                return
            if self.path != "/v1/chat/completions":
                self._send(404, "text/plain", b"not found")
                return
            model = req.get("model", "")
            if not req.get("stream"):
                body = {
                    "object": "chat.completion",
                    "model": model,
                    "backend": backend_id,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hi from " + backend_id},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
                self._send(200, "application/json", json.dumps(body).encode())
                return
            chunks = [
                {
                    "object": "chat.completion.chunk",
                    "model": model,
                    "backend": backend_id,
                    "choices": [{"index": 0, "delta": {"content": "hi"}}],
                },
                {
                    "object": "chat.completion.chunk",
                    "model": model,
                    "backend": backend_id,
                    "choices": [],
                    "usage": usage,
                },
            ]
            events = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
            events += b"data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            for part in events.split(b"\n\n")[:-1]:
                self.wfile.write(part + b"\n\n")
                self.wfile.flush()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"backend {backend_id} listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
