"""continue_task: a follow-up round of a finished attempt, in its worktree, branch and session."""

from __future__ import annotations

import json
import math
import os
import sys

import anyio
import pytest
from mcp import Client

from engine.config import parse_config
from engine.engine import Engine
from engine.inputs import CouncilError
from engine.models import ACTIVE_TASK, Attempt, AttemptState, Task, TaskState
from server.app import build_server

from conftest import FAKES, git
from fakes.ollama_http import MODEL, OllamaStandin
from test_cli import cli, write_config

SESSION = "33f10894-2508-4607-a4ab-55f2726bfd60"  # the session id in the recorded claude-success run


def recording(kind: str, log, fixture: str, **env: str) -> dict:
    """An agent of `kind` whose CLI records each run's argv and stdin in `log`, then replays `fixture`."""
    return {"kind": kind, "command": [sys.executable, str(FAKES / "recording.py")],
            "env": {"RECORD_LOG": str(log), "FAKE_FIXTURE": fixture, "ANTHROPIC_API_KEY": "sk-ant-test-0000000000",
                    "GEMINI_API_KEY": "gm-test-0000000000", **env}}


def python_agent() -> dict:
    """A command agent that runs its prompt as Python in the worktree: each round does what it is told."""
    return {"kind": "command", "argv": [sys.executable, "-c", "import sys; exec(sys.argv[1])", "{prompt}"]}


def runs(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


async def texts(engine: Engine, task_id: str) -> list[str]:
    return [line.text for line in (await engine.logs(task_id, limit=5000)).lines]


async def test_claude_round_resumes_its_session_on_the_same_branch(make_engine, repo, tmp_path):
    log = tmp_path / "runs.jsonl"
    agents = {"claude": recording("claude", log, "claude-success", FAKE_WRITE="hello{n}.txt")}
    async with make_engine(agents) as engine:
        first = await engine.wait((await engine.submit(str(repo), "write hello", agents=["claude"])).task_id, 60)
        assert first.state == TaskState.succeeded and first.attempt("claude").rounds == 1
        started = await engine.continue_task(first.task_id, "claude", "now also handle the empty case")
        assert started.state in ACTIVE_TASK and started.attempt("claude").rounds == 2  # returned at once
        task = await engine.wait(first.task_id, 60)
        lines = await texts(engine, task.task_id)
    a = task.attempt("claude")
    assert task.state == TaskState.succeeded and task.best == "claude" and a.state == AttemptState.succeeded
    assert a.rounds == 2 and [r.prompt for r in a.history] == ["write hello", "now also handle the empty case"]
    assert a.history[0].summary and a.history[1].summary == a.summary
    second = runs(log)[1]["argv"]
    assert second[second.index("--resume") + 1] == SESSION and second[second.index("-p") + 1] == (
        "now also handle the empty case")
    assert "--resume" not in runs(log)[0]["argv"]
    assert a.branch == first.attempt("claude").branch and a.worktree == first.attempt("claude").worktree
    assert git(repo, "show", f"{a.branch}:hello1.txt") == git(repo, "show", f"{a.branch}:hello2.txt")
    assert git(repo, "rev-list", "--count", f"{task.base}..{a.branch}") == "2"
    assert "round 2" in git(repo, "log", "-1", "--format=%s", a.branch)
    marker = [i for i, t in enumerate(lines) if t.startswith("round 2 of claude: now also handle")]
    assert len(marker) == 1 and any("running:" in t for t in lines[marker[0]:])  # the round's lines follow it
    assert a.files_changed == 2 and a.cost_usd > first.attempt("claude").cost_usd  # costs add up over rounds


async def test_gemini_gets_the_earlier_rounds_retold(make_engine, repo, tmp_path):
    log = tmp_path / "runs.jsonl"
    async with make_engine({"gemini": recording("gemini", log, "gemini-success", FAKE_WRITE="g{n}.txt")}) as engine:
        task = await engine.wait((await engine.submit(str(repo), "first ask", agents=["gemini"])).task_id, 60)
        await engine.continue_task(task.task_id, "gemini", "second ask")
        task = await engine.wait(task.task_id, 60)
    assert task.attempt("gemini").rounds == 2 and task.state == TaskState.succeeded
    prompt = runs(log)[1]["argv"][1]
    assert "first ask" in prompt and prompt.index("first ask") < prompt.index("second ask")


async def test_command_agent_gets_the_new_prompt_and_a_new_check(make_engine, repo):
    async with make_engine({"py": python_agent()}) as engine:
        task = await engine.submit(str(repo), "open('a.txt', 'w').write('a')", agents=["py"], check="test -f a.txt")
        task = await engine.wait(task.task_id, 60)
        assert task.attempt("py").check.passed
        await engine.continue_task(task.task_id, "py", "open('b.txt', 'w').write('b')", check="test -f c.txt")
        task = await engine.wait(task.task_id, 60)
        lines = await texts(engine, task.task_id)
    a = task.attempt("py")
    assert a.rounds == 2 and a.check.command == "test -f c.txt" and not a.check.passed
    assert a.state == AttemptState.failed and a.error.kind == "check_failed" and task.state == TaskState.failed
    assert task.check == "test -f c.txt" and a.history[1].check == "test -f c.txt"
    assert any(t.startswith("running:") for t in lines)
    assert git(repo, "show", f"{a.branch}:b.txt") == "b" and git(repo, "show", f"{a.branch}:a.txt") == "a"


async def test_local_model_gets_the_earlier_exchange(make_engine, repo):
    with OllamaStandin() as ollama:
        ollama.server.answers += ["I wrote it.\n\nnotes.txt\n```\none\n```\n", "Added two.\n\nnotes.txt\n```\none\ntwo\n```\n"]
        async with make_engine({"ollama": {"kind": "ollama", "base_url": ollama.url, "model": MODEL}}) as engine:
            task = await engine.wait((await engine.submit(str(repo), "create notes.txt saying one",
                                                          agents=["ollama"])).task_id, 60)
            assert task.state == TaskState.succeeded, task
            await engine.continue_task(task.task_id, "ollama", "add a line two to notes.txt")
            task = await engine.wait(task.task_id, 60)
        chats = ollama.server.chats
    assert task.state == TaskState.succeeded and task.attempt("ollama").rounds == 2
    roles = [(m["role"], m["content"]) for m in chats[-1]["messages"]]
    assert roles[1] == ("user", "Task:\ncreate notes.txt saying one")
    assert roles[2][0] == "assistant" and "I wrote it." in roles[2][1]
    assert roles[-1][0] == "user" and "add a line two" in roles[-1][1]
    assert git(repo, "show", f"{task.attempt('ollama').branch}:notes.txt") == "one\ntwo"


async def snapshot(engine: Engine, repo, task_id: str) -> tuple:
    # The warm pool refills in the background after a task: its entries come and go on their own (one
    # half made shows in `worktree list` as "locked initializing"), not because of a refusal.
    with anyio.fail_after(60):
        while engine.pool.filling((await engine.store.get_task(task_id)).repo):
            await anyio.sleep(0.05)
    stored = (await engine.store.get_task(task_id)).model_dump_json()
    return stored, git(repo, "for-each-ref"), git(repo, "worktree", "list", "--porcelain")


async def test_refusals_change_nothing(make_engine, repo):
    async with make_engine({"py": python_agent(), "other": python_agent()}) as engine:
        task = await engine.wait((await engine.submit(str(repo), "open('a.txt', 'w').write('a')",
                                                      agents=["py"])).task_id, 60)
        before = await snapshot(engine, repo, task.task_id)
        bad = [dict(agent="nobody", prompt="x"), dict(agent="other", prompt="x"), dict(agent="py", prompt=""),
               dict(agent="py", prompt="   "), dict(agent="py", prompt="a\0b"), dict(agent="py", prompt=7),
               dict(agent="py", prompt="x", timeout_s=0), dict(agent="py", prompt="x", timeout_s=-1),
               dict(agent="py", prompt="x", timeout_s=math.nan), dict(agent="py", prompt="x", timeout_s="9"),
               dict(agent="py", prompt="x", check="'unbalanced"), dict(agent="py", prompt="x", check="")]
        for args in bad:
            with pytest.raises(CouncilError):
                await engine.continue_task(task.task_id, **args)
        with pytest.raises(CouncilError, match="no task"):
            await engine.continue_task("0" * 12, "py", "x")
        assert await snapshot(engine, repo, task.task_id) == before

        # while a round runs, another is refused
        await engine.continue_task(task.task_id, "py", "import time; time.sleep(60)")
        with pytest.raises(CouncilError, match="still running"):
            await engine.continue_task(task.task_id, "py", "x")
        task = await engine.cancel(task.task_id)
        assert task.state == TaskState.cancelled and task.attempt("py").state == AttemptState.cancelled

        # merged: refused, the merge said so
        await engine.continue_task(task.task_id, "py", "open('b.txt', 'w').write('b')")
        task = await engine.wait(task.task_id, 60)
        assert task.state == TaskState.succeeded, task
        merged = await engine.merge(task.task_id)
        assert merged.merged
        before = await snapshot(engine, repo, task.task_id)
        with pytest.raises(CouncilError, match="undo the merge first"):
            await engine.continue_task(task.task_id, "py", "x")
        assert await snapshot(engine, repo, task.task_id) == before
        # undone, but the merge's cleanup removed the worktree: refused, saying so
        assert (await engine.undo_merge(task.task_id)).commit
        with pytest.raises(CouncilError, match="was removed"):
            await engine.continue_task(task.task_id, "py", "x")


async def test_a_round_in_flight_when_the_host_stops_is_interrupted_and_can_continue(make_engine, repo, council_home):
    agents = {"py": python_agent()}
    async with make_engine(agents) as engine:
        task = await engine.wait((await engine.submit(str(repo), "open('a.txt', 'w').write('a')",
                                                      agents=["py"])).task_id, 60)
        await engine.continue_task(task.task_id, "py", "import time; print('sleeping', flush=True); time.sleep(60)")
        while "sleeping" not in await texts(engine, task.task_id):
            await engine.logs(task.task_id, cursor=0, wait_s=1)
    async with make_engine(agents) as engine:
        task = await engine.get(task.task_id)
        assert task.state == TaskState.interrupted and task.attempt("py").state == AttemptState.interrupted
        await engine.continue_task(task.task_id, "py", "open('b.txt', 'w').write('b')")
        task = await engine.wait(task.task_id, 60)
    a = task.attempt("py")
    assert task.state == TaskState.succeeded and a.rounds == 3 and a.files_changed == 2


def test_a_stored_attempt_without_rounds_reads_as_one_round():
    a = Attempt.model_validate_json('{"agent": "claude", "state": "succeeded"}')
    assert a.rounds == 1 and a.history == []


def test_cli_continue_and_undo(repo, tmp_path):
    """`cli-council continue` hosts the round in the foreground; `undo` takes a merge back."""
    write_config(tmp_path / "config.toml", {"py": python_agent()})
    assert os.environ["CLI_COUNCIL_CONFIG"] == str(tmp_path / "config.toml")
    task = json.loads(cli("run", "--repo", str(repo), "--agents", "py", "--json",
                          "open('a.txt', 'w').write('a')").stdout)
    done = cli("continue", task["task_id"], "--agent", "py", "--json", "open('b.txt', 'w').write('b')")
    assert "round 2 of py" in done.stderr
    task = json.loads(done.stdout)
    assert task["state"] == "succeeded" and task["attempts"][0]["rounds"] == 2
    refused = cli("continue", task["task_id"], "--agent", "nobody", "x", check_code=2)
    assert "no attempt by 'nobody'" in refused.stderr
    cli("merge", task["task_id"])
    assert (repo / "b.txt").exists()
    undone = cli("undo", task["task_id"])
    assert "undid the merge" in undone.stdout and not (repo / "b.txt").exists()
    assert cli("undo", task["task_id"], check_code=2).stderr.startswith("error: ")
    assert git(repo, "status", "--porcelain") == ""


async def test_mcp_continue_task_and_undo_merge(repo, council_home):
    cfg = parse_config({"engine": {"kill_grace_s": 1}, "agents": {"py": python_agent()}})
    async with Client(build_server(config=cfg, home=council_home)) as client:
        async def call(name: str, **args) -> dict:
            r = await client.call_tool(name, args)
            assert not r.is_error, r.content
            return r.structured_content

        task = await call("submit_task", repo=str(repo), prompt="open('a.txt', 'w').write('a')", agents=["py"])
        await call("get_status", task_id=task["task_id"], wait_s=30)
        started = Task.model_validate(await call("continue_task", task_id=task["task_id"], agent="py",
                                                 prompt="open('b.txt', 'w').write('b')", timeout_s=30))
        assert started.attempt("py").rounds == 2
        done = Task.model_validate(await call("get_status", task_id=task["task_id"], wait_s=30))
        assert done.state == TaskState.succeeded and done.attempt("py").history[1].timeout_s == 30
        assert (await call("merge_result", task_id=task["task_id"]))["merged"]
        undone = await call("undo_merge", task_id=task["task_id"])
        assert undone["commit"] == done.base and undone["backup_ref"].startswith("refs/council/undone/")
        refused = await client.call_tool("undo_merge", {"task_id": task["task_id"]})
        assert refused.is_error and "not merged" in refused.content[0].text


async def test_a_retold_history_too_long_for_one_argument_is_refused(make_engine, repo, tmp_path):
    log = tmp_path / "runs.jsonl"
    async with make_engine({"gemini": recording("gemini", log, "gemini-success", FAKE_WRITE="g{n}.txt")}) as engine:
        task = await engine.wait((await engine.submit(str(repo), "a" * 70_000, agents=["gemini"])).task_id, 60)
        before = await snapshot(engine, repo, task.task_id)
        with pytest.raises(CouncilError, match="too long for gemini"):
            await engine.continue_task(task.task_id, "gemini", "b" * 70_000)
        assert await snapshot(engine, repo, task.task_id) == before and len(runs(log)) == 1
