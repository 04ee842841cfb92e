"""Known fake keys in the server's environment and in an agent's must never leave an attempt unredacted:
not in get_status, stream_logs, the resources, nor the bytes of council.db; and a check (which runs
what the agent wrote) never sees the server's secrets at all."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
from mcp import Client

from engine.config import parse_config
from server.app import build_server
from tests.conftest import git

SERVER_SECRETS = {
    "ANTHROPIC_API_KEY": "sk-ant-test-4f9d2c1b7e6a5d3c",
    "GITHUB_TOKEN": "ghp_testtoken0123456789abcdef",
    "AWS_SECRET_ACCESS_KEY": "aws/secret+test/0123456789",
    "MY_PASSWD": "hunter2-hunter2-hunter2",
    "CLI_COUNCIL_TOKEN": "council-bearer-test-token-77",
}
AGENT_SECRET = "deploy-token-only-the-agent-has-42"

# A claude stand-in that repeats its API key on stdout and stderr and fails, so the key also lands in
# the attempt's error message.
LEAKY_CLAUDE = """#!{python}
import os, sys
if "--version" in sys.argv:
    print("2.1.197 (Claude Code)"); sys.exit(0)
key = os.environ.get("ANTHROPIC_API_KEY", "")
print("using key " + key, flush=True)
print("Invalid API key: " + key, file=sys.stderr, flush=True)
sys.exit(1)
"""

# A command agent that writes its own secret into the repo and a check that prints it and its env.
LEAKY_AGENT = """import os
open("leak.txt", "w").write(os.environ["DEPLOY_TOKEN"] + "\\n")
open("check.py", "w").write("import os\\nprint(open('leak.txt').read())\\nfor k, v in sorted(os.environ.items()):\\n    print(k + '=' + v)\\n")
print("my token is " + os.environ["DEPLOY_TOKEN"], flush=True)
"""


@pytest.fixture
def leaky(tmp_path, monkeypatch, council_home):
    for name, value in SERVER_SECRETS.items():
        monkeypatch.setenv(name, value)
    claude = tmp_path / "claude"
    claude.write_text(LEAKY_CLAUDE.format(python=sys.executable))
    claude.chmod(claude.stat().st_mode | stat.S_IEXEC)
    agent = tmp_path / "leaky_agent.py"
    agent.write_text(LEAKY_AGENT)
    cfg = parse_config({"engine": {"kill_grace_s": 1}, "agents": {
        "claude": {"command": [str(claude)]},
        "writer": {"kind": "command", "argv": [sys.executable, str(agent)], "env": {"DEPLOY_TOKEN": AGENT_SECRET}},
    }})
    return build_server(config=cfg, home=council_home)


def assert_clean(where: str, text: str) -> None:
    for value in [*SERVER_SECRETS.values(), AGENT_SECRET]:
        assert value not in text, f"{value!r} leaked into {where}"


async def test_no_secret_leaves_an_attempt(leaky, repo, council_home):
    async with Client(leaky) as client:
        r = await client.call_tool("submit_task", {"repo": str(repo), "prompt": "leak", "agents": ["claude", "writer"],
                                                   "check": f"{sys.executable} check.py"})
        assert not r.is_error, r.content
        task_id = r.structured_content["task_id"]
        status = await client.call_tool("get_status", {"task_id": task_id, "wait_s": 30})
        task = status.structured_content
        assert task["state"] in ("succeeded", "failed"), task
        lines, cursor = [], 0
        while True:
            chunk = (await client.call_tool("stream_logs", {"task_id": task_id, "cursor": cursor})).structured_content
            lines += chunk["lines"]
            cursor = chunk["next_cursor"]
            if chunk["done"]:
                break
        task_res = (await client.read_resource(f"council://tasks/{task_id}")).contents[0].text
        logs_res = (await client.read_resource(f"council://tasks/{task_id}/logs")).contents[0].text

    claude = next(a for a in task["attempts"] if a["agent"] == "claude")
    assert "Invalid API key: ***" in claude["error"]["message"]  # the failure is still readable
    texts = [ln["text"] for ln in lines]
    assert "my token is ***" in texts and "using key ***" in texts
    check_lines = [ln["text"] for ln in lines if ln["stream"] == "check"]
    assert "***" in check_lines  # the check printed the agent's token, redacted
    # The check ran with the agents' allow-list: the server's secrets are not even named there.
    env_names = {t.split("=", 1)[0] for t in check_lines if "=" in t}
    assert "PATH" in env_names and not env_names & set(SERVER_SECRETS), env_names
    for where, text in [("get_status", json.dumps(status.structured_content)), ("get_status text", str(status.content)),
                        ("stream_logs", json.dumps(lines)), ("task resource", task_res), ("logs resource", logs_res)]:
        assert_clean(where, text)
    for name in os.listdir(council_home):
        if name.startswith("council.db"):
            assert_clean(name, (council_home / name).read_bytes().decode("latin-1"))
    assert not git(repo, "status", "--porcelain")
