"""The shortcuts that keep git processes off the merge and attempt paths answer exactly as the long
ways did: one cat-file for many revs, changes_in's path test before a three-way merge, a branch
lookup by listing, commit_all without asking the index first, a remembered toplevel."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from engine.config import parse_config
from engine.engine import Engine
from engine.gitcmd import git, resolve_many
from engine.inputs import CouncilError
from engine.merge import MergeRefused, changes_in
from engine.worktrees import Worktrees
from conftest import fake
from test_merge import attempt, commit, edited, g, merge, repo, root, snapshot  # noqa: F401 (fixtures)


async def test_an_idle_git_runs_at_the_lowest_cpu_priority(repo):
    """The uncommitted-changes status of a submission's checkout (only a warning) yields the CPU to
    the agents starting beside it. `nice` without arguments prints the niceness it runs at."""
    alias = ("-c", "alias.niceness=!nice")
    normal = int(await git(repo, *alias, "niceness"))
    niced = int(await git(repo, *alias, "niceness", idle=True))
    assert niced == min(19, normal + 19) and (niced > normal or normal == 19)


async def test_resolve_many_answers_each_rev_or_none_and_never_reads_an_option(repo):
    head, tree = g(repo, "rev-parse", "HEAD"), g(repo, "rev-parse", "HEAD^{tree}")
    got = await resolve_many(repo, "main^{commit}", "main^{tree}", "nope^{commit}", "-h", "--all",
                             "main\nHEAD", "main\0x", "", "HEAD^{commit}", f"{tree}^{{commit}}")
    assert got == [head, tree, None, None, None, None, None, None, head, None]


async def test_changes_in_is_true_when_into_has_the_change_among_others(repo, root):
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent"), "new.txt": "new\n"})
    base = g(repo, "rev-parse", "main")
    commit(repo, {"a.txt": edited(0, "agent"), "new.txt": "new\n", "b.txt": "user\n"}, "same change, by hand")
    assert await changes_in(repo, branch, "main", base)
    # and when `into` changed the same file further, in another place (the three-way merge says so)
    commit(repo, {"a.txt": edited(5, "user", edited(0, "agent").splitlines(True))})
    assert await changes_in(repo, branch, "main", base)


@pytest.mark.parametrize("user", [
    {"a.txt": edited(0, "user")},                # the same line, another text
    {"b.txt": "user\n"},                         # nothing of the attempt's
    {"a.txt": edited(0, "agent"), "new.txt": "other\n"},  # half of it; the new file differs
])
async def test_changes_in_is_false_when_into_lacks_any_of_the_change(repo, root, user):
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent"), "new.txt": "new\n"})
    base = g(repo, "rev-parse", "main")
    commit(repo, user)
    assert not await changes_in(repo, branch, "main", base)


async def test_changes_in_sees_a_mode_change_and_a_deletion(repo, root):
    base = g(repo, "rev-parse", "main")
    branch, wt = attempt(repo, root, "t1", "claude", {})
    (wt / "a.txt").chmod(0o755)
    (wt / "b.txt").unlink()
    g(wt, "add", "-A")
    g(wt, "commit", "-qm", "chmod and delete")
    commit(repo, {"dir/c.txt": "user\n"})
    assert not await changes_in(repo, branch, "main", base)
    g(repo, "rm", "-q", "b.txt")
    g(repo, "commit", "-qm", "delete b")
    assert not await changes_in(repo, branch, "main", base)  # the mode change is still missing
    (repo / "a.txt").chmod(0o755)
    g(repo, "commit", "-qam", "chmod a")
    assert await changes_in(repo, branch, "main", base)


@pytest.mark.parametrize("into", ["feature", "mai", "feature/x/y"])
async def test_into_must_be_that_very_branch_not_one_under_or_beside_it(repo, root, into):
    g(repo, "branch", "feature/x")
    branch, _ = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent")})
    before = snapshot(repo)
    with pytest.raises(MergeRefused, match="no local branch of that name"):
        await merge(repo, branch, into=into)
    assert snapshot(repo) == before


async def test_commit_all_without_changes_is_false_and_commits_nothing(repo, root):
    _, wt = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent")})  # committed by the agent
    head = g(wt, "rev-parse", "HEAD")
    assert not await Worktrees(root).commit_all(wt, "council t1: claude")
    assert g(wt, "rev-parse", "HEAD") == head
    (wt / "b.txt").write_text("left uncommitted\n")
    assert await Worktrees(root).commit_all(wt, "council t1: claude")
    assert g(wt, "show", "HEAD:b.txt") == "left uncommitted"


async def test_commit_all_raises_when_git_cannot_commit(repo, root):
    _, wt = attempt(repo, root, "t1", "claude", {})
    (wt / "b.txt").write_text("work\n")
    # HEAD's branch cannot be written: commit fails, and that is not "nothing to commit"
    lock = repo / ".git" / "refs" / "heads" / "council" / "t1" / "claude.lock"
    lock.write_text("")
    try:
        with pytest.raises(Exception, match="claude.lock|cannot lock"):
            await Worktrees(root).commit_all(wt, "council t1: claude")
    finally:
        lock.unlink()


async def test_a_repo_that_stops_being_one_is_refused_again(tmp_path):
    path = tmp_path / "proj"
    path.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    (path / "f.txt").write_text("x\n")
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    subprocess.run(["git", "commit", "-qm", "x"], cwd=path, check=True)
    cfg = parse_config({"agents": {"fake": fake("--write", "out.txt=hi")}})
    async with Engine(cfg, home=tmp_path / "h", warm_pool=False) as engine:
        task = await engine.submit(str(path), "p", agents=["fake"])
        await engine.wait(task.task_id, 60)
        shutil.rmtree(path / ".git")
        with pytest.raises(CouncilError, match="not a git repository"):
            await engine.submit(str(path), "p", agents=["fake"])


async def test_commit_and_count_counts_what_the_branch_records_since_base(repo, root):
    base = g(repo, "rev-parse", "main")
    _, wt = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent")})  # one change committed by the agent
    (wt / "new.txt").write_text("one\ntwo\n")                                  # one left uncommitted
    (wt / "b.txt").unlink()
    (wt / ".scratch").mkdir()
    (wt / ".scratch" / "notes").write_text("the CLI's own\n")                 # never part of the result

    files, ins, dels = await Worktrees(root).commit_and_count(wt, "council t1: claude", (".scratch",), base)

    assert g(wt, "status", "--porcelain", "--untracked-files=no") == ""
    numstat = g(wt, "diff", "--numstat", base, "HEAD").splitlines()
    assert sorted(files) == ["a.txt", "b.txt", "new.txt"] == sorted(line.split("\t")[2] for line in numstat)
    assert (ins, dels) == (sum(int(line.split("\t")[0]) for line in numstat),
                           sum(int(line.split("\t")[1]) for line in numstat)) == (3, 11)
    # nothing left to commit: the same counts, no new commit
    head = g(wt, "rev-parse", "HEAD")
    assert await Worktrees(root).commit_and_count(wt, "again", (".scratch",), base) == (files, ins, dels)
    assert g(wt, "rev-parse", "HEAD") == head


async def test_changes_in_without_a_base_uses_the_merge_base_and_refuses_unrelated_or_unknown(repo, root):
    branch, wt = attempt(repo, root, "t1", "claude", {"a.txt": edited(0, "agent")})
    assert not await changes_in(repo, branch, "main")
    commit(repo, {"b.txt": "user\n"})  # first, so the cherry-pick is a new commit whatever the clock says
    g(repo, "cherry-pick", branch)
    assert await changes_in(repo, branch, "main")
    assert not await changes_in(repo, branch, "main", "no-such-base")
    g(repo, "checkout", "-q", "--orphan", "lone")
    commit(repo, {"a.txt": edited(0, "agent")}, "unrelated")
    assert not await changes_in(repo, branch, "lone")  # no merge base: nothing can be shown to be in it


@pytest.mark.parametrize("strategy", ["squash", "merge", "rebase"])
async def test_neither_an_attempt_commit_nor_a_merge_runs_the_repos_auto_maintenance(repo, root, strategy):
    """Each would start `git maintenance run --auto`, a process the answer waits for; the user's own
    git does the repo's housekeeping. Here that maintenance writes a commit-graph after any commit."""
    for key, value in (("maintenance.gc.enabled", "false"), ("maintenance.commit-graph.enabled", "true"),
                       ("maintenance.commit-graph.auto", "1")):
        g(repo, "config", key, value)
    graphs = repo / ".git" / "objects" / "info" / "commit-graphs"
    _, wt = attempt(repo, root, "t1", "claude", {})
    (wt / "b.txt").write_text("work\n")
    assert await Worktrees(root).commit_all(wt, "council t1: claude")
    assert not graphs.exists()
    assert (await merge(repo, "council/t1/claude", strategy)).merged
    assert not graphs.exists()
    commit(repo, {"c.txt": "by hand\n"})  # the check can fail: the user's own commit runs it
    assert graphs.exists()


async def test_the_checkout_branch_a_task_merges_into_is_read_from_head_as_git_answers(make_engine, repo, tmp_path):
    """submit_task reads the checkout's branch from its HEAD file; git answers when the file can't be
    read that way. A branch that shares its name with a tag is still that branch (git's --short would
    say heads/x, which names no branch)."""
    linked = tmp_path / "linked"
    g(repo, "worktree", "add", "-q", "-b", "feat/linked", str(linked))
    async with make_engine({"one": fake("--write", "x=1")}) as engine:
        async def into(path=repo, base="HEAD"):
            return (await engine.submit(str(path), "do it", agents=["one"], base=base)).into

        assert await into() == "main"
        assert await into(linked) == "feat/linked"
        g(repo, "checkout", "-q", "--detach")
        assert await into() is None
        g(repo, "checkout", "-q", "-b", "x")
        g(repo, "tag", "x")
        assert await into() == "x"
        head = repo / ".git" / "HEAD"  # a HEAD git can read but the file reader doesn't: git answers
        head.write_text("ref:refs/heads/main\n")
        assert g(repo, "symbolic-ref", "HEAD") == "refs/heads/main"
        assert await into() == "main"
        head.write_text("ref: refs/heads/main\nmore\n")  # git takes the repo, and finds no ref in HEAD
        assert subprocess.run(["git", "symbolic-ref", "HEAD"], cwd=repo, capture_output=True).returncode != 0
        assert await into(base="main") is None  # (HEAD itself names no commit then)
        head.write_text("ref: refs/heads/main\n")
        head.unlink()
        head.symlink_to("refs/heads/x")  # the symlink HEAD of old gits
        assert await into() == "x"
