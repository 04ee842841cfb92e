"""merge_branch in real git repos: every strategy lands the attempt, and nothing is ever lost."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from engine.merge import MergeRefused, _plain_branch, changes_in, merge_branch
from engine.worktrees import Worktrees

ID = ["-c", "user.name=Agent Smith", "-c", "user.email=agent@example.com", "-c", "commit.gpgsign=false"]
LINES = [f"line {i}\n" for i in range(1, 11)]


def g(cwd, *args, check=True) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "LC_ALL": "C"}
    res = subprocess.run(["git", *ID, *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and res.returncode:
        raise AssertionError(f"git {args} failed: {res.stderr}")
    return res.stdout.strip()


def is_ancestor(repo: Path, a: str, b: str) -> bool:
    return subprocess.run(["git", "merge-base", "--is-ancestor", a, b], cwd=repo).returncode == 0


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def commit(cwd: Path, files: dict[str, str], msg: str = "change") -> str:
    for name, text in files.items():
        write(cwd / name, text)
    g(cwd, "add", "-A")
    g(cwd, "commit", "-q", "-m", msg)
    return g(cwd, "rev-parse", "HEAD")


def edited(line: int, text: str, lines=LINES) -> str:
    out = list(lines)
    out[line] = text + "\n"
    return "".join(out)


@pytest.fixture
def repo(tmp_path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    g(path, "init", "-q", "-b", "main")
    commit(path, {"a.txt": "".join(LINES), "b.txt": "".join(LINES), "dir/c.txt": "c\n"}, "initial")
    return path


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "council" / "worktrees"


def attempt(repo: Path, root: Path, tid: str, agent: str, files: dict[str, str], base: str = "main",
            commits: int = 1) -> tuple[str, Path]:
    branch, wt = f"council/{tid}/{agent}", root / tid / agent
    g(repo, "worktree", "add", "-q", "-b", branch, str(wt), base)
    items = list(files.items())
    for i in range(commits if files else 0):
        commit(wt, dict(items[i::commits]), f"{agent} step {i + 1}")
    return branch, wt


def snapshot(repo: Path) -> dict:
    """Everything a merge must not touch when it doesn't merge: refs, index bytes, working tree bytes."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(repo):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            full = Path(dirpath, name)
            files[str(full.relative_to(repo))] = full.read_bytes()
    git_dir = repo / ".git"
    return {"refs": g(repo, "for-each-ref", "--format=%(refname) %(objectname)"),
            "head": (git_dir / "HEAD").read_text(),
            "index": (git_dir / "index").read_bytes(), "files": files,
            "markers": sorted(p.name for p in git_dir.iterdir() if p.name.isupper() and p.name != "HEAD")}


def show(repo: Path, rev: str, path: str) -> str:
    return g(repo, "show", f"{rev}:{path}") + "\n"


async def merge(repo, branch, strategy="squash", into="main", tid="t1", base="main", **kw):
    kw.setdefault("message", f"council {tid}: agent's work\n\nPrompt: do it")
    return await merge_branch(repo, branch=branch, base=base, into=into, strategy=strategy, task_id=tid, **kw)


@pytest.mark.parametrize("strategy", ["squash", "merge", "rebase"])
async def test_checked_out_and_clean_updates_branch_and_worktree(repo, root, strategy):
    base = g(repo, "rev-parse", "main")
    new_a = edited(2, "agent was here")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": new_a, "new.txt": "new\n"}, commits=2)

    res = await merge(repo, branch, strategy, base=base)

    assert res.merged and res.commit == g(repo, "rev-parse", "main")
    assert res.strategy == strategy and res.into == "main" and res.task_id == "t1"
    assert sorted(res.files) == ["a.txt", "new.txt"] and res.insertions == 2 and res.deletions == 1
    assert (repo / "a.txt").read_text() == new_a and (repo / "new.txt").read_text() == "new\n"
    assert g(repo, "status", "--porcelain") == ""
    assert res.backup_ref == "refs/council/backup/t1" and g(repo, "rev-parse", res.backup_ref) == base
    assert is_ancestor(repo, base, "main")
    parents = g(repo, "log", "-1", "--format=%P", "main").split()
    if strategy == "squash":
        assert parents == [base]
        assert g(repo, "log", "-1", "--format=%an|%s", "main") == "Test User|council t1: agent's work"
    elif strategy == "merge":
        assert parents == [base, g(repo, "rev-parse", branch)]
    else:
        log = g(repo, "log", "--format=%an|%ad|%s", "--date=raw", f"{base}..main").splitlines()
        assert log == g(repo, "log", "--format=%an|%ad|%s", "--date=raw", f"{base}..{branch}").splitlines()
        assert [line.split("|")[-1] for line in log] == ["claude step 2", "claude step 1"]


@pytest.mark.parametrize("strategy", ["squash", "merge", "rebase"])
async def test_not_checked_out_moves_only_the_ref(repo, root, strategy):
    g(repo, "branch", "feature")
    base = g(repo, "rev-parse", "feature")
    branch, _ = attempt(repo, root, "t1", "gemini", {"b.txt": edited(5, "gemini")}, base="feature")
    before = snapshot(repo)

    res = await merge(repo, branch, strategy, into="feature", base=base)

    assert res.merged and g(repo, "rev-parse", "feature") == res.commit
    assert show(repo, "feature", "b.txt") == edited(5, "gemini")
    after = snapshot(repo)
    assert after["files"] == before["files"] and after["index"] == before["index"]
    assert after["head"] == before["head"] and g(repo, "rev-parse", "main") == base


@pytest.mark.parametrize("strategy", ["squash", "merge", "rebase"])
async def test_into_moved_since_submission_keeps_both(repo, root, strategy):
    base = g(repo, "rev-parse", "main")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(1, "agent"), "dir/c.txt": "agent c\n"},
                        commits=2)
    user = commit(repo, {"b.txt": edited(9, "user"), "a.txt": edited(8, "user"), "user.txt": "u\n"}, "user work")

    res = await merge(repo, branch, strategy, base=base)

    assert res.merged and is_ancestor(repo, user, "main")
    both = edited(1, "agent", edited(8, "user").splitlines(keepends=True))
    assert (repo / "a.txt").read_text() == both == show(repo, "main", "a.txt")
    assert (repo / "b.txt").read_text() == edited(9, "user") and (repo / "user.txt").exists()
    assert (repo / "dir/c.txt").read_text() == "agent c\n"
    assert sorted(res.files) == ["a.txt", "dir/c.txt"]
    assert g(repo, "rev-parse", res.backup_ref) == user and g(repo, "status", "--porcelain") == ""


@pytest.mark.parametrize("strategy", ["squash", "merge"])
async def test_counts_are_of_what_lands_when_into_already_has_part_of_the_change(repo, root, strategy):
    """`into` moved on since the task began, with one of the attempt's two edits already in it: the
    result counts what the merge changes on `into`, not the attempt's whole diff from its base."""
    base = g(repo, "rev-parse", "main")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(1, "agent"), "dir/c.txt": "agent c\n"})
    commit(repo, {"dir/c.txt": "agent c\n"}, "the user made the same edit")

    res = await merge(repo, branch, strategy, base=base)

    assert res.merged and res.files == ["a.txt"] and (res.insertions, res.deletions) == (1, 1)
    assert (repo / "a.txt").read_text() == edited(1, "agent") and g(repo, "status", "--porcelain") == ""


async def test_squash_carries_only_the_attempts_own_changes(repo, root):
    """The task's base was later dropped from `into` (reset): squash must not bring it back."""
    dropped = commit(repo, {"b.txt": edited(0, "dropped later")}, "to be dropped")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(4, "agent")}, base=dropped)
    g(repo, "reset", "-q", "--hard", "HEAD~1")
    g(repo, "commit", "-q", "--allow-empty", "-m", "user moved on")

    res = await merge(repo, branch, "squash", base=dropped)

    assert res.merged and res.files == ["a.txt"]
    assert (repo / "b.txt").read_text() == "".join(LINES)
    assert (repo / "a.txt").read_text() == edited(4, "agent")


@pytest.mark.parametrize("strategy", ["squash", "merge", "rebase"])
@pytest.mark.parametrize("checked_out", [True, False])
async def test_conflict_changes_nothing(repo, root, strategy, checked_out):
    into = "main" if checked_out else "feature"
    g(repo, "branch", "feature")
    base = g(repo, "rev-parse", into)
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(3, "agent"), "ok.txt": "fine\n"}, base=into,
                        commits=2)
    if checked_out:
        commit(repo, {"a.txt": edited(3, "user")}, "user")
    else:
        g(repo, "worktree", "add", "-q", str(root.parent / "feature"), "feature")
        commit(root.parent / "feature", {"a.txt": edited(3, "user")}, "user")
        g(repo, "worktree", "remove", str(root.parent / "feature"))
    before = snapshot(repo)

    res = await merge(repo, branch, strategy, into=into, base=base)

    assert not res.merged and res.conflicts == ["a.txt"] and res.commit is None
    assert "conflict" in res.message
    assert snapshot(repo) == before


async def test_dry_run_reports_and_changes_nothing(repo, root):
    base = g(repo, "rev-parse", "main")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "x"), "dir/c.txt": "c\nd\ne\n"})
    before = snapshot(repo)

    res = await merge(repo, branch, "rebase", base=base, dry_run=True)

    assert not res.merged and res.dry_run and res.commit is None and res.backup_ref is None
    assert sorted(res.files) == ["a.txt", "dir/c.txt"] and (res.insertions, res.deletions) == (3, 1)
    assert "would apply cleanly" in res.message and snapshot(repo) == before


async def test_dry_run_reports_conflicts(repo, root):
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "x")})
    commit(repo, {"a.txt": edited(0, "y")})
    before = snapshot(repo)
    res = await merge(repo, branch, base="main~1", dry_run=True)
    assert res.conflicts == ["a.txt"] and res.files == ["a.txt"] and snapshot(repo) == before


async def test_dry_run_mentions_a_dirty_target(repo, root):
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "x")})
    write(repo / "b.txt", "dirty\n")
    res = await merge(repo, branch, dry_run=True)
    assert not res.merged and "uncommitted changes" in res.message


def make_dirty_modified(repo: Path):
    write(repo / "b.txt", "user's unsaved work\n")


def make_dirty_staged(repo: Path):
    write(repo / "staged.txt", "staged\n")
    g(repo, "add", "staged.txt")


def make_mid_merge(repo: Path):
    g(repo, "checkout", "-q", "-b", "other")
    commit(repo, {"b.txt": edited(0, "other")})
    g(repo, "checkout", "-q", "main")
    commit(repo, {"b.txt": edited(0, "mine")})
    g(repo, "merge", "other", check=False)
    assert (repo / ".git" / "MERGE_HEAD").exists()


def make_mid_rebase(repo: Path):
    g(repo, "branch", "upstream")
    commit(repo, {"b.txt": edited(0, "mine")})
    g(repo, "checkout", "-q", "upstream")
    commit(repo, {"b.txt": edited(0, "theirs")})
    g(repo, "checkout", "-q", "main")
    g(repo, "rebase", "upstream", check=False)
    assert (repo / ".git" / "rebase-merge").exists()


@pytest.mark.parametrize("make_dirty", [make_dirty_modified, make_dirty_staged, make_mid_merge, make_mid_rebase])
async def test_dirty_target_is_refused_and_nothing_changes(repo, root, make_dirty):
    base = g(repo, "rev-parse", "main")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent")})
    make_dirty(repo)
    before = snapshot(repo)

    with pytest.raises(MergeRefused) as err:
        await merge(repo, branch, base=base)

    assert "then merge again" in str(err.value)
    assert snapshot(repo) == before
    assert g(repo, "rev-parse", "--verify", "-q", "refs/council/backup/t1", check=False) == ""


async def test_untracked_file_in_the_way_is_never_lost(repo, root):
    branch, _ = attempt(repo, root, "t1", "claude", {"new.txt": "agent's\n", "sub/deep.txt": "deep\n"})
    write(repo / "new.txt", "user's precious untracked file\n")
    write(repo / "sub", "an untracked file where the attempt wants a directory\n")
    before = snapshot(repo)

    with pytest.raises(MergeRefused) as err:
        await merge(repo, branch)

    assert "new.txt" in str(err.value) and "sub" in str(err.value)
    assert snapshot(repo) == before


async def test_ignored_file_in_the_way_is_never_lost(repo, root):
    commit(repo, {".gitignore": "*.log\n"})
    branch, wt = attempt(repo, root, "t1", "claude", {})
    write(wt / "build.log", "agent's log\n")
    g(wt, "add", "-f", "build.log")
    g(wt, "commit", "-q", "-m", "force-add a log")
    write(repo / "build.log", "user's ignored log\n")

    with pytest.raises(MergeRefused):
        await merge(repo, branch)
    assert (repo / "build.log").read_text() == "user's ignored log\n"


async def test_untracked_files_elsewhere_do_not_block(repo, root):
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent")})
    write(repo / "notes.txt", "mine\n")
    res = await merge(repo, branch)
    assert res.merged and (repo / "notes.txt").read_text() == "mine\n"


async def test_into_checked_out_in_another_worktree_is_updated_there(repo, root, tmp_path):
    g(repo, "branch", "feature")
    other = tmp_path / "feature-wt"
    g(repo, "worktree", "add", "-q", str(other), "feature")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent")}, base="feature")
    before = snapshot(repo)

    res = await merge(repo, branch, into="feature", base="feature")

    assert res.merged and str(other) in res.message
    assert (other / "a.txt").read_text() == edited(0, "agent") and g(other, "status", "--porcelain") == ""
    assert snapshot(repo)["files"] == before["files"]


async def test_an_operation_in_progress_in_a_linked_checkout_is_refused(repo, root, tmp_path):
    """The checkout's git dir is found through its `.git` file, not only as a `.git` directory."""
    g(repo, "branch", "feature")
    g(repo, "branch", "other")
    other = tmp_path / "feature-wt"
    g(repo, "worktree", "add", "-q", str(other), "feature")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent")}, base="feature")
    commit(other, {"b.txt": edited(0, "mine")})
    g(other, "checkout", "-q", "other")
    commit(other, {"b.txt": edited(0, "theirs")})
    g(other, "checkout", "-q", "feature")
    g(other, "merge", "other", check=False)  # conflicts: MERGE_HEAD waits in the worktree's own git dir
    assert (other / ".git").is_file()
    tip = g(repo, "rev-parse", "feature")

    with pytest.raises(MergeRefused, match="operation in progress"):
        await merge(repo, branch, into="feature", base="feature~1")
    assert g(repo, "rev-parse", "feature") == tip


async def test_no_changes_is_not_merged(repo, root):
    branch, _ = attempt(repo, root, "t1", "claude", {})
    before = snapshot(repo)
    res = await merge(repo, branch)
    assert not res.merged and "no changes" in res.message and snapshot(repo) == before


async def test_merging_twice_is_a_no_op_the_second_time(repo, root):
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent")})
    assert (await merge(repo, branch, base="main")).merged
    again = await merge(repo, branch, base="main~1")
    assert not again.merged and "already has" in again.message
    assert await changes_in(repo, branch, "main", "main~1")


async def test_rebase_drops_commits_already_upstream_and_refuses_merge_commits(repo, root):
    base = g(repo, "rev-parse", "main")
    branch, wt = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent"), "b.txt": edited(0, "agent")},
                         commits=2)
    g(repo, "cherry-pick", f"{branch}~1")
    res = await merge(repo, branch, "rebase", base=base)
    assert res.merged and g(repo, "log", "--format=%s", f"{base}..main").splitlines() == [
        "claude step 2", "claude step 1"]  # the cherry-pick (same message) and step 2; step 1 dropped

    g(wt, "checkout", "-q", "-b", "side", "main~1")
    commit(wt, {"side.txt": "s\n"})
    g(wt, "checkout", "-q", branch)
    g(wt, "merge", "-q", "--no-edit", "side")
    with pytest.raises(MergeRefused, match="merge commit"):
        await merge(repo, branch, "rebase", base=base)


async def test_unknown_refs_are_refused(repo, root):
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": "x\n"})
    with pytest.raises(MergeRefused):
        await merge(repo, branch, into="nope")
    with pytest.raises(MergeRefused):
        await merge(repo, "council/t1/nobody")
    with pytest.raises(ValueError):
        await merge(repo, branch, "octopus")


def reachable(repo: Path) -> set[str]:
    return set(g(repo, "rev-list", "--all", "--reflog").split())


async def test_randomized_merges_never_lose_a_commit(repo, root):
    rng = random.Random(20240605)
    files = ["a.txt", "b.txt", "dir/c.txt", "d.txt"]
    commit(repo, {"dir/c.txt": "".join(LINES), "d.txt": "".join(LINES)}, "more files")
    commit(repo, {"b.txt": edited(0, "user 1")})
    commit(repo, {"b.txt": edited(1, "user 2", edited(0, "user 1").splitlines(True))})
    g(repo, "branch", "side")
    outcomes = {"merged": 0, "conflict": 0}
    for n in range(40):
        into = rng.choice(["main", "main", "side"])
        base = g(repo, "rev-parse", f"{into}~{rng.randint(0, 2)}")
        current = {f: show(repo, base, f).splitlines(keepends=True) for f in files}
        edits = {}
        touched = rng.sample(files, rng.randint(1, 3))
        for f in touched:
            lines = list(current[f])
            for _ in range(rng.randint(1, 2)):
                lines[rng.randrange(len(lines))] = f"agent {n} {rng.random()}\n"
            edits[f] = "".join(lines)
        if rng.random() < 0.2:
            edits[f"new{n}.txt"] = f"new {n}\n"
        branch, wt = attempt(repo, root, f"r{n}", "agent", edits, base=base, commits=rng.randint(1, min(2, len(edits))))
        if into == "main" and rng.random() < 0.3:  # the user edits a file the agent touched: may conflict
            f = rng.choice(touched)
            commit(repo, {f: edited(rng.randrange(10), f"user {n}", show(repo, "main", f).splitlines(True))})
        strategy = rng.choice(["squash", "merge", "rebase"])
        old_tip = g(repo, "rev-parse", into)
        before, seen = snapshot(repo), reachable(repo)

        res = await merge(repo, branch, strategy, into=into, tid=f"r{n}", base=base)

        assert seen <= reachable(repo), "a commit became unreachable"
        if res.merged:
            outcomes["merged"] += 1
            assert is_ancestor(repo, old_tip, into)
            assert g(repo, "rev-parse", into) == res.commit
            assert g(repo, "rev-parse", res.backup_ref) == old_tip
            assert await changes_in(repo, branch, into, base), f"{strategy} lost the attempt's changes"
            for f, text in edits.items():  # files nobody else touched since base: exactly the agent's
                if subprocess.run(["git", "diff", "--quiet", base, old_tip, "--", f], cwd=repo).returncode == 0:
                    assert show(repo, into, f) == text
            assert g(repo, "status", "--porcelain") == ""
        else:
            outcomes["conflict"] += 1
            assert res.conflicts, res.message
            assert snapshot(repo) == before
        g(repo, "worktree", "remove", str(wt))
    assert outcomes["merged"] >= 10 and outcomes["conflict"] >= 3, outcomes


def backups(repo: Path) -> dict[str, str]:
    out = g(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/council/backup/")
    return dict(line.split() for line in out.splitlines())


@pytest.mark.parametrize("into", ["main~1", "main^", "@{-1}", "HEAD", "main..feature", "main:x", "-main", "ma\0in",
                                  "main.lock", "nope", "refs/tags/v1", "refs/heads/", "", "x" * 5000,
                                  "council/t2/claude", "refs/heads/council/t1/claude", "Council/T2/Claude", "alias"])
async def test_a_target_that_is_not_a_users_branch_is_refused_and_nothing_is_written(repo, root, into):
    g(repo, "branch", "feature")
    g(repo, "checkout", "-q", "feature")
    g(repo, "checkout", "-q", "main")  # so that @{-1} names a branch
    g(repo, "tag", "v1")
    g(repo, "symbolic-ref", "refs/heads/alias", "refs/heads/main")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent")})
    attempt(repo, root, "t2", "claude", {"b.txt": edited(0, "other task")})
    before = snapshot(repo)

    with pytest.raises(MergeRefused) as err:
        await merge(repo, branch, into=into)

    assert snapshot(repo) == before and backups(repo) == {}
    if into.casefold().removeprefix("refs/heads/").startswith("council/"):
        assert "council's own attempt branches" in str(err.value)
    assert (await merge(repo, branch, into="main")).merged  # the same merge into a real branch works


async def test_each_merge_of_a_task_gets_its_own_backup_ref(repo, root):
    g(repo, "branch", "feature")
    tips = [g(repo, "rev-parse", "main")]
    claude, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "claude")})
    gemini, _ = attempt(repo, root, "t1", "gemini", {"b.txt": edited(0, "gemini")})
    ollama, _ = attempt(repo, root, "t1", "ollama", {"dir/c.txt": "ollama\n"})

    first = await merge(repo, claude, base=tips[0])
    tips.append(g(repo, "rev-parse", "main"))
    second = await merge(repo, gemini, "merge", base=tips[0])
    feature = g(repo, "rev-parse", "feature")
    third = await merge(repo, ollama, "rebase", into="feature", base=tips[0])  # not checked out: a ref transaction

    assert [r.backup_ref for r in (first, second, third)] == [
        "refs/council/backup/t1", "refs/council/backup/t1-2", "refs/council/backup/t1-3"]
    assert backups(repo) == {"refs/council/backup/t1": tips[0], "refs/council/backup/t1-2": tips[1],
                             "refs/council/backup/t1-3": feature}
    assert all(r.backup_ref in r.message for r in (first, second, third))


async def test_a_backup_name_already_taken_is_never_overwritten(repo, root):
    old = g(repo, "rev-parse", "main")
    g(repo, "update-ref", "refs/council/backup/t1", f"{old}~0")
    commit(repo, {"b.txt": "user\n"})
    g(repo, "update-ref", "refs/council/backup/t1-2", "main")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent")}, base=old)
    tip = g(repo, "rev-parse", "main")

    res = await merge(repo, branch, base=old)

    assert res.merged and res.backup_ref == "refs/council/backup/t1-3"
    assert backups(repo) == {"refs/council/backup/t1": old, "refs/council/backup/t1-2": tip,
                             "refs/council/backup/t1-3": tip}


async def test_when_the_target_cannot_move_no_backup_is_written(repo, root):
    g(repo, "branch", "feature")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent")}, base="feature")
    lock = repo / ".git" / "refs" / "heads" / "feature.lock"  # another git is updating feature right now
    lock.write_text("")
    before = snapshot(repo)

    with pytest.raises(MergeRefused, match="could not move feature"):
        await merge(repo, branch, into="feature", base="feature")

    assert snapshot(repo) == before and backups(repo) == {}
    lock.unlink()
    assert (await merge(repo, branch, into="feature", base="feature")).backup_ref == "refs/council/backup/t1"


async def test_when_the_checkout_cannot_move_the_backup_written_meanwhile_is_taken_back(repo, root):
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent")})
    lock = repo / ".git" / "index.lock"  # another git is writing main's checkout right now
    lock.write_text("")
    before = snapshot(repo)

    with pytest.raises(MergeRefused, match="could not move main"):
        await merge(repo, branch)

    after = snapshot(repo)
    assert after.pop("markers") == before.pop("markers") + ["ORIG_HEAD"]  # git's merge writes it first
    assert after == before and backups(repo) == {}
    lock.unlink()
    assert (await merge(repo, branch)).backup_ref == "refs/council/backup/t1"


# Identity and trailers: what lands on the user's branch is the user's, and says where it came from.

def landed(repo: Path, base: str, fmt: str) -> list[str]:
    """One line per commit that landed on main since base (first parents: not the attempt's own)."""
    sep = "\x1f"
    out = g(repo, "log", "--first-parent", f"--format={fmt.replace('|', sep)}%x1e", f"{base}..main")
    return [rec.strip("\n").replace(sep, "|") for rec in out.split("\x1e") if rec.strip("\n")]


TRAILERS = "%(trailers:key=Council-Task,valueonly,separator=)|%(trailers:key=Council-Agent,valueonly,separator=)"


@pytest.mark.parametrize("strategy", ["squash", "merge", "rebase"])
async def test_commits_landing_on_the_users_branch_are_the_users_with_trailers(repo, root, strategy):
    g(repo, "config", "user.name", "Ada Lovelace")  # the repo's own identity beats the global Test User
    g(repo, "config", "user.email", "ada@example.com")
    base = g(repo, "rev-parse", "main")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(1, "x"), "n.txt": "n\n"}, commits=2)

    res = await merge_branch(repo, branch=branch, base=base, into="main", strategy=strategy,
                             message="Fix it\n\nPrompt:\nfix it", task_id="t1", agent="claude")

    assert res.merged and "committed as cli-council" not in res.message
    rows = landed(repo, base, "%an <%ae>|%cn <%ce>|" + TRAILERS)
    assert len(rows) == (2 if strategy == "rebase" else 1)
    author = "Agent Smith <agent@example.com>" if strategy == "rebase" else "Ada Lovelace <ada@example.com>"
    assert rows == [f"{author}|Ada Lovelace <ada@example.com>|t1|claude"] * len(rows)
    if strategy == "rebase":  # the agent's dates are kept too
        assert landed(repo, base, "%ad|%s") == g(repo, "log", "--format=%ad|%s", f"{base}..{branch}").splitlines()
    else:
        assert g(repo, "log", "-1", "--format=%B", "main") == "Fix it\n\nPrompt:\nfix it\n\nCouncil-Task: t1\nCouncil-Agent: claude"


@pytest.mark.parametrize("config", ["", "[user]\n\temail = only-an-email@example.com\n"])
async def test_without_any_identity_the_council_commits_and_says_so(repo, root, tmp_path, monkeypatch, config):
    """Never an identity guessed from the host: with no name configured git would take the login's."""
    empty = tmp_path / "empty.gitconfig"
    empty.write_text(config)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):  # the server's environment is no identity
        monkeypatch.setenv(name, "Server Env")
    for name in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.setenv(name, "server@env.example")
    base = g(repo, "rev-parse", "main")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(1, "x")})

    dry = await merge(repo, branch, base=base, agent="claude", dry_run=True)
    res = await merge(repo, branch, base=base, agent="claude")

    for r in (dry, res):
        assert "committed as cli-council <cli-council@localhost>" in r.message and "user.name" in r.message
    assert res.merged
    assert landed(repo, base, "%an <%ae>|%cn <%ce>|" + TRAILERS) == [
        "cli-council <cli-council@localhost>|cli-council <cli-council@localhost>|t1|claude"]


async def test_attempt_commits_keep_the_council_identity(repo, root):
    g(repo, "config", "user.name", "Ada Lovelace")
    g(repo, "config", "user.email", "ada@example.com")
    g(repo, "config", "author.name", "Ada Author")  # beats user.name for authors, as in the user's own commits
    base = g(repo, "rev-parse", "main")
    wt, branch = await Worktrees(root).add(str(repo), "t1", "claude", base)
    (wt / "a.txt").write_text("agent\n")
    assert await Worktrees(root).commit_all(wt, "council t1: claude")

    assert (await merge(repo, branch, strategy="merge", base=base, agent="claude")).merged

    assert g(repo, "log", "-1", "--format=%an <%ae>|%cn <%ce>", branch) == \
        "cli-council <cli-council@localhost>|cli-council <cli-council@localhost>"
    assert g(repo, "log", "-1", "--format=%an|%cn", "main") == "Ada Author|Ada Lovelace"


@pytest.mark.parametrize("message, trailers", [
    # the message's own trailer block gets ours added to it
    ("Fix it\n\nbody\n\nSigned-off-by: A <a@example.com>\n", ["Signed-off-by: A <a@example.com>"]),
    # a last paragraph that is prose stays prose: ours come after a blank line
    ("Fix it\n\nbody with: a colon\nand more", []),
    # a markdown rule in a prompt is no patch divider
    ("Fix it\n\nPrompt:\nabove\n---\nbelow", []),
    ("Only: a subject line", []),
    ("", []),
])
async def test_trailers_are_what_git_parses_whatever_the_message(repo, root, message, trailers):
    base = g(repo, "rev-parse", "main")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(1, "x")})
    assert (await merge(repo, branch, base=base, agent="claude", message=message)).merged
    parsed = g(repo, "log", "-1", "--format=%(trailers:unfold)", "main").splitlines()
    assert parsed == [*trailers, "Council-Task: t1", "Council-Agent: claude"]
    if message.strip():
        assert g(repo, "log", "-1", "--format=%B", "main").startswith(message.strip())


def test_a_branch_name_taken_without_asking_git_is_one_git_takes(repo):
    """check_target answers the common names itself (a process fewer per merge): every name it takes
    so must be a valid branch name to git, and each tricky one must be left to git."""
    tricky = ["HEAD", "main.", "a..b", ".main", "a/.b", "main.lock", "a/b.lock/c", "a//b", "a/", "/a", "@",
              "a@{1}", "ma in", "é", "a:b", "a~1", "a^", "a*", "a?", "a[b", "a\\b", "-", "-a/b"]
    assert not any(_plain_branch(name) for name in tricky)
    rng = random.Random(11)
    alphabet = "abcXYZ019._-/" + "." * 3 + "/" * 2
    names = ["main", "feature/x-1", "release_2.0", "a.b/c-d", "a/-b", "v1.2.3", "x.locked", "lock.lock_"]
    names += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    taken = sorted({name for name in names if _plain_branch(name)})
    assert len(taken) > 100
    for name in taken:
        assert g(repo, "check-ref-format", "--branch", name, check=False) == name, name
