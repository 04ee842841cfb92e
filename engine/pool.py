"""Where attempts get their worktrees: ready from the warm pool, or fresh.

A fresh worktree of a real project costs a checkout plus the repo's setup (`npm ci`: minutes).
The pool keeps `[pool] size` worktrees per repo made ahead at the repo's HEAD with the setup
already run, refilled in the background (in the Engine's task group) after each take. Taking one
moves it to the attempt's path and branch (as `git worktree move`, then `git checkout -b BRANCH BASE`,
which rewrites only the files that differ; an entry whose setup ran is only used at the commit it
ran at, as its output may depend on any file) and verifies it clean before the agent starts: HEAD at
the base, and `git status` showing exactly what its setup left. That status runs when the entry is
made, under a watch (watch.py) of the directories it reads; a take at the entry's base whose watch
saw nothing since needs no other. Anything else (a stray file, a setup that changed since the entry
was made, git refusing) discards the entry and the attempt gets a fresh worktree. An entry is used
once: a taken worktree never returns to the pool.

Entries live under CLI_COUNCIL_HOME/worktrees/pool/<pid>-<start>/<id>: the directory names the
process that owns them, so a later process (its start, `gc`) removes those of a process that is
gone, and stops any setup it left running (its run marker is `pool.<owner>.<id>`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from . import runner, setup
from .config import Config, ConfigError
from .gitcmd import GitError, concurrently, git, resolve_commit
from .models import GcReport
from .repoconfig import RepoConfigs, WorktreeSetup
from .watch import Watch
from .worktrees import Worktrees, branch_name

POOL_DIR = "pool"

logger = logging.getLogger("cli_council.pool")


@dataclass
class Entry:
    repo: str
    base: str
    path: Path
    setup: str | None  # the setup command it was made with
    output: list[str]  # what `git status` showed after its copies and setup: allowed, never committed
    lines: list[tuple[str, str]] = field(default_factory=list)  # the setup's output, for the attempt's log
    made_at: float = field(default_factory=time.time)
    watch: Watch | None = None  # on since before its last status; None: a take runs one
    watched: bool = False  # its take found the watch untouched and ran no status


@dataclass
class Workspace:
    """An attempt's worktree, ready for its agent."""

    path: Path
    branch: str
    keep_out: list[str] = field(default_factory=list)  # the setup's and copies' paths: never in the result
    env: dict[str, str] = field(default_factory=dict)  # for the agent and the check: the leased ports
    pooled: Entry | None = None  # the pool entry it came from, or None when made fresh


def _owner_name(pid: int, start: int | None) -> str:
    return f"{pid}-{start}"


def _marker(owner: str, entry_id: str) -> str:
    return f"pool.{owner}.{entry_id}"


class Pool:
    def __init__(self, worktrees: Worktrees, home: Path, environ: dict[str, str], repo_configs: RepoConfigs,
                 owner: tuple[int, int | None], kill_grace_s: float = 5.0):
        self.worktrees = worktrees
        self.home = home
        self.environ = environ
        self.repo_configs = repo_configs
        self.owner = _owner_name(*owner)
        self.dir = worktrees.root / POOL_DIR / self.owner
        self.kill_grace_s = kill_grace_s
        self._entries: dict[str, list[Entry]] = {}
        self._filling: set[str] = set()
        self._trees: dict[tuple[str, str], tuple[int, frozenset[str] | None]] = {}  # files, dirs
        self._failed: set[tuple[str, str, str | None]] = set()  # (repo, commit, setup) whose setup failed here
        self._tg: TaskGroup | None = None
        self._config: Config | None = None

    # the one place attempts get a worktree

    async def checkout(self, config: Config, repo: str, task_id: str, agent: str, base: str,
                       ws: WorktreeSetup) -> Workspace:
        """The attempt's worktree at `base` on its branch: a verified pool entry when one fits, else
        a fresh `Worktrees.add`. The caller asks for the refill (`want`) once its agent has started:
        a refill's checkout beside the agents' starts slows them down."""
        taken = await self._take(repo, task_id, agent, base, ws)
        if taken is not None:
            return taken
        path, branch = await self.worktrees.add(repo, task_id, agent, base)
        return Workspace(path=path, branch=branch)

    async def prepare(self, repo: str, ws: WorktreeSetup, work: Workspace, spawn: setup.Spawn,
                      log: runner.LineSink, note: Callable[[str], Awaitable[None]]) -> None:
        """Copy the repo's untracked files in and, for a fresh worktree, run the setup (SetupFailed)."""
        copied, warnings = await setup.copy_files(repo, work.path, ws.copy)
        for w in warnings:
            await note(w)
        if work.pooled is not None:
            when = time.strftime("%H:%M:%S", time.localtime(work.pooled.made_at))
            await note(f"worktree ready from the warm pool (made at {when} at {work.pooled.base[:12]}"
                       + ("; watched since it was verified clean: unchanged)" if work.pooled.watched else ")")
                       + (f"; its setup `{ws.setup}` ran then, its output:" if ws.setup else ""))
            for stream, text in work.pooled.lines:
                await log(stream, text)
        elif ws.setup:
            await note(f"setup: {ws.setup}")
        try:
            if work.pooled is None:
                await setup.run_setup(work.path, ws, setup.setup_env(self.environ, self.home), spawn, log)
        finally:  # also after a failed setup: what it left is no work for cleanup to keep
            with anyio.CancelScope(shield=True):
                if work.pooled is not None and not copied:
                    work.keep_out = work.pooled.output  # what the take just verified
                elif work.pooled is None and not copied and not ws.setup:
                    work.keep_out = []  # a checkout nothing ran in: a status would stat every file to say so
                else:
                    work.keep_out = await setup.untracked_and_changed(work.path)
                if work.keep_out:
                    await setup.record_output(work.path, work.keep_out)

    # the pool itself

    def start(self, tg: TaskGroup) -> None:
        """Refills run in the Engine's task group from now on; without it the pool stays empty."""
        self._tg = tg

    def want(self, config: Config, repo: str) -> None:
        """Make sure a refill of the repo's pool is under way, if it is on and short."""
        self._config = config
        if (self._tg is None or config.pool.size <= 0 or repo in self._filling
                or len(self._entries.get(repo, [])) >= config.pool.size):
            return
        self._filling.add(repo)
        self._tg.start_soon(self._fill, repo)

    def ready(self, repo: str) -> int:
        """How many entries of the repo are ready to take."""
        return len(self._entries.get(repo, []))

    def filling(self, repo: str) -> bool:
        """Whether a refill of the repo's pool is under way."""
        return repo in self._filling

    async def _fill(self, repo: str) -> None:
        try:
            while True:
                config = self._config
                head = await resolve_commit(repo, "HEAD")
                if head is None or (dirs := await self._dirs_if_small(repo, head, config.pool.max_files)) is None:
                    return
                try:
                    ws = await self.repo_configs.settings(config, repo, head)
                except ConfigError as e:
                    logger.warning("no warm pool for %s: %s", repo, e)
                    return
                if (repo, head, ws.setup) in self._failed:
                    return  # it would fail again: the attempts run it themselves and say why
                entries = self._entries.setdefault(repo, [])
                for old in [e for e in entries if not _fits(e, head, ws)]:  # another setup, or its output is stale
                    entries.remove(old)
                    await self._drop(old)
                if len(entries) >= config.pool.size:
                    return
                entry = await self._make(repo, head, ws, dirs)
                if entry is None:
                    self._failed.add((repo, head, ws.setup))
                    return
                self._entries.setdefault(repo, []).append(entry)
        except Exception:  # a broken refill costs speed, never a task
            logger.exception("warm pool refill for %s failed", repo)
        finally:
            self._filling.discard(repo)

    async def _dirs_if_small(self, repo: str, commit: str, max_files: int) -> frozenset[str] | None:
        """The directories holding the commit's files ("" the top) if it tracks at most max_files
        files, else None. The tree is listed once per commit, its directories only gathered for a
        commit small enough to get a pool."""
        files, dirs = self._trees.get((repo, commit), (None, None))
        if dirs is None and (files is None or files <= max_files):
            if len(self._trees) > 64:
                self._trees.clear()
            out = await git(repo, "ls-tree", "-r", "-z", "--name-only", "--full-tree", commit)
            files = out.count("\0")
            dirs = await anyio.to_thread.run_sync(_dirs_of, out) if files <= max_files else None
            self._trees[(repo, commit)] = (files, dirs)
        if files > max_files:
            logger.info("no warm pool for %s: %d files, over [pool] max_files = %d", repo, files, max_files)
            return None
        return dirs

    async def _make(self, repo: str, base: str, ws: WorktreeSetup, dirs: frozenset[str]) -> Entry | None:
        entry_id = uuid.uuid4().hex[:12]
        path = self.dir / entry_id
        await anyio.Path(self.dir).mkdir(parents=True, exist_ok=True)
        lines: list[tuple[str, str]] = []
        entry: Entry | None = None

        async def keep(stream: str, text: str) -> None:
            if len(lines) < setup.KEEP_LINES:
                lines.append(("setup", text))

        async def spawn(inv, timeout_s, on_line):
            return await runner.run(inv, timeout_s=timeout_s, on_line=on_line, kill_grace_s=self.kill_grace_s,
                                    marker=_marker(self.owner, entry_id))

        ok = False
        try:
            await _retried(repo, "worktree", "add", "--quiet", "--detach", str(path), base)
            await setup.copy_files(repo, path, ws.copy)
            try:
                await setup.run_setup(path, ws, setup.setup_env(self.environ, self.home), spawn, keep)
            except setup.SetupFailed as e:
                logger.warning("warm pool for %s: %s", repo, e)
                return None
            # git trusts a file's cached stat only when the file is older than the index, to the second:
            # an index written in the second of the checkout leaves every file "racily clean", re-read
            # by each later status (40 ms on 3,000 files, at the take, on the path of the agent's
            # start). Refreshed and written back in a later second (with the untracked cache), the
            # index makes the take's check a stat per file.
            await anyio.sleep(math.floor(time.time()) + 1.01 - time.time())
            output = await setup.untracked_and_changed(path, keep=True)
            entry = Entry(repo=repo, base=base, path=path, setup=ws.setup, output=output, lines=lines)
            # Watched from before a second status (which writes nothing): whatever changes from then
            # on shows in the watch, whatever changed before in the status.
            entry.watch = await anyio.to_thread.run_sync(_watch, path, dirs)
            if entry.watch is not None and await setup.untracked_and_changed(path) != output:
                await self._unwatch(entry)
            ok = True
            return entry
        finally:
            if not ok:
                with anyio.CancelScope(shield=True):
                    if entry is not None:
                        await self._unwatch(entry)
                    await self._discard(repo, path)

    async def _take(self, repo: str, task_id: str, agent: str, base: str, ws: WorktreeSetup) -> Workspace | None:
        entries = self._entries.get(repo, [])
        fits = [e for e in entries if _fits(e, base, ws)]
        for old in [e for e in entries if not _fits(e, base, ws)]:  # never used: the refill replaces them
            entries.remove(old)
            if self._tg is not None:
                self._tg.start_soon(self._drop, old)
        if not fits:
            return None
        entry = next((e for e in fits if e.base == base), fits[0])  # same base: nothing to rewrite
        entries.remove(entry)
        # Asked before anything of the take happens; the watch itself is closed off its path.
        entry.watched = entry.base == base and entry.watch is not None and entry.watch.untouched()
        if entry.watch is not None and self._tg is not None:
            self._tg.start_soon(self._unwatch, entry)
        dest, branch = self.worktrees.path(task_id, agent), branch_name(task_id, agent)
        made_branch, ok = False, False
        moved: list[Path] = []  # the entry's new place once it is there, even if its registration failed

        def parent() -> Awaitable[None]:
            return anyio.Path(dest.parent).mkdir(parents=True, exist_ok=True)

        try:
            if entry.base == base:  # only the branch is new: no file to touch, no index to refresh
                # The check and the new branch at once (a take is on the path of the agent's start): with
                # HEAD still detached at the base, the status reads the tree the branch is made at.
                async def new_branch() -> None:
                    nonlocal made_branch
                    await git(repo, "update-ref", f"refs/heads/{branch}", base, "")  # "": it must not exist yet
                    made_branch = True

                if entry.watched:  # nothing changed since the status that made it: that one answers
                    await concurrently(new_branch, parent)
                    status = entry.output
                else:
                    _, status, _ = await concurrently(new_branch, lambda: setup.untracked_and_changed(entry.path),
                                                      parent)
                await anyio.to_thread.run_sync(_move, entry.path, dest, branch, moved)
                head = base
            else:
                await parent()
                await anyio.to_thread.run_sync(_move, entry.path, dest, None, moved)
                await git(dest, "checkout", "--quiet", "--no-recurse-submodules", "-b", branch, base)
                made_branch = True
                head = await resolve_commit(dest, "HEAD")
                status = await setup.untracked_and_changed(dest)
            # HEAD's tree vs the index vs the files: anything but what the setup left means not clean
            if head != base or status != entry.output:
                logger.warning("warm pool entry %s for %s is not clean (HEAD %s, status %s); a fresh worktree "
                               "is made instead", entry.path.name, repo, head, status[:5])
                return None
            ok = True
            return Workspace(path=dest, branch=branch, pooled=entry)
        except (GitError, OSError) as e:
            logger.warning("warm pool entry %s for %s could not be taken (%s); a fresh worktree is made instead",
                           entry.path.name, repo, e)
            return None
        finally:
            if not ok:
                with anyio.CancelScope(shield=True):
                    await self._discard(repo, moved[0] if moved else entry.path)
                    if made_branch:
                        await git(repo, "branch", "-D", branch, check=False)

    async def _unwatch(self, entry: Entry) -> None:
        watch, entry.watch = entry.watch, None
        if watch is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(watch.close)

    async def _drop(self, entry: Entry) -> None:
        """An entry that will not be taken: its watch closed, its worktree removed."""
        await self._unwatch(entry)
        await self._discard(entry.repo, entry.path)

    async def _discard(self, repo: str | Path, path: Path) -> None:
        """Remove one entry, whatever cancellation comes meanwhile (a half-removed one would be litter)."""
        with anyio.CancelScope(shield=True):
            try:
                await _retried(str(repo), "worktree", "remove", "--force", "--force", str(path))
            except GitError:  # not (or no longer) a registered worktree: its directory goes, prune forgets it
                await anyio.to_thread.run_sync(shutil.rmtree, path, True)
                await git(repo, "worktree", "prune", check=False)

    async def close(self) -> None:
        """Remove every entry this process made (the Engine's exit), and whatever else is in its directory."""
        entries = [e for es in self._entries.values() for e in es]
        self._entries.clear()
        for entry in entries:
            await self._drop(entry)
        for left in await _subdirs(self.dir):
            await _remove_dir(left)
        await anyio.to_thread.run_sync(_rmdirs, self.dir)


def _fits(entry: Entry, base: str, ws: WorktreeSetup) -> bool:
    """Made with this setup, and at this base unless there is no setup: what a setup made (say
    node_modules from a lockfile) may depend on any file, so it is not carried to another commit."""
    return entry.setup == ws.setup and (entry.base == base or not ws.setup)


def _dirs_of(names: str) -> frozenset[str]:
    """The directories holding the NUL-separated paths, and all above them ("" the top)."""
    dirs = {""}
    for name in names.split("\0"):
        d = name.rpartition("/")[0]
        while d not in dirs:
            dirs.add(d)
            d = d.rpartition("/")[0]
    return frozenset(dirs)


def _watch(path: Path, dirs: frozenset[str]) -> Watch | None:
    """A watch of what `git status` reads in the worktree at `path`: its git dir (index, HEAD) and the
    directories holding tracked files, where any new, changed or removed file shows. Not the inside of
    an untracked directory: a status shows it as one `dir/` line whatever it holds."""
    try:
        admin = setup.own_git_dir(path)
    except OSError:
        return None
    return Watch.start([admin, *(path / d for d in sorted(dirs))])


# A take moves the entry as `git worktree move` does, then (same base) points its HEAD at the new
# branch as `git symbolic-ref` does: without their two processes, half of a take's, which are on the
# path of the agent's start. What git would refuse to move is refused with OSError.

def _rename(src: Path, dest: Path) -> Path:
    """The worktree's directory to its new place, unless git would refuse: a locked worktree, one with
    submodules (their git dirs name the old place), an existing destination. One whose `.git` names
    its git dir relative to where it is (newer git's `worktree.useRelativePaths`) is refused too:
    the name would be wrong from the new place. Returns the worktree's admin dir."""
    admin = Path(setup.git_dir_named(src))
    if not admin.is_absolute():
        raise OSError(f"{src}/.git names its git dir by a relative path")
    for refusal in (admin / "locked", admin / "modules", dest):
        if refusal.exists():
            raise OSError(f"cannot move {src} to {dest}: {refusal} exists")
    os.rename(src, dest)
    return admin


def _move(src: Path, dest: Path, branch: str | None, moved: list[Path]) -> None:
    """_rename, then _register (one worker thread for both: a take is on the path of the agent's
    start); `moved` gets `dest` as soon as the directory is there."""
    admin = _rename(src, dest)
    moved.append(dest)
    _register(admin, dest, branch)


def _register(admin: Path, worktree: Path, branch: str | None) -> None:
    """The moved worktree's admin dir told where it is now (`gitdir`) and, given one, its branch."""
    _write_locked(admin / "gitdir", f"{worktree.resolve()}/.git\n")
    if branch is not None:
        _write_locked(admin / "HEAD", f"ref: refs/heads/{branch}\n")


def _write_locked(path: Path, text: str) -> None:
    """Replace a file as git does: through `<file>.lock`, created only if no git holds it."""
    lock = path.with_name(path.name + ".lock")
    with open(lock, "x") as f:
        f.write(text)
    os.replace(lock, path)


async def _retried(repo: str, *args: str) -> str:
    """A `git worktree` command, tried again when it failed: git 2.39 reads every worktree's metadata
    and fails on one another `worktree add` is half way through writing."""
    for attempt in range(3):
        try:
            return await git(repo, *args)
        except GitError:
            if attempt == 2:
                raise
            await anyio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _rmdirs(path: Path) -> None:
    """Remove `path` and its parent if empty: nothing of a stopped pool is left."""
    for p in (path, path.parent):
        try:
            p.rmdir()
        except OSError:
            return


async def reap(root: Path, grace_s: float = 5.0) -> GcReport:
    """Remove the pool entries of council processes that are gone, and stop the setups they left running.
    Nobody ever worked in a pool entry, so nothing in one is work."""
    report = GcReport()
    pool = root / POOL_DIR
    if not await anyio.Path(pool).is_dir():
        return report
    for owner_dir in await _subdirs(pool):
        pid, _, start = owner_dir.name.partition("-")
        if pid.isdigit() and str(runner.proc_start_time(int(pid))) == start:
            continue  # its process still runs and uses them
        for entry in await _subdirs(owner_dir):
            await runner.stop_marked(_marker(owner_dir.name, entry.name), grace_s)
            await _remove_dir(entry)
            report.removed.append(f"{entry}: warm pool worktree of a stopped process")
        await anyio.to_thread.run_sync(_rmdirs, owner_dir)
    return report


async def _subdirs(path: Path) -> list[Path]:
    def listing() -> list[Path]:
        try:
            return sorted(p for p in path.iterdir() if p.is_dir())
        except OSError:
            return []
    return await anyio.to_thread.run_sync(listing)


async def _remove_dir(entry: Path) -> None:
    """Remove a pool entry found on disk: from its repo's worktree list, then the directory."""
    repo = await _repo_of(entry)
    if repo is not None:
        await git(repo, "worktree", "remove", "--force", "--force", str(entry), check=False)
    await anyio.to_thread.run_sync(shutil.rmtree, entry, True)
    if repo is not None:
        await git(repo, "worktree", "prune", check=False)


async def _repo_of(worktree: Path) -> Path | None:
    """The repo a pool entry belongs to; None unless it is a worktree (a `.git` file), so that git never
    looks further up for an enclosing repository."""
    if not await anyio.Path(worktree / ".git").is_file():
        return None
    try:
        common = Path(await git(worktree, "rev-parse", "--path-format=absolute", "--git-common-dir"))
    except (GitError, OSError):
        return None
    return common.parent if common.name == ".git" else common


__all__ = ["POOL_DIR", "Pool", "Workspace", "reap"]
