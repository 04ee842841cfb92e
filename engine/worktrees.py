"""Attempt worktrees: one per agent under CLI_COUNCIL_HOME/worktrees, never inside the user's repo."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import anyio

from .gitcmd import COUNCIL_ENV, COUNCIL_IDENTITY, GitError, concurrently, diff_stat, git, git_ok


async def scratch_excludes(path: Path, scratch: tuple[str, ...]) -> list[str]:
    """`:(exclude)` pathspecs for the scratch paths git does not ignore already. Ignored ones need
    none (`add -A` skips them), and git 2.39's `add` exits 1 ("The following paths are ignored by
    one of your .gitignore files") on an exclude that names an ignored path."""
    if not scratch:
        return []
    ignored = set((await git(path, "check-ignore", "--", *scratch, check=False)).splitlines())
    return [f":(exclude){d}" for d in scratch if d not in ignored]


def _exactly(path: str) -> str:
    """A gitignore pattern matching this one path from the top: anchored, wildcards escaped."""
    return "/" + re.sub(r"([][*?\\])", r"\\\1", path)


BRANCH_ROOT = "council"  # every attempt's branch is under it: a branch of this very name blocks them all


def branch_name(task_id: str, agent: str) -> str:
    return f"{BRANCH_ROOT}/{task_id}/{agent}"


class Worktrees:
    def __init__(self, root: Path):
        self.root = root
        self._locks: dict[str, anyio.Lock] = {}

    def path(self, task_id: str, agent: str) -> Path:
        return self.root / task_id / agent

    def lock(self, repo: str) -> anyio.Lock:
        """git 2.39 can fail on concurrent `worktree add` to one repo, so the metadata step is serialized per repo."""
        return self._locks.setdefault(repo, anyio.Lock())

    async def add(self, repo: str, task_id: str, agent: str, base: str) -> tuple[Path, str]:
        """A new worktree on a new branch at `base`. Only git's metadata (`worktree add --no-checkout`:
        a few files under .git/worktrees) is made under the repo's lock; the checkout, which is the
        cost, runs outside it, so parallel attempts check out in parallel (each its own index and
        files; the object store is only read). The checkout is the `reset --hard` git's own add runs."""
        path, branch = self.path(task_id, agent), branch_name(task_id, agent)
        await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True)  # not on the loop: disks stall
        async with self.lock(repo):
            for attempt in range(3):
                try:
                    await git(repo, "worktree", "add", "--quiet", "--no-checkout", "-b", branch, str(path), base)
                    break
                except GitError as e:
                    # Another process adding a worktree to this repo at the same moment (git 2.39 races).
                    if attempt == 2 or "commondir" not in e.stderr:
                        raise
                    await git(repo, "worktree", "prune")
                    await git(repo, "branch", "-D", branch, check=False)
                    await anyio.to_thread.run_sync(shutil.rmtree, path, True)
                    await anyio.sleep(0.1)
        try:
            await git(path, "reset", "--hard", "--quiet", "--no-recurse-submodules")
        except BaseException:  # as git's own add does: a worktree whose checkout failed is not left behind
            with anyio.CancelScope(shield=True):
                await git(repo, "worktree", "remove", "--force", str(path), check=False)
                await git(repo, "branch", "-D", branch, check=False)
            raise
        return path, branch

    async def commit_all(self, path: Path, message: str, scratch: tuple[str, ...] = (),
                         base: str | None = None) -> bool:
        """Commit whatever the agent left uncommitted but its scratch paths; False when there was nothing.

        Scratch paths (an adapter's `scratch`: a CLI's own bookkeeping in the worktree) never reach
        the result, whether git ignores them or not. With `base`, scratch paths the agent committed
        itself (Auto-Claude's coder commits with `git add . ':!.auto-claude'`, which takes its root
        bookkeeping files along) are taken back to their state in base, so the branch's tree
        differs from base by the work alone."""
        await self._stage(path, scratch, base)
        return await self._commit_staged(path, message)

    async def commit_and_count(self, path: Path, message: str, scratch: tuple[str, ...],
                               base: str) -> tuple[list[str], int, int]:
        """commit_all, then what the branch changed since `base`: (files, insertions, deletions).
        The counts are read from the staged index, which is the tree the commit records, while the
        commit is written: one git process less on the path from an agent's end to its result."""
        await self._stage(path, scratch, base)
        _, stat = await concurrently(lambda: self._commit_staged(path, message),
                                     lambda: diff_stat(path, "--cached", base))
        return stat

    async def _stage(self, path: Path, scratch: tuple[str, ...], base: str | None) -> None:
        await git(path, "add", "-A", "--", ".", *await scratch_excludes(path, scratch))
        if base and scratch and await git(path, "diff", "--cached", "--name-only", "--no-renames", base, "--",
                                          *scratch):
            await git(path, "reset", "-q", base, "--", *scratch)

    async def _commit_staged(self, path: Path, message: str) -> bool:
        # Committed straight away (one git process, not a `diff --cached` first): commit exits 1 when
        # nothing is staged, and only then is the index asked whether that was the reason.
        # The variables beat a repo's author.name / committer.name, which beat user.name. No
        # `maintenance run --auto` after each attempt's commit (a process per attempt): the user's own
        # git does the repo's housekeeping.
        try:
            await git(path, *COUNCIL_IDENTITY, "-c", "maintenance.auto=false", "commit", "--quiet", "--no-verify",
                      "-m", message, env=COUNCIL_ENV)
        except GitError as e:
            if e.code == 1 and await git_ok(path, "diff", "--cached", "--quiet"):
                return False
            raise
        return True

    async def reset(self, path: Path, base: str, keep: tuple[str, ...] = ()) -> None:
        """Back to the base commit before a retry, so a retried agent starts clean; the untracked
        paths in `keep` (what the repo's setup made) stay."""
        await git(path, "reset", "--quiet", "--hard", base)
        await git(path, "clean", "-fdq", *(f"--exclude={_exactly(p)}" for p in keep))
