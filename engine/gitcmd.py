"""Git as an async subprocess: nothing blocks the event loop, and errors carry git's own words."""

from __future__ import annotations

import os
from pathlib import Path

import anyio

# A fixed identity and no user hooks/config surprises for the commits the council makes itself.
COUNCIL_IDENTITY = ("-c", "user.name=cli-council", "-c", "user.email=cli-council@localhost",
                    "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null")
_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}


class GitError(RuntimeError):
    def __init__(self, args: list[str], code: int, stderr: str):
        self.args_ = args
        self.code = code
        self.stderr = stderr.strip()
        super().__init__(f"git {' '.join(args)} failed ({code}): {self.stderr}")


async def git(cwd: str | Path, *args: str, check: bool = True, input: bytes | None = None,
              env: dict[str, str] | None = None) -> str:
    """Run git in `cwd` and return stdout (stripped of the final newline)."""
    full_env = {**os.environ, **_GIT_ENV, **(env or {})}
    result = await anyio.run_process(["git", *args], cwd=str(cwd), input=input, check=False, env=full_env)
    if check and result.returncode != 0:
        raise GitError(list(args), result.returncode, result.stderr.decode(errors="replace"))
    return result.stdout.decode(errors="replace").rstrip("\n")


async def git_ok(cwd: str | Path, *args: str) -> bool:
    """True when git exits 0 (for questions like `rev-parse --verify`)."""
    result = await anyio.run_process(["git", *args], cwd=str(cwd), check=False,
                                     env={**os.environ, **_GIT_ENV})
    return result.returncode == 0


async def resolve_commit(cwd: str | Path, rev: str) -> str | None:
    """The commit `rev` names, or None. A rev starting with '-' is never read as an option."""
    sha = await git(cwd, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}", check=False)
    return sha or None


async def diff_stat(cwd: str | Path, a: str, b: str) -> tuple[list[str], int, int]:
    """Files changed, insertions, deletions between two commits (binary files count as changed)."""
    out = await git(cwd, "diff", "--numstat", "-z", "--no-renames", a, b)
    files, ins, dels = [], 0, 0
    for rec in out.split("\0"):
        if not rec:
            continue
        added, deleted, path = rec.split("\t", 2)
        files.append(path)
        ins += int(added) if added.isdigit() else 0
        dels += int(deleted) if deleted.isdigit() else 0
    return files, ins, dels
