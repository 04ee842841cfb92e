"""remove_attempt and gc in real git repos: no litter left, no unmerged work deleted."""

from __future__ import annotations

import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from engine.cleanup import gc, remove_attempt
from engine.merge import merge_branch
from engine.models import Attempt, AttemptState, Task, TaskState, now

ID = ["-c", "user.name=Agent", "-c", "user.email=agent@example.com", "-c", "commit.gpgsign=false"]


def g(cwd, *args) -> str:
    res = subprocess.run(["git", *ID, *args], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"git {args}: {res.stderr}"
    return res.stdout.strip()


def commit(cwd: Path, files: dict[str, str], msg: str = "change") -> None:
    for name, text in files.items():
        (cwd / name).write_text(text)
    g(cwd, "add", "-A")
    g(cwd, "commit", "-q", "-m", msg)


@pytest.fixture
def repo(tmp_path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    g(path, "init", "-q", "-b", "main")
    commit(path, {"a.txt": "a\n", "b.txt": "b\n"}, "initial")
    return path


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "council" / "worktrees"


def attempt(repo: Path, root: Path, tid: str, agent: str, files: dict[str, str]) -> tuple[str, Path]:
    branch, wt = f"council/{tid}/{agent}", root / tid / agent
    g(repo, "worktree", "add", "-q", "-b", branch, str(wt), "main")
    if files:
        commit(wt, files, f"{agent}'s attempt")
    return branch, wt


def branches(repo: Path) -> list[str]:
    return g(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/council/").splitlines()


def worktree_list(repo: Path) -> str:
    return g(repo, "worktree", "list", "--porcelain")


def task(repo: Path, root: Path, tid: str, state: TaskState, age: timedelta, agents: dict[str, AttemptState],
         base: str) -> Task:
    return Task(task_id=tid, repo=str(repo), base=base, into="main", prompt="p", timeout_s=60, state=state,
                finished_at=None if state in (TaskState.queued, TaskState.running) else now() - age,
                created_at=now() - age - timedelta(minutes=1),
                attempts=[Attempt(agent=a, state=s, branch=f"council/{tid}/{a}", worktree=str(root / tid / a))
                          for a, s in agents.items()])


@pytest.mark.parametrize("strategy", ["squash", "merge", "rebase"])
async def test_after_a_merge_nothing_of_the_task_remains(repo, root, strategy):
    base = g(repo, "rev-parse", "main")
    picked, picked_wt = attempt(repo, root, "t1", "claude", {"a.txt": "claude\n"})
    other, other_wt = attempt(repo, root, "t1", "gemini", {"b.txt": "gemini\n"})
    commit(repo, {"b.txt": "user moved main\n"})
    res = await merge_branch(repo, branch=picked, base=base, into="main", strategy=strategy,
                             message="council t1", task_id="t1")
    assert res.merged

    kept = await remove_attempt(repo, root=root, worktree=picked_wt, branch=picked, into="main", base=base)
    dropped = await remove_attempt(repo, root=root, worktree=other_wt, branch=other, discard=True)

    assert kept.removed == [str(picked_wt.resolve()), picked] and kept.kept == []
    assert dropped.removed == [str(other_wt.resolve()), other]
    assert branches(repo) == [] and "council" not in worktree_list(repo)
    assert not (root / "t1").exists() and root.exists()
    assert (repo / "a.txt").read_text() == "claude\n"


async def test_unmerged_work_is_kept_unless_discarded(repo, root):
    branch, wt = attempt(repo, root, "t1", "claude", {"a.txt": "unmerged work\n"})

    report = await remove_attempt(repo, root=root, worktree=wt, branch=branch, into="main")

    assert report.removed == [str(wt.resolve())] and not wt.exists()
    assert branches(repo) == [branch] and "not in main" in report.kept[0]
    assert (await remove_attempt(repo, root=root, branch=branch, discard=True)).removed == [branch]


async def test_attempt_without_changes_goes_without_discard(repo, root):
    branch, wt = attempt(repo, root, "t1", "ollama", {})
    report = await remove_attempt(repo, root=root, worktree=wt, branch=branch)
    assert report.removed == [str(wt.resolve()), branch] and branches(repo) == []


async def test_a_running_attempt_is_never_removed(repo, root):
    branch, wt = attempt(repo, root, "t1", "claude", {"a.txt": "x\n"})
    (wt / "in-progress.txt").write_text("agent still typing\n")

    report = await remove_attempt(repo, root=root, worktree=wt, branch=branch, discard=True, running=True)

    assert report.removed == [] and len(report.kept) == 2
    assert (wt / "in-progress.txt").exists() and branches(repo) == [branch] and str(wt) in worktree_list(repo)


async def test_nothing_outside_the_root_is_deleted(repo, root, tmp_path):
    outside = tmp_path / "elsewhere"
    g(repo, "worktree", "add", "-q", "-b", "council/t1/x", str(outside), "main")
    report = await remove_attempt(repo, root=root, worktree=outside)
    assert outside.exists() and report.removed == [] and "outside" in report.kept[0]
    report = await remove_attempt(repo, root=root, worktree=root / ".." / "..")
    assert report.removed == [] and (tmp_path / "repo").exists()


async def test_leftover_directory_and_stale_registration_are_cleared(repo, root):
    branch, wt = attempt(repo, root, "t1", "claude", {})
    (wt / ".git").unlink()  # a half-broken worktree: git no longer recognises the directory
    report = await remove_attempt(repo, root=root, worktree=wt, branch=branch)
    assert not wt.exists() and "council" not in worktree_list(repo) and branches(repo) == []
    assert report.removed == [str(wt.resolve()), branch]


async def test_gc(repo, root, tmp_path):
    base = g(repo, "rev-parse", "main")
    old, young = timedelta(days=10), timedelta(minutes=5)
    # t-merged: claude's attempt was squashed into main; gemini's was not picked.
    attempt(repo, root, "t-merged", "claude", {"a.txt": "claude\n"})
    attempt(repo, root, "t-merged", "gemini", {"a.txt": "gemini\n"})
    res = await merge_branch(repo, branch="council/t-merged/claude", base=base, into="main", message="m",
                             task_id="t-merged")
    assert res.merged
    attempt(repo, root, "t-young", "claude", {"b.txt": "young\n"})
    attempt(repo, root, "t-running", "claude", {"b.txt": "running\n"})
    attempt(repo, root, "t-old", "claude", {"b.txt": "old but never merged\n"})
    attempt(repo, root, "t-old", "ollama", {})
    attempt(repo, root, "t-busy", "claude", {"b.txt": "busy\n"})
    attempt(repo, root, "ghost", "claude", {"b.txt": "unknown task's work\n"})
    attempt(repo, root, "ghost2", "claude", {})
    g(repo, "worktree", "remove", str(root / "ghost" / "claude"))
    g(repo, "worktree", "remove", str(root / "ghost2" / "claude"))
    _, stray = attempt(repo, root, "ghost3", "claude", {})
    _, dirty = attempt(repo, root, "ghost4", "claude", {})
    (dirty / "notes.txt").write_text("uncommitted\n")
    junk = root / "junk" / "x"
    junk.mkdir(parents=True)
    (junk / "file").write_text("not a worktree\n")
    for path in (stray, dirty, junk):
        os.utime(path, (0, 0))
    s = AttemptState
    tasks = [
        task(repo, root, "t-merged", TaskState.merged, old, {"claude": s.succeeded, "gemini": s.succeeded}, base),
        task(repo, root, "t-young", TaskState.succeeded, young, {"claude": s.succeeded}, base),
        task(repo, root, "t-running", TaskState.running, young, {"claude": s.running}, base),
        task(repo, root, "t-old", TaskState.failed, old, {"claude": s.failed, "ollama": s.failed}, base),
        task(repo, root, "t-busy", TaskState.succeeded, old, {"claude": s.succeeded}, base),
    ]

    report = await gc(root, tasks, age_s=timedelta(days=1).total_seconds(), busy=[root / "t-busy" / "claude"])

    assert sorted(branches(repo)) == ["council/ghost/claude", "council/ghost4/claude", "council/t-busy/claude",
                                      "council/t-old/claude", "council/t-running/claude", "council/t-young/claude"]
    left = sorted(str(p.relative_to(root)) for p in root.glob("*/*"))
    assert left == ["ghost4/claude", "t-busy/claude", "t-running/claude", "t-young/claude"]
    assert sorted(p.name for p in root.iterdir()) == ["ghost4", "t-busy", "t-running", "t-young"]
    listed = worktree_list(repo)
    assert "t-merged" not in listed and "t-old" not in listed and "ghost3" not in listed
    for item in ("council/t-merged/claude", "council/t-merged/gemini", "council/t-old/ollama",
                 "council/ghost2/claude", "council/ghost3/claude", str(junk.resolve()), str(stray.resolve())):
        assert item in report.removed, item
    kept = "\n".join(report.kept)
    for reason in ("council/ghost/claude: has work in no other branch", "council/t-old/claude: has work not in main",
                   "task t-running: still running", "task t-young: finished less than", "ghost4/claude: uncommitted changes (notes.txt)", "t-busy/claude: its agent is still running"):
        assert reason in kept, reason
    assert (dirty / "notes.txt").exists()


async def test_gc_with_the_repo_gone_clears_its_worktrees(repo, root, tmp_path):
    base = g(repo, "rev-parse", "main")
    attempt(repo, root, "t1", "claude", {"a.txt": "x\n"})
    gone = tmp_path / "moved-away"
    repo.rename(gone)
    t = task(repo, root, "t1", TaskState.succeeded, timedelta(days=3), {"claude": AttemptState.succeeded}, base)
    report = await gc(root, [t], age_s=3600)
    assert report.removed == [str((root / "t1" / "claude").resolve())] and list(root.iterdir()) == []
