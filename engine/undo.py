"""Take a merge back: the target branch returns to its tip from before the task's merge.

Only while the target still is where the merge left it (a commit on top would be dropped with it:
the refusal names those commits), and, where it is checked out, only when that checkout is clean
(its files move with it). Nothing is lost: the undone merge commit stays reachable under
`refs/council/undone/<task_id>` (then `-2`, `-3`...), and the old tip was already kept under the
merge's backup ref. The task goes back to its finished state; where the merge's cleanup removed the
attempt's branch, the branch is made again (the merge's changes on the task's base) so that the
task can be merged again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from .gitcmd import COUNCIL_ENV, GitError, git, git_ok, resolve_commit
from .inputs import CouncilError
from .merge import (BACKUP_PREFIX, MergeRefused, _check_checkout, _commit, _find_checkout, _three_way,
                    check_target)
from .models import ACTIVE_TASK, AttemptState, MergeResult, Task, TaskState

if TYPE_CHECKING:
    from .engine import Engine

UNDONE_PREFIX = "refs/council/undone/"
SHOWN_AFTER = 20  # commits listed in a refusal


async def undo_merge(engine: "Engine", task_id: str) -> MergeResult:
    task = await engine.get(task_id)
    if task.state in ACTIVE_TASK:
        raise CouncilError(f"task {task_id} is {task.state}: it has no merge to undo")
    if task.state != TaskState.merged or not task.merge_commit:
        raise CouncilError(f"task {task_id} is {task.state}, not merged: there is no merge to undo")
    if not await anyio.Path(task.repo).is_dir():
        raise CouncilError(f"the task's repo {task.repo} is gone")
    repo, merged = task.repo, task.merge_commit
    agent = await git(repo, "log", "-1", "--format=%(trailers:key=Council-Agent,valueonly)", merged,
                      check=False) or None

    def refuse(message: str, into: str | None = None) -> MergeResult:
        return MergeResult(merged=False, task_id=task_id, agent=agent, strategy="undo", into=into,
                           message=f"not undone, nothing was changed: {message}")

    try:
        into = await check_target(repo, task.merge_into or task.into or "")
    except MergeRefused as e:
        return refuse(f"the merge's target is no branch to move now: {e}")
    old, why = await _old_tip(task)
    if old is None:
        return refuse(why, into)
    tip = await resolve_commit(repo, f"refs/heads/{into}")
    if tip != merged:
        return refuse(await _moved(repo, into, merged, tip), into)
    try:
        checkout = await _find_checkout(repo, into)
        if checkout:
            await _check_checkout(checkout, into, merged, old, "undo")
    except MergeRefused as e:
        return refuse(str(e), into)
    reflog = f"cli-council: undo the merge of task {task_id}"
    keep = await _free_name(repo, task_id)
    try:
        # One transaction, only from the merge commit: a commit made on `into` since the checks makes
        # it fail instead of being dropped (a reset of the checkout would drop it).
        await git(repo, "update-ref", "-m", reflog, "--stdin",
                  input=f"create {keep} {merged}\nupdate refs/heads/{into} {old} {merged}\n".encode())
    except GitError as e:
        return refuse(f"git would not move {into}, it may have moved meanwhile ({e.stderr or e})", into)
    if checkout:
        try:  # the files follow the branch; git refuses to overwrite a change made since the checks
            await git(checkout, "read-tree", "-m", "-u", merged, old)
        except GitError as e:
            await git(repo, "update-ref", "-m", f"{reflog}: taken back", "--stdin", check=False,
                      input=f"update refs/heads/{into} {merged} {old}\ndelete {keep} {merged}\n".encode())
            return refuse(f"git would not update the files of {checkout} ({e.stderr or e})", into)
    restored = await _restore_branch(task, agent, old, merged)
    task.state = _finished_state(task)
    task.merge_commit = task.merge_into = task.merge_backup_ref = None
    where = f"and moved the files of {checkout} with it" if checkout else "(not checked out; only the branch moved)"
    message = (f"undid the merge: {into} is back at {old[:12]} {where}; the undone merge commit "
               f"{merged[:12]} stays reachable at {keep}{restored}; the task is {task.state} again "
               "and can be merged again")
    await engine._note(task, message)
    await engine._save(task)
    return MergeResult(merged=False, task_id=task_id, agent=agent, strategy="undo", into=into, commit=old,
                       backup_ref=keep, message=message)


async def _old_tip(task: Task) -> tuple[str | None, str]:
    """The target's tip from before the merge, from the merge's backup ref (or, for a task merged
    before merges recorded theirs, the task's backup ref nearest below the merge commit)."""
    repo, merged = task.repo, task.merge_commit
    if task.merge_backup_ref:
        old = await resolve_commit(repo, task.merge_backup_ref)
        if old is None:
            return None, (f"the merge's backup ref {task.merge_backup_ref} is gone, so where the branch was "
                          "before the merge is not known; `git reflog` of the branch shows it")
        if not await git_ok(repo, "merge-base", "--is-ancestor", old, merged):
            return None, f"{task.merge_backup_ref} ({old[:12]}) is not below the merge commit {merged[:12]}"
        return old, ""
    names = (await git(repo, "for-each-ref", "--format=%(refname)", f"{BACKUP_PREFIX}{task.task_id}",
                       f"{BACKUP_PREFIX}{task.task_id}-*")).splitlines()
    best = None
    for name in names:
        old = await resolve_commit(repo, name)
        if old and old != merged and await git_ok(repo, "merge-base", "--is-ancestor", old, merged):
            if best is None or await git_ok(repo, "merge-base", "--is-ancestor", best, old):
                best = old
    return best, ("" if best else f"no backup ref of task {task.task_id} ({BACKUP_PREFIX}{task.task_id}...) "
                                  "is below its merge commit")


async def _moved(repo: str, into: str, merged: str, tip: str | None) -> str:
    """Why the target cannot go back: the commits that came after the merge, or how it was rewritten."""
    if tip and await git_ok(repo, "merge-base", "--is-ancestor", merged, tip):
        after = (await git(repo, "log", "--format=%h %s", f"{merged}..{tip}")).splitlines()
        shown = "; ".join(after[:SHOWN_AFTER]) + (f"; and {len(after) - SHOWN_AFTER} more" if len(after) > SHOWN_AFTER
                                                   else "")
        return (f"{into} has moved since the merge ({merged[:12]}): {len(after)} commit(s) came after it: {shown}. "
                f"Undoing would drop them; revert the merge instead (`git revert {merged[:12]}`)")
    return (f"{into} no longer contains the merge commit {merged[:12]} (it is at {(tip or 'nothing')[:12]}): "
            "it was reset or rewritten since, so there is nothing to undo there")


async def _free_name(repo: str, task_id: str) -> str:
    taken = set((await git(repo, "for-each-ref", "--format=%(refname)", UNDONE_PREFIX)).splitlines())
    n = 1
    while (name := f"{UNDONE_PREFIX}{task_id}" + (f"-{n}" if n > 1 else "")) in taken:
        n += 1
    return name


async def _restore_branch(task: Task, agent: str | None, old: str, merged: str) -> str:
    """Make the merged attempt's branch again when the merge's cleanup removed it: one commit on the
    task's base with what the merge brought (old..merged). Returns a note for the message."""
    try:
        attempt = task.attempt(agent or task.best or "")
    except KeyError:
        return ""
    if not attempt.branch or await resolve_commit(task.repo, f"refs/heads/{attempt.branch}"):
        return ""
    try:
        tree, conflicts = await _three_way(task.repo, old, task.base, merged)
        if conflicts:  # the merge's changes do not apply to the base alone: the merged tree itself
            tree = await git(task.repo, "rev-parse", f"{merged}^{{tree}}")
        commit = await _commit(task.repo, tree, [task.base],
                               f"council {task.task_id}: {attempt.agent} (made again by undo_merge)\n", env=COUNCIL_ENV)
        await git(task.repo, "update-ref", "-m", "cli-council: undo_merge", f"refs/heads/{attempt.branch}", commit, "")
    except GitError as e:
        return f"; its branch {attempt.branch} could not be made again ({e.stderr or e})"
    return f"; its branch {attempt.branch} is back (the merged changes on the task's base)"


def _finished_state(task: Task) -> TaskState:
    best = next((a for a in task.attempts if a.agent == task.best), None)
    ok = best is not None and best.state == AttemptState.succeeded and task.error is None
    return TaskState.succeeded if ok else TaskState.failed


__all__ = ["undo_merge", "UNDONE_PREFIX"]
