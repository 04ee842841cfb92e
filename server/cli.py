"""The `cli-council` command line: the same engine as the MCP tools, for scripts and humans.

`--json` prints exactly one JSON document: the model the matching MCP tool returns. Bad input
exits 2 with the engine's message; `run` exits 0 when the task succeeded and 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import time

import anyio
from pydantic import BaseModel

from engine import agents as agents_mod
from engine import diffs
from engine.config import TIERS, ConfigError, home_dir, load_config
from engine.engine import CouncilError, Engine
from engine.models import ACTIVE_TASK, Task, TaskState
from engine.store import Store

from . import text


class Parser(argparse.ArgumentParser):
    """Usage mistakes read like every other refusal: `error: ...` first, exit 2, and where to look."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def local_path(value: str) -> str:
    """A path as a person types it: relative to the current directory, ~ expanded."""
    return os.path.abspath(os.path.expanduser(value)) if value and "\0" not in value else value


def port_number(value: str) -> int:
    if not (value.isdigit() and int(value) <= 65535):
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0-65535)")
    return int(value)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="cli-council", description="Run a council of AI coding CLIs on a repo.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="serve the MCP tools (stdio for Claude Desktop/Code, or streamable HTTP)")
    s.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=port_number, default=8765, help="TCP port for http (0: any free port)")

    db = sub.add_parser("dashboard", help="serve the live dashboard on its own (what `serve --transport http` has at /)",
                        description="Serve the dashboard (task list, live logs, diffs; cancel and merge when signed "
                                    "in with CLI_COUNCIL_TOKEN) over the tasks every process on this machine shares.")
    db.add_argument("--host", default="127.0.0.1")
    db.add_argument("--port", type=port_number, default=8766, help="TCP port (0: any free port)")

    d = sub.add_parser("doctor", help="which agents are usable here, and what to do about the rest")
    d.add_argument("--json", action="store_true")

    ag = sub.add_parser("agents", help="the configured agents: usable here or not, model, tiers, parallel cap")
    ag.add_argument("--json", action="store_true", help="print the AgentList the list_agents tool returns")

    r = sub.add_parser("run", help="run a task in the foreground until it ends",
                       description="Run one task on the council and stay until it ends: exit 0 when it "
                                   "succeeded, 1 when it failed, 2 on bad input.")
    r.add_argument("--repo", required=True, type=local_path, help="the git repository (relative to here is fine)")
    r.add_argument("--agents", type=lambda v: [a.strip() for a in v.split(",") if a.strip()], metavar="A,B",
                   help="agents to run in parallel (see `cli-council doctor`); default: route by tier")
    r.add_argument("--tier", choices=TIERS, help="cheap tries the local model first; default: classify the prompt")
    r.add_argument("--base", metavar="REF", help="branch, tag or commit to start from (default HEAD)")
    r.add_argument("--check", metavar="CMD", help='run in each worktree after its agent, e.g. "pytest -q"')
    r.add_argument("--timeout", type=float, metavar="S", help="per-attempt limit in seconds (default [engine])")
    r.add_argument("--budget", type=float, dest="budget_usd", metavar="USD", help="stop escalating past this cost")
    r.add_argument("--wait", action="store_true", default=True, help="the default: stay until the task ends")
    r.add_argument("--review", action="store_true", default=None,
                   help="cross-review the attempts before the pick (default: [review] enabled)")
    r.add_argument("--json", action="store_true", help="print the finished task as JSON only")
    r.add_argument("prompt", help="what the agents should do")

    st = sub.add_parser("status", help="one task, or the recent ones")
    st.add_argument("task_id", nargs="?")
    st.add_argument("--repo", type=local_path, help="only tasks on this repository")
    st.add_argument("--limit", type=int, default=20)
    st.add_argument("--json", action="store_true")

    lg = sub.add_parser("logs", help="a task's log lines")
    lg.add_argument("task_id")
    lg.add_argument("--agent")
    lg.add_argument("--follow", "-f", action="store_true")
    lg.add_argument("--json", action="store_true")

    m = sub.add_parser("merge", help="merge an attempt (the best by default) into the task's branch")
    m.add_argument("task_id")
    m.add_argument("--agent")
    m.add_argument("--strategy", choices=["squash", "merge", "rebase"], default="squash")
    m.add_argument("--into")
    m.add_argument("--dry-run", action="store_true")
    m.add_argument("--no-cleanup", dest="cleanup", action="store_false")
    m.add_argument("--json", action="store_true")

    co = sub.add_parser("continue", help="a follow-up prompt to one attempt of a finished task, in the foreground",
                        description="Run a new round of an attempt in its worktree, branch and session, and stay "
                                    "until it ends: exit 0 when the task succeeded, 1 when it failed, 2 on bad input.")
    co.add_argument("task_id")
    co.add_argument("--agent", required=True, help="whose attempt gets the follow-up")
    co.add_argument("--check", metavar="CMD", help="a new check for this round and the task; default: the task's")
    co.add_argument("--timeout", type=float, metavar="S", help="this round's limit in seconds (default: the task's)")
    co.add_argument("--json", action="store_true", help="print the finished task as JSON only")
    co.add_argument("prompt", help="the follow-up")

    u = sub.add_parser("undo", help="take a task's merge back (while nothing came after it)")
    u.add_argument("task_id")
    u.add_argument("--json", action="store_true")

    c = sub.add_parser("cancel", help="stop every running attempt of a task")
    c.add_argument("task_id")
    c.add_argument("--json", action="store_true")

    df = sub.add_parser("diff", help="an attempt's changes as a patch (the best attempt by default)")
    df.add_argument("task_id")
    df.add_argument("--agent", help="whose attempt; default: the task's best")
    df.add_argument("--max-bytes", type=int, default=diffs.MAX_BYTES, metavar="N",
                    help=f"cut the patch after N bytes (default and most: {diffs.MAX_BYTES:,})")
    df.add_argument("--json", action="store_true", help="print the Diff the get_diff tool returns")

    rv = sub.add_parser("review", help="cross-review a finished task's attempts and pick its best again")
    rv.add_argument("task_id")
    rv.add_argument("--reviewers", type=lambda v: [a.strip() for a in v.split(",") if a.strip()], metavar="A,B",
                    help="agents that review (default: [review] reviewers, else every enabled agent)")
    rv.add_argument("--json", action="store_true", help="print the Task the review_task tool returns")

    dc = sub.add_parser("discard", help="remove a finished task's worktrees and branches (cancel it first)")
    dc.add_argument("task_id")
    dc.add_argument("--json", action="store_true")

    sa = sub.add_parser("stats", help="the council's figures (tasks, attempts, cost, tokens), as /metrics serves them")
    sa.add_argument("--json", action="store_true", help="print them as one JSON document")

    g = sub.add_parser("gc", help="prune finished worktrees, orphaned branches and dead processes")
    g.add_argument("--older-than", type=float, dest="older_than_s", metavar="SECONDS",
                   help="reclaim tasks finished longer ago than this; default [engine] gc_age_s")
    g.add_argument("--json", action="store_true")
    return p


def emit(model: BaseModel) -> None:
    print(model.model_dump_json(indent=2))


async def live_progress(engine: Engine, task_id: str) -> None:
    """One line per agent, redrawn in place: state, elapsed time, last log line."""
    cursor, last, drawn = 0, {}, 0
    while True:
        chunk = await engine.logs(task_id, cursor=cursor, wait_s=0.5)
        for line in chunk.lines:
            last[line.agent] = line.text
        cursor = chunk.next_cursor
        task = await engine.get(task_id)
        rows = []
        for a in task.attempts:
            elapsed = a.duration_s if a.duration_s is not None else (
                time.time() - a.started_at.timestamp() if a.started_at else 0.0)
            rows.append(f"{a.agent:<12} {a.state:<10} {elapsed:6.1f}s  {last.get(a.agent, '')[:80]}")
        sys.stderr.write("\x1b[F\x1b[2K" * drawn + "".join(r + "\n" for r in rows))
        sys.stderr.flush()
        drawn = len(rows)
        if chunk.done:
            return


async def cmd_run(args, engine: Engine) -> int:
    task = await engine.submit(args.repo, args.prompt, agents=args.agents, tier=args.tier, base=args.base,
                               check=args.check, timeout_s=args.timeout, budget_usd=args.budget_usd,
                               review=args.review)
    print(f"task {task.task_id}", file=sys.stderr, flush=True)
    return await host(args, engine, task)


async def cmd_continue(args, engine: Engine) -> int:
    task = await engine.continue_task(args.task_id, args.agent, args.prompt, check=args.check,
                                      timeout_s=args.timeout)
    print(f"task {task.task_id}: round {task.attempt(args.agent).rounds} of {args.agent}", file=sys.stderr, flush=True)
    return await host(args, engine, task)


async def host(args, engine: Engine, task: Task) -> int:
    """Stay while the task this process hosts runs (a signal cancels it), then print how it ended."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with anyio.create_task_group() as tg:
            async def on_signal():
                async for _ in signals:
                    print("cancelling...", file=sys.stderr, flush=True)
                    await engine.cancel(task.task_id)
                    return
            tg.start_soon(on_signal)
            if sys.stderr.isatty() and not args.json:
                await live_progress(engine, task.task_id)
            while task.state in ACTIVE_TASK:
                task = await engine.wait(task.task_id, 3600)
            tg.cancel_scope.cancel()
    emit(task) if args.json else print(text.describe(task))
    return 0 if task.state == TaskState.succeeded else 1


async def check_tails(engine: Engine, task: Task, keep: int = 5) -> dict[str, list[str]]:
    """The last lines each failed check printed (the log is read page by page, never held whole)."""
    tails = {}
    for a in task.attempts:
        if a.check is None or a.check.passed:
            continue
        tail, cursor = collections.deque(maxlen=keep), 0
        while True:
            chunk = await engine.logs(task.task_id, agent=a.agent, cursor=cursor, limit=5000)
            tail.extend(ln.text for ln in chunk.lines if ln.stream == "check")
            cursor = chunk.next_cursor
            if chunk.done or not chunk.lines:
                break
        tails[a.agent] = list(tail)
    return tails


async def cmd_status(args, engine: Engine) -> int:
    if args.task_id:
        task = await engine.get(args.task_id)
        emit(task) if args.json else print(text.describe(task, await check_tails(engine, task)))
        return 0
    tasks = await engine.list(args.repo, args.limit)
    if args.json:
        emit(tasks)
    else:
        print(text.task_list(tasks))
    return 0


async def cmd_logs(args, engine: Engine) -> int:
    cursor = 0
    while True:
        chunk = await engine.logs(args.task_id, agent=args.agent, cursor=cursor, wait_s=5 if args.follow else 0,
                                  limit=5000)
        for line in chunk.lines:
            if args.json:
                print(line.model_dump_json())
            else:
                print(f"{line.seq:>5} {line.agent}/{line.stream}: {line.text}")
        cursor = chunk.next_cursor
        if chunk.done or (not args.follow and len(chunk.lines) < 5000):
            return 0


async def cmd_merge(args, engine: Engine) -> int:
    result = await engine.merge(args.task_id, agent=args.agent, strategy=args.strategy, into=args.into,
                                dry_run=args.dry_run, cleanup=args.cleanup)
    if args.json:
        emit(result)
    else:
        print(text.merge_result(result))
    return 0 if result.merged or (args.dry_run and not result.conflicts) else 1


async def cmd_undo(args, engine: Engine) -> int:
    result = await engine.undo_merge(args.task_id)
    emit(result) if args.json else print(result.message)
    return 0 if result.commit else 1


async def cmd_cancel(args, engine: Engine) -> int:
    was = await engine.get(args.task_id)
    task = await engine.cancel(args.task_id)
    if args.json:
        emit(task)
    else:
        if was.state not in ACTIVE_TASK:
            print(f"task {task.task_id} had already ended ({task.state}); nothing to cancel")
        print(text.describe(task))
    return 0 if task.state not in ACTIVE_TASK else 1


async def cmd_gc(args, engine: Engine) -> int:
    report = await engine.gc(older_than_s=args.older_than_s)
    emit(report) if args.json else print(text.gc_report(report))
    return 0


async def cmd_discard(args, engine: Engine) -> int:
    report = await engine.discard(args.task_id)
    emit(report) if args.json else print(text.gc_report(report))
    return 0


async def cmd_review(args, engine: Engine) -> int:
    task = await engine.review(args.task_id, reviewers=args.reviewers)
    print(f"task {task.task_id}: reviewing", file=sys.stderr, flush=True)
    return await host(args, engine, task)


async def cmd_diff(args, engine: Engine) -> int:
    """The patch alone on stdout (so it pipes into `git apply`); what it is, on stderr."""
    diff = await engine.diff(args.task_id, agent=args.agent, max_bytes=args.max_bytes)
    if args.json:
        emit(diff)
        return 0
    ins, dels = sum(f.insertions for f in diff.files), sum(f.deletions for f in diff.files)
    print(f"task {diff.task_id}, {diff.agent}'s attempt: {diff.branch} against {diff.base[:12]}, "
          f"{text.plural(len(diff.files), 'file')}, +{ins}/-{dels}", file=sys.stderr)
    sys.stdout.write(diff.patch)
    sys.stdout.flush()
    if diff.truncated:
        print(f"the patch was cut at {args.max_bytes:,} bytes; see the whole branch with "
              f"`git diff {diff.base[:12]} {diff.branch}` in the repo", file=sys.stderr)
    return 0


async def cmd_agents(args) -> int:
    agents = await agents_mod.describe(load_config(), os.environ)
    if args.json:
        emit(agents)
        return 0
    for a in agents.agents:
        usable = "yes" if a.available and a.enabled else "no"
        print(f"{a.name:<12} {a.kind:<12} {usable:<4} {a.version or '-':<12} model {a.model or '(default)'}, "
              f"tiers {', '.join(a.tiers) or '-'}, {a.max_parallel} at once  "
              f"{'' if a.enabled else '(disabled) '}{a.message}")
    return 0


async def cmd_doctor(args) -> int:
    """A broken config is main's `error:` exit 2; an agent whose probe fails is that agent's row."""
    agents = await agents_mod.describe(load_config(), os.environ)
    rows = [{"agent": a.name, "kind": a.kind, "enabled": a.enabled, "ok": a.available, "version": a.version,
             "message": a.message, **a.details} for a in agents.agents]
    if args.json:
        print(json.dumps({"agents": rows}, indent=2))
    else:
        for r in rows:
            mark = "ok " if r["ok"] and r["enabled"] else "-- "
            print(f"{mark}{r['agent']:<12} {r['kind']:<12} {r['version'] or '':<14} "
                  f"{'' if r['enabled'] else '(disabled) '}{r['message']}")
    return 0 if any(r["ok"] and r["enabled"] for r in rows) else 1


async def cmd_stats(args) -> int:
    """Reads the store only: no engine, so nothing is recovered or started by looking."""
    from . import metrics  # prometheus_client is loaded only by the commands that use it

    store = Store(home_dir() / "council.db")
    try:
        figures = await metrics.stats(store)
    finally:
        await store.close()
    emit(figures) if args.json else print(metrics.table(figures))
    return 0


COMMANDS = {"run": cmd_run, "status": cmd_status, "logs": cmd_logs, "merge": cmd_merge,
            "cancel": cmd_cancel, "gc": cmd_gc, "diff": cmd_diff, "discard": cmd_discard, "review": cmd_review,
            "continue": cmd_continue, "undo": cmd_undo}
NO_ENGINE = {"doctor": cmd_doctor, "agents": cmd_agents, "stats": cmd_stats}  # no engine: they start nothing


async def amain(args) -> int:
    if args.cmd in NO_ENGINE:
        return await NO_ENGINE[args.cmd](args)
    async with Engine(warm_pool=False) as engine:  # one-shot: worktrees made ahead would only be thrown away
        return await COMMANDS[args.cmd](args, engine)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.cmd == "serve":
            from .app import serve
            return serve(args.transport, args.host, args.port)
        if args.cmd == "dashboard":
            from .dashboard import serve as serve_dashboard
            return serve_dashboard(args.host, args.port)
        return anyio.run(amain, args)
    except (CouncilError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
