"""Remove what tasks leave behind — worktrees and council branches — without deleting work.

A worktree is the council's scratch space: it goes (forcefully) once everything in it is committed
on a branch, since the branch then holds the work. It stays when its agent may still be running,
when it lies outside the council's worktrees root (nothing there is ever deleted), when it holds
uncommitted changes (tracked or untracked: an agent killed before the council committed its work)
or commits on no branch. A branch goes only when its commits can't be lost: the caller discards it
(an attempt that was not picked), its changes are already in `into`, or its tip is reachable from
another ref. What a repo's worktree setup left (recorded by setup.py: node_modules that is not
ignored, copied .env files) is not work; neither is anything in the warm pool's worktrees, which gc
removes once the process that made them is gone (pool.reap). Everything kept is reported with the reason and the command to resolve it, so `gc`
never deletes work silently, and one broken repo or worktree is reported, not fatal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Awaitable, Callable, Collection, Iterable
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

import anyio

from adapters import KINDS
from engine.gitcmd import GitError, git, git_ok, resolve_commit
from engine.merge import changes_in
from engine.models import ACTIVE_TASK, Attempt, AttemptState, GcReport, Task, TaskState, now
from engine.pool import POOL_DIR, reap as reap_pool
from engine.setup import exclude, own_git_dir, recorded_output

__all__ = ["remove_attempt", "gc", "check_output_until"]

_RUNNING_ATTEMPT = frozenset({AttemptState.queued, AttemptState.running})
TRASH_DIR = ".trash"  # under the worktrees root: removed worktrees whose files are being deleted
Defer = Callable[[Callable[[], None]], None]  # runs a blocking function later, e.g. in a worker thread
# Dirs agent CLIs keep in their worktree that are never part of a result: not work to keep.
_SCRATCH = tuple(sorted({d for cls in KINDS.values() for d in cls.scratch}))


async def _inside(path: str | Path, root: str | Path) -> Path | None:
    """`path` resolved, if it lies strictly inside `root` (symlinks resolved too), else None."""
    resolved = await anyio.Path(path).resolve()
    return Path(resolved) if Path(await anyio.Path(root).resolve()) in Path(resolved).parents else None


def _rmtree_and_empty_parents(path: Path, root: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    parent = path.parent
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()  # only when empty: the task's directory once its last attempt is gone
        except OSError:
            break
        parent = parent.parent


def check_output_until(attempt: Attempt) -> datetime | None:
    """Until when only the council's check wrote to an attempt's worktree, or None when no check ran.

    The engine commits the agent's work before it runs the check, so what is left uncommitted and
    was last modified before the attempt finished is the check's output (bytecode, caches,
    reports), not work; anything touched later (someone working in the kept worktree) is work.
    """
    return attempt.finished_at if attempt.check is not None else None


def _touched_since(worktree: Path, paths: list[str], since: float) -> list[str]:
    """The paths modified after `since` (a deleted path counts: its loss can't be dated)."""
    out = []
    for path in paths:
        try:
            if os.lstat(worktree / path).st_mtime <= since:
                continue
        except OSError:
            pass
        out.append(path)
    return out


async def _unsaved_work(worktree: Path, check_until: datetime | None = None) -> str | None:
    """Why deleting this intact git worktree would lose work, or None: uncommitted changes (ignored
    files, CLIs' scratch dirs and the check's output aside) or commits on no branch (a detached HEAD)."""
    # Unlike `add` (see worktrees.scratch_excludes), `status` takes excludes that name ignored paths.
    out = await git(worktree, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames",
                    "--", ".", *(f":(exclude){d}" for d in _SCRATCH), *exclude(await recorded_output(worktree)))
    paths = [entry[3:] for entry in out.split("\0") if entry]
    if paths and check_until is not None:
        paths = await anyio.to_thread.run_sync(_touched_since, worktree, paths, check_until.timestamp())
    if paths:
        return f"uncommitted changes ({', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''})"
    if not await git_ok(worktree, "symbolic-ref", "-q", "HEAD"):
        head = await resolve_commit(worktree, "HEAD")
        if head and not await git(worktree, "for-each-ref", "--count=1", "--contains", head):
            return f"commits on no branch (detached HEAD at {head[:12]})"
    return None


async def _remove_worktree(repo: str | Path | None, worktree: str | Path, root: str | Path,
                           report: GcReport, check_until: datetime | None = None,
                           defer: Defer | None = None) -> bool:
    """Remove one worktree unless that could lose work; True when it is gone. Given `defer`, the
    deletion of its files is handed to it (see _to_trash) instead of awaited."""
    path = await _inside(worktree, root)
    if path is None:
        report.kept.append(f"{worktree}: outside the council worktrees root {root}; not touched")
        return False
    if await anyio.Path(path).exists():
        owner = await _repo_of(path)
        why = owner is not None and await _unsaved_work(path, check_until)
        if why:
            report.kept.append(f"{path}: {why}; look with `git -C {path} status`, keep the work with "
                               f"`git -C {path} add -A && git -C {path} commit`, or drop it with "
                               f"`git -C {owner} worktree remove --force {path}`")
            return False
        root_path = Path(await anyio.Path(root).resolve())
        trashed = defer is not None and await anyio.to_thread.run_sync(_to_trash, path, root_path)
        if trashed:  # prune below forgets it; its files are deleted after the caller has its answer
            defer(partial(shutil.rmtree, trashed, ignore_errors=True))
        else:
            if repo is not None:
                try:  # twice forced: also when locked or full of ignored files; nothing unsaved is left
                    await git(repo, "worktree", "remove", "--force", "--force", str(path))
                except GitError:
                    pass  # no longer a registered worktree: the leftovers go below, prune forgets it
            await anyio.to_thread.run_sync(_rmtree_and_empty_parents, path, root_path)
        report.removed.append(str(path))
    if repo is not None:
        await git(repo, "worktree", "prune")  # also forgets worktrees whose directory was deleted by hand
    return True


def _to_trash(path: Path, root: Path) -> Path | None:
    """Move an unlocked worktree into the root's trash (a rename: instant, whatever its size) and
    return where it went; None when it has to go the slow way (`git worktree remove`).

    Locked worktrees survive `worktree prune`, so they are left to `remove --force --force`. What a
    crash leaves in the trash, gc deletes: nothing there is work.
    """
    try:
        if (own_git_dir(path) / "locked").exists():
            return None
        trash = root / TRASH_DIR
        trash.mkdir(exist_ok=True)
        target = trash / f"{path.name}-{os.urandom(6).hex()}"
        path.rename(target)
    except (OSError, UnicodeDecodeError):
        return None
    parent = path.parent
    with contextlib.suppress(OSError):
        while parent != root and root in parent.parents:
            parent.rmdir()  # only when empty: the task's directory once its last attempt is gone
            parent = parent.parent
    return target


async def _unique_work(repo: str | Path, branch: str, into: str | None, base: str | None) -> bool:
    """True when deleting `branch` would lose commits: its tip is in no other ref and its changes
    are not in `into`."""
    tip = await git(repo, "rev-parse", f"refs/heads/{branch}")
    holders = await git(repo, "for-each-ref", "--contains", tip, "--format=%(refname)")
    if any(ref != f"refs/heads/{branch}" for ref in holders.splitlines()):
        return False
    return not (into and await changes_in(repo, branch, into, base))


async def _remove_branch(repo: str | Path, branch: str, into: str | None, base: str | None,
                         discard: bool, report: GcReport, merged_tip: str | None = None) -> None:
    if merged_tip and await git_ok(repo, "update-ref", "-d", f"refs/heads/{branch}", merged_tip):
        report.removed.append(branch)  # still at the commit just merged: nothing on it can be lost
        return
    if not await git(repo, "for-each-ref", f"refs/heads/{branch}"):
        return  # already gone
    if not discard and await _unique_work(repo, branch, into, base):
        where = f"not in {into}" if into else "in no other branch"
        report.kept.append(f"{branch}: has work {where}; merge it, or delete it with `git branch -D {branch}`")
        return
    try:
        await git(repo, "branch", "-D", branch)  # git refuses while a worktree has it checked out
    except GitError as e:
        report.kept.append(f"{branch}: {e.stderr}")
        return
    report.removed.append(branch)


async def remove_attempt(repo: str | Path, *, root: str | Path, worktree: str | Path | None = None,
                         branch: str | None = None, into: str | None = None, base: str | None = None,
                         discard: bool = False, running: bool = False,
                         check_until: datetime | None = None, merged_tip: str | None = None,
                         defer: Defer | None = None) -> GcReport:
    """Remove one attempt's worktree (only inside `root`) and branch; report what went and what stayed.

    The worktree is kept while it holds anything uncommitted, `discard` or not (the caller decided
    about the attempt's result, not about leftovers it never saw), and its branch with it;
    `check_until` (see check_output_until) sets the check's own output aside.
    The branch is deleted when `discard` (the caller decided, e.g. an attempt that was not picked),
    when its changes since `base` are already in `into` (any strategy), or when its tip is reachable
    from another ref. `running=True` (its agent may still be working) keeps both. `merged_tip`: the
    branch's commit the caller has just merged; while the branch is still there it goes without
    further checks. `defer`: see _remove_worktree.
    """
    report = GcReport()
    if running:
        report.kept += [f"{item}: its agent is still running" for item in (worktree, branch) if item]
        return report
    if worktree and not await _remove_worktree(repo, worktree, root, report, check_until, defer):
        if branch:
            report.kept.append(f"{branch}: stays with its worktree {worktree}")
        return report
    if branch:
        await _remove_branch(repo, branch, into, base, discard, report, merged_tip)
    return report


def _merge_into(report: GcReport, part: GcReport) -> None:
    report.removed += part.removed
    report.kept += part.kept


async def _subdirs(path: Path) -> list[Path]:
    if not await anyio.Path(path).is_dir():
        return []
    return sorted([Path(p) async for p in anyio.Path(path).iterdir() if await p.is_dir()])


async def _repo_of(worktree: Path) -> Path | None:
    """The repository a worktree belongs to, or None when it is no (intact) git worktree."""
    try:
        common, top = map(Path, (await git(worktree, "rev-parse", "--path-format=absolute", "--git-common-dir",
                                           "--show-toplevel")).splitlines())
    except (GitError, ValueError):
        return None
    if top != worktree:
        return None  # a plain directory inside some enclosing repository
    return common.parent if common.name == ".git" else common


async def _toplevel(path: Path) -> Path | None:
    """The top of the git working tree at `path`, or None when git can't read one there."""
    try:
        return Path(await git(path, "rev-parse", "--show-toplevel"))
    except (GitError, OSError):  # OSError: the directory went away
        return None


async def gc(root: str | Path, tasks: Iterable[Task], *, age_s: float, busy: Collection[str | Path] = (),
             at: datetime | None = None, kill_grace_s: float = 5.0) -> GcReport:
    """Reclaim what tasks finished more than `age_s` ago left behind, and the council's litter.

    - Known finished tasks: worktrees go unless they hold unsaved work; branches go when the task
      was merged (the other attempts were not picked) or when nothing would be lost (see
      remove_attempt).
    - Queued/running tasks, attempts still running and worktrees in `busy` are never touched.
    - A task whose repo is gone (or no longer a git repo): its worktrees are disk litter, except an
      interrupted attempt's, which may hold the only copy of uncommitted work.
    - Directories under `root` of unknown tasks, older than `age_s`: removed if they are not git
      worktrees or hold nothing unsaved; kept otherwise.
    - `council/*` branches of unknown tasks in the repos seen: deleted only if no work is lost.
    Whatever git or the disk refuses is reported as kept with git's words; gc goes on.
    - The warm pool's worktrees of council processes that are gone, and the setups they left running.
    Ages are measured from `at` (now by default).
    """
    root = Path(root)
    cutoff = (at or now()) - timedelta(seconds=age_s)
    busy_paths = {Path(await anyio.Path(p).resolve()) for p in busy}
    known = {t.task_id: t for t in tasks}
    report = GcReport()
    repos: set[Path] = set()
    recorded: set[Path] = set()
    handled: set[tuple[Path, str]] = set()

    async def guarded(what: str, step: Awaitable[GcReport | None]) -> None:
        """Run one step; what git or the disk refuses is reported as kept, and gc goes on."""
        try:
            part = await step
        except (GitError, OSError) as e:
            report.kept.append(f"{what}: kept, could not check it: {getattr(e, 'stderr', None) or e}")
            return
        if part is not None:
            _merge_into(report, part)

    async def finished_task(task: Task) -> None:
        repo = Path(await anyio.Path(task.repo).resolve())
        has_repo = await _toplevel(repo) == repo
        if has_repo:
            repos.add(repo)
        for attempt in task.attempts:
            running = attempt.state in _RUNNING_ATTEMPT or (
                attempt.worktree is not None and Path(await anyio.Path(attempt.worktree).resolve()) in busy_paths)
            if not has_repo:
                if not attempt.worktree or running or not await anyio.Path(attempt.worktree).exists():
                    continue
                if attempt.state == AttemptState.interrupted:
                    report.kept.append(f"{attempt.worktree}: its repo {task.repo} is gone and its agent was "
                                       "stopped before the council committed its work; delete it by hand when sure")
                else:  # the council committed this attempt's work into a repo that is gone
                    await _remove_worktree(None, attempt.worktree, root, report)
                continue
            await guarded(attempt.worktree or attempt.branch or task.task_id, remove_attempt(
                repo, root=root, worktree=attempt.worktree, branch=attempt.branch, into=task.into,
                base=task.base, discard=task.state == TaskState.merged, running=running,
                check_until=check_output_until(attempt)))
            if attempt.branch:
                handled.add((repo, attempt.branch))

    async def unknown_worktree(wt: Path) -> None:
        mtime = datetime.fromtimestamp((await anyio.Path(wt).stat()).st_mtime, cutoff.tzinfo)
        if mtime > cutoff:
            report.kept.append(f"{wt}: unknown worktree, younger than {age_s:g}s")
            return
        repo = await _repo_of(wt)
        if repo is not None:
            repos.add(repo)
        await _remove_worktree(repo, wt, root, report)

    async def council_branches(repo: Path) -> None:
        names = await git(repo, "for-each-ref", "--format=%(refname:strip=2)", "refs/heads/council/")
        for branch in names.splitlines():
            if (repo, branch) in handled:
                continue
            task = known.get(branch.split("/")[1]) if branch.count("/") >= 2 else None
            if task is not None and (task.state in ACTIVE_TASK or (task.finished_at or task.created_at) > cutoff):
                continue
            await guarded(branch, remove_attempt(
                repo, root=root, branch=branch, into=task.into if task else None,
                base=task.base if task else None, discard=task is not None and task.state == TaskState.merged))
        await git(repo, "worktree", "prune")

    for task in known.values():
        worktrees = [Path(await anyio.Path(a.worktree).resolve()) for a in task.attempts if a.worktree]
        recorded.update(worktrees)
        if task.state in ACTIVE_TASK or (task.finished_at or task.created_at) > cutoff:
            if any([await anyio.Path(w).exists() for w in worktrees]):
                why = f"still {task.state}" if task.state in ACTIVE_TASK else f"finished less than {age_s:g}s ago"
                report.kept.append(f"task {task.task_id}: {why}")
            continue
        await guarded(f"task {task.task_id}", finished_task(task))

    _merge_into(report, await reap_pool(root, kill_grace_s))
    trash = root / TRASH_DIR
    if await anyio.Path(trash).exists():  # removed worktrees a stopped process had not finished deleting
        await anyio.to_thread.run_sync(partial(shutil.rmtree, trash, ignore_errors=True))
    for task_dir in await _subdirs(root):
        if task_dir.name in (POOL_DIR, TRASH_DIR):
            continue  # the warm pool's, handled above: a live process's entries are its own
        owner = known.get(task_dir.name)
        if owner is not None and owner.state in ACTIVE_TASK:
            continue  # its worktrees may still be being created
        for wt in await _subdirs(task_dir):
            wt = Path(await anyio.Path(wt).resolve())
            if wt in recorded:
                continue
            if wt in busy_paths:
                report.kept.append(f"{wt}: busy")
                continue
            await guarded(str(wt), unknown_worktree(wt))
        with contextlib.suppress(OSError):
            await anyio.Path(task_dir).rmdir()  # only when empty

    for repo in sorted(repos):
        await guarded(str(repo), council_branches(repo))
    return report
