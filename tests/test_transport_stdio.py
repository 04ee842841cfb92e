"""Raw bytes on a `cli-council serve` subprocess's stdin: every malformed line gets a JSON-RPC error
reply on stdout (with the request's id when one can be read) and the server goes on serving."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from server.app import TOOLS
from server.jsonrpc import MAX_MESSAGE_BYTES

ROOT = Path(__file__).resolve().parents[1]
PARSE_ERROR, INVALID_REQUEST = -32700, -32600
INITIALIZE = {"jsonrpc": "2.0", "id": "init", "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}

# (what is written to stdin, the error code expected, the id the reply must carry)
MALFORMED = [
    (b"{not json", PARSE_ERROR, None),
    (b'{"jsonrpc": "2.0", "id": 3, "method": "ping"', PARSE_ERROR, None),
    (b"[]", INVALID_REQUEST, None),
    (b'[{"jsonrpc": "2.0", "id": 4, "method": "ping"}]', INVALID_REQUEST, None),
    (b"42", INVALID_REQUEST, None),
    (b'"x"', INVALID_REQUEST, None),
    (b"null", INVALID_REQUEST, None),
    (b"true", INVALID_REQUEST, None),
    (b'{"a": 1}', INVALID_REQUEST, None),
    (b'{"jsonrpc": "2.0", "id": 7, "method": 5}', INVALID_REQUEST, 7),
    (b'{"jsonrpc": "1.0", "id": "s", "method": "ping"}', INVALID_REQUEST, "s"),
    (b'{"jsonrpc": "2.0", "id": [1], "method": "ping"}', INVALID_REQUEST, None),
    (b'{"jsonrpc": "2.0", "id": true, "method": "ping"}', INVALID_REQUEST, None),
    (b'{"jsonrpc": "2.0", "id": null, "method": "ping"}', INVALID_REQUEST, None),
    (b'{"jsonrpc": "2.0", "id": 1.5, "method": "ping"}', INVALID_REQUEST, None),
    (b'{"jsonrpc": "2.0", "id": 8, "method": "ping", "params": {"x": "\\ud800"}}', PARSE_ERROR, 8),
    (b'{"jsonrpc": "2.0", "id": 9, "method": "ping", "params": {"x": "\\udfff\\ud800"}}', PARSE_ERROR, 9),
    (b'{"jsonrpc": "2.0", "id": 10, "method": "ping", "params": {"x": "\xff\xfe"}}', PARSE_ERROR, 10),
    (b'{"jsonrpc": "2.0", "id": 11, "method": "ping", "params": {"x": "\xed\xa0\x80"}}', PARSE_ERROR, 11),
    (b'{"jsonrpc": "2.0", "id": 12, "method": "ping", "params": {"x": NaN}}', PARSE_ERROR, 12),
    (b'{"jsonrpc": "2.0", "id": 13, "method": "ping", "params": {"x": -Infinity}}', PARSE_ERROR, 13),
    (b"[" * 100_000, PARSE_ERROR, None),
    (b'{"jsonrpc": "2.0", "id": 14, "method": "ping", "params": {"x": "' + b"a" * MAX_MESSAGE_BYTES + b'"}}',
     INVALID_REQUEST, None),
]


class RawServer:
    """The server as a subprocess; stdout lines are collected by a thread so every read has a deadline."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(b"")

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def request(self, message: dict) -> None:
        self.send(json.dumps(message).encode() + b"\n")

    def reply(self, timeout: float = 20) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no reply within {timeout} s")
        assert line, "the server closed stdout (it exited)"
        return json.loads(line)

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def server():
    s = RawServer()
    yield s
    s.close()


def test_every_malformed_line_gets_an_error_reply_and_the_server_keeps_serving(server):
    for n, (line, code, request_id) in enumerate(MALFORMED):
        server.send(line + b"\n")
        reply = server.reply()
        assert reply["jsonrpc"] == "2.0" and "result" not in reply, (line[:80], reply)
        assert reply["error"]["code"] == code, (line[:80], reply)
        assert reply["id"] == request_id, (line[:80], reply)
        assert reply["error"]["message"], line[:80]
        server.request({"jsonrpc": "2.0", "id": f"ping-{n}", "method": "ping"})  # still alive, still in step
        assert server.reply() == {"jsonrpc": "2.0", "id": f"ping-{n}", "result": {}}, line[:80]

    server.request(INITIALIZE)
    assert server.reply()["result"]["serverInfo"]["name"] == "cli-council"
    server.request({"jsonrpc": "2.0", "method": "notifications/initialized"})
    server.request({"jsonrpc": "2.0", "id": "tools", "method": "tools/list"})
    tools = server.reply()
    assert tools["id"] == "tools" and len(tools["result"]["tools"]) == len(TOOLS)
    assert server.close() == 0


def test_blank_lines_are_skipped_without_a_reply(server):
    server.send(b"\n  \r\n\t\n")
    server.request({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert server.reply() == {"jsonrpc": "2.0", "id": 1, "result": {}}


def test_a_reply_to_the_last_line_is_written_before_the_server_stops(server):
    server.send(b"{oops\n")
    server.proc.stdin.close()
    assert server.reply()["error"]["code"] == PARSE_ERROR
    assert server.proc.wait(15) == 0


def test_stdin_is_diverted_while_serving_so_children_cannot_steal_messages(server):
    server.request({"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert server.reply()["id"] == 1
    assert Path(f"/proc/{server.proc.pid}/fd/0").resolve() == Path("/dev/null")


def test_a_dead_lifespan_ends_the_process_even_with_stdin_open():
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fakes" / "dying_stdio.py")], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        for message in [INITIALIZE, {"jsonrpc": "2.0", "method": "notifications/initialized"},
                        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "die", "arguments": {}}}]:
            proc.stdin.write(json.dumps(message).encode() + b"\n")
        proc.stdin.flush()
        assert proc.wait(20) != 0  # stdin is still open: a reader thread must not keep the process waiting
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
