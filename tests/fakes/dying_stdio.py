"""An MCP server on stdio (served by server.app's stdio transport) whose lifespan dies when its `die` tool
is called, the way an Engine whose task group raised would. For the test that the process then exits
even though the client keeps its stdin open."""

from __future__ import annotations

from contextlib import asynccontextmanager

import anyio
from mcp.server.mcpserver import MCPServer

from server.app import _serve_stdio

died = anyio.Event()


@asynccontextmanager
async def lifespan(_server: MCPServer):
    async def engine() -> None:
        await died.wait()
        raise RuntimeError("an attempt's exception escaped the engine")

    async with anyio.create_task_group() as tg:
        tg.start_soon(engine)
        yield


async def die() -> str:
    """Make the lifespan die."""
    died.set()
    return "dying"


if __name__ == "__main__":
    server = MCPServer("dying", lifespan=lifespan)
    server.add_tool(die)
    anyio.run(_serve_stdio, server)
