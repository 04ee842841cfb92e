"""remove_attempt and gc in real git repos: no litter left, no unmerged work deleted."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from engine.cleanup import gc, remove_attempt
from engine.merge import merge_branch
from engine.models import Attempt, AttemptState, CheckResult, Task, TaskState, now

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
                   "task t-running: still running", "task t-young: finished less than",
                   "ghost4/claude: uncommitted changes (notes.txt)", "t-busy/claude: its agent is still running"):
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


def dirty_tracked(wt: Path) -> str:
    (wt / "a.txt").write_text("agent's unsaved edit\n")
    return "a.txt"


def dirty_untracked(wt: Path) -> str:
    (wt / "deep" / "er").mkdir(parents=True)
    (wt / "deep" / "er" / "new.txt").write_text("agent's new file\n")
    return "deep/er/new.txt"


def dirty_staged(wt: Path) -> str:
    (wt / "staged.txt").write_text("staged\n")
    g(wt, "add", "staged.txt")
    return "staged.txt"


def dirty_deleted(wt: Path) -> str:
    (wt / "b.txt").unlink()
    return "b.txt"


@pytest.mark.parametrize("make_dirty", [dirty_tracked, dirty_untracked, dirty_staged, dirty_deleted])
async def test_uncommitted_work_keeps_the_worktree_and_its_branch(repo, root, make_dirty):
    """An attempt whose agent was killed before the council committed: discarding the attempt
    does not discard what it never saw."""
    branch, wt = attempt(repo, root, "t1", "claude", {"c.txt": "committed part\n"})
    path = make_dirty(wt)
    before = g(wt, "status", "--porcelain", "--untracked-files=all")

    report = await remove_attempt(repo, root=root, worktree=wt, branch=branch, discard=True)

    assert report.removed == [] and wt.is_dir() and branches(repo) == [branch]
    assert g(wt, "status", "--porcelain", "--untracked-files=all") == before
    why = report.kept[0]
    assert f"uncommitted changes ({path})" in why and f"git -C {wt.resolve()} status" in why
    assert f"worktree remove --force {wt.resolve()}" in why and "commit" in why
    assert report.kept[1] == f"{branch}: stays with its worktree {wt}"

    g(wt, "add", "-A")
    g(wt, "commit", "-q", "-m", "saved")
    report = await remove_attempt(repo, root=root, worktree=wt, branch=branch, into="main")
    assert report.removed == [str(wt.resolve())] and branches(repo) == [branch], "the branch holds the work now"


async def test_scratch_dirs_and_ignored_files_are_not_work(repo, root):
    commit(repo, {".gitignore": "build/\n"})
    branch, wt = attempt(repo, root, "t1", "claude", {"a.txt": "done\n"})
    (wt / ".auto-claude").mkdir()
    (wt / ".auto-claude" / "spec.md").write_text("auto-claude's notes\n")
    (wt / "build").mkdir()
    (wt / "build" / "out.bin").write_text("artifact\n")
    report = await remove_attempt(repo, root=root, worktree=wt, branch=branch, into="main")
    assert report.removed == [str(wt.resolve())] and not wt.exists()


async def test_commits_on_no_branch_keep_the_worktree(repo, root):
    branch, wt = attempt(repo, root, "t1", "claude", {})
    g(wt, "checkout", "-q", "--detach")
    commit(wt, {"a.txt": "committed on a detached HEAD\n"})
    report = await remove_attempt(repo, root=root, worktree=wt, branch=branch, discard=True)
    assert wt.is_dir() and "commits on no branch (detached HEAD at" in report.kept[0]
    g(wt, "branch", "keep-it")
    report = await remove_attempt(repo, root=root, worktree=wt, branch=branch, discard=True)
    assert report.removed == [str(wt.resolve()), branch] and g(repo, "show", "keep-it:a.txt") == "committed on a detached HEAD"


async def test_gc_keeps_an_interrupted_attempts_uncommitted_work(repo, root):
    base = g(repo, "rev-parse", "main")
    branch, wt = attempt(repo, root, "t1", "claude", {})
    (wt / "a.txt").write_text("half-done work of a killed agent\n")
    (wt / "new.txt").write_text("new\n")
    t = task(repo, root, "t1", TaskState.interrupted, timedelta(days=3), {"claude": AttemptState.interrupted}, base)

    report = await gc(root, [t], age_s=3600)

    assert report.removed == [] and (wt / "a.txt").read_text() == "half-done work of a killed agent\n"
    assert "uncommitted changes (a.txt, new.txt)" in report.kept[0] and branches(repo) == [branch]
    assert str(wt) in worktree_list(repo)


async def test_the_checks_output_is_not_work_but_later_edits_are(repo, root):
    """The council commits the agent's work, then runs the check: what the check leaves before
    the attempt finishes goes; what someone changes in the kept worktree afterwards stays."""
    base = g(repo, "rev-parse", "main")
    tasks, worktrees = [], {}
    for tid in ("t-check", "t-edited"):
        _, wt = attempt(repo, root, tid, "claude", {"a.txt": f"{tid}\n"})
        (wt / "__pycache__").mkdir()
        (wt / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0bytecode")
        (wt / "b.txt").write_text("rewritten by the check\n")
        t = task(repo, root, tid, TaskState.succeeded, timedelta(days=3), {"claude": AttemptState.succeeded}, base)
        t.attempts[0].check = CheckResult(command="pytest", passed=True, exit_code=0)
        t.attempts[0].finished_at = now() - timedelta(days=3)
        for path in ("__pycache__/app.cpython-311.pyc", "b.txt"):
            os.utime(wt / path, (t.attempts[0].finished_at.timestamp() - 5,) * 2)
        tasks.append(t)
        worktrees[tid] = wt
    (worktrees["t-edited"] / "notes.txt").write_text("the user's notes, written after the attempt\n")

    report = await gc(root, tasks, age_s=3600)

    assert not worktrees["t-check"].exists() and str(worktrees["t-check"].resolve()) in report.removed
    assert (worktrees["t-edited"] / "notes.txt").exists()
    assert any("uncommitted changes (notes.txt)" in k for k in report.kept), report.kept


async def test_gc_survives_broken_surroundings_and_goes_on(repo, root, tmp_path):
    base = g(repo, "rev-parse", "main")
    age = timedelta(days=3)
    # a repo that is no longer a git repo: a finished attempt's worktree is litter, an interrupted one is kept
    broken = tmp_path / "broken"
    broken.mkdir()
    g(broken, "init", "-q", "-b", "main")
    commit(broken, {"a.txt": "a\n"})
    _, litter = attempt(broken, root, "t-broken", "claude", {"a.txt": "x\n"})
    _, interrupted = attempt(broken, root, "t-broken", "gemini", {})
    (interrupted / "unsaved.txt").write_text("only copy\n")
    shutil.rmtree(broken / ".git")
    # a recorded worktree deleted by hand; its branch holds unmerged work
    handmade, gone_wt = attempt(repo, root, "t-hand", "claude", {"a.txt": "hand\n"})
    shutil.rmtree(gone_wt)
    # a merged task whose unpicked branch the user checked out in a worktree of their own
    elsewhere, _ = attempt(repo, root, "t-else", "claude", {"b.txt": "else\n"})
    g(repo, "worktree", "remove", str(root / "t-else" / "claude"))
    g(repo, "worktree", "add", "-q", str(tmp_path / "inspect"), elsewhere)
    # a branch whose tip commit object is missing (an interrupted copy, a broken disk): git fails
    corrupt, corrupt_wt = attempt(repo, root, "t-corrupt", "claude", {"c.txt": "c\n"})
    tip = g(repo, "rev-parse", corrupt)
    (repo / ".git" / "objects" / tip[:2] / tip[2:]).unlink()
    # and an ordinary finished task that must still be cleaned up
    _, plain = attempt(repo, root, "t-plain", "claude", {})
    s = AttemptState
    tasks = [
        task(broken, root, "t-broken", TaskState.failed, age, {"claude": s.failed, "gemini": s.interrupted}, base),
        task(repo, root, "t-hand", TaskState.failed, age, {"claude": s.failed}, base),
        task(repo, root, "t-else", TaskState.merged, age, {"claude": s.succeeded}, base),
        task(repo, root, "t-corrupt", TaskState.failed, age, {"claude": s.failed}, base),
        task(repo, root, "t-plain", TaskState.failed, age, {"claude": s.failed}, base),
    ]

    report = await gc(root, tasks, age_s=3600)

    kept = "\n".join(report.kept)
    assert not litter.exists() and str(litter.resolve()) in report.removed
    assert (interrupted / "unsaved.txt").exists() and f"{interrupted}: its repo {broken} is gone" in kept
    assert "t-hand" not in worktree_list(repo) and "council/t-hand/claude: has work not in main" in kept
    assert (tmp_path / "inspect" / "b.txt").read_text() == "else\n" and f"{elsewhere}: " in kept
    assert corrupt_wt.is_dir() and f"{corrupt_wt}: kept, could not check it: fatal: bad object HEAD" in kept  # can't tell what it holds: kept
    assert not plain.exists() and "council/t-plain/claude" in report.removed
    assert sorted(branches(repo)) == [corrupt, elsewhere, handmade]


async def test_a_deferred_removal_moves_the_worktree_away_and_leaves_its_files_to_the_caller(repo, root):
    branch, wt = attempt(repo, root, "t9", "claude", {"a.txt": "claude\n"})
    later = []
    report = await remove_attempt(repo, root=root, worktree=str(wt), branch=branch, discard=True, defer=later.append)
    assert report.removed == [str(wt), branch] and not wt.exists() and not (root / "t9").exists()
    assert str(wt) not in worktree_list(repo)  # git forgot it at once
    [trashed] = (root / ".trash").iterdir()
    assert (trashed / "a.txt").read_text() == "claude\n" and len(later) == 1
    later[0]()
    assert not trashed.exists()


async def test_a_locked_worktree_is_removed_the_slow_way_all_the_same(repo, root):
    branch, wt = attempt(repo, root, "t9", "claude", {"a.txt": "claude\n"})
    g(repo, "worktree", "lock", str(wt))  # prune keeps locked entries: a rename would leave it registered
    later = []
    report = await remove_attempt(repo, root=root, worktree=str(wt), branch=branch, discard=True, defer=later.append)
    assert report.removed == [str(wt), branch] and not wt.exists() and later == []
    assert str(wt) not in worktree_list(repo)


async def test_a_merged_branch_that_moved_since_is_kept_with_its_new_work(repo, root):
    base = g(repo, "rev-parse", "main")
    branch, wt = attempt(repo, root, "t9", "claude", {"a.txt": "claude\n"})
    res = await merge_branch(repo, branch=branch, base=base, into="main", message="m", task_id="t9")
    commit(wt, {"b.txt": "more work after the merge\n"})
    report = await remove_attempt(repo, root=root, worktree=str(wt), branch=branch, into="main", base=base,
                                  merged_tip=res.source_commit)
    assert branches(repo) == [branch] and any(branch in k for k in report.kept)
    res2 = await merge_branch(repo, branch=branch, base=base, into="main", message="m", task_id="t9")
    report = await remove_attempt(repo, root=root, branch=branch, into="main", base=base,
                                  merged_tip=res2.source_commit)
    assert branches(repo) == [] and report.removed == [branch]


async def test_gc_empties_the_trash_a_stopped_process_left(repo, root):
    (root / ".trash" / "claude-0123").mkdir(parents=True)
    (root / ".trash" / "claude-0123" / "big.bin").write_bytes(b"x" * 1000)
    await gc(root, [], age_s=3600)
    assert not (root / ".trash").exists()
