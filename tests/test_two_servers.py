"""Two servers on one CLI_COUNCIL_HOME (two real stdio processes) submitting, logging, merging and
cancelling each other's tasks at once: no error, and every task's log numbers stay contiguous."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

from engine.engine import Engine
from tests.conftest import FAKE_AGENT, git

ROOT = Path(__file__).resolve().parents[1]


def write_config() -> None:
    agent = [sys.executable, FAKE_AGENT, "--lines", "200", "--sleep", "0.5"]
    Path(os.environ["CLI_COUNCIL_CONFIG"]).write_text(f"""
[engine]
kill_grace_s = 1

[agents.a]
kind = "command"
argv = {json.dumps(agent + ["--write", "a.txt={prompt}", "{prompt}"])}

[agents.b]
kind = "command"
argv = {json.dumps(agent + ["--write", "b.txt={prompt}", "{prompt}"])}

[agents.slow]
kind = "command"
argv = {json.dumps([sys.executable, FAKE_AGENT, "--lines", "50", "--sleep", "600", "{prompt}"])}
""")


def params() -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "server.cli", "serve"], env=dict(os.environ),
                                 cwd=str(ROOT))


async def call(client: Client, tool: str, args: dict | None = None, **kw) -> dict:
    args = {**(args or {}), **kw}
    r = await client.call_tool(tool, args)
    assert not r.is_error, (tool, args, r.content)
    return r.structured_content


async def test_two_servers_share_one_home_without_errors(repo, tmp_path):
    write_config()
    repos = []
    for i in range(2):  # one repo per server, so both merges can land
        other = tmp_path / f"repo{i}"
        git(tmp_path, "clone", "-q", str(repo), str(other))
        repos.append(other)
    async with Client(params()) as one, Client(params()) as two:
        submitted: dict[str, list[str]] = {"one": [], "two": []}

        async def submit(name, client, repo, n):
            for i in range(n):
                task = await call(client, "submit_task", repo=str(repo), prompt=f"{name}-{i}", agents=["a", "b"])
                submitted[name].append(task["task_id"])

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(submit, "one", one, repos[0], 3)
                tg.start_soon(submit, "two", two, repos[1], 3)
            slow = await call(one, "submit_task", repo=str(repos[0]), prompt="stuck", agents=["slow"])
            for task_id in submitted["one"] + submitted["two"]:
                await call(two, "get_status", task_id=task_id, wait_s=30)
            async with anyio.create_task_group() as tg:
                # Each server merges a task the other one ran, while the second cancels the first's slow task.
                tg.start_soon(call, two, "merge_result", {"task_id": submitted["one"][0], "agent": "a"})
                tg.start_soon(call, one, "merge_result", {"task_id": submitted["two"][0], "agent": "b"})
                tg.start_soon(call, two, "cancel_task", {"task_id": slow["task_id"]})
                for task_id in submitted["one"][1:]:
                    tg.start_soon(call, two, "stream_logs", {"task_id": task_id, "limit": 5000})
            listed = await call(one, "list_tasks", limit=100)
    states = {t["task_id"]: t["state"] for t in listed["tasks"]}
    assert states[submitted["one"][0]] == states[submitted["two"][0]] == "merged"
    assert states[slow["task_id"]] == "cancelled"
    assert all(states[t] == "succeeded" for t in submitted["one"][1:] + submitted["two"][1:])
    async with Engine() as engine:
        for task_id in states:
            seqs = [ln.seq for ln in (await engine.logs(task_id, limit=5000)).lines]
            assert seqs == list(range(1, len(seqs) + 1)), task_id
