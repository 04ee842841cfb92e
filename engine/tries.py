"""An agent run with its retries: transient failures back off and run again; a rate limit whose
reset the agent reported is waited out when the attempt can afford it, or fails at once.

Failing at once matters for the cheap-first cascade: an attempt that would sleep past its timeout
only delays the escalation to another agent, so it ends as rate_limit saying it did not wait.
"""

from __future__ import annotations

import random
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from adapters.base import TRANSIENT, Adapter, ErrorKind, Job, Outcome

from . import runner
from .models import Attempt, Task

if TYPE_CHECKING:
    from .engine import Engine


def clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%H:%M:%S UTC")


def why_not_wait(wait_s: float, left_s: float, retries_left: int, task: Task) -> str | None:
    """Why a rate limit that resets in wait_s is not waited out, or None to wait."""
    if retries_left <= 0:
        return "no retries left ([engine] retries)"
    if wait_s >= left_s:
        return f"the reset is {wait_s:.0f}s away, beyond the {max(left_s, 0):.0f}s left of the attempt's timeout"
    if task.budget_usd is not None and task.total_cost_usd >= task.budget_usd:
        return f"the task's budget ${task.budget_usd:g} is spent"
    return None


async def run(engine: "Engine", task: Task, attempt: Attempt, adapter: Adapter, job: Job, deadline: float,
              env: dict[str, str], start: str, keep_out: tuple[str, ...]) -> tuple[Outcome, runner.RunResult]:
    """Run the agent until it succeeds, fails for good, or time runs out (deadline: time.monotonic()).
    Before a retry the worktree goes back to `start`, so the retried agent starts clean."""
    config = engine.config.engine
    retries_left = config.retries
    while True:
        outcome, result = await engine._run_agent(task, attempt, adapter, job, deadline - time.monotonic(), env)
        engine._account(attempt, outcome)
        task.total_cost_usd = task.spent()
        error = outcome.error
        if result.timed_out or error is None or error.kind not in TRANSIENT:
            return outcome, result
        if error.kind == ErrorKind.rate_limit and outcome.retry_at is not None:
            delay = max(0.0, outcome.retry_at - time.time())
            why = why_not_wait(delay, deadline - time.monotonic(), retries_left, task)
            if why:
                error.message += f"; did not wait for its reset at {clock(outcome.retry_at)}: {why}"
                return outcome, result
            await engine._note(task, f"rate limited until {clock(outcome.retry_at)}, waiting {delay:.0f}s",
                               attempt.agent)
        else:
            if retries_left <= 0:
                return outcome, result
            delay = min(config.retry_max_s, config.retry_base_s * 2 ** attempt.retries)
            delay *= random.uniform(0.5, 1.0)  # jitter: retries of parallel attempts do not stampede
            if time.monotonic() + delay >= deadline:
                return outcome, result
            await engine._note(task, f"{error.kind}: {error.message}; retry {attempt.retries + 1} in {delay:.1f}s",
                               attempt.agent)
        attempt.retries += 1
        retries_left -= 1
        await anyio.sleep(delay)
        await engine.host.reset(Path(job.worktree), start, keep_out)
