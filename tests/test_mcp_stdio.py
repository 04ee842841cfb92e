"""`cli-council serve` as a real stdio subprocess: the SDK's stdio client, the MCP Inspector CLI, and
what stopping the server does to running attempts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters

from engine.engine import Engine
from engine.models import LogChunk, Task
from tests.conftest import FAKE_AGENT, pid_running

ROOT = Path(__file__).resolve().parents[1]
SERVE = [sys.executable, "-m", "server.cli", "serve"]
INSPECTOR = "@modelcontextprotocol/inspector@2.12.0"


@pytest.fixture(autouse=True)
def config(tmp_path):
    """Fake `command` agents in the TOML file CLI_COUNCIL_CONFIG points at (conftest isolates the env)."""
    pidfile = tmp_path / "agent.pid"
    Path(os.environ["CLI_COUNCIL_CONFIG"]).write_text(f"""
[engine]
kill_grace_s = 1

[agents.fake]
kind = "command"
argv = [{json.dumps(sys.executable)}, "-c", "open('hello.txt', 'w').write('hi')"]

[agents.stuck]
kind = "command"
argv = [{json.dumps(sys.executable)}, {json.dumps(FAKE_AGENT)}, "--sleep", "600",
        "--pidfile", "{pidfile}", "{{prompt}}"]
""")
    return pidfile


def params() -> StdioServerParameters:
    # The SDK passes only a few safe variables to the child unless told; this test's env is the point.
    return StdioServerParameters(command=SERVE[0], args=SERVE[1:], env=dict(os.environ), cwd=str(ROOT))


async def stored(task_id: str) -> Task:
    """The task as the server left it in council.db."""
    async with Engine() as engine:
        return await engine.get(task_id)


async def agent_pid(pidfile: Path) -> int:
    with anyio.fail_after(20):
        while not (pidfile.exists() and pidfile.read_text()):
            await anyio.sleep(0.05)
    return int(pidfile.read_text())


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def gone(pid: int, within: float = 15) -> bool:
    deadline = time.monotonic() + within
    while pid_running(pid) and time.monotonic() < deadline:
        await anyio.sleep(0.05)
    return not pid_running(pid)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_stdio_session_submits_follows_and_merges(repo, mode):
    async with Client(params(), mode=mode) as client:
        assert client.server_info.name == "cli-council"
        r = await client.call_tool("submit_task", {"repo": str(repo), "prompt": "say hi", "agents": ["fake"]})
        assert not r.is_error, r.content
        task_id = r.structured_content["task_id"]

        cursor, done = 0, False
        with anyio.fail_after(30):
            while not done:
                r = await client.call_tool("stream_logs", {"task_id": task_id, "cursor": cursor, "wait_s": 10})
                chunk = LogChunk.model_validate(r.structured_content)
                cursor, done = chunk.next_cursor, chunk.done
        assert cursor > 0

        status = Task.model_validate((await client.call_tool("get_status", {"task_id": task_id})).structured_content)
        assert status.state == "succeeded" and status.best == "fake"

        r = await client.call_tool("merge_result", {"task_id": task_id})
        assert not r.is_error, r.content
        assert r.structured_content["merged"] is True
    assert (repo / "hello.txt").read_text() == "hi"


async def test_closing_stdin_stops_running_attempts(repo, config):
    async with Client(params()) as client:
        r = await client.call_tool("submit_task", {"repo": str(repo), "prompt": "hang", "agents": ["stuck"]})
        task_id = r.structured_content["task_id"]
        pid = await agent_pid(config)
    assert await gone(pid), "the agent outlived its server"
    task = await stored(task_id)
    assert task.state == "interrupted"
    assert task.attempt("stuck").error.message == "the server stopped"


async def test_sigterm_stops_running_attempts_and_the_server(repo, config):
    async with Client(params()) as client:
        r = await client.call_tool("submit_task", {"repo": str(repo), "prompt": "hang", "agents": ["stuck"]})
        task_id = r.structured_content["task_id"]
        pid = await agent_pid(config)
        server = parent_of(pid)
        os.kill(server, signal.SIGTERM)
        assert await gone(pid), "the agent outlived its server"
        assert await gone(server, within=5), "SIGTERM did not end the server while its stdin was open"
    assert (await stored(task_id)).attempt("stuck").error.message == "the server stopped"


@pytest.mark.skipif(shutil.which("npx") is None, reason="npx (node + npm) is not installed")
def test_mcp_inspector_cli_lists_the_tools():
    # npm's cache lives outside the per-test HOME so the Inspector is downloaded once per machine, not per run.
    env = {**os.environ, "npm_config_cache": str(Path(tempfile.gettempdir()) / "cli-council-npm-cache"),
           "npm_config_update_notifier": "false"}
    cmd = ["npx", "-y", INSPECTOR, "--cli",
           "-e", f"CLI_COUNCIL_HOME={os.environ['CLI_COUNCIL_HOME']}",
           "-e", f"CLI_COUNCIL_CONFIG={os.environ['CLI_COUNCIL_CONFIG']}",
           *SERVE, "--method", "tools/list"]
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip("the Inspector could not be fetched from npm within 240 s")
    if out.returncode != 0 and "npm error" in out.stderr:
        pytest.skip(f"npm could not install the Inspector: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    tools = {t["name"]: t for t in json.loads(out.stdout)["tools"]}
    assert set(tools) == {"submit_task", "get_status", "list_tasks", "stream_logs", "merge_result", "cancel_task",
                          "list_agents", "get_diff", "discard_task", "continue_task", "undo_merge", "review_task"}
    assert tools["merge_result"]["annotations"]["destructiveHint"] is True
    assert "outputSchema" in tools["get_status"]


def test_example_client_submits_follows_and_merges(repo):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "client.py"), "--repo", str(repo), "--agents", "fake",
                          "--command", " ".join(SERVE), "say hi"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["merged"] is True
    assert "best: fake" in out.stderr
    assert (repo / "hello.txt").read_text() == "hi"
