"""Worktrees made in parallel: only git's metadata step is serialized, the checkouts overlap, and
every worktree comes out complete and clean, also when another process adds worktrees to the same
repo at the same moment (git 2.39 races there)."""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from engine.worktrees import Worktrees
from tests.conftest import git


def tracked(repo: Path, rev: str) -> list[tuple[str, str]]:
    """(path, blob) of every file in the commit, as git stores it."""
    out = git(repo, "ls-tree", "-r", "--full-tree", rev)
    return sorted((line.split("\t", 1)[1], line.split()[2]) for line in out.splitlines())


def on_disk(path: Path) -> list[tuple[str, str]]:
    """(path, blob) of every file in a worktree, hashed from the bytes on disk."""
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), path)
            if rel != ".git":  # a worktree's .git is a file pointing at its metadata
                files.append(rel)
    blobs = git(path, "hash-object", "--no-filters", *sorted(files)).splitlines() if files else []
    return sorted(zip(sorted(files), blobs))


def make_many_files(repo: Path, n: int) -> str:
    for i in range(n):
        d = repo / f"pkg{i % 13}" / f"sub{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"mod{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * (i % 30))
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "many files")
    return git(repo, "rev-parse", "HEAD")


def assert_complete(repo: Path, path: Path, branch: str, base: str) -> None:
    assert on_disk(path) == tracked(repo, base)
    assert git(path, "status", "--porcelain") == ""
    assert git(path, "rev-parse", "HEAD") == base
    assert git(path, "symbolic-ref", "HEAD") == f"refs/heads/{branch}"
    # The index is populated (a --no-checkout worktree left as is would list every file as deleted).
    assert len(git(path, "ls-files").splitlines()) == len(tracked(repo, base))


async def test_parallel_adds_give_complete_checkouts(repo, tmp_path):
    base = make_many_files(repo, 600)
    wts = Worktrees(tmp_path / "wt")
    made: list[tuple[Path, str]] = []

    async def add(task: str, agent: str) -> None:
        made.append(await wts.add(str(repo), task, agent, base))

    async with anyio.create_task_group() as tg:
        for t in ("t1", "t2"):
            for a in ("claude", "gemini", "ollama", "lint"):
                tg.start_soon(add, t, a)
    assert len(made) == 8
    for path, branch in made:
        assert_complete(repo, path, branch, base)


async def test_adds_from_many_processes_at_once_survive_the_git_race(repo, tmp_path):
    """Separate Worktrees objects hold separate locks, as separate server processes do: their
    metadata steps overlap, git 2.39 fails some of them ("failed to read .git/worktrees/claude7/
    commondir": one add reads another's half-made metadata), and the retry still yields complete
    checkouts."""
    base = make_many_files(repo, 50)
    processes = [Worktrees(tmp_path / f"p{i}") for i in range(8)]
    made: list[tuple[Path, str]] = []

    async def add(wts: Worktrees, task: str) -> None:
        made.append(await wts.add(str(repo), task, "claude", base))  # one basename: git numbers them

    async with anyio.create_task_group() as tg:
        for round_ in range(3):
            for i, wts in enumerate(processes):
                tg.start_soon(add, wts, f"t{i}x{round_}")
    assert len(made) == 24
    for path, branch in made:
        assert_complete(repo, path, branch, base)
    assert len(git(repo, "worktree", "list", "--porcelain").split("\n\n")) == 25


async def test_a_failed_checkout_leaves_no_worktree_or_branch(repo, tmp_path):
    base = make_many_files(repo, 5)
    # A smudge filter that fails: git's checkout of a file marked with it fails.
    (repo / ".gitattributes").write_text("*.py filter=broken\n")
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-qm", "attrs")
    git(repo, "config", "filter.broken.smudge", "false")
    git(repo, "config", "filter.broken.required", "true")
    wts = Worktrees(tmp_path / "wt")
    try:
        await wts.add(str(repo), "t1", "claude", git(repo, "rev-parse", "HEAD"))
    except Exception:
        pass
    else:
        raise AssertionError("a checkout through a failing required filter succeeded")
    assert not wts.path("t1", "claude").exists()
    assert git(repo, "branch", "--list", "council/*") == ""
    assert base  # the repo itself is untouched
