"""Follow-up rounds: another prompt to an attempt that has finished, in its own worktree and branch.

The attempt keeps its place in the task: the round resumes the CLI's own session where it has one
(the adapter decides how: claude `--resume`, the earlier rounds retold, or chat turns), streams into
the task's log after a round marker, commits on the same branch, runs the check again, and the
task's best attempt is picked again when it ends. The engine hosts the round like a task it was
given, so cancel, status, logs and recovery after a crash work as they do for the first run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from adapters import make_adapter
from adapters.base import Adapter, Job

from . import compare as compare_mod, inputs, ports as ports_mod, setup, tries
from .config import ConfigError
from .events import wait_for
from .gitcmd import git
from .inputs import CouncilError
from .models import ACTIVE_TASK, Attempt, AttemptState, Round, Task, TaskState

if TYPE_CHECKING:
    from .engine import Engine


async def start(engine: "Engine", task_id: str, agent: str, prompt: str, check: str | None,
                timeout_s: float | None, max_prompt_bytes: int) -> Task:
    """Check that the round can run, record it and start it; returns at once with the task running.
    A refusal (CouncilError) changes nothing."""
    inputs.agent(agent)
    prompt = inputs.text("prompt", prompt, max_bytes=max_prompt_bytes, hint=(
        "CLIs receive it as one argument: put the details in a file in the repo and refer to it"))
    if timeout_s is not None:
        inputs.number("timeout_s", timeout_s, low=0, low_open=True, high=inputs.MAX_TIMEOUT_S)
    await let_go(engine, inputs.task_id(task_id))
    task = await engine.get(task_id)
    if task.state in ACTIVE_TASK or task_id in engine._hosted:
        raise CouncilError(f"task {task_id} is still {task.state}; wait for it (get_status with wait_s) "
                           "or cancel it, then continue it")
    if task.discarded_at is not None:
        raise CouncilError(f"task {task_id} was discarded at {task.discarded_at:%Y-%m-%d %H:%M:%S} UTC: its "
                           "worktrees are gone, so no attempt can be continued; submit a new task")
    if task.state == TaskState.merged:
        raise CouncilError(f"task {task_id} is merged into {task.merge_into or task.into} as "
                           f"{(task.merge_commit or '')[:12]}: a follow-up would change what already landed; "
                           f"undo the merge first (undo_merge, `cli-council undo {task_id}`), or submit a new task")
    try:
        attempt = task.attempt(agent)
    except KeyError:
        raise CouncilError(f"task {task_id} has no attempt by {agent!r}; its attempts: "
                           f"{', '.join(a.agent for a in task.attempts) or 'none'}") from None
    await _workspace_left(task, attempt)
    config = engine.config
    try:
        spec = config.agent(agent)
    except ConfigError as e:
        raise CouncilError(f"{agent}'s attempt cannot be continued: {e}") from None
    if not spec.enabled:
        raise CouncilError(f"agent {agent!r} is disabled in the config ([agents.{agent}] enabled = false)")
    adapter = make_adapter(spec, engine.environ)
    avail = await engine._available(agent, adapter)
    if not avail.ok:
        raise CouncilError(f"{agent} cannot run here now: {avail.message}")
    timeout_s = timeout_s or task.timeout_s
    earlier = [(r.prompt, r.summary) for r in attempt.history] or [(task.prompt, attempt.summary)]
    try:  # the command line as the round will build it: a retold history can outgrow what exec accepts
        inv = adapter.invocation(Job(prompt=prompt, worktree=Path(attempt.worktree), timeout_s=timeout_s,
                                     check=check or task.check, budget_usd=task.budget_usd, tier=task.tier,
                                     session_id=attempt.session_id, earlier=earlier))
    except (ValueError, OSError):  # the round records what is wrong with the agent
        inv = None
    if inv is not None:
        inputs.argv_fits(agent, inv)
    if task_id in engine._hosted or not await engine.store.claim(task_id, engine.owner):
        raise CouncilError(f"task {task_id} was started again meanwhile (another continue_task); wait for it")
    engine._hosted[task_id] = task
    if not attempt.history:  # the first run becomes round 1 of the history
        attempt.history.append(Round(prompt=task.prompt, check=task.check, summary=attempt.summary,
                                     started_at=attempt.started_at or task.created_at))
    attempt.history.append(Round(prompt=prompt, check=check or task.check, timeout_s=timeout_s))
    attempt.rounds = len(attempt.history)
    if check:
        task.check = check  # the check the attempts are judged by from now on
    attempt.state, attempt.error, attempt.exit_code, attempt.check = AttemptState.queued, None, None, None
    task.drop_reviews(attempt)  # they judged the change before this round; review_task again to judge the new one
    task.state, task.finished_at, task.error = TaskState.running, None, None
    await engine._save(task)
    answer = task.model_copy(deep=True)
    engine._tg.start_soon(engine._run_task, task, None, lambda: _host(engine, task, attempt))
    return answer


async def let_go(engine: "Engine", task_id: str) -> None:
    """A run here that has just ended holds its task a moment longer (its last cleanup): wait for that."""
    with anyio.move_on_after(10):
        while (hosted := engine._hosted.get(task_id)) is not None and hosted.state not in ACTIVE_TASK:
            with engine.events.watch(task_id, hurry=False) as changed:
                if task_id in engine._hosted:
                    await wait_for(changed, 0.5)


async def _workspace_left(task: Task, attempt: Attempt) -> None:
    """Refuse unless the attempt's worktree is still there on its branch."""
    if not attempt.worktree or not attempt.branch:
        why = f": {attempt.error.message}" if attempt.error else ""
        raise CouncilError(f"{attempt.agent}'s attempt ({attempt.state}{why}) never got a worktree, so there "
                           "is no session to continue; submit a new task")
    gone = (f"{attempt.agent}'s worktree {attempt.worktree} was removed (the task was merged with cleanup, "
            "discarded, or reclaimed by `cli-council gc`), so there is nothing to continue; submit a new task")
    if not await anyio.Path(attempt.worktree).is_dir():
        raise CouncilError(gone)
    head = await git(attempt.worktree, "symbolic-ref", "--quiet", "HEAD", check=False)
    if head != f"refs/heads/{attempt.branch}":
        raise CouncilError(f"{attempt.worktree} is no longer on {attempt.branch} (it is on {head or 'nothing'}); "
                           "the follow-up would not land on the attempt's branch")


async def _host(engine: "Engine", task: Task, attempt: Attempt) -> None:
    """The round as a task run: marker, then the attempt's usual lifecycle (limits, crash handling, save)."""
    await engine._note(task, f"round {attempt.rounds} of {attempt.agent}: "
                             f"{attempt.history[-1].prompt.strip().splitlines()[0][:200]}", attempt.agent)
    await engine._run_attempt(task, attempt)


async def body(engine: "Engine", task: Task, attempt: Attempt, adapter: Adapter) -> None:
    """One follow-up round in the attempt's worktree (what `_attempt_body` is for the first run)."""
    this = attempt.history[-1]
    path = Path(attempt.worktree)
    start_commit, keep_out = await git(path, "rev-parse", "HEAD"), tuple(await setup.recorded_output(path))
    env = await _ports(engine, task, attempt)
    timeout_s = this.timeout_s or task.timeout_s
    job = Job(prompt=this.prompt, worktree=path, timeout_s=timeout_s, check=task.check, budget_usd=task.budget_usd,
              tier=task.tier, session_id=attempt.session_id,
              earlier=[(r.prompt, r.summary) for r in attempt.history[:-1]])
    outcome = result = None
    try:
        outcome, result = await tries.run(engine, task, attempt, adapter, job, time.monotonic() + timeout_s, env,
                                          start_commit, keep_out)
    finally:
        with anyio.CancelScope(shield=True):  # whatever the agent did is kept, even when cancelled
            first = this.prompt.strip().splitlines()[0][:200]
            files, attempt.insertions, attempt.deletions = await engine.worktrees.commit_and_count(
                path, f"council {task.task_id}: {attempt.agent}, round {attempt.rounds}\n\n{first}",
                adapter.scratch + keep_out, task.base)
            attempt.files_changed, attempt.files_touched = len(files), compare_mod.listed(files)
    round_changed = await git(path, "rev-parse", "HEAD") != start_commit
    attempt.session_id = outcome.session_id or attempt.session_id
    attempt.summary = this.summary = outcome.summary
    if outcome.ok and not result.timed_out and not round_changed:
        await engine._note(task, f"round {attempt.rounds} changed no file", attempt.agent)
    await engine._conclude(task, attempt, outcome, result, path, env,
                           f"round {attempt.rounds}: no result within {timeout_s:g}s")


async def _ports(engine: "Engine", task: Task, attempt: Attempt) -> dict[str, str]:
    """The ports the repo's setup asks for, leased again for this round (released when it ends)."""
    try:
        ws = await engine.repo_configs.settings(engine.config, task.repo, task.base)
    except ConfigError:
        return {}
    if not ws.ports:
        return {}
    leased = engine._leases[(task.task_id, attempt.agent)] = await anyio.to_thread.run_sync(
        engine.ports.lease, ws.ports)
    return ports_mod.env(leased)
