"""Servers the hostile corpus talks to, each kept for a whole group of cases and restarted if a case
killed it (so every case starts from a live server whatever ran before it).

- InMemory: build_server() behind the SDK's in-memory Client, run in a blocking portal so sync
  tests can share one server per module.
- StdioProcess: `python -m server.cli serve` with raw bytes on its stdin, replies read by a thread.
- http_process(): `serve --transport http` on a free loopback port.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
import httpx
from anyio.from_thread import start_blocking_portal
from mcp import Client

from engine.config import Config
from server.app import build_server
from tests.conftest import stop_server

ROOT = Path(__file__).resolve().parents[2]
ACTIVE = ("queued", "running")
PROTOCOL = "2025-06-18"
INITIALIZE = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "hostile", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def tool_text(result) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


class InMemory:
    def __init__(self, config: Config, home: Path):
        self.config, self.home = config, home
        self._portal_cm = self._client_cm = None
        self.orphans: set[str] = set()
        self.start()

    def start(self) -> None:
        self._portal_cm = start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self._client_cm = self.portal.wrap_async_context_manager(Client(build_server(self.config, self.home)))
        self.client = self._client_cm.__enter__()

    def stop(self) -> None:
        for cm in (self._client_cm, self._portal_cm):
            try:
                cm.__exit__(None, None, None)
            except BaseException:  # a server a case killed may not exit cleanly; the next start is fresh
                pass

    def call(self, name: str, args: dict, timeout: float = 60):
        async def go():
            with anyio.fail_after(timeout):
                return await self.client.call_tool(name, args)
        return self.portal.call(go)

    def read(self, uri: str, timeout: float = 30):
        async def go():
            with anyio.fail_after(timeout):
                return await self.client.read_resource(uri)
        return self.portal.call(go)

    def alive(self) -> bool:
        try:
            return not self.call("list_tasks", {}, timeout=15).is_error
        except BaseException:
            return False

    def ensure_alive(self) -> None:
        if not self.alive():
            self.stop()
            self.start()
            # Tasks the dead engine hosted stay "running" in the store: this process, their recorded
            # host, is alive, so nothing will ever end them. They change no more; leave them be.
            try:
                self.orphans = {t["task_id"] for t in self.tasks() if t["state"] in ACTIVE}
            except Exception:  # an unreadable store: the caller starts a fresh one
                self.orphans = set()

    def tasks(self) -> list[dict]:
        return self.call("list_tasks", {"limit": 1000}).structured_content["tasks"]

    def quiesce(self, keep: set[str] = frozenset(), within: float = 20) -> None:
        """Wait until no task but `keep` is active (a wrongly accepted earlier case may still run), then
        cancel whatever still is, so it cannot write into the next case's snapshot."""
        deadline = time.monotonic() + within
        while True:
            active = [t["task_id"] for t in self.tasks()
                      if t["state"] in ACTIVE and t["task_id"] not in keep | self.orphans]
            if not active:
                return
            if time.monotonic() > deadline:
                for task_id in active:
                    self.call("cancel_task", {"task_id": task_id})
                return
            time.sleep(0.2)

    def wait_done(self, task_id: str, within: float = 60) -> dict:
        deadline = time.monotonic() + within
        while True:
            task = self.call("get_status", {"task_id": task_id, "wait_s": 5}).structured_content
            if task["state"] not in ACTIVE or time.monotonic() > deadline:
                return task


def settle(list_tasks, within: float = 30) -> None:
    """Wait until no task is active, so a task a wrongly accepted earlier case started cannot write
    into the next case's snapshot. `list_tasks()` returns the task dicts."""
    deadline = time.monotonic() + within
    while any(t["state"] in ACTIVE for t in list_tasks()) and time.monotonic() < deadline:
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `cli-council serve` subprocess whose stderr goes to the file `self.err`."""

    def ensure_alive(self) -> None:
        if not self.alive():
            self.stop()
            self.start()

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")


class StdioProcess(ServerProcess):
    """A stdio server fed raw bytes. Replies (one JSON document a line) arrive on a queue."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.next_id = 100
        self.start()

    def start(self) -> None:
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.replies), daemon=True).start()
        self.send(json.dumps(INITIALIZE).encode())
        assert "result" in self.reply(0, within=30), "the stdio server did not initialize"
        self.send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')

    @staticmethod
    def _read(stream, out: queue.Queue) -> None:
        for line in stream:
            try:
                out.put(json.loads(line))
            except ValueError:
                out.put({"unparseable": line[:200]})

    def send(self, raw: bytes) -> None:
        self.proc.stdin.write(raw + b"\n")
        self.proc.stdin.flush()

    def reply(self, msg_id, within: float = 20) -> dict:
        """The next reply with this id, or with any of these ids when given a tuple (None: an error
        reply to a message that had no usable id). Other replies are dropped."""
        ids = msg_id if isinstance(msg_id, tuple) else (msg_id,)
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply with id {msg_id!r} within {within} s")
            try:
                msg = self.replies.get(timeout=left)
            except queue.Empty:
                continue
            if "method" not in msg and msg.get("id") in ids:
                return msg

    def request(self, method: str, params: dict | None = None, within: float = 30) -> dict:
        self.next_id += 1
        self.send(json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method,
                              **({"params": params} if params is not None else {})}).encode())
        return self.reply(self.next_id, within)

    def tasks(self) -> list[dict]:
        reply = self.request("tools/call", {"name": "list_tasks", "arguments": {"limit": 1000}})
        return reply["result"]["structuredContent"]["tasks"]

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            reply = self.request("tools/call", {"name": "list_tasks", "arguments": {}}, within=15)
            return "result" in reply and not reply["result"].get("isError")
        except (TimeoutError, OSError):
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


class HttpProcess(ServerProcess):
    """`serve --transport http` on a free loopback port, with a bearer token."""

    def __init__(self, env: dict[str, str], token: str):
        self.env, self.token = env, token
        self.start()

    def start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--transport", "http",
                                      "--port", str(self.port)], cwd=ROOT, env={**self.env, "CLI_COUNCIL_TOKEN":
                                     self.token}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.err)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, f"http server exited: {self.stderr()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "http server did not start listening"
                time.sleep(0.05)

    @property
    def headers(self) -> dict[str, str]:
        return {**MCP_HEADERS, "Authorization": f"Bearer {self.token}"}

    def session(self) -> dict[str, str]:
        """Headers of a fresh initialized session."""
        r = httpx.post(self.url, json=INITIALIZE, headers=self.headers, timeout=15)
        assert r.status_code == 200, (r.status_code, r.text[:300])
        h = {**self.headers, "mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": PROTOCOL}
        httpx.post(self.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=h, timeout=15)
        return h

    def call(self, name: str, args: dict, headers: dict | None = None) -> dict:
        """tools/call in a session; the JSON-RPC reply (read out of the SSE stream)."""
        h = headers or self.session()
        r = httpx.post(self.url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                       "params": {"name": name, "arguments": args}}, headers=h, timeout=30)
        assert r.status_code == 200, (r.status_code, r.text[:300])
        for line in r.text.splitlines():
            if line.startswith("data:"):
                return json.loads(line[5:])
        return r.json()

    def tasks(self) -> list[dict]:
        return self.call("list_tasks", {"limit": 1000})["result"]["structuredContent"]["tasks"]

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            return self.call("list_tasks", {})["result"]["isError"] is False
        except Exception:
            return False

    def stop(self) -> None:
        stop_server(self.proc, 15)
        self.err.close()


def env_for(home: Path, config: Path, userhome: Path, **extra: str) -> dict[str, str]:
    """The environment of a server or command-line subprocess of the corpus."""
    env = {k: v for k, v in os.environ.items() if k != "CLI_COUNCIL_TOKEN"}
    env.update(HOME=str(userhome), CLI_COUNCIL_HOME=str(home), CLI_COUNCIL_CONFIG=str(config),
               GIT_CONFIG_GLOBAL=str(userhome / ".gitconfig"), PYTHONPATH=str(ROOT), **extra)
    return env
