"""The shared parallel engine: a task fans out to agents, each in its own worktree, at once.

One Engine per process (the MCP server's lifespan, or a `cli-council run`). It hosts the tasks
submitted to it in its own task group; every other process reads and cancels them through the
store. Parallelism is capped globally and per agent with CapacityLimiters that hold across tasks.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
import shutil
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anyio
import anyio.lowlevel

from adapters import make_adapter
from adapters.ollama import classify_tier
from adapters.base import (TIERS, Adapter, Availability, ErrorInfo, ErrorKind, Invocation, Job, Outcome,
                           allowed_env, redact, secret_values)

from . import agents as agents_mod
from . import cleanup as cleanup_mod
from . import compare as compare_mod
from . import diffs, hosts, inputs, judge, rounds, routing, runner, tries
from . import review as review_mod
from . import ports as ports_mod
from . import pool as pool_mod
from . import undo as undo_mod
from .config import Config, ConfigError, LiveConfig, config_path, home_dir
from .events import Event, Events, wait_for
from .gitcmd import GitError, concurrently, git, is_object_id, resolve_commit, resolve_many
from .inputs import CouncilError, NotFound
from .merge import STRATEGIES, BadTarget, MergeRefused, check_target, merge_branch, read_head
from .models import (ACTIVE_TASK, AgentList, Attempt, AttemptState, CheckResult, Diff, GcReport, LogChunk,
                     MergeResult, Task, TaskList, TaskState, TaskSummary, now)
from .logbook import Logbook
from .pool import Pool, Workspace
from .ports import Ports
from .repoconfig import RepoConfigs
from .setup import SetupFailed
from .store import Store
from .worktrees import BRANCH_ROOT, Worktrees

MAX_PROMPT_BYTES = 120_000  # Linux refuses a single argv element over 128 KiB (framing is checked per agent)
AVAILABLE_TTL_S = 30.0
OTHERS_POLL_S = 0.5  # how soon a waiter here sees what another process changed (this one's changes wake it at once)

logger = logging.getLogger("cli_council.engine")


def _self_owner() -> tuple[int, int | None]:
    return os.getpid(), runner.proc_start_time(os.getpid())


def _alive(pid: int | None, start: int | None) -> bool:
    if pid is None:
        return False
    if pid == os.getpid():
        return True
    if start is not None:
        return runner.proc_start_time(pid) == start
    return runner.proc_start_time(pid) is not None


SHELL = "/bin/sh"
SHELL_EXIT = {126: "exit 126: a command was found but could not run", 127: "exit 127: a command was not found"}


async def _shell_syntax(check: str) -> None:
    """Refuse a check the shell cannot parse (an unbalanced quote) now, not after every agent ran."""
    done = await anyio.run_process([SHELL, "-n", "-c", check], check=False, env={"PATH": os.defpath})
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["syntax error"]
        raise CouncilError(f"check {check[:200]!r} is not a valid shell command line: {why[0]}")


def _what_failed(task: Task, attempt: Attempt) -> str | None:
    """Why merging this attempt deserves a second thought, or None when it and its task succeeded."""
    if attempt.check is not None and not attempt.check.passed:
        return f"{attempt.agent}'s attempt failed its check `{attempt.check.command}` ({attempt.check.outcome()})"
    if attempt.state != AttemptState.succeeded:
        why = f": {attempt.error.message}" if attempt.error else ""
        return f"{attempt.agent}'s attempt {attempt.state}{why}"
    if task.state != TaskState.succeeded:
        return f"the task {task.state}"
    return None


def _enabled_agent(config: Config, name: str) -> None:
    """Refuse a name that is no agent of the config, or one that is disabled there."""
    inputs.agent(name)
    try:
        spec = config.agent(name)
    except ConfigError as e:
        raise CouncilError(str(e)) from None
    if not spec.enabled:
        raise CouncilError(f"agent {name!r} is disabled in the config ([agents.{name}] enabled = false)")


class _Later:
    """An answer asked for in the engine's background while the caller goes on, awaited with `get`.
    What goes wrong is an answer of None: the engine's task group must never see it."""

    def __init__(self):
        self.scope, self._done, self._value = anyio.CancelScope(), anyio.Event(), None

    async def ask(self, question: Callable) -> None:
        with self.scope:
            try:
                self._value = await question()
            except Exception as e:  # e.g. the checkout went away meanwhile
                logger.debug("a background question failed: %s", e)
        self._done.set()

    async def get(self):
        await self._done.wait()
        return self._value


class Engine:
    def __init__(self, config: Config | None = None, home: Path | None = None,
                 environ: dict[str, str] | None = None, require_roots: bool = False, warm_pool: bool = True):
        """require_roots: refuse every submission while [server] allowed_roots is empty (a server reachable
        beyond this machine; the bind checked the roots at start, a later config edit must not drop them).
        warm_pool: keep ready worktrees per repo ([pool]); off for one-shot processes (`cli-council run`)."""
        self.environ = dict(os.environ if environ is None else environ)
        self.require_roots = require_roots
        # A given Config stays as it is (tests, `run`); otherwise the file is followed while we run.
        self._static = config
        self._live = None if config is not None else LiveConfig(config_path(self.environ))
        self._told_problem: str | None = None
        self.home = home or home_dir(self.environ)
        self.store = Store(self.home / "council.db")
        self.others_poll_s = OTHERS_POLL_S
        # Wake-ups and the event stream: task records, stored log batches and merges, here and elsewhere.
        self.events = Events()
        self.logbook = Logbook(self.store, max_bytes=self.config.engine.log_max_bytes,
                               max_lines=self.config.engine.log_max_lines, on_flush=self.events.publish,
                               hurry=self.events.waited_on,
                               on_stored=lambda tid, seq: self.events.emit(Event("logs", tid, seq=seq), wake=False))
        self.worktrees = Worktrees(self.home / "worktrees")
        self.owner = _self_owner()
        self.repo_configs = RepoConfigs()
        self.ports = Ports(self.home / "ports")
        self.pool = Pool(self.worktrees, self.home, self.environ, self.repo_configs, self.owner,
                         kill_grace_s=self.config.engine.kill_grace_s)
        # Where attempts run ([runner], read once: a running attempt stays where it started).
        self.host = hosts.make_host(self.config.runner, self)
        self._warm_pool = warm_pool and self.host.local
        self._leases: dict[tuple[str, str], list[int]] = {}  # (task, agent): ports it holds while it runs
        self._starting: dict[str, set[str]] = {}  # per task: the stage's agents not started (nor ended) yet
        self._global = anyio.CapacityLimiter(self.config.engine.max_parallel)
        self._per_agent: dict[str, anyio.CapacityLimiter] = {}
        self._avail: dict[str, tuple[float, Availability]] = {}
        self._hosted: dict[str, Task] = {}
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._tops: dict[str, str] = {}  # repo path as given: its toplevel (see _toplevel)
        self._secrets: dict[str, list[str]] = {}  # per task: the values its agents' env holds as secrets
        # Our own secrets (API keys, tokens, passwords): never stored or shown, whoever prints them.
        self._own_secrets = secret_values(self.environ, min_len=8)
        self._tg = None
        self._stopping = False

    @property
    def config(self) -> Config:
        if self._live is None:
            return self._static
        config = self._live.get()
        if self._live.problem != self._told_problem:
            self._told_problem = self._live.problem
            if self._live.problem:
                logger.warning("config edit ignored, the last good config stays in use: %s", self._live.problem)
        return config

    @property
    def config_problem(self) -> str | None:
        """Why the config file's current content is not in use (a broken edit), or None."""
        return self._live.problem if self._live is not None else None

    # lifecycle

    async def __aenter__(self) -> "Engine":
        await self.store.open()
        await self.recover()
        await pool_mod.reap(self.worktrees.root, self.config.engine.kill_grace_s)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        if self._warm_pool:
            self.pool.start(self._tg)
        self._tg.start_soon(self._watch_cancel_requests)
        self._tg.start_soon(self.logbook.run)
        self._tg.start_soon(self.events.follow_store, self.store)
        return self

    async def __aexit__(self, *exc) -> None:
        self._stopping = True  # running attempts end as interrupted: the host stopped, not the user
        self._tg.cancel_scope.cancel()
        try:
            # The caller's own exception (bad input, Ctrl-C) passes through as itself, not wrapped
            # in an ExceptionGroup: the engine's tasks were only cancelled, not failed.
            await self._tg.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self.pool.close()
                    await self.host.aclose()
                finally:
                    await self.logbook.close()
                    await self.store.close()

    async def recover(self) -> list[str]:
        """Tasks whose host process died are marked interrupted (their worktrees stay for inspection),
        and any agent process group they left behind is stopped."""
        found = []
        for task_id, pid, start in await self.store.owners([s.value for s in ACTIVE_TASK]):
            if _alive(pid, start):
                continue
            task = await self.store.get_task(task_id)
            cut_short = [a for a in task.attempts if a.state in (AttemptState.queued, AttemptState.running)]
            for a in cut_short:
                a.state = AttemptState.interrupted
                a.error = ErrorInfo(kind=ErrorKind.crash, message="the process hosting this task stopped")
            await self._stop_recorded(task_id)
            await self.store.clear_procs(task_id)
            if cut_short or not task.attempts:
                task.state, task.finished_at = TaskState.interrupted, now()
            else:  # only a review of finished attempts was in flight: their results stand, judged again
                for field, value in self._ended(task, cancelled=False).items():
                    setattr(task, field, value)
                await self._note(task, f"the process hosting this task's review stopped; the verdict stands on "
                                       f"the evidence recorded: {task.state}, best {task.best}")
            self.events.emit(Event.of_task(task), rev=await self.store.save_task(task))
            found.append(task_id)
        return found

    # the API every surface calls

    async def submit(self, repo: str, prompt: str, agents: list[str] | None = None, tier: str | None = None,
                     base: str | None = None, check: str | None = None, timeout_s: float | None = None,
                     budget_usd: float | None = None, review: bool | None = None) -> Task:
        """Validate, record and start a task; returns at once while the attempts run. review: cross-review
        the candidates before the pick (None: the config's [review] enabled)."""
        if self._tg is None:
            raise RuntimeError("Engine must be entered (async with Engine() as engine) before submit")
        if review is not None and not isinstance(review, bool):
            raise CouncilError(f"review must be true or false, got {review!r}")
        review = self.config.review.enabled if review is None else review
        # Whether the user's checkout has uncommitted changes only feeds a warning, and its status stats
        # every file (23 ms on 3,000, 56 ms on 20,000): asked in the background from the moment the
        # repo is known, beside the other questions and the attempts' worktrees, not before them.
        dirty = _Later() if base is None else None
        try:
            task = await self._new_task(repo, prompt, agents, tier, base, check, timeout_s, budget_usd, dirty)
        except BaseException:
            if dirty is not None:
                dirty.scope.cancel()
            raise
        self._hosted[task.task_id] = task
        rev = await self.store.save_task(task, owner=self.owner)
        self.events.emit(Event.of_task(task), rev=rev)
        answer = task.model_copy(deep=True)  # the task as submitted: the run changes `task` from now on
        self._tg.start_soon(self._run_task, task, agents, None, review)
        if dirty is not None and await dirty.get():
            warning = (f"the checkout has uncommitted changes; the agents start from the last commit "
                       f"({task.base[:12]}) and do not see them: commit them first if they matter")
            answer.warnings.append(warning)
            task.warnings.append(warning)
            await self._save(task)  # the run may already have saved its last state
        return answer

    async def get(self, task_id: str) -> Task:
        task_id = inputs.task_id(task_id)
        if task_id in self._hosted:
            return self._hosted[task_id].model_copy(deep=True)
        task = await self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"no task {task_id!r}; list_tasks shows the known ones")
        return task

    async def wait(self, task_id: str, wait_s: float = 0) -> Task:
        """The task as soon as it has finished, or as it is when wait_s runs out."""
        inputs.number("wait_s", wait_s, low=0, high=inputs.MAX_TIMEOUT_S)
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            with self.events.watch(task_id, hurry=False) as changed:  # the task's end, not its lines
                task = await self.get(task_id)
                left = deadline - time.monotonic()
                if task.state not in ACTIVE_TASK or left <= 0:
                    return task
                await wait_for(changed, min(left, self.others_poll_s))

    async def list(self, repo: str | None = None, limit: int = 20) -> TaskList:
        limit = int(inputs.number("limit", limit, low=1, high=10**9))
        if repo is not None:
            repo = str(inputs.repo_path(repo, []))
            repo = await self._toplevel(repo, must_exist=False) or repo
        tasks = await self.store.list_tasks(repo, max(1, min(limit, 1000)))
        return TaskList(tasks=[TaskSummary.of(self._hosted.get(t.task_id, t)) for t in tasks])

    async def logs(self, task_id: str, agent: str | None = None, cursor: int = 0, wait_s: float = 0,
                   limit: int = 500, hurry: bool = True) -> LogChunk:
        """Lines after `cursor`; with wait_s, waits for the first new line (or the task's end).
        hurry=False: the waiter does not need each line the moment it comes (lines stay batched)."""
        inputs.number("wait_s", wait_s, low=0, high=inputs.MAX_TIMEOUT_S)
        cursor = int(inputs.number("cursor", cursor, low=0, high=inputs.MAX_CURSOR))
        limit = int(max(1, min(inputs.number("limit", limit, low=-inputs.MAX_CURSOR, high=inputs.MAX_CURSOR), 5000)))
        if agent is not None:
            inputs.agent(agent)
        deadline = time.monotonic() + max(0.0, wait_s)
        polled = False
        while True:
            with self.events.watch(task_id, hurry) as changed:
                task = await self.get(task_id)
                finished = task.state not in ACTIVE_TASK
                # A running task hosted here: its new lines are ours, in memory. The store answers for
                # the rest: tasks hosted elsewhere, the end of a task, and the slow poll that finds
                # lines another process (a merge or cancel from another shell) wrote to our task.
                lines = None
                if task_id in self._hosted and not finished and not polled:
                    lines = self.logbook.read(task_id, cursor, agent, limit)
                if lines is None:
                    lines = await self.store.read_logs(task_id, cursor, agent, limit)
                left = deadline - time.monotonic()
                if lines or finished or left <= 0:
                    return LogChunk(task_id=task_id, lines=lines, next_cursor=lines[-1].seq if lines else cursor,
                                    done=finished and not lines.more)
                if hurry:
                    self.logbook.urge(task_id)  # lines buffered before we watched: store them now
                polled = not await wait_for(changed, min(left, self.others_poll_s))

    async def cancel(self, task_id: str) -> Task:
        """Stop every running attempt of a task, here or in the process hosting it."""
        task = await self.get(task_id)
        if task.state not in ACTIVE_TASK:
            return task
        if task_id in self._scopes:
            self._scopes[task_id].cancel()
            return await self.wait(task_id, 10)
        # Hosted elsewhere: flag it for the host, and stop the process groups ourselves if the
        # host does not act in time (or is gone).
        await self.store.request_cancel(task_id)
        task = await self.wait(task_id, 2)
        if task.state in ACTIVE_TASK:
            await self._stop_recorded(task_id)
            if not await self._host_alive(task_id):
                await self.recover()
        return await self.wait(task_id, 10)

    async def merge(self, task_id: str, agent: str | None = None, strategy: str = "squash", into: str | None = None,
                    dry_run: bool = False, cleanup: bool = True) -> MergeResult:
        """Bring an attempt (the best by default) into `into` (default: the branch checked out at
        submission) without losing work; then remove the task's worktrees and branches."""
        task = await self.get(task_id)
        if strategy not in STRATEGIES:
            raise CouncilError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        for name, flag in (("dry_run", dry_run), ("cleanup", cleanup)):
            if not isinstance(flag, bool):
                raise CouncilError(f"{name} must be true or false, got {flag!r}")
        if agent is not None:
            inputs.agent(agent)
        if into is not None:
            inputs.ref("into", into)
        if task.state in ACTIVE_TASK:
            raise CouncilError(f"task {task_id} is still {task.state}; wait for it (get_status with wait_s) or cancel it")
        if task.discarded_at is not None:
            raise CouncilError(f"task {task_id} was discarded at {task.discarded_at:%Y-%m-%d %H:%M:%S} UTC: "
                               "its worktrees and branches are gone, so there is nothing to merge")
        if task.state == TaskState.merged:
            raise CouncilError(f"task {task_id} is already merged as {task.merge_commit}; "
                               f"`git show {(task.merge_commit or '')[:12]}` in {task.repo} shows it")
        into = into or task.into
        if not into:
            raise CouncilError("the repo was on a detached HEAD when the task was submitted; pass into=BRANCH")

        async def target() -> str:  # a target that is no branch of the user's is bad input, not a refusal
            try:
                return await check_target(task.repo, into)
            except BadTarget as e:
                raise CouncilError(str(e)) from None

        async def refuse(message: str) -> MergeResult:  # bad input is said first
            return MergeResult(merged=False, task_id=task_id, agent=agent, strategy=strategy, into=await target(),
                               dry_run=dry_run, message=message)

        explicit = agent is not None
        if agent is None:
            if task.best is None:
                return await refuse(f"no attempt to merge: {task.best_reason or 'the task picked no best attempt'}")
            agent = task.best
        try:
            attempt = task.attempt(agent)
        except KeyError:
            raise CouncilError(f"task {task_id} has no attempt by {agent!r}; "
                               f"its attempts: {', '.join(a.agent for a in task.attempts)}") from None
        if not attempt.branch or not attempt.files_changed:
            return await refuse(f"{agent}'s attempt ({attempt.state}) left no changes to merge")
        failed = _what_failed(task, attempt)
        if failed and not explicit:
            await target()
            raise CouncilError(f"not merging task {task_id} by default: {failed}. Look at its diff first; to merge "
                               f"it anyway, name the attempt: agent={agent!r} (`--agent {agent}`)")
        first = task.prompt.strip().splitlines()[0][:72]
        message = (f"{first}\n\ncli-council task {task_id}, agent {agent} ({strategy}).\n"
                   f"Picked: {task.best_reason or 'chosen by the caller'}\n\nPrompt:\n{task.prompt.strip()}")
        try:
            result = await merge_branch(task.repo, branch=attempt.branch, base=task.base, into=into, strategy=strategy,
                                        message=message, task_id=task_id, agent=agent,
                                        run_hooks=self.config.merge.run_hooks, dry_run=dry_run)
        except MergeRefused as e:  # a BadTarget too: refuse() says it as the error it is
            return await refuse(str(e))
        except GitError as e:  # e.g. another process merged or cleaned this task at the same moment
            return await refuse(f"git could not compute the merge, nothing was changed: {e}")
        result.agent, into = agent, result.into or into  # the branch's name as merge_branch read it
        if failed:
            result.message = f"warning: {failed}. {result.message}"
        if not result.merged:
            return result
        task.state, task.merge_commit = TaskState.merged, result.commit
        task.merge_into, task.merge_backup_ref = into, result.backup_ref  # what undo_merge needs
        await self._note(task, f"merged {agent} into {into} ({strategy}): {result.commit}")
        await self._save(task)
        self.events.emit(Event("merge", task_id, agent=agent, commit=result.commit))
        if cleanup:
            for a in task.attempts:
                try:
                    report = await cleanup_mod.remove_attempt(
                        task.repo, root=self.worktrees.root, worktree=a.worktree, branch=a.branch, into=into,
                        base=task.base, discard=a.agent != agent, check_until=cleanup_mod.check_output_until(a),
                        merged_tip=result.source_commit if a.agent == agent else None, defer=self._defer)
                except GitError as e:  # the merge landed; what is left behind, gc reclaims later
                    result.message += f"; cleanup of {a.agent} incomplete ({e.stderr or e})"
                    continue
                result.removed += report.removed
        return result

    def _defer(self, fn: Callable[[], None]) -> None:
        """Run a blocking cleanup step in a worker thread after the caller has its answer (deleting a
        removed worktree's files); the engine waits for it when it stops."""
        self._tg.start_soon(partial(anyio.to_thread.run_sync, fn))

    async def continue_task(self, task_id: str, agent: str, prompt: str, check: str | None = None,
                            timeout_s: float | None = None) -> Task:
        """A follow-up prompt to a finished attempt, in its worktree and session (rounds.py); returns at once."""
        if check is not None:
            inputs.text("check", check, max_bytes=inputs.MAX_CHECK_BYTES,
                        hint="put a long check in a script in the repo and run that")
            await _shell_syntax(check)
        return await rounds.start(self, task_id, agent, prompt, check, timeout_s, MAX_PROMPT_BYTES)

    async def undo_merge(self, task_id: str) -> MergeResult:
        """Put the merge's target back where it was before the task's merge (undo.py)."""
        return await undo_mod.undo_merge(self, inputs.task_id(task_id))

    async def gc(self, older_than_s: float | None = None) -> GcReport:
        """Reap what crashed hosts left running, then reclaim finished tasks' worktrees and branches."""
        age = self.config.engine.gc_age_s if older_than_s is None else inputs.number(
            "older_than_s", older_than_s, low=0, high=100 * 365 * 86400)
        interrupted = await self.recover()
        tasks = await self.store.list_tasks(limit=10**9)
        busy = [a.worktree for t in self._hosted.values() for a in t.attempts if a.worktree]
        report = await cleanup_mod.gc(self.worktrees.root, tasks, age_s=age, busy=busy,
                                      kill_grace_s=self.config.engine.kill_grace_s)
        report.removed[:0] = [f"task {t}: host process gone, marked interrupted" for t in interrupted]
        cutoff = now().timestamp() - age
        for task in tasks:
            finished = task.finished_at or task.created_at
            old = finished.timestamp() <= cutoff or task.discarded_at is not None  # discarded: no need to wait
            if task.state not in ACTIVE_TASK and old and not await self._leftovers(task):
                await self.store.delete_task(task.task_id)
                report.removed.append(f"task {task.task_id}: record and logs (nothing of it is left in git or on disk)")
        report.kept += [f"task {tid}: its stored record cannot be read ({why})" for tid, why in
                        await self.store.unreadable_tasks()]
        return report

    async def _leftovers(self, task: Task) -> bool:
        """Whether any worktree or branch of the task still exists (its record must stay to explain them)."""
        for a in task.attempts:
            if a.worktree and await anyio.Path(a.worktree).exists():
                return True
        if not await anyio.Path(task.repo).is_dir():
            return False
        return bool(await git(task.repo, "for-each-ref", "--format=%(refname)", f"refs/heads/council/{task.task_id}/",
                              check=False))

    # agents, diffs, throwing a task away

    async def agents(self) -> AgentList:
        """Every configured agent and whether it can run here: what `cli-council doctor` shows."""
        return await agents_mod.describe(self.config, self.environ)

    async def diff(self, task_id: str, agent: str | None = None, max_bytes: int = 200_000) -> Diff:
        """An attempt's changes (the best attempt's by default) as `git diff base..branch`, cut at max_bytes."""
        task = await self.get(task_id)
        max_bytes = int(inputs.number("max_bytes", max_bytes, low=1, high=diffs.MAX_BYTES))
        if agent is None:
            if task.best is None:
                why = (f"it is still {task.state}" if task.state in ACTIVE_TASK
                       else task.best_reason or "it picked no best attempt")
                raise CouncilError(f"task {task_id} has no best attempt to show ({why}); name one: agent=NAME "
                                   f"(`--agent NAME`) of {', '.join(a.agent for a in task.attempts) or 'none yet'}")
            agent = task.best
        inputs.agent(agent)
        try:
            attempt = task.attempt(agent)
        except KeyError:
            raise CouncilError(f"task {task_id} has no attempt by {agent!r}; "
                               f"its attempts: {', '.join(a.agent for a in task.attempts) or 'none yet'}") from None
        if attempt.state in (AttemptState.queued, AttemptState.running):
            raise CouncilError(f"{agent}'s attempt is still {attempt.state}: its changes reach its branch when it "
                               "ends; wait for the task (get_status with wait_s), then ask again")
        if not attempt.branch or not attempt.files_changed:
            raise CouncilError(f"{agent}'s attempt ({attempt.state}) left no changes: there is no diff to show")
        if not await anyio.Path(task.repo).is_dir():
            raise CouncilError(f"the task's repo {task.repo} is gone, and its branches with it")
        tip = await resolve_commit(task.repo, f"refs/heads/{attempt.branch}")
        if tip is None:
            gone = (f"the task was merged as {task.merge_commit} and its branches removed; "
                    f"`git show {task.merge_commit[:12]}` in {task.repo} shows what landed"
                    if task.state == TaskState.merged and task.merge_commit else "it was removed (discarded or deleted)")
            raise CouncilError(f"{agent}'s branch {attempt.branch} no longer exists: {gone}")
        patch, truncated = await diffs.patch(task.repo, task.base, tip, max_bytes, self._own_secrets)
        return Diff(task_id=task_id, agent=agent, base=task.base, branch=attempt.branch,
                    files=await diffs.files(task.repo, task.base, tip), patch=patch, truncated=truncated)

    async def discard(self, task_id: str) -> GcReport:
        """Remove a finished task's worktrees and branches (only the council's own, never the user's).
        Uncommitted work in a worktree is kept and reported, as gc does. With nothing left the record
        and logs go too; otherwise the record stays, marked discarded, and gc drops it once nothing is."""
        task = await self.get(task_id)
        if task.state in ACTIVE_TASK:
            raise CouncilError(f"task {task_id} is still {task.state}; cancel it first (cancel_task, or "
                               f"`cli-council cancel {task_id}`), then discard it")
        report, root = GcReport(), self.worktrees.root
        if not await anyio.Path(task.repo).is_dir():
            report.kept.append(f"task {task_id}: its repo {task.repo} is gone; `cli-council gc` reclaims its "
                               "worktrees")
        else:
            prefix = f"council/{task_id}/"
            recorded = {a.branch for a in task.attempts if a.branch}
            listed = await git(task.repo, "for-each-ref", "--format=%(refname:strip=2)", f"refs/heads/{prefix}",
                               check=False)  # no longer a repo: each removal below reports why it kept things
            paths = {str(Path(a.worktree)) for a in task.attempts if a.worktree}
            strays = [str(p) for p in await anyio.to_thread.run_sync(self._task_dirs, task_id) if str(p) not in paths]
            parts = ([(a.worktree, a.branch, cleanup_mod.check_output_until(a)) for a in task.attempts]
                     + [(p, None, None) for p in strays]
                     + [(None, b, None) for b in listed.splitlines() if b not in recorded])
            for worktree, branch, check_until in parts:
                if branch and not branch.startswith(prefix):  # a record naming someone else's branch
                    report.kept.append(f"{branch}: not a council branch of task {task_id}; not touched")
                    branch = None
                try:
                    part = await cleanup_mod.remove_attempt(task.repo, root=root, worktree=worktree, branch=branch,
                                                            into=task.into, base=task.base, discard=True,
                                                            check_until=check_until)
                except (GitError, OSError) as e:
                    report.kept.append(f"{worktree or branch}: could not remove it: {getattr(e, 'stderr', '') or e}")
                    continue
                report.removed += part.removed
                report.kept += part.kept
        if await self._leftovers(task) or await anyio.to_thread.run_sync(self._task_dirs, task_id):
            task.discarded_at = now()
            await self._note(task, "discarded; kept: " + "; ".join(report.kept))
            await self.logbook.flush(task_id)
            await self._save(task)
            report.kept.append(f"task {task_id}: its record stays, marked discarded, while any of it is left; "
                               "once you have dealt with what was kept, discard it again, or `cli-council gc` "
                               "drops the record when nothing of it is left")
        else:
            await self.store.delete_task(task_id)
            report.removed.append(f"task {task_id}: record and logs")
        return report

    async def review(self, task_id: str, reviewers: list[str] | None = None) -> Task:
        """Cross-review a finished task's candidates (again), then pick its best anew on that evidence.
        Hosted like a run: returns at once with the task `running` (merge, discard and continue_task wait,
        cancel_task stops the reviews) until the verdict is recorded. A refusal changes nothing."""
        task_id = inputs.task_id(task_id)
        config = self.config
        if reviewers is not None:
            if not isinstance(reviewers, list) or not reviewers or len(reviewers) > inputs.MAX_AGENTS:
                raise CouncilError(f"reviewers must be a list of 1 to {inputs.MAX_AGENTS} agent names, or left out "
                                   "for [review] reviewers (default: every enabled agent)")
            for name in reviewers:
                _enabled_agent(config, name)
        await rounds.let_go(self, task_id)
        task = await self.get(task_id)
        if task.state in ACTIVE_TASK or task_id in self._hosted:
            raise CouncilError(f"task {task_id} is still {task.state}; wait for it (get_status with wait_s), "
                               "then review it")
        if task.discarded_at is not None:
            raise CouncilError(f"task {task_id} was discarded: its branches are gone, there is nothing to review")
        if task.state not in (TaskState.succeeded, TaskState.failed):
            raise CouncilError(f"task {task_id} is {task.state}: only a task that ran to its end (succeeded or "
                               "failed) and is not merged has candidates to review")
        if not compare_mod.candidates(task):
            raise CouncilError(f"task {task_id} has no candidate to review: no attempt finished with changes")
        if task_id in self._hosted or not await self.store.claim(task_id, self.owner):
            raise CouncilError(f"task {task_id} was started again meanwhile (a review or continue_task); wait for it")
        self._hosted[task_id] = task
        task.state, task.finished_at = TaskState.running, None
        await self._save(task)
        answer = task.model_copy(deep=True)
        asked = f" by {', '.join(reviewers)}" if reviewers else ""
        self._tg.start_soon(self._run_task, task, None, lambda: self._note(task, f"review_task{asked}"), True,
                            reviewers)
        return answer

    async def _deliberate(self, task: Task, review: bool, reviewers: list[str] | None = None) -> None:
        """The verdict's evidence beyond the check: comparison always, cross-review when asked."""
        try:
            await compare_mod.compare(task, self._own_secrets)
            if review and compare_mod.candidates(task):
                await self._note(task, "cross-review: each candidate is reviewed by other agents, anonymously")
                await review_mod.review(self._seat(), task, reviewers)
        except Exception as e:  # the evidence is a help to the verdict, never a reason to lose the task
            logger.exception("comparing or reviewing task %s failed", task.task_id)
            await self._note(task, f"comparison or review broke, the verdict goes without it: {type(e).__name__}: {e}")
        await self._save(task)

    def _seat(self) -> review_mod.Seat:
        @contextlib.asynccontextmanager
        async def slots(agent: str):
            async with self._limiter(agent), self._global:  # the agent's own slot first, as attempts take them
                yield

        def keep_secret(task: Task, values: list[str]) -> None:
            secrets = self._secrets.setdefault(task.task_id, [])
            secrets += [s for s in values if s not in secrets]

        # Reviews read a patch in a directory of this machine, whatever host runs the attempts.
        return review_mod.Seat(config=lambda: self.config, environ=self.environ,
                               spawn=partial(self._spawn, here=True), log=self._log, slots=slots,
                               available=partial(self._available, here=True), keep_secret=keep_secret,
                               redact=lambda task, text: self._redact(task.task_id, text),
                               secrets=self._own_secrets, tmp=self.home / "tmp")

    def _task_dirs(self, task_id: str) -> list[Path]:
        """Directories under the task's worktree folder, recorded in its attempts or not."""
        try:
            return sorted(p for p in (self.worktrees.root / task_id).iterdir() if p.is_dir())
        except OSError:
            return []

    # building a task

    async def _new_task(self, repo, prompt, agents, tier, base, check, timeout_s, budget_usd,
                        dirty: _Later | None = None) -> Task:
        """dirty: asked, once the repo is known, whether its checkout has uncommitted changes."""
        config = self.config  # one reading for the whole submission, however the file is edited meanwhile
        prompt = inputs.text("prompt", prompt, max_bytes=MAX_PROMPT_BYTES, hint=(
            "CLIs receive it as one argument: put the details in a file in the repo and refer to it"))
        if timeout_s is not None:
            inputs.number("timeout_s", timeout_s, low=0, low_open=True, high=inputs.MAX_TIMEOUT_S)
        if budget_usd is not None:
            inputs.number("budget_usd", budget_usd, low=0, high=1e6)
        if tier is not None and tier not in TIERS:
            raise CouncilError(f"unknown tier {tier!r}; use one of {', '.join(TIERS)}")
        if check is not None:
            inputs.text("check", check, max_bytes=inputs.MAX_CHECK_BYTES,
                        hint="put a long check in a script in the repo and run that")
            await _shell_syntax(check)
        if agents is not None:
            if not isinstance(agents, list) or not agents:
                raise CouncilError("agents must be a non-empty list of agent names, or left out to route by tier")
            if len(agents) > inputs.MAX_AGENTS:
                raise CouncilError(f"{len(agents)} agents named; at most {inputs.MAX_AGENTS}")
            for name in agents:
                _enabled_agent(config, name)
        if base is not None:
            inputs.ref("base", base)
            if ".." in base:
                raise CouncilError(f"base {base!r} is a range; give one commit, branch or tag")
        if self.require_roots and not config.server.allowed_roots:
            raise CouncilError("this server is reachable beyond this machine, so [server] allowed_roots must say "
                               "where repos may be, and the config no longer sets it: add it back, nothing runs "
                               "until then")
        repo = inputs.repo_path(repo, config.server.allowed_roots)
        top = await self._toplevel(repo)
        if dirty is not None:
            self._tg.start_soon(dirty.ask, partial(git, top, "status", "--porcelain", "--untracked-files=no",
                                                   check=False, idle=True))
        ref = base or "HEAD"
        # On the path of every submit_task call: the base's commit and whether a branch named `council`
        # blocks every attempt's, from one git process; beside it, the checkout's branch, from its HEAD
        # file (git is asked only when that file can't be read as git writes it).
        (commit, blocker), into = await concurrently(
            lambda: resolve_many(top, f"{ref}^{{commit}}", f"refs/heads/{BRANCH_ROOT}"),
            lambda: self._checkout_branch(top))
        if not commit:
            raise CouncilError(f"base {ref!r} does not resolve to a commit in {top}" if base else
                               f"{top} has no commits yet; commit something first")
        if blocker:  # git keeps a branch and the branches under its name apart: it would refuse every one
            raise CouncilError(f"{top} has a branch named {BRANCH_ROOT!r}, so git cannot make the council's branches "
                               f"({BRANCH_ROOT}/<task>/<agent>) beside it; rename it "
                               f"(git branch -m {BRANCH_ROOT} <new name>) and submit again")
        try:  # the repo's .cli-council.toml at the base: a broken one is refused now, not in every attempt
            await self.repo_configs.settings(config, top, commit)
        except ConfigError as e:
            raise CouncilError(str(e)) from None
        why = "explicit agents" if agents else "given"
        if tier is None and not agents:
            tier, why = routing.classify(prompt)
            why = f"classified: {why}"
        plan = routing.stages(config, tier, agents)
        unknown = [a for stage in plan for a in stage if a not in config.agents]
        if unknown:
            raise CouncilError(f"routing for tier {tier!r} names unknown agents {unknown}; fix [routing] in the config")
        timeout_s = timeout_s or config.engine.default_timeout_s
        for agent in {a for stage in plan for a in stage}:
            self._check_command_line(config, agent, prompt, check, timeout_s, budget_usd, tier)
        return Task(task_id=uuid.uuid4().hex[:12], repo=top, base=commit, into=into, prompt=prompt, tier=tier, tier_reason=why,
                    agents=[a for stage in plan for a in stage], check=check,
                    timeout_s=timeout_s, budget_usd=budget_usd,
                    attempts=[Attempt(agent=a, stage=0) for a in plan[0]])

    def _check_command_line(self, config: Config, agent: str, prompt: str, check, timeout_s: float, budget_usd,
                            tier) -> None:
        """Build the agent's command line now, to refuse what the kernel would refuse at exec."""
        try:
            adapter = make_adapter(config.agent(agent), self.environ)
            job = Job(prompt=prompt, worktree=self.worktrees.path("0" * 12, agent), timeout_s=timeout_s, check=check,
                      budget_usd=budget_usd, tier=tier)
            inv = adapter.invocation(job)
        except Exception:  # the attempt will record what is wrong with this agent; not the caller's input
            return
        inputs.argv_fits(agent, inv)

    @staticmethod
    async def _checkout_branch(top: str) -> str | None:
        """The branch checked out at `top` (None when HEAD is detached). Its whole name: git's
        `symbolic-ref --short` says heads/x for a branch x beside a tag x, and that names no branch."""
        head = await anyio.to_thread.run_sync(read_head, top)
        if head is None or not (head.startswith("ref: ") or is_object_id(head)):
            head = "ref: " + await git(top, "symbolic-ref", "--quiet", "HEAD", check=False)
        return head.removeprefix("ref: refs/heads/") if head.startswith("ref: refs/heads/") else None

    async def _toplevel(self, repo: str | Path, must_exist: bool = True) -> str | None:
        path = Path(repo).expanduser()
        if not path.is_absolute() or not path.is_dir():
            if must_exist:
                raise CouncilError(f"repo {str(repo)!r} is not an existing directory")
            return None
        key = str(path)
        if (cached := self._tops.get(key)) and (path / ".git").exists():
            return cached
        top = await git(path, "rev-parse", "--show-toplevel", check=False)
        if not top:
            if must_exist:
                raise CouncilError(f"repo {str(repo)!r} is not a git repository with a working tree "
                                   "(run `git init` there first; bare repositories are not supported)")
            return None
        top = str(Path(top).resolve())
        if top == str(path.resolve()):
            # Only a repo's own top is remembered: while `.git` is there, git says the same of it
            # whatever else changes (a subdirectory's answer would change with a `git init` inside it).
            if len(self._tops) >= 1000:  # bounded, however many repos one server is asked about
                self._tops.clear()
            self._tops[key] = top
        return top

    # running a task

    async def _run_task(self, task: Task, explicit_agents: list[str] | None, body=None, review: bool = False,
                        reviewers: list[str] | None = None) -> None:
        """body: what to run instead of the task's stages (a follow-up round, see rounds.py, or a review's
        note). review: cross-review the candidates (by `reviewers`) before the pick."""
        with anyio.CancelScope() as scope:
            self._scopes[task.task_id] = scope
            settled = body is not None and review  # a review_task: every attempt had ended before it
            try:
                await (body() if body else self._run_stages(task, explicit_agents))
                await self._deliberate(task, review, reviewers)
            except Exception as e:  # failures are results: a broken task ends failed, the engine goes on
                logger.exception("task %s failed inside the engine", task.task_id)
                task.error = ErrorInfo(kind=ErrorKind.crash, message=f"{type(e).__name__}: {e}")
            finally:
                with anyio.CancelScope(shield=True):
                    try:
                        # a cancelled review leaves the attempts as they ended: the verdict goes on what was said
                        await self._finish(task, cancelled=scope.cancel_called and not settled)
                    except Exception:  # the store itself failing (disk full): nothing left to record it in
                        logger.exception("could not record the end of task %s", task.task_id)
                    finally:
                        self._scopes.pop(task.task_id, None)
                        self._hosted.pop(task.task_id, None)
                        self._secrets.pop(task.task_id, None)
                        self._starting.pop(task.task_id, None)  # an attempt cancelled before it ran never said
                        self.events.publish(task.task_id)

    async def _run_stages(self, task: Task, explicit_agents: list[str] | None) -> None:
        task.state, task.started_at = TaskState.running, now()
        if task.tier_reason and task.tier_reason.startswith("classified") and self.config.routing.classify_with_model:
            await self._confirm_tier(task)
        plan = routing.stages(self.config, task.tier, explicit_agents)
        await self._save(task)
        shown = " -> then, if that fails: ".join(", ".join(stage) for stage in plan)
        await self._note(task, f"task started: tier {task.tier or '-'} ({task.tier_reason}); agents: {shown}")
        if self.config_problem:
            await self._note(task, f"the config file has a broken edit, so the last good config is used: "
                                   f"{self.config_problem}")
        for stage, agents in enumerate(plan):
            if stage > 0:
                if not await self._should_escalate(task):
                    break
                await self._note(task, f"escalating to {', '.join(agents)}: stage {stage - 1} gave no good result")
                task.attempts += [Attempt(agent=a, stage=stage) for a in agents]
                await self._save(task)
            async with anyio.create_task_group() as tg:
                self._starting[task.task_id] = {a.agent for a in task.attempts if a.stage == stage}
                for attempt in [a for a in task.attempts if a.stage == stage]:
                    tg.start_soon(self._run_attempt, task, attempt)

    async def _finish(self, task: Task, cancelled: bool) -> None:
        # The closing note is logged before the state turns final, so a reader that sees the task
        # finished has every line.
        ended = self._ended(task, cancelled=cancelled)
        for a in task.attempts:
            if dropped := self.logbook.dropped(task.task_id, a.agent):
                await self._note(task, f"{dropped} lines of output over the log cap were not stored", a.agent)
        await self._note(task, f"task {ended['state']}" + (
            f"; best: {ended['best']} ({ended['best_reason']})" if ended["best"] else "")
            + (f"; {task.error.message}" if task.error else ""))
        await self.logbook.flush(task.task_id)
        self.logbook.forget(task.task_id)
        for key, value in ended.items():  # only now: a reader here that sees the end has every line
            setattr(task, key, value)
        await self._save(task)
        await anyio.to_thread.run_sync(shutil.rmtree, self.home / "tmp" / task.task_id, True)

    async def _confirm_tier(self, task: Task) -> None:
        """Ask the local model to confirm the heuristic's tier (here, not in submit: it takes seconds)."""
        spec = self.config.agents.get("ollama")
        if spec is None or not spec.enabled:
            return
        local = make_adapter(spec, self.environ)
        with anyio.move_on_after(30):
            said = await classify_tier(local.base_url, local.model, task.prompt)
            if said is not None:
                tier = routing.confirm(task.tier, said)
                task.tier_reason = (f"local model {local.model} said {said} (it may only raise a task to complex); "
                                    f"heuristic said {task.tier} ({task.tier_reason})")
                task.tier = tier
                plan = routing.stages(self.config, tier, None)
                task.attempts = [Attempt(agent=a, stage=0) for a in plan[0]]
                task.agents = [a for stage in plan for a in stage]

    async def _should_escalate(self, task: Task) -> bool:
        if await self.store.cancel_requested([task.task_id]):
            return False
        if task.budget_usd is not None and task.total_cost_usd >= task.budget_usd:
            await self._note(task, f"not escalating: budget ${task.budget_usd:g} spent")
            return False
        return not any(a.state == AttemptState.succeeded and a.files_changed > 0 for a in task.attempts)

    def _ended(self, task: Task, cancelled: bool) -> dict:
        """The task's final fields: picked on evidence, or cancelled/interrupted."""
        if cancelled or any(a.state in (AttemptState.queued, AttemptState.running) for a in task.attempts):
            end = AttemptState.interrupted if self._stopping else AttemptState.cancelled
            for a in task.attempts:
                if a.state in (AttemptState.queued, AttemptState.running):
                    a.state = end
                    a.error = ErrorInfo(kind=ErrorKind.cancelled, message="the server stopped" if self._stopping else "cancelled")
            state = TaskState.interrupted if self._stopping else TaskState.cancelled
            best, reason = None, None
        else:
            best, reason = judge.pick_best(task.attempts)
            ok = best is not None and task.attempt(best).state == AttemptState.succeeded
            if all(a.state == AttemptState.skipped for a in task.attempts):
                reason = "no agent could run here: " + "; ".join(
                    f"{a.agent}: {a.error.message}" for a in task.attempts if a.error) + self._other_agents(task)
            state = TaskState.succeeded if ok and task.error is None else TaskState.failed
        return {"state": state, "best": best, "best_reason": reason, "finished_at": now()}

    async def _available(self, agent: str, adapter: Adapter, here: bool = False) -> Availability:
        """Whether the agent can run here. A yes is reused for AVAILABLE_TTL_S: probing starts the
        CLI (`--version`), which must not sit on every attempt's path; a no is asked again."""
        if not here and not self.host.local:  # its CLI is the worker's, found there when it starts (else not_installed)
            return Availability(True, "resolved on the host that runs it")
        cached = self._avail.get(agent)
        if cached and time.monotonic() - cached[0] < AVAILABLE_TTL_S:
            return cached[1]
        try:
            avail = await adapter.available()
        except Exception as e:  # an adapter's probe failing must skip one agent, not break the task
            return Availability(False, f"could not check {agent}: {e!r}")
        if avail.ok:
            self._avail[agent] = (time.monotonic(), avail)
        return avail

    def _other_agents(self, task: Task) -> str:
        """When none of the task's agents could run: which configured ones could, and how to ask for them."""
        tried = {a.agent for a in task.attempts}
        others = [name for name, spec in self.config.agents.items() if spec.enabled and name not in tried]
        if not others:
            return ""
        where = f"list them under [routing] {task.tier} in the config" if task.tier else "name them"
        return (f". The {'tier ' + task.tier if task.tier else 'task'} named {', '.join(sorted(tried))}; other "
                f"configured agents: {', '.join(others)}: pass agents=[...] (`--agents {others[0]}`) or {where}")

    def _limiter(self, agent: str) -> anyio.CapacityLimiter:
        """The agent's cap; both caps follow config edits (a lowered cap lets running attempts finish)."""
        config = self.config
        cap = config.agent(agent).max_parallel or config.engine.max_parallel
        limiter = self._per_agent.setdefault(agent, anyio.CapacityLimiter(cap))
        for lim, want in ((limiter, cap), (self._global, config.engine.max_parallel)):
            if lim.total_tokens != want:
                lim.total_tokens = want
        return limiter

    async def _run_attempt(self, task: Task, attempt: Attempt) -> None:
        t0 = None
        try:
            adapter = make_adapter(self.config.agent(attempt.agent), self.environ)
            avail = await self._available(attempt.agent, adapter)
            if not avail.ok:
                attempt.state = AttemptState.skipped
                attempt.error = ErrorInfo(kind=avail.error_kind, message=avail.message)
                await self._note(task, f"skipped: {avail.message}", attempt.agent)
                return
            # The agent's own slot first: an attempt waiting for its agent must not hold a global slot.
            async with self._limiter(attempt.agent), self._global:
                # Saved once its worktree is recorded (_attempt_body): no store write before the checkout.
                attempt.state, attempt.started_at = AttemptState.running, now()
                t0 = time.monotonic()
                await self._attempt_body(task, attempt, adapter)
        except hosts.HostLost as e:  # the machine went away mid-attempt: nothing re-runs it silently
            attempt.state, attempt.error = AttemptState.interrupted, ErrorInfo(kind=ErrorKind.crash, message=str(e))
        except Exception as e:  # failures are results: whatever broke is this attempt's, not the engine's
            logger.exception("attempt %s/%s crashed", task.task_id, attempt.agent)
            attempt.state = AttemptState.failed
            attempt.error = ErrorInfo(kind=ErrorKind.crash, message=f"{type(e).__name__}: {e}")
        finally:
            with anyio.CancelScope(shield=True):
                if t0 is not None:
                    attempt.duration_s = round(time.monotonic() - t0, 3)
                    attempt.finished_at = now()
                task.total_cost_usd = task.spent()
                self._started(task, attempt.agent)  # also when its agent never started
                if leased := self._leases.pop((task.task_id, attempt.agent), None):
                    await anyio.to_thread.run_sync(self.ports.release, leased)
                if attempt.state in (AttemptState.succeeded, AttemptState.failed, AttemptState.timed_out):
                    await self._note(task, f"{attempt.state}" + (f": {attempt.error.message}" if attempt.error else ""), attempt.agent)
                await self._save(task)

    def _started(self, task: Task, agent: str) -> None:
        """The agent's process started, or its attempt ended: once the whole stage's have, the repo's warm
        pool refills (its checkout beside the agents' starts would slow them down)."""
        waiting = self._starting.get(task.task_id)
        if waiting:
            waiting.discard(agent)
            if waiting:
                return
        self._starting.pop(task.task_id, None)
        self.pool.want(self.config, task.repo)

    async def _workspace(self, task: Task, attempt: Attempt) -> Workspace | None:
        """The attempt's worktree from the one place (ready from the warm pool, or fresh), with the repo's
        copies and setup done and its ports leased; None when the setup failed (recorded on the attempt)."""
        config = self.config
        try:
            ws = await self.repo_configs.settings(config, task.repo, task.base)
            work = await self.pool.checkout(config, task.repo, task.task_id, attempt.agent, task.base, ws)
            attempt.worktree, attempt.branch = str(work.path), work.branch
            await self._save(task)

            async def spawn(inv: Invocation, timeout_s: float, on_line: runner.LineSink) -> runner.RunResult:
                return await self._spawn(task, attempt.agent, "setup", inv, timeout_s, on_line)

            async def log(stream: str, text: str) -> None:
                await self._log(task, attempt.agent, "setup", text)

            await self.pool.prepare(task.repo, ws, work, spawn, log, lambda text: self._note(task, text, attempt.agent))
            if ws.ports:
                try:
                    leased = self._leases[(task.task_id, attempt.agent)] = await anyio.to_thread.run_sync(
                        self.ports.lease, ws.ports)
                except OSError as e:
                    raise SetupFailed(f"[worktree] ports = {ws.ports}: {e}") from None
                work.env = ports_mod.env(leased)
                await self._note(task, f"ports: {' '.join(map(str, leased))} (COUNCIL_PORT, PORT)", attempt.agent)
        except (SetupFailed, ConfigError) as e:
            attempt.state, attempt.error = AttemptState.failed, ErrorInfo(kind=ErrorKind.setup_failed, message=str(e))
            return None
        return work

    async def _attempt_body(self, task: Task, attempt: Attempt, adapter: Adapter) -> None:
        if attempt.rounds > 1:  # a follow-up in the worktree it already has
            return await rounds.body(self, task, attempt, adapter)
        # The attempt's TMPDIR is made while its worktree is: both are on the path of the agent's start.
        work, _ = await concurrently(lambda: self.host.workspace(self, task, attempt),
                                     lambda: self.host.tmpdir(self.home, task.task_id, attempt.agent))
        if work is None:
            return
        try:
            await self._attempt_in(task, attempt, adapter, work)
        finally:
            with anyio.CancelScope(shield=True):
                await self.host.finish(task, attempt, work)

    async def _attempt_in(self, task: Task, attempt: Attempt, adapter: Adapter, work: Workspace) -> None:
        path = work.path
        job = Job(prompt=task.prompt, worktree=path, timeout_s=task.timeout_s, check=task.check,
                  budget_usd=task.budget_usd, tier=task.tier)
        try:
            outcome, result = await tries.run(self, task, attempt, adapter, job, time.monotonic() + task.timeout_s,
                                              work.env, task.base, tuple(work.keep_out))
        finally:
            with anyio.CancelScope(shield=True):  # whatever the agent did is kept, even when cancelled
                files, attempt.insertions, attempt.deletions = await self.host.commit_and_count(
                    path, f"council {task.task_id}: {attempt.agent}\n\n{task.prompt.splitlines()[0][:200]}",
                    adapter.scratch + tuple(p.rstrip("/") for p in work.keep_out), task.base)
                attempt.files_changed, attempt.files_touched = len(files), compare_mod.listed(files)
        attempt.session_id, attempt.summary = outcome.session_id, outcome.summary
        await self._conclude(task, attempt, outcome, result, path, work.env, f"no result within {task.timeout_s:g}s")

    async def _conclude(self, task: Task, attempt: Attempt, outcome: Outcome, result: runner.RunResult, path: Path,
                        env: dict[str, str], timed_out: str) -> None:
        """What an ended run (the first, or a follow-up round) makes of its attempt, its changes committed:
        timed out (`timed_out` says how), no changes, the check's verdict, succeeded or failed."""
        attempt.exit_code, attempt.error = result.exit_code, outcome.error
        if result.timed_out:
            attempt.state = AttemptState.timed_out
            attempt.error = ErrorInfo(kind=ErrorKind.timeout, message=f"{timed_out}; the process group was killed")
            return
        if outcome.ok and not attempt.files_changed:
            attempt.error = ErrorInfo(kind=ErrorKind.no_changes, message="the agent finished without changing any file")
        if task.check and attempt.files_changed and attempt.error is None:
            attempt.check = await self._run_check(task, attempt, path, env)
            if not attempt.check.passed:
                attempt.error = ErrorInfo(kind=ErrorKind.check_failed,
                                          message=f"`{task.check}` failed ({attempt.check.outcome()})")
        attempt.state = AttemptState.succeeded if outcome.ok and attempt.error is None else AttemptState.failed

    @staticmethod
    def _account(attempt: Attempt, outcome: Outcome) -> None:
        """Cost and tokens add up over retries: a failed try was still paid for."""
        for field in ("cost_usd", "tokens_in", "tokens_out"):
            value = getattr(outcome, field)
            if value is not None:
                setattr(attempt, field, (getattr(attempt, field) or 0) + value)

    async def _run_agent(self, task: Task, attempt: Attempt, adapter: Adapter, job: Job,
                         budget_s: float, env: dict[str, str]) -> tuple[Outcome, runner.RunResult]:
        try:
            inv = adapter.invocation(job)
            inv.env.update(env)
        except (ValueError, OSError) as e:
            return Outcome(ok=False, error=ErrorInfo(kind=ErrorKind.invalid_output, message=str(e))), runner.RunResult(None)
        if tmp := await self.host.tmpdir(self.home, task.task_id, attempt.agent):
            inv.env.setdefault("TMPDIR", tmp)
        secrets = self._secrets.setdefault(task.task_id, [])
        secrets += [s for s in inv.secrets if s not in secrets]
        parser = adapter.parser(job)

        async def on_line(stream: str, text: str) -> None:
            try:
                parser.feed(stream, text)
            except Exception as e:  # a line the parser chokes on is still logged; finish() judges
                await self._note(task, f"parser error on a line: {e!r}", attempt.agent)
            await self._log(task, attempt.agent, stream, text)

        await self._note(task, f"running: {shlex.join(inv.argv[:1])} in {job.worktree}", attempt.agent)
        try:
            result = await self._spawn(task, attempt.agent, "agent", inv, max(budget_s, 0.001), on_line)
        except runner.SpawnError as e:
            kind = ErrorKind.not_installed if e.errno in (errno.ENOENT, errno.EACCES, errno.ENOTDIR) else ErrorKind.crash
            return Outcome(ok=False, error=ErrorInfo(kind=kind, message=str(e))), runner.RunResult(None)
        if await self.store.cancel_requested([task.task_id]):
            # Another process cancelled and may have killed the agent before our watcher saw the
            # flag: the attempt was cancelled, not failed.
            self._scopes[task.task_id].cancel()
            await anyio.lowlevel.checkpoint()
        if result.timed_out:
            return Outcome(ok=False), result
        try:
            return parser.finish(result.exit_code), result
        except Exception as e:  # a parser bug must fail one attempt, not the engine
            return Outcome(ok=False, error=ErrorInfo(kind=ErrorKind.invalid_output, message=f"cannot read the agent's output: {e!r}")), result

    async def _run_check(self, task: Task, attempt: Attempt, path: Path, ports: dict[str, str]) -> CheckResult:
        # The check runs what the agent wrote: it gets the agents' allow-listed environment, never our keys.
        env = {**allowed_env(self.environ), **ports}
        if tmp := await self.host.tmpdir(self.home, task.task_id, attempt.agent):
            env["TMPDIR"] = tmp
        # A shell command line, as CI configs have it (`pytest -q && ruff check .`): the caller can run any
        # program through the check anyway, so the shell adds no power.
        inv = Invocation(argv=[SHELL, "-c", task.check], env=env, cwd=path)

        async def on_line(stream: str, text: str) -> None:
            await self._log(task, attempt.agent, "check", text)

        await self._note(task, f"check: {task.check}", attempt.agent)
        try:
            result = await self._spawn(task, attempt.agent, "check", inv, self.config.engine.check_timeout_s, on_line)
        except runner.SpawnError as e:
            await self._log(task, attempt.agent, "check", str(e))
            return CheckResult(command=task.check, passed=False, exit_code=None, error=str(e))
        if result.timed_out:
            return CheckResult(command=task.check, passed=False, exit_code=None,
                               error=f"no result within {self.config.engine.check_timeout_s:g}s; killed")
        return CheckResult(command=task.check, passed=result.exit_code == 0, exit_code=result.exit_code,
                           error=SHELL_EXIT.get(result.exit_code))

    async def _spawn(self, task: Task, agent: str, role: str, inv: Invocation, timeout_s: float,
                     on_line: runner.LineSink, here: bool = False) -> runner.RunResult:
        """Run one agent or check process, recorded in the store while it runs, so that a later
        process can stop it (and whatever it started, even outside its group) if we die. On the
        attempt's host, or `here` (reviews: read-only, in a directory of this machine)."""
        marker = f"{task.task_id}.{agent}.{role}.{uuid.uuid4().hex[:8]}"

        async def on_start(pgid: int) -> None:
            if role == "agent":
                self._started(task, agent)
            await self.store.set_proc(task.task_id, agent, pgid, runner.proc_start_time(pgid), marker=marker, role=role)

        try:
            run = runner.run if here else self.host.run
            return await run(inv, timeout_s=timeout_s, on_line=on_line, on_start=on_start,
                             kill_grace_s=self.config.engine.kill_grace_s, marker=marker)
        finally:
            with anyio.CancelScope(shield=True):
                await self.store.clear_proc(task.task_id, agent, role)

    async def _stop_recorded(self, task_id: str) -> None:
        """Stop the processes another (maybe dead) process recorded for a task: groups, then escapees."""
        grace = self.config.engine.kill_grace_s
        for _, _, pgid, start, marker in await self.store.procs(task_id):
            await runner.stop_recorded_group(pgid, start, grace)
            if marker:
                await runner.stop_marked(marker, grace)

    # logs, notes and change notification

    async def _log(self, task: Task, agent: str, stream: str, text: str) -> None:
        await self.logbook.write(task.task_id, agent, stream, self._redact(task.task_id, text),
                                 capped=stream != "council")

    async def _note(self, task: Task, text: str, agent: str = "council") -> None:
        await self._log(task, agent, "council", text)

    def _redact(self, task_id: str, text: str) -> str:
        return redact(text, self._secrets.get(task_id, []) + self._own_secrets)

    def _scrub(self, task: Task) -> None:
        """Redact every text that came out of an agent or a check before it is stored or shown."""
        for holder in [task, *task.attempts]:
            if holder.error is not None:
                holder.error.message = self._redact(task.task_id, holder.error.message)
        for a in task.attempts:
            if a.summary:
                a.summary = self._redact(task.task_id, a.summary)
        if task.best_reason:
            task.best_reason = self._redact(task.task_id, task.best_reason)

    async def _save(self, task: Task) -> None:
        self._scrub(task)
        rev = await self.store.save_task(task)
        self.events.emit(Event.of_task(task), rev=rev)

    async def _host_alive(self, task_id: str) -> bool:
        for tid, pid, start in await self.store.owners([s.value for s in ACTIVE_TASK]):
            if tid == task_id:
                return _alive(pid, start)
        return False

    async def _watch_cancel_requests(self) -> None:
        """`cli-council cancel` from another shell flags the task in the store; act on it here."""
        while True:
            await anyio.sleep(0.3)
            try:
                for task_id in await self.store.cancel_requested(list(self._scopes)):
                    self._scopes[task_id].cancel()
            except Exception:  # a store hiccup (locked, disk full) must not end the engine; look again soon
                logger.exception("reading cancel requests failed")
