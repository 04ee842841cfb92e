"""A stand-in Ollama server on 127.0.0.1 for engine tests: /api/tags, /api/version and /api/chat.

Each chat request's body is kept in `server.chats`; the answer is the next of `server.answers`
(a whole-file reply, streamed as Ollama does), or, while `server.busy` > 0, HTTP 429 with the
header `Retry-After: server.retry_after` (each such answer counts busy down by one).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "fake-coder:1b"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/api/tags":
            self._send(200, json.dumps({"models": [{"name": MODEL, "model": MODEL}]}).encode())
        else:
            self._send(200, json.dumps({"version": "0.0.0-standin"}).encode())

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        srv.chats.append(body)
        if srv.busy > 0:
            srv.busy -= 1
            self._send(429, json.dumps({"error": "server busy, too many requests"}).encode(),
                       {"Retry-After": str(srv.retry_after)})
            return
        reply = srv.answers.pop(0) if srv.answers else "Nothing to do."
        lines = [{"model": MODEL, "message": {"role": "assistant", "content": reply}, "done": False},
                 {"model": MODEL, "done": True, "done_reason": "stop", "prompt_eval_count": 10, "eval_count": 5}]
        self._send(200, "".join(json.dumps(x) + "\n" for x in lines).encode(), {"Content-Type": "application/x-ndjson"})


class OllamaStandin:
    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.chats, self.server.answers, self.server.busy, self.server.retry_after = [], [], 0, "1"
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "OllamaStandin":
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
