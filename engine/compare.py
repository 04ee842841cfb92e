"""Comparison of a task's candidates, always on and free: how much each change agrees with the
others'. Attempts that reach the same change independently reinforce each other; the judge uses it
after the check and the reviews. (The files each attempt touched are listed when its work is
committed, from the same count: `listed`.)

Agreement of two changes weighs two Jaccard indices, a third for the files they touch and two
thirds for the lines they add (path and text, surrounding whitespace ignored; the lines they
remove when neither adds any): two attempts that rewrite the same line differently share its
file, not its result. An attempt's agreement is the mean over every other candidate. Patches are
read bounded (diffs.patch).
"""

from __future__ import annotations

import anyio

from . import diffs
from .gitcmd import GitError, concurrently
from .judge import NOT_CANDIDATES
from .models import Attempt, Task

MAX_PATCH_BYTES = 400_000  # per candidate: enough lines to compare, bounded whatever an agent wrote
MAX_LISTED = 200  # files_touched shown per attempt
AGREES = 0.6  # pair agreement at or above this: "much the same change" (same files, most lines alike)

Change = tuple[frozenset[str], frozenset[tuple[str, str, str]]]  # files, changed lines


def candidates(task: Task) -> list[Attempt]:
    """Attempts the judge may pick: finished with changes on their branch."""
    return [a for a in task.attempts if a.state not in NOT_CANDIDATES and a.files_changed > 0 and a.branch]


def parse_patch(patch: str) -> Change:
    """Files and changed lines of a unified diff (`git diff --no-renames`)."""
    files: set[str] = set()
    lines: set[tuple[str, str, str]] = set()
    path = ""
    header = False
    for line in patch.splitlines():
        if line.startswith("diff --git "):
            path, header = line.rsplit(" b/", 1)[-1], True  # the +++/--- lines below say it exactly
            files.add(path)
        elif header and line.startswith(("+++ ", "--- ")):
            named = line[4:]
            if named != "/dev/null":
                files.discard(path)
                path = named[2:] if named[:2] in ("a/", "b/") else named
                files.add(path)
        elif header and line.startswith("@@"):
            header = False
        elif not header and line[:1] in "+-" and line[1:].strip():
            lines.add((path, line[0], line[1:].strip()))
    return frozenset(files), frozenset(lines)


def _jaccard(a: frozenset, b: frozenset) -> float | None:
    union = a | b
    return len(a & b) / len(union) if union else None


def pair_agreement(a: Change, b: Change) -> float:
    files = _jaccard(a[0], b[0]) or 0.0
    added = [frozenset(x for x in change[1] if x[1] == "+") for change in (a, b)]
    lines = _jaccard(*added) if any(added) else _jaccard(a[1], b[1])
    return round((files + 2 * (files if lines is None else lines)) / 3, 3)


def agreements(changes: dict[str, Change]) -> dict[str, tuple[float | None, list[str]]]:
    """Each name's mean agreement with the others, and the others it agrees with (>= AGREES)."""
    found = {}
    for name, change in changes.items():
        pairs = {other: pair_agreement(change, theirs) for other, theirs in changes.items() if other != name}
        mean = round(sum(pairs.values()) / len(pairs), 3) if pairs else None
        found[name] = (mean, sorted(o for o, v in pairs.items() if v >= AGREES))
    return found


def listed(files: list[str]) -> list[str]:
    """An attempt's files_touched, from the paths its branch changed."""
    return sorted(files)[:MAX_LISTED]


async def compare(task: Task, secrets: list[str] = ()) -> None:
    """Record agreement and agrees_with on every candidate of a finished task. A lone candidate has
    no one to agree with: no patch is read for it."""
    found = candidates(task)
    if len(found) < 2:
        for a in found:
            a.agreement, a.agrees_with = None, []
        return
    changes: dict[str, Change] = {}

    async def read(a: Attempt) -> None:
        try:  # one git per candidate, on the path of every verdict: the branch is named, not resolved first
            patch, _ = await diffs.patch(task.repo, task.base, f"refs/heads/{a.branch}", MAX_PATCH_BYTES, list(secrets))
        except (GitError, OSError):  # a branch gone or a repo moved: no evidence, not an error
            return
        changes[a.agent] = await anyio.to_thread.run_sync(parse_patch, patch)  # up to 400 KB: not on the loop

    await concurrently(*(lambda a=a: read(a) for a in found))
    result = await anyio.to_thread.run_sync(agreements, changes)
    for a in found:
        if a.agent in changes:
            a.agreement, a.agrees_with = result[a.agent]
