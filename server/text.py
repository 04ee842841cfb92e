"""How results read to a person: the command line's output and the short text beside each tool's
structured result (a model reading a tool result wants a summary, not the JSON twice)."""

from __future__ import annotations

from pydantic import BaseModel

from engine.models import GcReport, LogChunk, MergeResult, Task, TaskList


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe(task: Task, check_tails: dict[str, list[str]] | None = None) -> str:
    """A task with one line per attempt, where its work is, and the tail of each failed check."""
    lines = [f"task {task.task_id}  {task.state}  tier {task.tier or '-'}  repo {task.repo}",
             f"  prompt: {(task.prompt.strip().splitlines() or [''])[0][:100]}"]
    for a in task.attempts:
        cost = f" ${a.cost_usd:.4f}" if a.cost_usd else ""
        check = f" check {'passed' if a.check.passed else 'failed'}" if a.check else ""
        err = f"  [{a.error.kind}] {a.error.message}" if a.error else ""
        dur = f" {a.duration_s:.1f}s" if a.duration_s is not None else ""
        lines.append(f"  {a.agent:<12} {a.state:<11} +{a.insertions}/-{a.deletions} in "
                     f"{plural(a.files_changed, 'file')}{dur}{cost}{check}{err}")
        if a.branch:
            lines.append(f"  {'':<12} branch {a.branch}" + (f"  worktree {a.worktree}" if a.worktree else ""))
        for text in (check_tails or {}).get(a.agent, []):
            lines.append(f"  {'':<12} | {text}")
        if a.agreement is not None:
            same = f", same change as {', '.join(a.agrees_with)}" if a.agrees_with else ""
            lines.append(f"  {'':<12} agreement {a.agreement:.2f} with the others{same}")
        for r in a.reviews:
            said = f"{r.verdict} {r.score:g}/10: {r.summary or ''}" if r.error is None else f"failed: {r.error}"
            lines.append(f"  {'':<12} review by {r.reviewer}: {said[:200]}")
    lines += [f"  warning: {w}" for w in task.warnings]
    if task.discarded_at:
        lines.append(f"  discarded at {task.discarded_at:%Y-%m-%d %H:%M:%S} UTC (what was kept is in its log)")
    if task.error:
        lines.append(f"  error: {task.error.message}")
    if task.best:
        lines.append(f"  best: {task.best} ({task.best_reason})")
    elif task.best_reason:
        lines.append(f"  no best: {task.best_reason}")
    return "\n".join(lines)


def task_list(tasks: TaskList) -> str:
    if not tasks.tasks:
        return "no tasks"
    return "\n".join(f"{t.task_id}  {t.state:<11} {t.created_at:%Y-%m-%d %H:%M}  best={t.best or '-':<12} "
                     f"{t.repo}  {t.title[:50]}" for t in tasks.tasks)


def merge_result(result: MergeResult) -> str:
    lines = [result.message]
    if result.conflicts:
        lines.append("conflicts: " + ", ".join(result.conflicts))
    lines += [f"removed {r}" for r in result.removed]
    return "\n".join(lines)


def gc_report(report: GcReport) -> str:
    lines = [f"removed {r}" for r in report.removed] + [f"kept {k}" for k in report.kept]
    return "\n".join(lines) or "nothing to do"


def log_chunk(chunk: LogChunk, shown: int = 20) -> str:
    """The last lines of a chunk and where to go on; the structured result has them all."""
    head = (f"{plural(len(chunk.lines), 'line')} of task {chunk.task_id}; next_cursor {chunk.next_cursor}; "
            + ("done" if chunk.done else "more may come"))
    skipped = [f"... {len(chunk.lines) - shown} earlier lines in the structured result"] if len(chunk.lines) > shown else []
    return "\n".join([head, *skipped, *(f"{ln.seq} {ln.agent}/{ln.stream}: {ln.text[:300]}"
                                         for ln in chunk.lines[-shown:])])


RENDER = {Task: describe, TaskList: task_list, MergeResult: merge_result, GcReport: gc_report, LogChunk: log_chunk}


def summary(model: BaseModel) -> str:
    """The short text for a tool result; models without their own rendering read as JSON."""
    render = RENDER.get(type(model))
    return render(model) if render else model.model_dump_json(indent=2)
