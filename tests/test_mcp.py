"""The MCP tool and resource surface through a real in-memory client: schemas, annotations, structured
results, error results, progress, and resource-updated notifications in both protocol eras."""

from __future__ import annotations

import time
import warnings

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from engine.config import parse_config
from engine.engine import Engine
from engine.models import LogChunk, Task, TaskList
from server import app
from server.app import build_server
from tests.conftest import fake, git

TOOLS = {"submit_task", "get_status", "list_tasks", "stream_logs", "merge_result", "cancel_task", "list_agents",
         "get_diff", "discard_task", "review_task", "continue_task", "undo_merge"}
MODES = ["auto", "legacy"]  # 2026-07-28 direct dispatch, and the initialize handshake older clients use


@pytest.fixture
def server(council_home):
    cfg = parse_config({"engine": {"kill_grace_s": 1}, "agents": {
        "fake": fake("--write", "hello.txt=hi"),
        "slow": fake("--sleep", "2", "--write", "slow.txt=done"),
        "stuck": fake("--sleep", "60"),
    }})
    return build_server(config=cfg, home=council_home)


async def follow(client: Client, task_id: str) -> list:
    """stream_logs from cursor 0 until done, as a client would."""
    lines, cursor = [], 0
    with anyio.fail_after(30):
        while True:
            r = await client.call_tool("stream_logs", {"task_id": task_id, "cursor": cursor, "wait_s": 5})
            assert not r.is_error, r.content
            chunk = LogChunk.model_validate(r.structured_content)
            lines += chunk.lines
            cursor = chunk.next_cursor
            if chunk.done:
                return lines


async def test_tools_are_listed_with_schemas_and_true_annotations(server):
    async with Client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and tool.output_schema, tool.name
        for name, prop in tool.input_schema["properties"].items():
            assert prop.get("description"), f"{tool.name}.{name} has no description"
    assert tools["submit_task"].input_schema["required"] == ["repo", "prompt"]
    assert "ctx" not in tools["submit_task"].input_schema["properties"]
    assert set(tools["get_status"].output_schema["properties"]) >= {"task_id", "state", "attempts", "best"}
    assert "50" in tools["get_status"].input_schema["properties"]["wait_s"]["description"]
    hints = {name: (t.annotations.read_only_hint, t.annotations.destructive_hint, t.annotations.idempotent_hint,
                    t.annotations.open_world_hint) for name, t in tools.items()}
    assert hints == {
        "submit_task": (False, False, False, True),
        "get_status": (True, False, True, False),
        "list_tasks": (True, False, True, False),
        "stream_logs": (True, False, True, False),
        "merge_result": (False, True, False, False),
        "cancel_task": (False, True, True, False),
        "list_agents": (True, False, True, False),
        "get_diff": (True, False, True, False),
        "discard_task": (False, True, True, False),
        "review_task": (False, False, False, True),
        "continue_task": (False, False, False, True),
        "undo_merge": (False, True, False, False),
    }


@pytest.mark.parametrize("mode", MODES)
async def test_submit_follow_status_and_resources(server, repo, mode):
    async with Client(server, mode=mode) as client:
        t0 = time.monotonic()
        r = await client.call_tool("submit_task", {"repo": str(repo), "prompt": "say hi", "agents": ["fake"]})
        assert time.monotonic() - t0 < 2, "submit_task must not wait for the agents"
        assert not r.is_error, r.content
        task = Task.model_validate(r.structured_content)
        assert task.state in ("queued", "running") and task.agents == ["fake"]

        lines = await follow(client, task.task_id)
        assert any("fake agent got: say hi" in ln.text for ln in lines)
        assert [ln.seq for ln in lines] == list(range(1, len(lines) + 1))

        r = await client.call_tool("get_status", {"task_id": task.task_id})
        done = Task.model_validate(r.structured_content)
        assert done.state == "succeeded" and done.best == "fake"
        assert done.attempt("fake").files_changed == 1

        listed = TaskList.model_validate((await client.call_tool("list_tasks", {"repo": str(repo)})).structured_content)
        assert [t.task_id for t in listed.tasks] == [task.task_id]

        res = await client.read_resource(f"council://tasks/{task.task_id}")
        assert Task.model_validate_json(res.contents[0].text) == done
        assert res.contents[0].mime_type == "application/json"
        log = (await client.read_resource(f"council://tasks/{task.task_id}/logs")).contents[0].text
        assert "fake [stdout] fake agent got: say hi" in log
        assert git(repo, "status", "--porcelain") == "", "nothing touches the user's checkout before a merge"


@pytest.mark.parametrize("args, says", [
    ({"agents": ["nobody"]}, "unknown agent 'nobody'"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"base": "no-such-branch"}, "does not resolve to a commit"),
    ({"repo": "NOT_A_REPO"}, "is not a git repository"),
    ({"repo": "relative/path"}, "absolute path"),
    ({"tier": "huge"}, "tier"),
])
async def test_bad_input_is_an_error_result_and_changes_nothing(server, repo, tmp_path, args, says):
    plain = tmp_path / "plain"
    plain.mkdir()
    call = {"repo": str(repo), "prompt": "do it", "agents": ["fake"], **args}
    if call["repo"] == "NOT_A_REPO":
        call["repo"] = str(plain)
    async with Client(server) as client:
        r = await client.call_tool("submit_task", call)
        assert r.is_error and r.structured_content is None
        assert says in r.content[0].text
        assert (await client.call_tool("list_tasks", {})).structured_content == {"tasks": []}


async def test_a_repo_with_a_branch_named_council_is_refused_with_the_fix(server, repo):
    """git cannot make council/<task>/<agent> beside a branch named council: every attempt would fail."""
    git(repo, "branch", "council")
    async with Client(server) as client:
        r = await client.call_tool("submit_task", {"repo": str(repo), "prompt": "do it", "agents": ["fake"]})
        assert r.is_error and "branch named 'council'" in r.content[0].text
        assert "git branch -m council <new name>" in r.content[0].text
        assert (await client.call_tool("list_tasks", {})).structured_content == {"tasks": []}
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1


@pytest.mark.parametrize("tool, extra", [
    ("get_status", {}), ("stream_logs", {}), ("cancel_task", {}), ("merge_result", {}),
])
async def test_unknown_task_id_is_an_error_result(server, tool, extra):
    async with Client(server) as client:
        r = await client.call_tool(tool, {"task_id": "0123456789ab", **extra})
        assert r.is_error
        assert "no task '0123456789ab'" in r.content[0].text
        with pytest.raises(MCPError, match="no task"):
            await client.read_resource("council://tasks/0123456789ab")


async def test_internal_failure_is_an_error_result_and_the_server_lives_on(server, monkeypatch):
    async def broken(self, task_id):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Engine, "get", broken)
    async with Client(server) as client:
        r = await client.call_tool("get_status", {"task_id": "0123456789ab"})
        assert r.is_error
        assert "internal error in get_status: RuntimeError: disk on fire" in r.content[0].text
        assert not (await client.call_tool("list_tasks", {})).is_error


@pytest.mark.parametrize("mode", MODES)
async def test_waits_report_progress_and_are_capped(server, repo, monkeypatch, mode):
    monkeypatch.setattr(app, "PROGRESS_SLICE_S", 0.2)
    monkeypatch.setattr(app, "MAX_WAIT_S", 1.0)
    progress = []

    async def on_progress(value, total, message):
        progress.append((value, total, message))

    async with Client(server, mode=mode) as client:
        task = await client.call_tool("submit_task", {"repo": str(repo), "prompt": "wait", "agents": ["stuck"]})
        task_id = task.structured_content["task_id"]
        t0 = time.monotonic()
        r = await client.call_tool("get_status", {"task_id": task_id, "wait_s": 600}, progress_callback=on_progress)
        assert time.monotonic() - t0 < 5, "wait_s is capped"
        assert r.structured_content["state"] == "running"
        assert len(progress) >= 2
        assert [p[0] for p in progress] == sorted(p[0] for p in progress) and progress[0][1] == 1.0
        assert "stuck running" in progress[-1][2]

        progress.clear()  # a cursor past every line: nothing arrives, so stream_logs waits
        r = await client.call_tool("stream_logs", {"task_id": task_id, "cursor": 10**6, "wait_s": 600},
                                   progress_callback=on_progress)
        assert r.structured_content["lines"] == [] and not r.structured_content["done"]
        assert progress and "waiting for log lines" in progress[-1][2]

        r = await client.call_tool("cancel_task", {"task_id": task_id})
        assert r.structured_content["state"] == "cancelled"
        assert (await client.call_tool("cancel_task", {"task_id": task_id})).structured_content["state"] == "cancelled"


async def test_listen_gets_resource_updates(server, repo):
    """2026-07-28 clients: subscriptions/listen streams resource-updated events for the task."""
    async with Client(server) as client:
        r = await client.call_tool("submit_task", {"repo": str(repo), "prompt": "slowly", "agents": ["slow"]})
        uri = f"council://tasks/{r.structured_content['task_id']}"
        async with client.listen(resource_subscriptions=[uri, uri + "/logs"]) as sub:
            seen = set()
            with anyio.fail_after(20):
                async for event in sub:
                    seen.add(event.uri)
                    state = Task.model_validate_json((await client.read_resource(uri)).contents[0].text).state
                    if state == "succeeded" and seen == {uri, uri + "/logs"}:
                        break


async def test_resources_subscribe_gets_updates_on_older_protocol(server, repo):
    updated = []

    async def on_message(message):
        if isinstance(message, types.ResourceUpdatedNotification):
            updated.append(message.params.uri)

    async with Client(server, mode="legacy", message_handler=on_message) as client:
        assert client.server_capabilities.resources.subscribe
        r = await client.call_tool("submit_task", {"repo": str(repo), "prompt": "slowly", "agents": ["slow"]})
        uri = f"council://tasks/{r.structured_content['task_id']}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # resources/subscribe is deprecated in 2026-07-28, still what they use
            await client.subscribe_resource(uri)
            with pytest.raises(MCPError, match="no task"):
                await client.subscribe_resource("council://tasks/0123456789ab")
        with anyio.fail_after(20):
            while (await client.call_tool("get_status", {"task_id": uri.rsplit("/", 1)[1], "wait_s": 5})
                   ).structured_content["state"] != "succeeded":
                pass
            while uri not in updated:
                await anyio.sleep(0.05)


async def test_merge_result_brings_the_best_attempt_back(server, repo):
    async with Client(server) as client:
        r = await client.call_tool("submit_task", {"repo": str(repo), "prompt": "say hi", "agents": ["fake"]})
        task_id = r.structured_content["task_id"]
        await follow(client, task_id)
        dry = await client.call_tool("merge_result", {"task_id": task_id, "dry_run": True})
        assert not dry.is_error, dry.content
        assert dry.structured_content["merged"] is False and dry.structured_content["files"] == ["hello.txt"]
        assert not (repo / "hello.txt").exists()
        r = await client.call_tool("merge_result", {"task_id": task_id})
        assert not r.is_error, r.content
        assert r.structured_content["merged"] is True and r.structured_content["agent"] == "fake"
        assert (repo / "hello.txt").read_text() == "hi\n"
        bad = await client.call_tool("merge_result", {"task_id": task_id, "agent": "nobody"})
        assert bad.is_error


async def test_results_read_as_summaries_and_lists_stay_light(server, repo):
    async with Client(server) as client:
        r = await client.call_tool("submit_task", {"repo": str(repo), "prompt": "say hi\nwith details", "agents": ["fake"]})
        task_id = r.structured_content["task_id"]
        done = await client.call_tool("get_status", {"task_id": task_id, "wait_s": 30})
        listed = await client.call_tool("list_tasks", {})
    text = done.content[0].text
    assert text.startswith(f"task {task_id}  succeeded") and "best: fake" in text and not text.startswith("{")
    assert f"branch council/{task_id}/fake" in text
    summary = listed.structured_content["tasks"][0]
    assert summary["title"] == "say hi" and summary["attempts"] == [{"agent": "fake", "state": "succeeded"}]
    assert "prompt" not in summary and "best_reason" not in summary  # get_status has the whole task
    assert listed.content[0].text.startswith(task_id)
