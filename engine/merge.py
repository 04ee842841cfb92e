"""Bring an attempt's branch into a target branch without ever losing work.

The target must be an existing local branch of the user's (never a council attempt branch).
Everything is first computed as git objects only (merge-tree, commit-tree), so a conflict, a dry run
or a refusal leaves refs, index and working trees exactly as they were. Only then is the target
moved, and its old tip recorded under a backup ref of its own (`refs/council/backup/<task_id>`,
then `<task_id>-2`, `-3`... for later merges of the same task; never overwritten):
- not checked out anywhere: the backup ref and the target move in one ref transaction, the target
  with its old value as a guard;
- checked out and clean: `git merge --ff-only NEW` in that worktree moves ref and files together,
  and git itself refuses if anything changed in between; the backup ref is written after it (the
  old tip is an ancestor of the new one whatever happens, so it is never lost).

Commits that land on the target carry the user's identity (author and committer of squash and
merge commits, committer of replayed ones, whose authors stay the agent's) as their own `git commit`
would record it, or the council's when the repo has none configured (the result says so), and end
with `Council-Task:` / `Council-Agent:` trailers. Hooks stay off unless `run_hooks`: then the
`merge --ff-only` in the user's checkout runs the user's hooks (post-merge, reference-transaction);
commit-tree, which builds the commits, runs none.

Normal outcomes (no changes, conflicts, already merged, dry run) come back as a MergeResult with
merged=False. A target that can't be moved safely right now (uncommitted changes, an operation in
progress, untracked files in the way, unknown refs, a target that is not a branch of the user's)
raises MergeRefused, whose message says what the user should do; the engine turns it into
merged=False at its boundary.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import anyio

from engine.gitcmd import (COUNCIL_ENV, COUNCIL_IDENTITY, GitError, changes, commits_and_trees, concurrently,
                           diff_stat, git, git_ok, resolve_many, summed, user_identity)
from engine.models import MergeResult
from engine.setup import own_git_dir

__all__ = ["BadTarget", "MergeRefused", "STRATEGIES", "check_target", "merge_branch", "changes_in", "read_head"]

STRATEGIES = ("squash", "merge", "rebase")
_T = TypeVar("_T")
_HELPER_MSG = "cli-council: throwaway commit for a three-way merge with an explicit base\n"
# Files git leaves in a worktree's git dir while an operation waits for the user.
_IN_PROGRESS = ("MERGE_HEAD", "CHERRY_PICK_HEAD", "REVERT_HEAD", "rebase-merge", "rebase-apply", "sequencer")
BACKUP_PREFIX = "refs/council/backup/"
_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")
_MAX_NAME = 1024  # bytes; far above any real branch name, far below the argv limit
_AGENT = re.compile(r"[A-Za-z0-9._-]{1,100}")
_TRAILER = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*:.*")
_CONTINUATION = re.compile(r"[ \t]+\S.*")
_PLAIN_COMPONENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class MergeRefused(ValueError):
    """The merge can't be done safely as asked (dirty or busy target, untracked files in the way,
    unknown refs, a strategy that doesn't fit the history); nothing was changed. The message says
    what to do."""


async def _merge_base(repo: str | Path, a: str, b: str) -> str | None:
    try:
        return await git(repo, "merge-base", a, b)
    except GitError:
        return None


async def _tree(repo: str | Path, rev: str) -> str:
    return await git(repo, "rev-parse", f"{rev}^{{tree}}")


async def _commit(repo: str | Path, tree: str, parents: list[str], message: str,
                  env: dict[str, str] | None = None) -> str:
    parent_args = [arg for p in parents for arg in ("-p", p)]
    return await git(repo, *COUNCIL_IDENTITY, "commit-tree", tree, *parent_args, "-F", "-",
                     input=message.encode(), env=env)


async def _commit_as_user(repo: str | Path, tree: str, parents: list[str], message: str) -> tuple[str, bool]:
    """A commit as the user's own `git commit` would record it: commit-tree takes their identity from
    their config itself (never a guess from the host: user.useConfigOnly), so it needs no question of
    its own; the council's identity when they have none. (commit, made as the council)."""
    parent_args = [arg for p in parents for arg in ("-p", p)]
    try:
        return await git(repo, "-c", "user.useConfigOnly=true", "-c", "commit.gpgsign=false", "commit-tree", tree,
                         *parent_args, "-F", "-", input=message.encode()), False
    except GitError:
        if await user_identity(repo) is not None:
            raise  # the user has an identity: git failed for another reason
    return await _commit(repo, tree, parents, message, env=COUNCIL_ENV), True


def with_trailers(message: str, trailers: list[tuple[str, str]]) -> str:
    """`message` ending with `trailers`: added to its trailer block when its last paragraph (not the
    subject) is one, else as a new paragraph after a blank line, so `git interpret-trailers --parse`
    and `%(trailers)` find them. Done here rather than by interpret-trailers, which would run any
    `trailer.<token>.cmd` a repo's config names."""
    lines = (message.rstrip() or "(no message)").splitlines()
    blanks = [i for i, line in enumerate(lines) if not line.strip()]
    last = lines[blanks[-1] + 1:] if blanks else []
    joined = bool(last) and bool(_TRAILER.fullmatch(last[0])) and all(
        _TRAILER.fullmatch(line) or _CONTINUATION.fullmatch(line) for line in last)
    return "\n".join(lines) + ("\n" if joined else "\n\n") + "".join(f"{k}: {v}\n" for k, v in trailers)


async def _merge_trees(repo: str | Path, ours: str, theirs: str) -> tuple[str, list[str]]:
    """merge-tree with git's own merge base: (result tree, conflicting paths). Writes objects only."""
    args = ("merge-tree", "--write-tree", "--name-only", "--no-messages", "-z", ours, theirs)
    try:
        return (await git(repo, *args)).split("\0")[0], []
    except GitError as e:
        if e.code != 1:
            raise
    # Exit 1 means conflicts. The helper drops stdout on failure; merge-tree is deterministic, so ask again.
    tree, *paths = [p for p in (await git(repo, *args, check=False)).split("\0") if p]
    return tree, paths


async def _three_way(repo: str | Path, base: str, ours: str, theirs: str) -> tuple[str, list[str]]:
    """Apply the changes base..theirs onto ours: (result tree, conflicting paths).

    git 2.39's merge-tree has no --merge-base, so both sides are re-parented onto `base` with
    throwaway commits; `base` is then their only merge base whatever the real history looks like.
    """
    if ours == base:
        return await _tree(repo, theirs), []
    side_a = await _commit(repo, f"{ours}^{{tree}}", [base], _HELPER_MSG)
    side_b = await _commit(repo, f"{theirs}^{{tree}}", [base], _HELPER_MSG)
    return await _merge_trees(repo, side_a, side_b)


async def changes_in(repo: str | Path, branch: str, into: str, base: str | None = None) -> bool:
    """True when every change of base..branch is already in `into`, however it got there
    (merge, rebase, squash, cherry-pick). `base` defaults to their merge base."""
    tip, target, base_c = await resolve_many(repo, f"{branch}^{{commit}}", f"{into}^{{commit}}",
                                              f"{base}^{{commit}}" if base else "")
    if tip is None or target is None:
        return False
    is_ancestor = lambda: git_ok(repo, "merge-base", "--is-ancestor", tip, target)  # noqa: E731
    if base and base_c is None:
        return await is_ancestor()  # a base that names no commit
    # Enough, and far cheaper than a merge: no path the branch changed differs between its tip and
    # `into`. Then applying base..tip onto `into` changes nothing, so `into` has every change.
    # Asked together with the ancestry when the base is known.
    differ = lambda: _paths(repo, tip, target)  # noqa: E731
    if base_c is None:
        ancestor, base_c = await concurrently(is_ancestor, lambda: _merge_base(repo, target, tip))
        if ancestor:
            return True
        if base_c is None:
            return False  # unrelated histories
        changed, differs = await concurrently(lambda: _paths(repo, base_c, tip), differ)
    else:
        ancestor, changed, differs = await concurrently(is_ancestor, lambda: _paths(repo, base_c, tip), differ)
        if ancestor:
            return True
    if not changed & differs:
        return True
    tree, conflicts = await _three_way(repo, base_c, target, tip)
    return not conflicts and tree == await _tree(repo, target)


async def _paths(repo: str | Path, a: str, b: str) -> set[str]:
    """Paths that differ between two commits (content, mode or type)."""
    out = await git(repo, "diff", "--name-only", "-z", "--no-renames", "--no-relative", "--no-ext-diff",
                    "--no-textconv", a, b)
    return {p for p in out.split("\0") if p}


async def _rebase(repo: str | Path, base: str, branch_tip: str, onto: str, who: dict[str, str],
                  trailers: list[tuple[str, str]]) -> tuple[str, list[str], str]:
    """Replay base..branch onto `onto` as new commits (objects only), each keeping its author and
    date, committed by `who`, with `trailers` added: (new tip, conflicts, note)."""
    if not await git_ok(repo, "merge-base", "--is-ancestor", base, branch_tip):
        raise MergeRefused("the attempt's branch does not descend from the task's base; use strategy squash")
    out = await git(repo, "log", "-z", "--reverse", "--topo-order", "--date=raw",
                    "--format=%H%x00%P%x00%an%x00%ae%x00%ad%x00%B", f"{base}..{branch_tip}")
    fields = out.split("\0")
    tip = onto
    for i in range(0, len(fields) - 5, 6):
        sha, parents, name, email, date, body = fields[i:i + 6]
        if " " in parents:
            raise MergeRefused(f"the attempt contains a merge commit ({sha[:12]}); use strategy squash or merge")
        tree, conflicts = await _three_way(repo, parents, tip, sha)
        if conflicts:
            return tip, conflicts, f"replaying {sha[:12]} conflicts"
        if tree == await _tree(repo, tip):
            continue  # already applied upstream: drop it, as git rebase does
        author = {**who, "GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_AUTHOR_DATE": date}
        tip = await _commit(repo, tree, [tip], with_trailers(body, trailers), env=author)
    return tip, [], ""


async def _worktrees(repo: str | Path) -> list[dict[str, str]]:
    out = await git(repo, "worktree", "list", "--porcelain", "-z")
    entries, current = [], {}
    for field in out.split("\0"):
        if not field:
            if current:
                entries.append(current)
            current = {}
            continue
        key, _, value = field.partition(" ")
        current[key] = value
    if current:
        entries.append(current)
    return entries


def _read_git_dir(worktree: str | Path) -> Path | None:
    """A checkout's own git dir as git reads it (`.git` is that directory, or a file naming it), or None."""
    dot = Path(worktree, ".git")
    if dot.is_dir():
        return dot
    try:
        return own_git_dir(Path(worktree))
    except OSError:
        return None


async def _git_dir(worktree: str) -> Path:
    """A checkout's own git dir, read without a process, else asked of git (e.g. a checkout that a
    `core.worktree` setting names)."""
    return (await anyio.to_thread.run_sync(_read_git_dir, worktree)
            or Path(await git(worktree, "rev-parse", "--absolute-git-dir")))


_HEAD_MAX = 4096  # a HEAD file is one short line


def read_head(worktree: str | Path) -> str | None:
    """The checkout's HEAD file as git writes it (`ref: refs/heads/main`, or a commit id), or None
    when it can't be read that way (no git dir found, a symlink HEAD, not text, more than one word
    after `ref: `, too long): then ask git. git accepts a repo whose HEAD has lines after its ref,
    and then finds no ref there; read whole, that would name a branch with a newline in it."""
    git_dir = _read_git_dir(worktree)
    if git_dir is None:
        return None
    try:
        if (git_dir / "HEAD").is_symlink():
            return None
        with open(git_dir / "HEAD", "rb") as f:
            data = f.read(_HEAD_MAX + 1)
        text = data.decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if len(data) > _HEAD_MAX or any(c.isspace() for c in text.removeprefix("ref: ")):
        return None
    return text


def _on_branch(worktree: str | Path, ref: str) -> bool:
    """Whether the checkout's HEAD names `ref`, read from its HEAD file (a guess the caller confirms)."""
    return read_head(worktree) == f"ref: {ref}"


async def _in_progress(worktree: str) -> list[str]:
    """The operations in `worktree` that wait for the user (rebase, merge, cherry-pick...)."""
    git_dir = await _git_dir(worktree)
    return await anyio.to_thread.run_sync(lambda: [name for name in _IN_PROGRESS if (git_dir / name).exists()])


async def _find_checkout(repo: str | Path, into: str) -> str | None:
    """The worktree that has `into` checked out, or None. Refuses when a worktree is rebasing it."""
    ref = f"refs/heads/{into}"
    for wt in await _worktrees(repo):
        if "prunable" in wt or "bare" in wt:
            continue  # no working tree there to keep in step
        if wt.get("branch") == ref:
            return wt["worktree"]
        if "detached" in wt:  # a rebase detaches HEAD but will write the branch when it ends
            git_dir = await _git_dir(wt["worktree"])
            for name in ("rebase-merge/head-name", "rebase-apply/head-name"):
                head_name = anyio.Path(git_dir / name)
                if await head_name.exists() and (await head_name.read_text()).strip() == ref:
                    raise MergeRefused(f"{into} is being rebased in {wt['worktree']}: "
                                       "finish it (git rebase --continue) or abort it, then merge again")
    return None


def _in_the_way(worktree: str, added: list[str], deleted: set[str]) -> list[str]:
    """Paths on disk (untracked or ignored) that writing the `added` files would overwrite or remove."""
    blocked = []
    for path in added:
        parts = path.split("/")
        for n in range(1, len(parts) + 1):
            prefix = "/".join(parts[:n])
            full = os.path.join(worktree, prefix)
            if prefix in deleted or not os.path.lexists(full):
                continue
            if n == len(parts) or os.path.islink(full) or not os.path.isdir(full):
                blocked.append(prefix)
                break
    return sorted(set(blocked))


async def _checkout_or_refusal(repo: str | Path, into: str) -> tuple[str | None, MergeRefused | None]:
    try:
        return await _find_checkout(repo, into), None
    except MergeRefused as e:
        return None, e


async def _checkout_state(worktree: str | None) -> tuple[list[str], list[str]] | None:
    """The operations waiting for the user in the checkout and its uncommitted changes (None: no checkout)."""
    if worktree is None:
        return None
    busy, status = await concurrently(
        lambda: _in_progress(worktree),
        lambda: git(worktree, "status", "--porcelain=v1", "-z", "--untracked-files=no", "--no-renames"))
    return busy, [p for p in status.split("\0") if p]


async def _state_if_on(worktree: str | Path, ref: str) -> tuple[str, tuple[list[str], list[str]]] | None:
    """(worktree, _checkout_state) when `worktree`'s HEAD names `ref`: the checkout the merge will most
    likely move (the repo itself, on the target), asked before the worktree list confirms it."""
    if not await anyio.to_thread.run_sync(_on_branch, worktree, ref):
        return None
    return str(worktree), await _checkout_state(str(worktree))


async def _check_checkout(worktree: str, into: str, old: str, new: str, action: str = "merge") -> None:
    """Refuse unless moving `into` from old to new in `worktree` is certain to lose nothing; the
    refusal names the `action` to try again (a merge, or undo_merge's move back)."""
    state, changed = await concurrently(lambda: _checkout_state(worktree), lambda: changes(worktree, old, new))
    await _judge_checkout(worktree, into, state, changed, action)


async def _judge_checkout(worktree: str, into: str, state: tuple[list[str], list[str]],
                          changed: list[tuple[str, str, int | None, int | None]], action: str = "merge") -> None:
    """_check_checkout's verdict from the checkout's state and the `changes` the move makes."""
    busy, dirty = state
    if busy:
        raise MergeRefused(f"{worktree} (on {into}) has an operation in progress ({', '.join(busy)}): "
                           f"finish or abort it, then {action} again")
    if dirty:
        shown = ", ".join(p[3:] for p in dirty[:5]) + (" ..." if len(dirty) > 5 else "")
        preview = " (or merge with --dry-run to preview)" if action == "merge" else ""
        raise MergeRefused(f"{worktree} (on {into}) has uncommitted changes ({shown}): "
                           f"commit or stash them, then {action} again{preview}")
    added = [path for letter, path, *_ in changed if letter == "A"]
    deleted = {path for letter, path, *_ in changed if letter == "D"}
    blocked = await anyio.to_thread.run_sync(_in_the_way, worktree, added, deleted)
    if blocked:
        raise MergeRefused(f"untracked files in {worktree} would be overwritten by the {action} "
                           f"({', '.join(blocked[:5])}): move or delete them, then {action} again")


async def _checkout_refusal(checkout: str | None, into: str, state: tuple[list[str], list[str]] | None,
                            changed: list[tuple[str, str, int | None, int | None]],
                            refused: MergeRefused | None) -> MergeRefused | None:
    """Why `into` can't move in its checkout now (`state` from _checkout_state, `changed` the move's
    `changes`), or None; `refused`: a reason found already."""
    if refused or not checkout or state is None:
        return refused
    try:
        await _judge_checkout(checkout, into, state, changed)
    except MergeRefused as e:
        return e
    return None


class BadTarget(MergeRefused):
    """`into` is no branch of the user's the council may move: bad input rather than a refusal."""


def _target_name(into: str) -> str:
    """The branch name in `into`, or BadTarget for what no git needs asking about."""
    name = into.removeprefix("refs/heads/")
    if not name or "\0" in name or len(name.encode()) > _MAX_NAME or name.startswith("-"):
        raise BadTarget(f"into {into!r} is not a branch name; give a local branch such as main")
    if name.split("/", 1)[0].casefold() == "council" and "/" in name:
        raise BadTarget(f"into {name!r} is one of the council's own attempt branches; "
                        "merge into a branch of yours (such as main) instead")
    return name


def _plain_branch(name: str) -> bool:
    """True for a name git surely takes as a branch name (`check-ref-format --branch`): components of
    letters, digits and `._-`, none starting with a dot or ending with `.lock`, no `..`, not starting
    with a dash or ending in a dot, not HEAD. Checked here because most names are like that; git judges every other one."""
    return name != "HEAD" and not name.startswith("-") and not name.endswith(".") and ".." not in name and all(
        _PLAIN_COMPONENT.fullmatch(part) and not part.endswith(".lock") for part in name.split("/"))


async def _target_facts(repo: str | Path, into: str, name: str) -> str | BadTarget:
    """`name` as a branch of the user's in `repo` the council may move, or why not (returned, so
    that it can be asked together with other questions and raised first)."""
    formatted, listed = await concurrently(
        lambda: _given(name) if _plain_branch(name) else git(repo, "check-ref-format", "--branch", name,
                                                                check=False),
        # A valid branch name has no glob character: the pattern matches that ref and the refs under it.
        lambda: git(repo, "for-each-ref", "--format=%(refname) %(symref)", f"refs/heads/{name}", check=False))
    if formatted != name:
        return BadTarget(f"into {into!r} is not a valid branch name (no ~ ^ : .. @{{ or spaces); "
                         "give a local branch such as main")
    found = dict(line.partition(" ")[::2] for line in listed.splitlines())
    if f"refs/heads/{name}" not in found:
        return BadTarget(f"into {name!r}: there is no local branch of that name in {repo}; "
                         "create it first or pick another")
    points_to = found[f"refs/heads/{name}"]
    if points_to:  # moving it would move another branch, behind the back of any checkout of that one
        return BadTarget(f"{name} is a symbolic ref to {points_to}; merge into that branch instead")
    return name


async def _given(value: _T) -> _T:
    return value


async def _changes_if_known(repo: str | Path, a: str, b: str) -> list[tuple[str, str, int | None, int | None]] | None:
    """`changes` between two revs, or None where git can't name them (the caller says why, later)."""
    if a.startswith("-") or b.startswith("-"):  # an option to git diff, not a rev
        return None
    try:
        return await changes(repo, a, b)
    except GitError:
        return None


async def check_target(repo: str | Path, into: str) -> str:
    """`into` as the name of an existing local branch the council may move, or BadTarget.

    Only a plain branch name: no revision syntax (`main~1`, `@{-1}`, `a..b`), no option-like name,
    and never one of the council's own attempt branches (`council/<task>/<agent>`).
    """
    found = await _target_facts(repo, into, _target_name(into))
    if isinstance(found, BadTarget):
        raise found
    return found


def _backup_name(task_id: str, n: int) -> str:
    return f"{BACKUP_PREFIX}{task_id}" + (f"-{n}" if n > 1 else "")


async def _save_old_tip(repo: str | Path, task_id: str, old: str, reflog: str,
                        move: tuple[str, str] | None = None) -> str:
    """Create the first free backup ref of this task at `old` and return it; never overwrites one.

    With `move` (ref, new) the target moves from `old` to `new` in the same transaction: both or
    neither. Raises GitError when git refuses for another reason than the name being taken.
    """
    taken: set[str] | None = None  # listed only once the first name turns out to be taken
    n = 1
    while True:
        name = _backup_name(task_id, n)
        n += 1
        if taken is not None and name in taken:
            continue
        commands = f"create {name} {old}\n" + (f"update {move[0]} {move[1]} {old}\n" if move else "")
        try:
            await git(repo, "update-ref", "-m", reflog, "--stdin", input=commands.encode())
            return name
        except GitError:
            if not await git_ok(repo, "show-ref", "--verify", "--quiet", name):
                raise  # not a race for the name: the target moved, or git can't write refs
            if taken is None:
                taken = set((await git(repo, "for-each-ref", "--format=%(refname)", BACKUP_PREFIX)).splitlines())
            taken.add(name)  # an earlier merge of this task, or one at the same moment, has the name


async def _attempt(step: Awaitable[str]) -> str | GitError:
    """The step's output, or the GitError it raised (for steps asked together with others)."""
    try:
        return await step
    except GitError as e:
        return e


async def _backup(repo: str | Path, task_id: str, old: str, reflog: str) -> tuple[str | None, str]:
    """_save_old_tip, or why the old tip could not be saved (the merge goes on: the old tip is an
    ancestor of the new one)."""
    try:
        return await _save_old_tip(repo, task_id, old, reflog), ""
    except GitError as e:
        return None, f"old tip {old} not saved ({e.stderr})"


async def merge_branch(repo: str | Path, *, branch: str, base: str, into: str, strategy: str = "squash",
                       message: str, task_id: str, agent: str | None = None, run_hooks: bool = False,
                       dry_run: bool = False) -> MergeResult:
    """Bring `branch` (an attempt that started at `base`) into the local branch `into`.

    squash: one council commit on into's tip with the attempt's own changes (base..branch);
    merge: a council merge commit with parents (into's tip, branch); rebase: the attempt's commits
    replayed on into's tip, authors kept. `message` is the commit message for squash and merge.
    Every new commit is the user's (see above) and gets the trailers `Council-Task: <task_id>` and,
    given `agent`, `Council-Agent: <agent>`. `run_hooks` lets the update of a checkout run its hooks.
    Returns merged=True with `commit` the new tip and `backup_ref` at the old one, or merged=False
    with the reason (and `conflicts`); raises MergeRefused when the target can't move safely now
    (first BadTarget, when `into` is no branch the council may move: see check_target).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if not _TASK_ID.fullmatch(task_id):
        raise ValueError(f"task id {task_id!r} can't name a backup ref")
    if agent is not None and not _AGENT.fullmatch(agent):
        raise ValueError(f"agent {agent!r} can't be a trailer value")
    for name in (branch, base):
        if "\0" in name or len(name.encode()) > _MAX_NAME:
            raise MergeRefused(f"{name[:80]!r} is not a commit or branch name")
    asked = into
    into = _target_name(into)
    ref = f"refs/heads/{into}"
    # Whether `into` may move, the commits with their trees, where `into` is checked out and (for a
    # rebase, which commits as the user with its own dates) the user's identity, asked at once (all
    # only read). A bad target is raised first; a refusal from the checkout where it always was, after
    # the outcomes that need no checkout (no changes, conflicts). Asked with them, for the usual case
    # (`into` has not moved since the task began and is checked out in the repo itself): the attempt's
    # changes and that checkout's state, which the merge then needs from no further round of git. A
    # guess that turns out wrong only costs its processes; the changes decide the counts and which
    # untracked files are in the way, and `merge --ff-only` refuses to overwrite any that were missed.
    target, found, who, (checkout, refused), early_changes, early_state = await concurrently(
        lambda: _target_facts(repo, asked, into), lambda: commits_and_trees(repo, branch, base, ref),
        lambda: user_identity(repo) if strategy == "rebase" else _given(None),
        lambda: _checkout_or_refusal(repo, into),
        lambda: _changes_if_known(repo, base, branch) if strategy != "rebase" else _given(None),
        lambda: _state_if_on(repo, ref))
    if isinstance(target, BadTarget):
        raise target
    for name, value in zip((branch, base, into), found):
        if value is None:
            raise MergeRefused(f"{name} is not a commit or branch in {repo}")
    (branch_tip, tip_tree), (base_c, base_tree), (old, old_tree) = found
    early_state = early_state[1] if early_state and early_state[0] == checkout and not refused else None

    def checkout_state() -> Awaitable[tuple[list[str], list[str]] | None]:
        return _given(early_state) if early_state else _checkout_state(None if refused else checkout)

    def result(merged: bool, text: str, **fields) -> MergeResult:
        return MergeResult(merged=merged, task_id=task_id, strategy=strategy, into=into,
                           source_commit=branch_tip, dry_run=dry_run, message=text, **fields)

    if base_tree == tip_tree:
        return result(False, f"{branch} has no changes relative to the task's base; nothing to merge")

    trailers = [("Council-Task", task_id)] + ([("Council-Agent", agent)] if agent else [])
    message = with_trailers(message.strip() or f"cli-council: {strategy} {branch} (task {task_id})", trailers)
    note, council = "", False
    if strategy in ("squash", "merge"):
        if strategy == "merge":
            tree, conflicts = await _merge_trees(repo, old, branch_tip)
        elif old == base_c:  # into has not moved since the task began: the result is the attempt's tree
            tree, conflicts = tip_tree, []
        else:
            tree, conflicts = await _three_way(repo, base_c, old, branch_tip)
        unchanged = not conflicts and tree == old_tree
        parents = [old] if strategy == "squash" else [old, branch_tip]
        if conflicts or unchanged:
            new = old
        else:  # the counts and the checkout's check come from the tree the commit will have, while it is written
            early = old == base_c and tree == tip_tree and early_changes is not None
            (new, council), changed, state = await concurrently(
                lambda: _commit_as_user(repo, tree, parents, message),
                lambda: _given(early_changes) if early else changes(repo, old, tree), checkout_state)
    else:
        council = who is None
        new, conflicts, note = await _rebase(repo, base_c, branch_tip, old, who or COUNCIL_ENV, trailers)
        unchanged = not conflicts and await _tree(repo, new) == old_tree
        if not conflicts and not unchanged:
            changed, state = await concurrently(lambda: changes(repo, old, new), checkout_state)

    if conflicts:
        files, ins, dels = await diff_stat(repo, base_c, branch_tip)
        return result(False, f"{branch} conflicts with {into} in {len(conflicts)} file(s)"
                             f"{' (' + note + ')' if note else ''}; nothing was changed",
                      conflicts=conflicts, files=files, insertions=ins, deletions=dels)
    if unchanged:
        return result(False, f"{into} already has the changes of {branch}; nothing to merge")

    files, ins, dels = summed(changed)
    as_council = (f"; committed as cli-council <cli-council@localhost>: {repo} has no user.name/user.email "
                  "configured (git config user.name/user.email sets them)") if council else ""
    counts = dict(files=files, insertions=ins, deletions=dels)
    refused = await _checkout_refusal(checkout, into, state, changed, refused)
    if refused:
        if not dry_run:
            raise refused
        return result(False, f"dry run: {strategy} would apply cleanly, but right now {refused}", **counts)
    if dry_run:
        return result(False, f"dry run: {strategy} of {branch} into {into} would apply cleanly "
                             f"({len(files)} file(s), +{ins} -{dels}){as_council}", **counts)

    reflog = f"cli-council: {strategy} {branch} (task {task_id})"
    saved = ""
    try:
        if checkout:  # the backup ref is written while the checkout moves, and taken back if it can't
            moved, (backup_ref, saved) = await concurrently(
                # No `maintenance run --auto` after it (a process the answer waits for): the
                # user's own next git command runs it when it is due.
                lambda: _attempt(git(checkout, "-c", "maintenance.auto=false", "merge", "--ff-only", "--no-stat",
                                     "-q", new,
                                     env={**(COUNCIL_ENV if council else {}), "GIT_REFLOG_ACTION": reflog},
                                     hooks=run_hooks)),
                lambda: _backup(repo, task_id, old, reflog))
            if isinstance(moved, GitError):
                if backup_ref:
                    await git(repo, "update-ref", "-d", backup_ref, old, check=False)
                raise moved
        else:
            backup_ref = await _save_old_tip(repo, task_id, old, reflog, move=(ref, new))
    except GitError as e:
        raise MergeRefused(f"could not move {into} ({e.stderr}); nothing was merged, try again") from e
    if backup_ref:
        saved = f"old tip saved at {backup_ref}"
    where = f"and updated {checkout}" if checkout else "(not checked out; only the branch moved)"
    return result(True, f"{strategy} of {branch} into {into} {where}: {new[:12]}, "
                        f"{len(files)} file(s), +{ins} -{dels}; {saved}{as_council}",
                  commit=new, backup_ref=backup_ref, **counts)
