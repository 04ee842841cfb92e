"""Make a new worktree ready for its agent: the repo's untracked files copied in, its setup run.

A fresh worktree of a real project has no `node_modules`, no virtualenv and no `.env`, so neither
the agent nor the check could run the project's tests. The repo says what it needs in
`.cli-council.toml` (repoconfig.py). The setup command runs through the one process runner, in
its own process group, with the agents' allow-listed environment and shared caches outside the
worktree. What the setup and the copies leave in the worktree is never part of the attempt's
result: the paths `git status` shows after them are recorded in the worktree's private git dir,
left out of the attempt's commit, and not counted as unsaved work by cleanup.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from adapters.base import Invocation, allowed_env

from . import runner
from .gitcmd import git
from .repoconfig import WorktreeSetup

SHELL = "/bin/sh"
OUTPUT_FILE = "council-setup-output"  # in the worktree's own git dir: the setup's paths, NUL-separated
KEEP_LINES = 2000  # setup output a pool entry keeps to show in the attempt that takes it

# Package managers' download caches, shared by every worktree (under CLI_COUNCIL_HOME/cache): a
# second `npm ci` or `pip install` fetches nothing. Only caches the tools keep safe for concurrent
# use; never a tool's install location.
CACHES = {"npm_config_cache": "npm", "YARN_CACHE_FOLDER": "yarn", "npm_config_store_dir": "pnpm-store",
          "PIP_CACHE_DIR": "pip", "UV_CACHE_DIR": "uv", "GOMODCACHE": "go-mod", "GOCACHE": "go-build"}

Spawn = Callable[[Invocation, float, runner.LineSink], Awaitable[runner.RunResult]]


class SetupFailed(Exception):
    """The repo's setup could not make the worktree ready; the message says what to change."""


def setup_env(environ: dict[str, str], home: Path) -> dict[str, str]:
    """The setup's environment: the agents' allow-list, and the shared caches unless the user set them."""
    env = allowed_env(environ)
    for name, sub in CACHES.items():
        env[name] = environ.get(name) or str(home / "cache" / sub)
    return env


async def run_setup(path: Path, ws: WorktreeSetup, env: dict[str, str], spawn: Spawn,
                    on_line: runner.LineSink) -> None:
    """Run the setup command in the worktree; SetupFailed if it cannot start, fails or times out."""
    if not ws.setup:
        return
    tail: list[str] = []

    async def keep(stream: str, text: str) -> None:
        tail[:] = [*tail[-4:], text] if text.strip() else tail
        await on_line(stream, text)

    inv = Invocation(argv=[SHELL, "-c", ws.setup], env=env, cwd=path)
    try:
        result = await spawn(inv, ws.setup_timeout_s, keep)
    except runner.SpawnError as e:
        raise SetupFailed(f"setup `{ws.setup}` could not start: {e}") from None
    if result.timed_out:
        raise SetupFailed(f"setup `{ws.setup}` took longer than {ws.setup_timeout_s:g}s and was killed; "
                          "raise [worktree] setup_timeout_s in .cli-council.toml or the config")
    if result.exit_code != 0:
        last = f": {tail[-1][:300]}" if tail else ""
        raise SetupFailed(f"setup `{ws.setup}` failed (exit {result.exit_code}){last}; the attempt's log "
                          "has its output")


# Copying the user's untracked files (`.env`, local config) into the worktree.

def _inside(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def _readable(real: Path, src_top: Path) -> bool:
    """A resolved source path the copy may read: in the user's checkout, not in its .git."""
    return _inside(real, src_top) and (src_top / ".git") not in (real, *real.parents)


def _copy_one(src_top: Path, dst_top: Path, rel: str, tracked: set[str]) -> tuple[list[str], list[str]]:
    """(copied paths, warnings). Nothing is followed out of the user's checkout or written out of the
    worktree (a symlink in the way counts as out), nothing in .git is read, and no file the worktree
    tracks is overwritten (that would become part of the result). Runs before the setup and the
    agent, so nothing else writes to the worktree meanwhile."""
    src_top, dst_top = src_top.resolve(), dst_top.resolve()
    src = src_top / rel
    if not os.path.lexists(src):
        return [], [f"copy: {rel} is not in {src_top}; skipped"]
    real = src.resolve()
    if not _readable(real, src_top):
        return [], [f"copy: {rel} leads out of the repo or into .git (to {real}); refused"]
    copied, warnings = [], []
    files = [real] if real.is_file() else sorted(p for p in real.rglob("*") if not p.is_dir() or p.is_symlink())
    for item in files:
        item_real = item.resolve()
        sub = (Path(rel) / item.relative_to(real)).as_posix() if item != real else Path(rel).as_posix()
        if not _readable(item_real, src_top) or not item_real.is_file():
            warnings.append(f"copy: {sub} leads out of the repo, into .git, or is not a file; refused")
            continue
        dst = dst_top / sub
        if sub in tracked:
            warnings.append(f"copy: {sub} would overwrite a tracked file; refused")
            continue
        if not _inside(dst.parent.resolve(), dst_top) or dst.is_symlink():
            warnings.append(f"copy: {sub} would write out of the worktree (a symlink is in the way); refused")
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item_real, dst)
        shutil.copymode(item_real, dst)
        copied.append(sub)
    return copied, warnings


async def copy_files(repo: str, path: Path, paths: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Copy `paths` from the user's checkout into the worktree: (copied, warnings). A missing file is
    a warning, not a failure: a teammate's clone may have no .env yet."""
    if not paths:
        return [], []
    listed = await git(path, "ls-files", "-z", "--", *(f":(literal){p}" for p in paths))
    tracked = set(listed.split("\0")) - {""}
    copied, warnings = [], []
    for rel in paths:
        try:
            got, warned = await anyio.to_thread.run_sync(_copy_one, Path(repo), path, rel, tracked)
        except OSError as e:
            got, warned = [], [f"copy: {rel}: {e}"]
        copied += got
        warnings += warned
    return copied, warnings


# The setup's output: recorded so that it is neither committed nor mistaken for work.

async def untracked_and_changed(path: Path, keep: bool = False) -> list[str]:
    """What `git status` shows (ignored files aside): a new untracked directory as one `dir/` entry.

    With git's untracked cache: once an index holds it (`keep`: this status writes back the index it
    refreshed, as the server's git otherwise never does), a later status reads only the directories
    whose stat changed since instead of every one (50 -> 35 ms on 20,000 files). A directory whose
    stat is not older than the index counts as changed, so a file added in the instant the cache was
    written is not missed."""
    out = await git(path, "-c", "core.untrackedCache=true", "status", "--porcelain=v1", "-z",
                    "--untracked-files=normal", "--no-renames", env={"GIT_OPTIONAL_LOCKS": "1"} if keep else None)
    return sorted(entry[3:] for entry in out.split("\0") if entry)


def git_dir_named(path: Path) -> str:
    """The PATH in the worktree's `.git` file (`gitdir: PATH`), as written: absolute as git writes it.
    Read as bytes, as git reads it: a path need not be UTF-8, and bytes that are not a `.git` file's
    are an OSError like any other unreadable one."""
    text = os.fsdecode((path / ".git").read_bytes())
    if not text.startswith("gitdir: "):
        raise OSError(f"{path}/.git is not a worktree's .git file")
    return text[len("gitdir: "):].strip()


def own_git_dir(path: Path) -> Path:
    """The worktree's private git dir, from its `.git` file, as git itself reads it (a relative PATH
    joins the worktree)."""
    return path / git_dir_named(path)


async def _own_git_dir(path: Path) -> Path:
    return await anyio.to_thread.run_sync(own_git_dir, path)


async def record_output(path: Path, paths: list[str]) -> None:
    target = await _own_git_dir(path) / OUTPUT_FILE
    await anyio.Path(target).write_text("\0".join(paths))


async def recorded_output(path: Path) -> list[str]:
    """The paths the setup and copies left in this worktree ([] for a worktree without any)."""
    try:
        text = await anyio.Path(await _own_git_dir(path) / OUTPUT_FILE).read_text()
    except OSError:
        return []
    return [p for p in text.split("\0") if p]


def exclude(paths: list[str]) -> tuple[str, ...]:
    """Pathspecs leaving these paths (a `dir/` with everything in it) out of a git add or status."""
    return tuple(f":(exclude,literal){p.rstrip('/')}" for p in paths)
