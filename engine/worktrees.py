"""Attempt worktrees: one per agent under CLI_COUNCIL_HOME/worktrees, never inside the user's repo."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import anyio

from .gitcmd import COUNCIL_ENV, COUNCIL_IDENTITY, GitError, git


def _exactly(path: str) -> str:
    """A gitignore pattern matching this one path from the top: anchored, wildcards escaped."""
    return "/" + re.sub(r"([][*?\\])", r"\\\1", path)


def branch_name(task_id: str, agent: str) -> str:
    return f"council/{task_id}/{agent}"


class Worktrees:
    def __init__(self, root: Path):
        self.root = root
        self._locks: dict[str, anyio.Lock] = {}

    def path(self, task_id: str, agent: str) -> Path:
        return self.root / task_id / agent

    def lock(self, repo: str) -> anyio.Lock:
        """git 2.39 can fail on concurrent `worktree add` to one repo, so adds are serialized per repo."""
        return self._locks.setdefault(repo, anyio.Lock())

    async def add(self, repo: str, task_id: str, agent: str, base: str) -> tuple[Path, str]:
        path, branch = self.path(task_id, agent), branch_name(task_id, agent)
        path.parent.mkdir(parents=True, exist_ok=True)
        async with self.lock(repo):
            for attempt in range(3):
                try:
                    await git(repo, "worktree", "add", "--quiet", "-b", branch, str(path), base)
                    return path, branch
                except GitError as e:
                    if attempt == 2 or "commondir" not in e.stderr:
                        raise
                    await git(repo, "worktree", "prune")
                    await git(repo, "branch", "-D", branch, check=False)
                    await anyio.to_thread.run_sync(shutil.rmtree, path, True)
                    await anyio.sleep(0.1)
        raise AssertionError("unreachable")

    async def commit_all(self, path: Path, message: str, scratch: tuple[str, ...] = ()) -> bool:
        """Commit whatever the agent left uncommitted but its scratch dirs; False when there was nothing."""
        await git(path, "add", "-A", "--", ".", *(f":(exclude){d}" for d in scratch))
        if not await git(path, "diff", "--cached", "--name-only"):
            return False
        # The variables beat a repo's author.name / committer.name, which beat user.name.
        await git(path, *COUNCIL_IDENTITY, "commit", "--quiet", "--no-verify", "-m", message, env=COUNCIL_ENV)
        return True

    async def reset(self, path: Path, base: str, keep: tuple[str, ...] = ()) -> None:
        """Back to the base commit before a retry, so a retried agent starts clean; the untracked
        paths in `keep` (what the repo's setup made) stay."""
        await git(path, "reset", "--quiet", "--hard", base)
        await git(path, "clean", "-fdq", *(f"--exclude={_exactly(p)}" for p in keep))
