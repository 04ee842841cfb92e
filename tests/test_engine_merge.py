"""Merging a finished task through the engine, and gc, in real repos."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from engine.engine import CouncilError
from engine.models import TaskState

from conftest import fake, git
from test_cli import cli, write_config


async def finished(engine, repo, agents, **kw):
    task = await engine.submit(str(repo), kw.pop("prompt", "Fix add\n\nadd must add."), agents=agents, **kw)
    return await engine.wait(task.task_id, 60)


AGENTS = {"right": fake("--write", "app.py=def add(a, b):\n    return a + b"),
          "other": fake("--write", "notes.txt=unpicked work")}


@pytest.mark.parametrize("strategy", ["squash", "merge", "rebase"])
async def test_merge_lands_the_best_attempt_and_cleans_up(make_engine, repo, strategy, council_home):
    old_tip = git(repo, "rev-parse", "main")
    async with make_engine(AGENTS) as engine:
        task = await finished(engine, repo, ["right", "other"],
                              check="python3 -c \"from app import add; assert add(2, 3) == 5\"")
        assert task.best == "right"
        result = await engine.merge(task.task_id, strategy=strategy)
        after = await engine.get(task.task_id)
    assert result.merged and result.agent == "right" and result.into == "main", result.message
    assert result.files == ["app.py"] and result.commit == git(repo, "rev-parse", "main")
    assert (repo / "app.py").read_text() == "def add(a, b):\n    return a + b\n", "checked out: tree updated too"
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "rev-parse", f"refs/council/backup/{task.task_id}") == old_tip
    if strategy != "rebase":
        assert "Fix add" in git(repo, "log", "-1", "--format=%B") and task.task_id in git(repo, "log", "-1", "--format=%B")
    assert after.state == TaskState.merged and after.merge_commit == result.commit
    # nothing of the task is left: no worktree dir, no branch, no `git worktree list` entry
    assert git(repo, "branch", "--list", f"council/{task.task_id}/*") == ""
    assert task.task_id not in git(repo, "worktree", "list")
    assert not (council_home / "worktrees" / task.task_id).exists()
    assert len(result.removed) == 4  # two worktrees and two branches
    assert list((council_home / "worktrees" / ".trash").iterdir()) == []  # their files deleted by the time it stopped


async def test_dry_run_reports_and_changes_nothing(make_engine, repo):
    async with make_engine(AGENTS) as engine:
        task = await finished(engine, repo, ["right"])
        refs = git(repo, "for-each-ref")
        result = await engine.merge(task.task_id, dry_run=True)
        assert not result.merged and result.dry_run and result.files == ["app.py"] and result.insertions == 1
        assert git(repo, "for-each-ref") == refs and (await engine.get(task.task_id)).state == TaskState.succeeded


async def test_a_bad_target_is_bad_input_whatever_else_is_wrong(make_engine, repo):
    """The target's check is asked within the merge's first git round; a bad one is still said as an
    error before any refusal, and a target named as a full ref is stored under its branch name."""
    async with make_engine({**AGENTS, "empty": fake()}) as engine:
        empty = await finished(engine, repo, ["empty"])  # no changes: a refusal, were the target fine
        for into in ("main~1", "nope", "council/x/y"):
            with pytest.raises(CouncilError):
                await engine.merge(empty.task_id, into=into)
            task = await finished(engine, repo, ["right"])
            refs = git(repo, "for-each-ref")
            with pytest.raises(CouncilError):
                await engine.merge(task.task_id, into=into)
            assert git(repo, "for-each-ref") == refs
        assert not (await engine.merge(empty.task_id)).merged
        result = await engine.merge(task.task_id, into="refs/heads/main")
        assert result.merged and result.into == "main" and (await engine.get(task.task_id)).merge_into == "main"


async def test_dirty_checkout_is_refused_with_nothing_changed(make_engine, repo):
    async with make_engine(AGENTS) as engine:
        task = await finished(engine, repo, ["right"])
        (repo / "app.py").write_text("my unsaved work\n")
        refs = git(repo, "for-each-ref")
        result = await engine.merge(task.task_id)
        assert not result.merged and "uncommitted" in result.message
        assert (repo / "app.py").read_text() == "my unsaved work\n" and git(repo, "for-each-ref") == refs
        assert Path((await engine.get(task.task_id)).attempts[0].worktree).is_dir()


async def test_merge_refuses_bad_requests(make_engine, repo):
    async with make_engine({**AGENTS, "slow": fake("--sleep", "30")}) as engine:
        task = await finished(engine, repo, ["right"])
        with pytest.raises(CouncilError, match="no attempt by 'ghost'"):
            await engine.merge(task.task_id, agent="ghost")
        with pytest.raises(CouncilError, match="unknown strategy"):
            await engine.merge(task.task_id, strategy="octopus")
        with pytest.raises(CouncilError, match="no task"):
            await engine.merge("nope")
        running = await engine.submit(str(repo), "wait", agents=["slow"])
        with pytest.raises(CouncilError, match="still"):
            await engine.merge(running.task_id)
        await engine.cancel(running.task_id)
        none = await finished(engine, repo, ["slow"], timeout_s=0.5)
        result = await engine.merge(none.task_id)
        assert not result.merged and "no attempt to merge" in result.message


async def test_gc_never_removes_a_running_attempt(make_engine, repo, council_home):
    async with make_engine({**AGENTS, "slow": fake("--sleep", "30", "--write", "s.txt=1")}) as engine:
        done = await finished(engine, repo, ["other"])
        running = await engine.submit(str(repo), "wait", agents=["slow"])
        with anyio.fail_after(10):
            while (await engine.get(running.task_id)).attempts[0].worktree is None:
                await anyio.sleep(0.05)
        report = await engine.gc(older_than_s=0)
        live = Path((await engine.get(running.task_id)).attempts[0].worktree)
        assert live.is_dir(), report
        assert not Path(done.attempts[0].worktree).exists()
        assert any(done.task_id in r for r in report.removed)
        # an unmerged branch of a finished, unmerged task is kept: gc never deletes work silently
        assert git(repo, "branch", "--list", f"council/{done.task_id}/other")
        await engine.cancel(running.task_id)


def test_cli_merge_json(repo):
    write_config(Path(os.environ["CLI_COUNCIL_CONFIG"]), {"right": AGENTS["right"]})
    task = json.loads(cli("run", "--repo", str(repo), "--agents", "right", "--json", "fix add").stdout)
    dry = json.loads(cli("merge", task["task_id"], "--dry-run", "--json").stdout)
    assert dry["dry_run"] and not dry["merged"]
    merged = json.loads(cli("merge", task["task_id"], "--strategy", "merge", "--json").stdout)
    assert merged["merged"] and merged["commit"] == git(repo, "rev-parse", "main")
    assert json.loads(cli("status", task["task_id"], "--json").stdout)["state"] == "merged"
    assert cli("gc", "--json").returncode == 0
