"""A small local stand-in for the Anthropic and Gemini model APIs, for the contract tier.

A real HTTP server on 127.0.0.1 (port 0, one thread per connection). Whatever CLI talks to it,
the conversation is scripted: the first model turn writes one file (Claude's `Write` tool,
Gemini's `write_file` function call), and the turn after the tool result says `Done.`. Every
request is recorded (method, path, headers, JSON body) so tests can assert on what the real CLIs
sent; paths it does not know are answered 404 and listed in `unknown`.

Usage per model turn is fixed so tests can check the parsed totals:
Anthropic 1200 in / 42 out, Gemini 1000 in / 20 out.

Programs that run many agent sessions with different jobs (Auto-Claude's spec phases, coder and
QA) get a `script` instead: given a /v1/messages request it returns the tool calls that session
should make, `[(tool name, input), ...]`; the stand-in makes them one per turn (the Nth after N
tool results) and then says `Done.`. A script returning an int answers with that HTTP error (a
login refused halfway), one returning None leaves the request to the default.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ANTHROPIC_IN, ANTHROPIC_OUT = 1200, 42
GEMINI_IN, GEMINI_OUT = 1000, 20
DONE_TEXT = "Done."

_GEMINI_PATH = re.compile(r"^/v1(?:beta|alpha|)?/models/(?P<model>[^/:]+):(?P<method>[A-Za-z]+)$")


@dataclass
class Recorded:
    method: str
    path: str  # with the query string
    headers: dict[str, str]
    body: object  # parsed JSON, the raw text if it is not JSON, or None
    answer: str = ""  # what the stand-in did with it, for the report

    @property
    def route(self) -> str:
        return urlsplit(self.path).path

    def short(self) -> str:
        return f"{self.method} {self.path} -> {self.answer}"


@dataclass
class ModelStandin:
    """Answers with a scripted write of `content` to the absolute path `file_path`."""

    file_path: str
    content: str
    done_text: str = DONE_TEXT
    fail_status: int | None = None  # answer every model call with this HTTP error instead
    script: Callable[[dict], list[tuple[str, dict]] | None] | None = None  # see the module docstring
    requests: list[Recorded] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: int = 0

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> ModelStandin:
        standin = self

        class Handler(_Handler):
            owner = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="model-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ModelStandin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "stand-in not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- what the tests look at -------------------------------------------------------------

    @property
    def unknown(self) -> list[Recorded]:
        return [r for r in self.requests if r.answer.startswith("404")]

    def summary(self) -> str:
        return "\n".join(r.short() for r in self.requests) or "(no requests)"

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)

    def _next_id(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    # -- Anthropic Messages API -------------------------------------------------------------

    def anthropic(self, body: dict) -> tuple[str, list[tuple[str, dict]] | dict | int]:
        """Pick the answer to one /v1/messages request: (label, SSE events, a JSON message or an HTTP error status)."""
        n = self._next_id()
        model = body.get("model") or "claude-standin"
        tools = {t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)}
        messages = body.get("messages") or []
        after_tool = _last_user_has(messages, "tool_result")
        calls = self.script(body) if self.script else None
        if isinstance(calls, int):
            return f"HTTP {calls} (scripted failure)", calls
        if calls is None:
            calls = [("Write", {"file_path": self.file_path, "content": self.content})] if "Write" in tools else []
        done = sum(_has(m, "tool_result") for m in messages if isinstance(m, dict) and m.get("role") == "user")
        if done < len(calls):
            name, tool_input = calls[done]
            label = f"tool_use {name}"
            block = {"type": "tool_use", "id": f"toolu_standin{n:04d}", "name": name, "input": {}}
            payload = json.dumps(tool_input)
            deltas = [{"type": "input_json_delta", "partial_json": payload[:len(payload) // 2]},
                      {"type": "input_json_delta", "partial_json": payload[len(payload) // 2:]}]
            stop = "tool_use"
            full = {"type": "tool_use", "id": block["id"], "name": name, "input": tool_input}
        else:
            # The end of the scripted task, or a side request (title, topic, quota probe...).
            label = "text end_turn" if after_tool else "text (side request)"
            block = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": self.done_text}]
            stop = "end_turn"
            full = {"type": "text", "text": self.done_text}
        msg_id = f"msg_standin{n:04d}"
        usage0 = {"input_tokens": ANTHROPIC_IN, "output_tokens": 1,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        if not body.get("stream"):
            return label + " (json)", {
                "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [full],
                "stop_reason": stop, "stop_sequence": None,
                "usage": {**usage0, "output_tokens": ANTHROPIC_OUT}}
        events = [("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage0}})]
        events.append(("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}))
        events.append(("ping", {"type": "ping"}))
        for d in deltas:
            events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop, "stop_sequence": None},
                                         "usage": {"output_tokens": ANTHROPIC_OUT}}))
        events.append(("message_stop", {"type": "message_stop"}))
        return label, events

    # -- Gemini generateContent -------------------------------------------------------------

    def gemini(self, body: dict, model: str = "gemini-standin") -> tuple[str, dict]:
        """Pick the answer to one generateContent request: (label, one GenerateContentResponse)."""
        n = self._next_id()
        contents = body.get("contents") or []
        last_parts = (contents[-1].get("parts") or []) if contents else []
        after_tool = any(isinstance(p, dict) and "functionResponse" in p for p in last_parts)
        declared = {f.get("name") for t in body.get("tools") or [] if isinstance(t, dict)
                    for f in t.get("functionDeclarations") or [] if isinstance(f, dict)}
        gen = body.get("generationConfig") or {}
        usage = {"promptTokenCount": GEMINI_IN, "candidatesTokenCount": GEMINI_OUT,
                 "totalTokenCount": GEMINI_IN + GEMINI_OUT}
        if "write_file" in declared and not after_tool:
            label = "functionCall write_file"
            parts = [{"functionCall": {"id": f"write_file_standin{n:04d}", "name": "write_file",
                                       "args": {"file_path": self.file_path, "content": self.content}}}]
        elif gen.get("responseMimeType") == "application/json" or gen.get("responseJsonSchema") \
                or gen.get("responseSchema"):
            # A side request that wants JSON (model routing, next-speaker check, loop detection...):
            # answer with the smallest value that fits the schema it asked for.
            schema = gen.get("responseJsonSchema") or gen.get("responseSchema") or {}
            value = _example(schema)
            label = f"json (side request: {', '.join(value) if isinstance(value, dict) else type(value).__name__})"
            parts = [{"text": json.dumps(value)}]
        else:
            label = "text STOP" if after_tool else "text (side request)"
            parts = [{"text": self.done_text}]
        return label, {"candidates": [{"content": {"role": "model", "parts": parts},
                                       "finishReason": "STOP", "index": 0}],
                       "usageMetadata": usage, "modelVersion": model,
                       "responseId": f"standin{n:04d}"}


# Preferred answers for fields that side requests are known to ask for.
_KNOWN = {"next_speaker": "user", "complexity_score": 1}


def _example(schema: dict, name: str = ""):
    """The simplest value that satisfies a JSON schema (or a Gemini `Schema` with upper-case types)."""
    if not isinstance(schema, dict):
        return None
    if name in _KNOWN:
        return _KNOWN[name]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return _example(schema[key][0], name)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if str(k).lower() != "null"), "string")
    kind = str(kind).lower()
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: _example(v, k) for k, v in props.items()}
    if kind == "array":
        return [_example(schema["items"])] * int(schema.get("minItems") or 0) if "items" in schema else []
    if kind in ("number", "integer"):
        low = schema.get("minimum", 1)
        return int(low) if kind == "integer" else low
    if kind == "boolean":
        return False
    return "The task is done."


def _has(message: dict, block_type: str) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == block_type for b in content)


def _last_user_has(messages: list, block_type: str) -> bool:
    for m in reversed(messages):
        if not isinstance(m, dict) or m.get("role") != "user":
            continue
        return _has(m, block_type)
    return False


class _Handler(BaseHTTPRequestHandler):
    owner: ModelStandin
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length

    def log_message(self, format, *args):  # requests are recorded, not printed
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _handle(self) -> None:
        raw = self._read_body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        rec = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        self.owner._record(rec)
        route = urlsplit(self.path).path
        data = body if isinstance(body, dict) else {}
        owner = self.owner

        if self.command == "POST" and route == "/v1/messages":
            rec.answer, answer = (f"HTTP {owner.fail_status} (scripted failure)", owner.fail_status) \
                if owner.fail_status else owner.anthropic(data)
            if isinstance(answer, int):
                kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error",
                        529: "overloaded_error"}.get(answer, "api_error")
                self._json(answer, {"type": "error", "error": {
                    "type": kind, "message": f"model stand-in: scripted HTTP {answer}"}})
            elif isinstance(answer, dict):
                self._json(200, answer)
            else:
                sse = "".join(f"event: {name}\ndata: {json.dumps(ev)}\n\n" for name, ev in answer)
                self._send(200, sse.encode(), "text/event-stream")
            return
        if self.command == "POST" and route == "/v1/messages/count_tokens":
            rec.answer = "count_tokens"
            self._json(200, {"input_tokens": ANTHROPIC_IN})
            return

        if self.command in ("HEAD", "GET") and route == "/":
            rec.answer = "200 (reachability probe)"  # claude sends `HEAD /` before its first call
            self._send(200, b"", "text/plain")
            return

        m = _GEMINI_PATH.match(route)
        if m and self.command == "POST":
            method = m["method"]
            if method in ("streamGenerateContent", "generateContent") and owner.fail_status:
                rec.answer = f"{method}: HTTP {owner.fail_status} (scripted failure)"
                status = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED"}.get(
                    owner.fail_status, "INTERNAL")
                self._json(owner.fail_status, {"error": {
                    "code": owner.fail_status, "message": f"model stand-in: scripted HTTP {owner.fail_status}",
                    "status": status}})
                return
            if method in ("streamGenerateContent", "generateContent"):
                label, resp = owner.gemini(data, m["model"])
                rec.answer = f"{method}: {label}"
                if method == "streamGenerateContent":
                    self._send(200, f"data: {json.dumps(resp)}\r\n\r\n".encode(), "text/event-stream")
                else:
                    self._json(200, resp)
                return
            if method == "countTokens":
                rec.answer = "countTokens"
                self._json(200, {"totalTokens": GEMINI_IN})
                return
            if method in ("embedContent", "batchEmbedContents"):
                rec.answer = method
                n = len(data.get("requests") or [data])
                vec = {"values": [0.0] * 8}
                self._json(200, {"embeddings": [vec] * n} if method == "batchEmbedContents" else {"embedding": vec})
                return

        rec.answer = "404 unknown"
        self._json(404, {"error": {"code": 404, "message": f"model stand-in: no route for {self.command} {route}",
                                   "status": "NOT_FOUND"}})

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle
