"""Where an attempt runs: the engine's seam to the machine that holds its worktree and processes.

The engine keeps the decisions (routing, retries, verdict, merge) and asks its host for everything
that touches that machine: the attempt's worktree, each process (agent, check, setup), committing
and counting the result, going back to the base before a retry, and handing the result branch to
the user's repo. LocalHost is this machine, as the engine always ran; `[runner] kind = "dask"`
gives a host on Dask workers (dask_host.py, loaded only then: `distributed` is an optional extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

import anyio

from adapters.base import Invocation

from . import runner
from .config import ConfigError, RunnerSettings

if TYPE_CHECKING:
    from .engine import Engine
    from .models import Attempt, Task
    from .pool import Workspace


class HostLost(Exception):
    """The machine an attempt ran on went away (a dead worker, a lost scheduler): the attempt is
    interrupted, not failed, and nothing re-runs it behind the user's back."""


class Host(Protocol):
    local: bool  # worktrees live under CLI_COUNCIL_HOME and processes are this machine's (pool, reaper)

    async def workspace(self, engine: "Engine", task: "Task", attempt: "Attempt") -> "Workspace | None": ...

    async def run(self, inv: Invocation, *, timeout_s: float, on_line: runner.LineSink,
                  on_start: Callable[[int], Awaitable[None]], kill_grace_s: float,
                  marker: str) -> runner.RunResult: ...

    async def commit_and_count(self, path: Path, message: str, scratch: tuple[str, ...],
                               base: str) -> tuple[list[str], int, int]: ...

    async def reset(self, path: Path, base: str, keep: tuple[str, ...]) -> None: ...

    async def finish(self, task: "Task", attempt: "Attempt", work: "Workspace") -> None: ...

    async def tmpdir(self, home: Path, task_id: str, agent: str) -> str | None: ...

    async def aclose(self) -> None: ...


class LocalHost:
    """This machine: worktrees from the engine's pool or fresh, processes through the one runner."""

    local = True

    def __init__(self, engine: "Engine"):
        self.worktrees = engine.worktrees

    async def workspace(self, engine: "Engine", task: "Task", attempt: "Attempt") -> "Workspace | None":
        return await engine._workspace(task, attempt)

    async def run(self, inv: Invocation, *, timeout_s: float, on_line: runner.LineSink,
                  on_start: Callable[[int], Awaitable[None]], kill_grace_s: float,
                  marker: str) -> runner.RunResult:
        return await runner.run(inv, timeout_s=timeout_s, on_line=on_line, on_start=on_start,
                                kill_grace_s=kill_grace_s, marker=marker)

    async def commit_and_count(self, path: Path, message: str, scratch: tuple[str, ...],
                               base: str) -> tuple[list[str], int, int]:
        return await self.worktrees.commit_and_count(path, message, scratch, base)

    async def reset(self, path: Path, base: str, keep: tuple[str, ...]) -> None:
        await self.worktrees.reset(path, base, keep)

    async def finish(self, task: "Task", attempt: "Attempt", work: "Workspace") -> None:
        """Nothing to hand over: the worktree's branch is already the user's repo's."""

    async def tmpdir(self, home: Path, task_id: str, agent: str) -> str | None:
        """A private TMPDIR, removed when the task ends: CLIs leave files there (gemini's error reports).
        Made in a worker thread: a mkdir on a busy disk can take milliseconds, which the loop can't spare."""
        tmp = home / "tmp" / task_id / agent
        if not tmp.is_dir():  # made already (beside the attempt's worktree): no thread to wait for
            await anyio.Path(tmp).mkdir(parents=True, exist_ok=True)
        return str(tmp)

    async def aclose(self) -> None:
        """Nothing held open."""


def make_host(settings: RunnerSettings, engine: "Engine") -> Host:
    if settings.kind == "dask":
        try:  # `distributed` is only needed by those who ask for it
            from .dask_host import DaskHost
        except ImportError as e:
            raise ConfigError(f'[runner] kind = "dask" needs Dask distributed here and on the workers: '
                              f"pip install 'cli-council[dask]' ({e})") from None
        return DaskHost(settings, engine.environ)
    return LocalHost(engine)
