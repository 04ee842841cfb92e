"""A repo's own worktree setup: `.cli-council.toml` at its top, read at a task's base commit.

The user commits it (`[worktree] setup = "npm ci"`, `copy = [".env"]`, `ports = 1`); the user's
config overrides it key by key: `[worktree]` for every repo, then `[worktree] repos."PATH"` for one.
It is read from the base commit, not from the checkout: every attempt of a task gets the same
setup whatever the user is editing, and a pool entry made at one commit can tell whether its setup
still holds at another. The file is checked as strictly as the user's config (config.py), and every
problem is reported at once, naming the file, the commit and the key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass

import anyio
from pydantic import ValidationError

from .config import Config, ConfigError, Problems, WorktreeOverride, _check_values, _reason, _show, _suggest, _where
from .gitcmd import git

REPO_FILE = ".cli-council.toml"
MAX_BYTES = 256 * 1024
SETUP_TIMEOUT_S = 900.0
_CACHE_MAX = 256


@dataclass(frozen=True)
class WorktreeSetup:
    """What every new worktree of a repo gets before its agent starts."""

    setup: str | None = None  # a shell command line run in the worktree; None: nothing to run
    copy: tuple[str, ...] = ()  # untracked files copied from the user's checkout
    ports: int = 0  # free ports reserved per attempt
    setup_timeout_s: float = SETUP_TIMEOUT_S


def parse_repo_file(text: str, source: str) -> WorktreeOverride:
    """The `[worktree]` table of a `.cli-council.toml`; ConfigError lists every problem."""
    problems = Problems(source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{problems.prefix}not valid TOML: {e}") from None
    _check_values(problems, data, ())
    table = {}
    for key, value in data.items():
        if key != "worktree":
            problems.add((key,), f"[{key}] is not a section of {REPO_FILE}; it holds only [worktree]"
                         if isinstance(value, dict) else f"{key} = {_show(value)} is outside [worktree]")
        elif not isinstance(value, dict):
            problems.add((key,), "[worktree] must be a table")
        else:
            fields = WorktreeOverride.model_fields
            for name in value:
                if name not in fields:
                    problems.add((key, name), f"[worktree] {name} is not a key of [worktree]; "
                                              f"{_suggest(name, fields, 'keys')}")
            table = {k: v for k, v in value.items() if k in fields}
    found = WorktreeOverride()
    try:
        found = WorktreeOverride.model_validate(table, strict=True)
    except ValidationError as e:
        for err in e.errors():
            loc = ("worktree", *err["loc"])
            problems.add(loc, f"{_where(loc)} = {_show(err['input'])} {_reason(err)}")
    problems.raise_any()
    return found


class RepoConfigs:
    """Reads `.cli-council.toml` at a commit, once per (repo, commit): a commit never changes."""

    def __init__(self):
        self._cache: dict[tuple[str, str], WorktreeOverride | ConfigError] = {}

    async def repo_file(self, repo: str, commit: str) -> WorktreeOverride:
        """The repo's own [worktree] at `commit` (empty when it has no file); ConfigError if it is broken."""
        key = (repo, commit)
        if key not in self._cache:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.pop(next(iter(self._cache)))
            try:
                self._cache[key] = await self._read(repo, commit)
            except ConfigError as e:
                self._cache[key] = e
        found = self._cache[key]
        if isinstance(found, ConfigError):
            raise found
        return found

    async def _read(self, repo: str, commit: str) -> WorktreeOverride:
        source = f"{os.path.join(repo, REPO_FILE)} at commit {commit[:12]}"
        entry = await git(repo, "ls-tree", "-z", "--full-tree", commit, "--", REPO_FILE, check=False)
        if not entry:
            return WorktreeOverride()
        meta, _, _ = entry.partition("\t")
        mode, kind, oid = meta.split(" ")
        if kind != "blob" or mode == "120000":
            raise ConfigError(f"config {source}: is a {'symlink' if mode == '120000' else kind}, not a file")
        size = int(await git(repo, "cat-file", "-s", oid))
        if size > MAX_BYTES:
            raise ConfigError(f"config {source}: {size:,} bytes; at most {MAX_BYTES:,}")
        raw = await git(repo, "cat-file", "blob", oid)
        return parse_repo_file(raw, source)

    async def settings(self, config: Config, repo: str, commit: str) -> WorktreeSetup:
        """The repo's file at `commit`, overridden by the user's [worktree], then by its `repos` entry
        for this repo. ConfigError when the repo's file is broken."""
        layers = [await self.repo_file(repo, commit), config.worktree]
        if config.worktree.repos:
            mine = await anyio.to_thread.run_sync(_repo_entry, config, repo)
            if mine is not None:
                layers.append(mine)
        merged: dict = {}
        for layer in layers:
            merged.update({k: v for k in WorktreeOverride.model_fields if (v := getattr(layer, k)) is not None})
        return WorktreeSetup(setup=merged.get("setup") or None, copy=tuple(merged.get("copy") or ()),
                             ports=merged.get("ports") or 0,
                             setup_timeout_s=merged.get("setup_timeout_s") or SETUP_TIMEOUT_S)


def _repo_entry(config: Config, repo: str) -> WorktreeOverride | None:
    """The user's `[worktree] repos` entry naming this repo (~ and symlinks resolved), if any."""
    here = os.path.realpath(repo)
    for path, override in config.worktree.repos.items():
        if os.path.realpath(os.path.expanduser(path)) == here:
            return override
    return None


__all__ = ["REPO_FILE", "RepoConfigs", "WorktreeSetup", "parse_repo_file"]
