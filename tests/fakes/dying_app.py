"""An ASGI app served by server.http_transport.run whose lifespan dies on `GET /die`, the way an Engine
whose task group raised would: afterwards `GET /ok` answers 500, like the MCP endpoint without its
session manager. For the test that a dead lifespan stops the HTTP server."""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from server import http_transport


@asynccontextmanager
async def lifespan(app: Starlette):
    app.state.die = anyio.Event()
    app.state.alive = True

    async def engine() -> None:
        await app.state.die.wait()
        app.state.alive = False
        raise RuntimeError("an attempt's exception escaped the engine")

    async with anyio.create_task_group() as tg:
        tg.start_soon(engine)
        yield


async def ok(request: Request) -> PlainTextResponse:
    alive = request.app.state.alive
    return PlainTextResponse("ok" if alive else "engine gone", status_code=200 if alive else 500)


async def die(request: Request) -> PlainTextResponse:
    request.app.state.die.set()
    return PlainTextResponse("dying")


if __name__ == "__main__":
    sockets = http_transport.bind("127.0.0.1", 0)
    app = Starlette(routes=[Route("/ok", ok), Route("/die", die)], lifespan=lifespan)
    sys.exit(http_transport.run(app, sockets, banner=f"listening on {sockets[0].getsockname()[1]}"))
