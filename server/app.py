"""The MCP server: nine tools and three resources over one Engine, served on stdio or streamable HTTP.

Each tool is a thin typed wrapper over an Engine method and returns the engine's pydantic model as
its structured result, so the MCP surface and `cli-council ... --json` are the same documents.
The Engine lives in the server's lifespan (on HTTP, the outer app's, so that /metrics and other routes
reach it too): one per process, shared by every client, and leaving the lifespan (stdin closed,
SIGINT/SIGTERM, HTTP shutdown) stops the attempts that are still running.
"""

from __future__ import annotations

import functools
import gc
import importlib.metadata
import inspect
import logging
import os
import signal
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import anyio
import anyio.abc
import mcp_types as types
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated
from mcp.shared.exceptions import MCPError
from mcp.server.mcpserver.tools import Tool
from pydantic import ConfigDict, Field
from starlette.applications import Starlette
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from engine.config import Config, load_config
from engine.engine import CouncilError, Engine, NotFound
from engine.diffs import MAX_BYTES as MAX_DIFF_BYTES
from engine.models import ACTIVE_TASK, AgentList, Diff, GcReport, LogChunk, MergeResult, Task, TaskList

from . import auth, dashboard, http_transport, metrics, stdio_transport, text

logger = logging.getLogger("cli_council.server")

MAX_WAIT_S = 50.0  # well inside the ~60 s request timeout of common MCP clients
PROGRESS_SLICE_S = 2.0  # how often a waiting call tells the client it is still alive
NOTIFY_MIN_INTERVAL_S = 0.25  # coalesce resource-updated notifications from chatty agents
MAX_RESOURCE_BYTES = 4_000_000  # the log resource's size; stream_logs pages through the rest
MAX_URI_CHARS = 256

INSTRUCTIONS = """\
cli-council runs a council of AI coding CLIs (Claude Code, Gemini CLI, Auto-Claude, a local Ollama
model, or any configured command) on a git repository, each agent in its own worktree and branch,
in parallel. The user's checkout is not touched until merge_result.
Workflow: submit_task returns a task_id at once -> follow it with stream_logs (pass next_cursor back
as cursor, with wait_s to long-poll) until done is true, or get_status with wait_s -> read the
attempts and `best`, and each attempt's changes with get_diff -> merge_result (dry_run first if unsure)
-> or cancel_task; discard_task throws a finished task's worktrees and branches away. review_task (or
submit_task with review=true) has other agents judge each attempt anonymously before the pick.
continue_task sends a finished attempt a follow-up prompt (same worktree, branch and session);
undo_merge takes a merge back while nothing came after it.
list_agents tells which agents are configured and usable here (names for submit_task's `agents`).
Resources: council://tasks/{task_id} (the task as JSON), council://tasks/{task_id}/logs (its log) and
council://tasks/{task_id}/attempts/{agent}/diff (an attempt's patch)."""

T = TypeVar("T")


def task_uri(task_id: str) -> str:
    return f"council://tasks/{task_id}"


def logs_uri(task_id: str) -> str:
    return f"council://tasks/{task_id}/logs"


def diff_uri(task_id: str, agent: str) -> str:
    return f"council://tasks/{task_id}/attempts/{agent}/diff"


def _task_id_of(uri: str) -> str:
    rest = uri.removeprefix("council://tasks/").removesuffix("/logs")
    if rest == uri or not rest or "/" in rest:
        raise MCPError(types.INVALID_PARAMS, f"{uri!r} is not a cli-council resource; use {task_uri('<task_id>')} "
                                             f"or {logs_uri('<task_id>')}")
    return rest


@dataclass
class Updates:
    """Tells clients that a task's resources changed.

    2026-07-28 clients listen through `subscriptions/listen` (the SDK's bus, which filters by URI);
    older clients use resources/subscribe, kept here per connection. A task is followed from the
    first time this server sees it while it runs (submitted, looked at, or subscribed to) until it
    ends; merge and cancel announce their own changes.
    """

    engine: Engine
    bus: InMemorySubscriptionBus
    tg: anyio.abc.TaskGroup
    subscribers: dict[str, set[Connection]] = field(default_factory=lambda: defaultdict(set))
    followed: set[str] = field(default_factory=set)

    def follow(self, task: Task) -> None:
        if task.state in ACTIVE_TASK and task.task_id not in self.followed:
            self.followed.add(task.task_id)
            self.tg.start_soon(self._follow, task)

    async def announce(self, uri: str) -> None:
        await self.bus.publish(ResourceUpdated(uri=uri))
        for conn in list(self.subscribers.get(uri, ())):
            try:
                await conn.send_resource_updated(uri)
            except Exception:  # the client went away; forget it
                self.subscribers[uri].discard(conn)

    async def _follow(self, task: Task) -> None:
        """Announce the task's changes from the engine's event stream, at most every NOTIFY_MIN_INTERVAL_S
        (events meanwhile coalesce in the subscription), until it ends."""
        try:
            async with self.engine.events.subscribe(task.task_id) as sub:
                # Subscribed: a change from here on is an event; one made before is read now.
                now = await self.engine.get(task.task_id)
                if now != task:
                    await self.announce(task_uri(task.task_id))
                while now.state in ACTIVE_TASK:
                    kinds = {e.kind for e in await sub.batch()}
                    if kinds & {"logs", "gap"}:
                        await self.announce(logs_uri(task.task_id))
                    if kinds & {"task", "merge", "gap"}:
                        now = await self.engine.get(task.task_id)
                        await self.announce(task_uri(task.task_id))
                    await anyio.sleep(NOTIFY_MIN_INTERVAL_S)
        except Exception:  # notifications are best effort; they must never take the server down
            logger.exception("following task %s for resource notifications failed", task.task_id)
        finally:
            self.followed.discard(task.task_id)


@dataclass
class Council:
    """What the lifespan hands every request: the process's one Engine and its notifier."""

    engine: Engine
    updates: Updates


def _council(ctx: Context) -> Council:
    return ctx.request_context.lifespan_context


def _errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """The result goes out as the model (structured) with a short readable summary as its text. Bad input
    becomes a tool error with the engine's message; anything else becomes a tool error that names what
    failed, so one broken call never takes the server (and the running tasks) down."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            result = await fn(*args, **kwargs)
            # Text for whoever reads the content (a person, a model): a summary, not the JSON twice.
            return types.CallToolResult(content=[types.TextContent(type="text", text=text.summary(result))],
                                        structured_content=result.model_dump(mode="json", by_alias=True))
        except CouncilError as e:
            raise ToolError(str(e)) from None
        except Exception as e:
            logger.exception("%s failed", fn.__name__)
            raise ToolError(f"internal error in {fn.__name__}: {type(e).__name__}: {e} "
                            "(the server is still running; see its stderr for the traceback)") from e

    return wrapper


async def _in_slices(ctx: Context, wait_s: float, call: Callable[[float], Awaitable[T]],
                     finished: Callable[[T], bool], describe: Callable[[T], str]) -> T:
    """Run `call(slice)` until `finished` or wait_s (capped) is spent, reporting progress in between.

    Progress notifications go out only when the client sent a progressToken (the SDK drops them
    otherwise); they also keep clients that reset their timeout on progress from giving up.
    """
    wait_s = min(max(wait_s, 0.0), MAX_WAIT_S)
    deadline = time.monotonic() + wait_s
    while True:
        result = await call(max(0.0, min(PROGRESS_SLICE_S, deadline - time.monotonic())))
        left = deadline - time.monotonic()
        if finished(result) or left <= 0:
            return result
        await ctx.report_progress(round(wait_s - left, 1), wait_s, describe(result))


def _describe(task: Task) -> str:
    attempts = ", ".join(f"{a.agent} {a.state}" for a in task.attempts)
    return f"task {task.task_id} {task.state}" + (f": {attempts}" if attempts else "")


# The tools. Argument descriptions are what a model reads to call them right.

TaskId = Annotated[str, Field(description="The task_id that submit_task returned (list_tasks shows the known ones).")]
WaitS = Annotated[float, Field(ge=0, description=f"Seconds to wait for a change before returning; capped at "
                                                 f"{MAX_WAIT_S:g}. 0 returns at once.")]


@_errors
async def submit_task(
    repo: Annotated[str, Field(description=(
        "Absolute path of the git repository (or any directory inside it). Agents start from a commit "
        "(`base`), so uncommitted changes are not seen."))],
    prompt: Annotated[str, Field(description="What the agents should do, as you would tell a developer. Not empty.")],
    ctx: Context,
    agents: Annotated[list[str] | None, Field(description=(
        'Agents to run in parallel, e.g. ["claude", "gemini"]. Omit to route by tier.'))] = None,
    tier: Annotated[Literal["cheap", "standard", "complex"] | None, Field(description=(
        "cheap tries the local model first and escalates on failure; omit to classify the prompt."))] = None,
    base: Annotated[str | None, Field(description="Git ref to start from (branch, tag, commit); default HEAD.")] = None,
    check: Annotated[str | None, Field(description=(
        'Command run in each worktree after its agent, e.g. "pytest -q"; an attempt passes only if it exits 0. '
        "A shell command line, as in CI configs (`pytest -q && ruff check .`)."))] = None,
    timeout_s: Annotated[float | None, Field(gt=0, description=(
        "Per-attempt time limit in seconds; default from the config (30 min)."))] = None,
    budget_usd: Annotated[float | None, Field(ge=0, description=(
        "Stop escalating to more agents once this much USD is spent."))] = None,
    review: Annotated[bool | None, Field(description=(
        "Cross-review the candidates (other agents judge each diff, anonymously, read-only) before the best "
        "is picked; costs their runs. Omit for the config's [review] enabled (default false)."))] = None,
) -> Task:
    """Start a coding task on a council of AI coding agents, each in its own git worktree and branch, in parallel.

    Returns at once (state queued or running) with the task_id; nothing in the user's checkout changes.
    Then follow it with stream_logs or get_status(wait_s=...), and bring the best result back with merge_result.
    """
    council = _council(ctx)
    task = await council.engine.submit(repo, prompt, agents=agents, tier=tier, base=base, check=check,
                                       timeout_s=timeout_s, budget_usd=budget_usd, review=review)
    council.updates.follow(task)
    return task


@_errors
async def get_status(task_id: TaskId, ctx: Context, wait_s: WaitS = 0) -> Task:
    """The task with every attempt: state, branch, worktree, files changed, check result, cost, error, and
    `best` (the attempt merge_result would take) with the reason. With wait_s, returns as soon as the task
    finishes or the wait ends, whichever is first; call again if it is still running."""
    council = _council(ctx)
    task = await _in_slices(ctx, wait_s, lambda s: council.engine.wait(task_id, s),
                            lambda t: t.state not in ACTIVE_TASK, _describe)
    council.updates.follow(task)
    return task


@_errors
async def list_tasks(
    ctx: Context,
    repo: Annotated[str | None, Field(description="Only tasks on this repository (absolute path).")] = None,
    limit: Annotated[int, Field(ge=1, le=1000, description="At most this many, newest first.")] = 20,
) -> TaskList:
    """Recent tasks, newest first, including those started by `cli-council run` from a shell."""
    return await _council(ctx).engine.list(repo=repo, limit=limit)


@_errors
async def stream_logs(
    task_id: TaskId,
    ctx: Context,
    agent: Annotated[str | None, Field(description="Only this agent's lines (and not the council's notes).")] = None,
    cursor: Annotated[int, Field(ge=0, description="Return lines after this one: 0 first, then the next_cursor "
                                                   "of the previous call.")] = 0,
    wait_s: WaitS = 0,
    limit: Annotated[int, Field(ge=1, le=5000, description="At most this many lines.")] = 500,
) -> LogChunk:
    """Log lines of a task's agents and checks after `cursor`. Loop: pass next_cursor back as cursor, with wait_s
    to long-poll for new lines, until done is true (the task has finished and every line was returned)."""
    council = _council(ctx)
    chunk = await _in_slices(ctx, wait_s, lambda s: council.engine.logs(task_id, agent, cursor, s, limit),
                             lambda c: bool(c.lines) or c.done, lambda c: f"waiting for log lines of task {task_id}")
    council.updates.follow(await council.engine.get(task_id))
    return chunk


@_errors
async def merge_result(
    task_id: TaskId,
    ctx: Context,
    agent: Annotated[str | None, Field(description="Whose attempt to merge; omit for the task's best.")] = None,
    strategy: Annotated[Literal["squash", "merge", "rebase"], Field(description="squash: one commit on the target "
                        "branch; merge: a merge commit; rebase: the attempt's commits replayed.")] = "squash",
    into: Annotated[str | None, Field(description="Target branch; default: the branch checked out when the task "
                                                  "was submitted.")] = None,
    dry_run: Annotated[bool, Field(description="Only report what would happen (files, conflicts); change "
                                               "nothing.")] = False,
    cleanup: Annotated[bool, Field(description="After merging, remove the task's worktrees and branches.")] = True,
) -> MergeResult:
    """Bring a finished task's result into the user's branch. A backup ref (refs/council/backup/<task_id>) is
    written first and a dirty or conflicting checkout is refused rather than overwritten; `message` says what
    happened or why not. Try dry_run=true first when unsure."""
    council = _council(ctx)
    result = await council.engine.merge(task_id, agent=agent, strategy=strategy, into=into, dry_run=dry_run,
                                        cleanup=cleanup)
    if not dry_run:
        await council.updates.announce(task_uri(task_id))
    return result


@_errors
async def cancel_task(task_id: TaskId, ctx: Context) -> Task:
    """Stop every running attempt of a task (their process groups are killed); what the agents wrote so far stays
    on their branches. Cancelling a finished task changes nothing and returns it as it is."""
    council = _council(ctx)
    task = await council.engine.cancel(task_id)
    await council.updates.announce(task_uri(task_id))
    return task


@_errors
async def list_agents(ctx: Context) -> AgentList:
    """The configured agents and whether each can run on this machine (installed, signed in), with its model,
    the tiers whose routing runs it and how many of its attempts run at once; `message` says what to do about
    one that cannot run. Use the names in submit_task's `agents`. Probes each CLI, so it takes a moment."""
    return await _council(ctx).engine.agents()


@_errors
async def get_diff(
    task_id: TaskId,
    ctx: Context,
    agent: Annotated[str | None, Field(description="Whose attempt; omit for the task's best.")] = None,
    max_bytes: Annotated[int, Field(ge=1, le=MAX_DIFF_BYTES, description=(
        f"Cut the patch after this many bytes (at most {MAX_DIFF_BYTES:,}); `truncated` says when it was; "
        "`files` always lists every changed file."))] = 200_000,
) -> Diff:
    """What an attempt changed: `git diff base..branch` of its branch as a unified patch, with the files and
    their line counts. Look before merge_result. Refused for an attempt that left no changes or is still running."""
    return await _council(ctx).engine.diff(task_id, agent=agent, max_bytes=max_bytes)


@_errors
async def discard_task(task_id: TaskId, ctx: Context) -> GcReport:
    """Throw a finished task away: delete its worktrees and council branches (never the user's branches;
    a worktree holding uncommitted work is kept and reported). Its record goes too once nothing of it is
    left. Refused while the task runs: cancel_task first."""
    council = _council(ctx)
    report = await council.engine.discard(task_id)
    await council.updates.announce(task_uri(task_id))
    return report


@_errors
async def review_task(
    task_id: TaskId,
    ctx: Context,
    reviewers: Annotated[list[str] | None, Field(description=(
        'Agents that review, e.g. ["gemini", "ollama"]; never an attempt\'s own author. Omit for the config\'s '
        "[review] reviewers (default: every enabled agent that can run here)."))] = None,
) -> Task:
    """Cross-review a finished task: each attempt's diff (with the task and its check result) is judged by
    other agents under an anonymous label, read-only, as {score 0-10, verdict, issues, summary}; then the best
    is picked again (check passed, then median review score, then agreement). Returns at once with the task
    running; follow it with get_status (wait_s) or stream_logs. When it ends, attempts carry `reviews` and
    `review_score` and `best_reason` names the evidence that decided. Each review is bounded by [review]
    timeout_s; cancel_task stops them and the verdict goes on the reviews that ended. Refused while the task
    runs, once it is merged or discarded, or when no attempt left changes."""
    council = _council(ctx)
    task = await council.engine.review(task_id, reviewers=reviewers)
    council.updates.follow(task)
    return task


@_errors
async def continue_task(
    task_id: TaskId,
    agent: Annotated[str, Field(description="Whose attempt gets the follow-up (one of the task's attempts).")],
    prompt: Annotated[str, Field(description=(
        'The follow-up, as you would tell the same developer ("now also handle the empty case"). Not empty.'))],
    ctx: Context,
    check: Annotated[str | None, Field(description=(
        "A new check command for this round and the task from now on; omit to run the task's check again."))] = None,
    timeout_s: Annotated[float | None, Field(gt=0, description=(
        "This round's time limit in seconds; default: the task's."))] = None,
) -> Task:
    """Send a follow-up prompt to one attempt of a finished task: a new round in the same worktree and branch,
    resuming the agent's own session where its CLI has one (claude), or telling it the earlier rounds. Returns
    at once with the task running again; the round's lines follow a "round N" marker in the log, its changes
    are committed on the same branch, the check runs again and the best attempt is picked again. `rounds` on
    the attempt counts its prompts. Refused while the task runs, once it is merged (undo_merge first), or when
    the attempt's worktree was removed (merged with cleanup, discarded, gc)."""
    council = _council(ctx)
    task = await council.engine.continue_task(task_id, agent, prompt, check=check, timeout_s=timeout_s)
    council.updates.follow(task)
    return task


@_errors
async def undo_merge(task_id: TaskId, ctx: Context) -> MergeResult:
    """Take a task's merge back: the branch it merged into returns to its tip from before the merge (and its
    checkout with it). Refused, changing nothing, when commits came after the merge (they are listed) or the
    checkout has uncommitted changes. The undone merge commit stays reachable under the ref named in
    `backup_ref`; `commit` is the branch's tip again (null when refused). The task is finished again and can
    be merged again."""
    council = _council(ctx)
    result = await council.engine.undo_merge(task_id)
    await council.updates.announce(task_uri(task_id))
    return result


def _strict(tool: Tool) -> None:
    """Refuse unknown arguments (a misspelt `agnets` must not be silently dropped), non-finite numbers
    (`1e309`, "inf", NaN) and coercions ("yes" as true, true as 1 second), instead of the SDK's default
    of ignoring extras and coercing what it can.
    Watch on SDK upgrades: this replaces the argument model the SDK derived from the signature."""
    base = tool.fn_metadata.arg_model
    config = ConfigDict(**base.model_config, extra="forbid", allow_inf_nan=False, strict=True)
    tool.fn_metadata.arg_model = type(base.__name__, (base,), {"model_config": config, "__module__": base.__module__})
    tool.parameters = tool.fn_metadata.arg_model.model_json_schema(by_alias=True)


def _annotations(title: str, *, read_only: bool, destructive: bool = False, idempotent: bool = False,
                 open_world: bool = False) -> types.ToolAnnotations:
    return types.ToolAnnotations(title=title, read_only_hint=read_only, destructive_hint=destructive,
                                 idempotent_hint=idempotent, open_world_hint=open_world)


TOOLS = [
    # submit_task adds worktrees and branches but overwrites nothing; the agents it starts reach the network.
    (submit_task, _annotations("Submit a task to the council", read_only=False, open_world=True)),
    (get_status, _annotations("Task status", read_only=True, idempotent=True)),
    (list_tasks, _annotations("List tasks", read_only=True, idempotent=True)),
    (stream_logs, _annotations("Task logs", read_only=True, idempotent=True)),
    # merge_result moves the user's branch and, with cleanup, deletes the task's worktrees and branches.
    (merge_result, _annotations("Merge a result", read_only=False, destructive=True)),
    # cancel_task kills running agents (their unfinished work cannot be resumed); cancelling twice is a no-op.
    (cancel_task, _annotations("Cancel a task", read_only=False, destructive=True, idempotent=True)),
    # list_agents starts each CLI's `--version` and asks a local Ollama server: it changes nothing.
    (list_agents, _annotations("List agents", read_only=True, idempotent=True)),
    (get_diff, _annotations("Attempt diff", read_only=True, idempotent=True)),
    # discard_task deletes branches that may hold the only copy of an attempt's work; a second call finds nothing.
    (discard_task, _annotations("Discard a task", read_only=False, destructive=True, idempotent=True)),
    # review_task runs other agents (they reach the network) and rewrites the task's best; it changes no branch.
    (review_task, _annotations("Cross-review a task", read_only=False, open_world=True)),
    # continue_task runs an agent again (it reaches the network) and adds commits to its branch.
    (continue_task, _annotations("Continue an attempt", read_only=False, open_world=True)),
    # undo_merge moves the user's branch back; the undone commit stays under a ref of its own.
    (undo_merge, _annotations("Undo a merge", read_only=False, destructive=True)),
]


# The resources.

async def _followed(task_id: str, ctx: Context):
    """The council and the task a resource names; reading a task starts its change notifications."""
    council = _council(ctx)
    try:
        task = await council.engine.get(task_id)
    except NotFound as e:
        raise ResourceNotFoundError(str(e)) from None
    council.updates.follow(task)
    return council, task


async def _task_json(task_id: str, ctx: Context) -> str:
    _, task = await _followed(task_id, ctx)
    return task.model_dump_json(indent=2)


async def _task_log(task_id: str, ctx: Context) -> str:
    """The log from its start, up to MAX_RESOURCE_BYTES: one read must not hold a flood in memory."""
    council, _ = await _followed(task_id, ctx)
    out, cursor, size = [], 0, 0
    while True:
        chunk = await council.engine.logs(task_id, cursor=cursor, limit=5000)
        if not chunk.lines:
            break
        for ln in chunk.lines:
            text = f"{ln.seq:>6} {ln.ts:%H:%M:%S} {ln.agent} [{ln.stream}] {ln.text}"
            size += len(text) + 1
            if size > MAX_RESOURCE_BYTES:
                out.append(f"... the log goes on after line {cursor}: read the rest with stream_logs(cursor={cursor})")
                return "\n".join(out) + "\n"
            out.append(text)
            cursor = ln.seq
    return "\n".join(out) + ("\n" if out else "")


async def _attempt_diff(task_id: str, agent: str, ctx: Context) -> str:
    """The attempt's patch up to MAX_RESOURCE_BYTES; get_diff says more (files, truncated)."""
    council, _ = await _followed(task_id, ctx)
    try:
        diff = await council.engine.diff(task_id, agent=agent, max_bytes=MAX_RESOURCE_BYTES)
    except CouncilError as e:
        raise ResourceNotFoundError(str(e)) from None
    if diff.truncated:
        return diff.patch + f"# ... cut at {MAX_RESOURCE_BYTES} bytes; the whole branch: `git diff {diff.base} {diff.branch}`\n"
    return diff.patch


async def _subscribe(ctx: ServerRequestContext[Council], params: types.SubscribeRequestParams) -> types.EmptyResult:
    """resources/subscribe for pre-2026-07-28 clients (newer ones use subscriptions/listen)."""
    uri = str(params.uri)
    council = ctx.lifespan_context
    try:
        task = await council.engine.get(_task_id_of(uri))
    except NotFound as e:
        raise MCPError(types.INVALID_PARAMS, str(e)) from None
    # The SDK hands handlers a per-request session; the connection behind it outlives the request.
    council.updates.subscribers[uri].add(ctx.session._connection)
    council.updates.follow(task)
    return types.EmptyResult()


async def _unsubscribe(ctx: ServerRequestContext[Council], params: types.UnsubscribeRequestParams) -> types.EmptyResult:
    ctx.lifespan_context.updates.subscribers.get(str(params.uri), set()).discard(ctx.session._connection)
    return types.EmptyResult()


def _version() -> str:
    try:
        return importlib.metadata.version("cli-council")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


class CouncilServer(MCPServer):
    async def read_resource(self, uri, context=None):
        """An oversized URI is refused before the SDK echoes it whole into its error message."""
        if len(str(uri)) > MAX_URI_CHARS:
            raise ResourceNotFoundError(f"a {len(str(uri))}-character URI is no cli-council resource; "
                                        f"use {task_uri('<task_id>')} or {logs_uri('<task_id>')}")
        return await super().read_resource(uri, context)


def build_server(config: Config | None = None, home: Path | None = None, require_roots: bool = False,
                 engine: Callable[[], Engine] | None = None) -> MCPServer:
    """The server, not yet running. Config and state directory default to the environment's, read when the
    lifespan starts (never at import); tests pass their own. require_roots: see Engine.
    engine: the running Engine of an outer lifespan that enters it before this one and leaves it after
    (build_http_app); None: this server's lifespan runs its own."""
    bus = InMemorySubscriptionBus()

    @asynccontextmanager
    async def lifespan(_server: MCPServer):
        async with AsyncExitStack() as stack:
            running = engine() if engine is not None else await stack.enter_async_context(
                Engine(config=config, home=home, require_roots=require_roots))
            async with anyio.create_task_group() as tg:
                yield Council(engine=running, updates=Updates(engine=running, bus=bus, tg=tg))
                tg.cancel_scope.cancel()  # stop following tasks before the engine stops them

    server = CouncilServer("cli-council", title="cli-council", version=_version(), instructions=INSTRUCTIONS,
                       lifespan=lifespan, subscriptions=bus, log_level="WARNING")
    for fn, hints in TOOLS:
        server.add_tool(fn, description=inspect.cleandoc(fn.__doc__), annotations=hints)
        _strict(server._tool_manager.get_tool(fn.__name__))  # MCPServer has no public handle on a tool
    server.resource("council://tasks/{task_id}", name="task", title="Task", mime_type="application/json",
                    description="The task with all its attempts, as get_status returns it.")(_task_json)
    server.resource("council://tasks/{task_id}/logs", name="task_logs", title="Task log", mime_type="text/plain",
                    description="Every log line of the task so far: seq, time, agent, [stream], text.")(_task_log)
    server.resource("council://tasks/{task_id}/attempts/{agent}/diff", name="attempt_diff", title="Attempt diff",
                    mime_type="text/x-diff",
                    description="An attempt's changes: `git diff base..branch` of its branch, as get_diff returns "
                                "its patch.")(_attempt_diff)
    lowlevel = server._lowlevel_server  # MCPServer has no public hook for resources/subscribe
    lowlevel.add_request_handler("resources/subscribe", types.SubscribeRequestParams, _subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, _unsubscribe)
    return server


def routes(get_engine: Callable[[], Engine], token: str | None, host: str) -> list[BaseRoute]:
    """The HTTP routes beside /mcp, each reaching the Engine through get_engine(). The one place to add one."""
    return [metrics.route(get_engine), *dashboard.routes(get_engine, token, host=host)]


def build_http_app(host: str, token: str | None, *, config: Config | None = None, home: Path | None = None,
                   require_roots: bool = False,
                   extra_routes: Callable[[Callable[[], Engine], str | None, str], list[BaseRoute]] = routes) -> ASGIApp:
    """The ASGI app `serve --transport http` runs: /mcp and extra_routes(get_engine, token, host), behind the
    Host/Origin check, the message vetting and, when a token is set, the bearer token (every route but the
    dashboard's, which reads without it and checks it itself for what changes anything).
    The Engine lives in this app's lifespan: entered before the MCP sessions start and left after
    they stop, so every route reaches the same one; get_engine() fails outside that span."""
    holder: list[Engine] = []

    def get_engine() -> Engine:
        if not holder:
            raise RuntimeError("the engine is not running (the server is starting or stopping)")
        return holder[0]

    server = build_server(config=config, home=home, require_roots=require_roots, engine=get_engine)
    security = auth.security_settings(host)
    mcp_app = server.streamable_http_app(host=host, transport_security=security,
                                         max_request_body_size=http_transport.MAX_BODY_BYTES)

    @asynccontextmanager
    async def lifespan(_app: Starlette):
        async with Engine(config=config, home=home, require_roots=require_roots) as engine:
            holder.append(engine)
            try:
                async with mcp_app.router.lifespan_context(mcp_app):
                    yield
            finally:
                holder.clear()

    app = Starlette(routes=[*mcp_app.routes, *extra_routes(get_engine, token, host)], lifespan=lifespan)
    return auth.protect(http_transport.VetMessages(http_transport.CheckHost(app, security)), token,
                        own_auth=dashboard.own_path)


# Running it.

async def _serve_stdio(server: MCPServer) -> None:
    """Serve until stdin closes. SIGINT/SIGTERM stop the server the same way (leaving the lifespan stops the
    running attempts), then end the process by that signal: stdin may stay open, and the stdin reader
    thread would keep the process waiting for it. Malformed lines are answered by VettedStdin."""
    lowlevel = server._lowlevel_server  # run_stdio_async, with room to act before its stdin reader is joined
    with stdio_transport.claimed_stdin() as wire:
        stdin = stdio_transport.VettedStdin(wire)
        async with stdio_server(stdin=stdin) as (read, write):
            stdin.reply_through(write)
            signum = await _until_signal(lowlevel.run, read, write, lowlevel.create_initialization_options())
            if signum is not None:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)


async def _until_signal(fn: Callable[..., Awaitable[Any]], *args: Any) -> int | None:
    """Run fn until it returns, or cancel it on SIGINT/SIGTERM and return that signal."""
    received = None

    async def watch(scope: anyio.CancelScope) -> None:
        nonlocal received
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for received in signals:
                scope.cancel()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        await fn(*args)
        tg.cancel_scope.cancel()
    return received


def _freeze_what_start_built() -> None:
    """Modules, schemas and tools built at start live as long as the server: moved out of the cyclic
    collector's sight, a full collection no longer walks them each time. Seen under bench load: 36-42 ms
    full collections every few seconds, each one a pause of the event loop (a late log line, a slow call)."""
    gc.collect()
    gc.freeze()


def serve(transport: str = "stdio", host: str = "127.0.0.1", port: int = 8765) -> int:
    """Run the server in the foreground until it is stopped; returns the exit status. Bad config, an unsafe
    bind or a busy port raise ConfigError before anything starts."""
    config = load_config()  # fail now on a broken file; the engine then follows later edits itself
    if transport == "stdio":
        try:
            server = build_server()
            _freeze_what_start_built()
            anyio.run(_serve_stdio, server)
        except Exception:  # the lifespan (the Engine) died: exit, so the client sees it rather than silence
            logger.exception("the server's engine stopped unexpectedly; exiting (start it again)")
            return 1
        return 0
    if transport != "http":
        raise ValueError(f"unknown transport {transport!r}; use stdio or http")
    token = os.environ.get("CLI_COUNCIL_TOKEN") or None
    auth.check_bind(host, token, config.server.allowed_roots)
    header_timeout_s, body_timeout_s = http_transport.timeouts(os.environ)
    sockets = http_transport.bind(host, port)
    app = build_http_app(host, token, require_roots=not auth.is_loopback(host))
    _freeze_what_start_built()
    shown = f"[{host}]" if ":" in host else host
    banner = (f"cli-council: MCP on http://{shown}:{sockets[0].getsockname()[1]}/mcp"
              + (" (bearer token required)" if token else ""))
    return http_transport.run(app, sockets,
                              header_timeout_s=header_timeout_s,
                              body_timeout_s=body_timeout_s, banner=banner)
