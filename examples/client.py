#!/usr/bin/env python3
"""A scripted MCP client for cli-council: submit a task, follow its log until it is done, merge the best result.

    python examples/client.py --repo ~/src/app "make test_api pass" --check "pytest -q"
    python examples/client.py --url http://127.0.0.1:8765/mcp --agents claude,gemini --repo ~/src/app "..."

Over stdio it starts `cli-council serve` itself (--command changes that); with --url it speaks
streamable HTTP and sends CLI_COUNCIL_TOKEN, when set, as a bearer token. Exits 0 when the result
was merged (or would be, with --dry-run), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from contextlib import AsyncExitStack

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client


async def call(client: Client, tool: str, **arguments) -> dict:
    """A tool's structured result; a tool error ends the script with the server's message."""
    result = await client.call_tool(tool, {k: v for k, v in arguments.items() if v is not None})
    if result.is_error:
        sys.exit(f"{tool} failed: {result.content[0].text}")
    return result.structured_content


async def connect(stack: AsyncExitStack, args) -> Client:
    if args.url:
        token = os.environ.get("CLI_COUNCIL_TOKEN")
        http = await stack.enter_async_context(httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"} if token else None, timeout=httpx2.Timeout(30, read=300)))
        return await stack.enter_async_context(Client(streamable_http_client(args.url, http_client=http)))
    command, *rest = shlex.split(args.command)
    # The server needs this environment (CLI_COUNCIL_HOME/CONFIG, the agents' API keys); the SDK passes
    # only a handful of variables unless told.
    return await stack.enter_async_context(Client(StdioServerParameters(command=command, args=rest,
                                                                        env=dict(os.environ))))


async def main(args) -> int:
    async with AsyncExitStack() as stack:
        client = await connect(stack, args)
        task = await call(client, "submit_task", repo=os.path.abspath(os.path.expanduser(args.repo)),
                          prompt=args.prompt, agents=args.agents.split(",") if args.agents else None,
                          check=args.check)
        task_id = task["task_id"]
        print(f"task {task_id}: {', '.join(task['agents'])}", file=sys.stderr)

        cursor = 0
        while True:  # long-poll: each call returns as soon as there are new lines, or after 30 s
            chunk = await call(client, "stream_logs", task_id=task_id, cursor=cursor, wait_s=30)
            for line in chunk["lines"]:
                print(f"{line['agent']:>12} [{line['stream']}] {line['text']}", file=sys.stderr)
            cursor = chunk["next_cursor"]
            if chunk["done"]:
                break

        status = await call(client, "get_status", task_id=task_id)
        for a in status["attempts"]:
            error = f" ({a['error']['kind']}: {a['error']['message']})" if a["error"] else ""
            print(f"{a['agent']}: {a['state']}, {a['files_changed']} files{error}", file=sys.stderr)
        if status["state"] != "succeeded":
            print(f"task {status['state']}: {status['best_reason'] or 'no result to merge'}", file=sys.stderr)
            return 1
        print(f"best: {status['best']} ({status['best_reason']})", file=sys.stderr)

        merge = await call(client, "merge_result", task_id=task_id, dry_run=args.dry_run)
        print(json.dumps(merge, indent=2))
        return 0 if merge["merged"] or (args.dry_run and not merge["conflicts"]) else 1


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt", help="what the agents should do")
    p.add_argument("--repo", required=True, help="the git repository to work on")
    p.add_argument("--agents", help="comma-separated agent names; default: route by tier")
    p.add_argument("--check", help="command that must pass in each worktree, e.g. 'pytest -q'")
    p.add_argument("--dry-run", action="store_true", help="report what the merge would do, change nothing")
    p.add_argument("--url", help="streamable HTTP endpoint, e.g. http://127.0.0.1:8765/mcp (default: stdio)")
    p.add_argument("--command", default="cli-council serve", help="stdio server command (default: %(default)s)")
    return p.parse_args(argv)


def leaf(error: BaseException) -> BaseException:
    """The first real error inside the task groups' ExceptionGroups."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


if __name__ == "__main__":
    try:
        sys.exit(anyio.run(main, parse()))
    except Exception as e:  # a wrong token, a server that is not there: one line, not a traceback
        sys.exit(f"error: {leaf(e)}")
