"""`cli-council serve --transport http` as a real uvicorn subprocess on a free loopback port: the bearer
token, the SDK's DNS-rebinding (Host/Origin) checks, the refusal to serve beyond loopback without a token,
and a real session through the SDK's streamable HTTP client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from engine.engine import Engine
from tests.conftest import FAKE_AGENT, pid_running, stop_server

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-for-tests"
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_server(token: str | None, host: str = "127.0.0.1"):
    """`cli-council serve --transport http` on a free port; yields (url, process) once it accepts connections."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CLI_COUNCIL_TOKEN"}
    if token:
        env["CLI_COUNCIL_TOKEN"] = token
    err = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads it while the server runs
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--transport", "http", "--host", host,
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                err.seek(0)
                pytest.fail(f"server exited: {err.read()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start listening"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp", proc
    finally:
        stop_server(proc, 10)
        err.close()


def post(url: str, **headers: str) -> httpx.Response:
    return httpx.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **headers}, timeout=10)


def test_token_is_required_when_set():
    with http_server(TOKEN) as (url, _):
        r = post(url)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert post(url, Authorization="Bearer wrong").status_code == 401
        assert post(url, Authorization=f"Bearer {TOKEN}").status_code == 200


def test_dns_rebinding_protection_rejects_foreign_host_and_origin():
    with http_server(TOKEN) as (url, _):
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert post(url, Host="evil.example:80", **auth).status_code == 421  # the SDK's "Misdirected Request"
        assert post(url, Origin="http://evil.example", **auth).status_code == 403
        port = url.split(":")[2].split("/")[0]
        assert post(url, Host=f"localhost:{port}", Origin=f"http://localhost:{port}", **auth).status_code == 200


def test_loopback_without_token_serves_without_authorization():
    with http_server(None) as (url, _):
        assert post(url).status_code == 200
        assert post(url, Host="evil.example").status_code == 421


def test_non_loopback_bind_without_token_refuses_to_start():
    env = {k: v for k, v in os.environ.items() if k != "CLI_COUNCIL_TOKEN"}
    out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--transport", "http", "--host", "0.0.0.0",
                          "--port", str(free_port())], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "CLI_COUNCIL_TOKEN" in out.stderr and "0.0.0.0" in out.stderr


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_session_over_streamable_http_with_token(mode):
    with http_server(TOKEN) as (url, _):
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
                tools = {t.name for t in (await client.list_tools()).tools}
                assert tools == {"submit_task", "get_status", "list_tasks", "stream_logs", "merge_result",
                                 "cancel_task", "list_agents", "get_diff", "discard_task", "continue_task",
                                 "undo_merge", "review_task"}
                r = await client.call_tool("list_tasks", {})
                assert r.structured_content == {"tasks": []}


async def test_stopping_the_http_server_stops_running_attempts(repo, tmp_path):
    pidfile = tmp_path / "agent.pid"
    Path(os.environ["CLI_COUNCIL_CONFIG"]).write_text(
        f'[engine]\nkill_grace_s = 1\n[agents.stuck]\nkind = "command"\n'
        f'argv = [{json.dumps(sys.executable)}, {json.dumps(FAKE_AGENT)}, "--sleep", "600", "--pidfile", '
        f'"{pidfile}", "{{prompt}}"]\n')
    with http_server(None) as (url, proc):
        async with Client(url) as client:
            r = await client.call_tool("submit_task", {"repo": str(repo), "prompt": "hang", "agents": ["stuck"]})
            task_id = r.structured_content["task_id"]
            with anyio.fail_after(20):
                while not (pidfile.exists() and pidfile.read_text()):
                    await anyio.sleep(0.05)
        pid = int(pidfile.read_text())
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert not pid_running(pid), "the agent outlived its server"
    async with Engine() as engine:
        task = await engine.get(task_id)
    assert task.state == "interrupted" and task.attempt("stuck").error.message == "the server stopped"


def test_example_client_over_http_with_token(repo):
    Path(os.environ["CLI_COUNCIL_CONFIG"]).write_text(
        f'[agents.fake]\nkind = "command"\nargv = [{json.dumps(sys.executable)}, {json.dumps(FAKE_AGENT)}, '
        f'"--write", "hello.txt=hi", "{{prompt}}"]\n')
    with http_server(TOKEN) as (url, _):
        out = subprocess.run([sys.executable, str(ROOT / "examples" / "client.py"), "--url", url, "--repo", str(repo),
                              "--agents", "fake", "--dry-run", "say hi"],
                             cwd=ROOT, env={**os.environ, "CLI_COUNCIL_TOKEN": TOKEN}, capture_output=True, text=True,
                             timeout=60)
        wrong = subprocess.run([sys.executable, str(ROOT / "examples" / "client.py"), "--url", url, "--repo",
                                str(repo), "say hi"], cwd=ROOT, env={**os.environ, "CLI_COUNCIL_TOKEN": "wrong"},
                               capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    merge = json.loads(out.stdout)
    assert merge["dry_run"] is True and merge["files"] == ["hello.txt"]
    assert not (repo / "hello.txt").exists()
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr, wrong.stderr
    assert wrong.stderr.startswith("error: unauthorized (401): send Authorization: Bearer"), wrong.stderr
