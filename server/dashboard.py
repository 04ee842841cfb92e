"""The live dashboard: a task list, a page per task (its attempts side by side, its log as it grows,
each attempt's diff), and the JSON and server-sent-event API those pages read.

Reading needs no token; cancelling a task or merging an attempt does when the server has one (the
page sends it as `Authorization: Bearer`, never in a URL). A request whose Host is not a name this
server answers to gets 421 (a DNS-rebinding page cannot read the dashboard), and a POST from another
origin gets 403 (a page elsewhere cannot make the user's browser merge into their repo). What agents
printed or wrote reaches the browser only as JSON strings, which the pages render as text, under a
Content-Security-Policy that runs no script but the dashboard's own.

Served at `/` by `cli-council serve --transport http` (its routes beside `/mcp`), or on its own by
`cli-council dashboard` with an Engine of its own over the same CLI_COUNCIL_HOME.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import inputs
from engine.config import ConfigError, load_config
from engine.engine import Engine
from engine.inputs import CouncilError, NotFound

from . import auth, http_transport

STATIC = Path(__file__).parent / "static"
SSE_WAIT_S = 2.0  # how stale an attempt's state may get on the task page while no line arrives
SSE_PING_S = 15.0  # an idle stream gets a comment this often
MAX_STREAMS = 64  # open event streams at once; more get 503 (each one reads the store every SSE_WAIT_S)
LIST_LIMIT = 200

logger = logging.getLogger("cli_council.dashboard")

SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class Guard:
    """ASGI middleware on every dashboard route: Host allow-list (421) and the security headers."""

    def __init__(self, app: ASGIApp, host: str):
        self.app = app
        settings = auth.security_settings(host)
        self.hosts = settings.allowed_hosts if settings.enable_dns_rebinding_protection else None

    def host_ok(self, given: str) -> bool:
        if self.hosts is None:
            return True
        return given in self.hosts or any(
            h.endswith(":*") and given.startswith(h[:-1]) and given[len(h) - 1:].isdigit() for h in self.hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if not self.host_ok(host):
            return await _error(421, "this server does not answer to that Host name")(scope, receive, send)

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, secured)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _json(model) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"))


def _count(value: str | None, name: str, default: int) -> int:
    """A non-negative integer query value (a cursor, a limit); CouncilError (400) if it is not one."""
    if value is None:
        return default
    if not (value.isascii() and value.isdigit() and len(value) <= 15):
        raise CouncilError(f"{name} must be a whole number, got {value[:40]!r}")
    return int(inputs.number(name, int(value), low=0, high=inputs.MAX_CURSOR))


def _same_origin(request: Request) -> bool:
    """A browser names where a request comes from (Sec-Fetch-Site, Origin); a script or curl sends neither."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


async def task_stream(engine: Engine, task_id: str, cursor: int) -> AsyncIterator[tuple[str, dict, int | None]]:
    """What the task page follows, as (event, data, id): its log lines as they arrive (`lines`, id = the
    cursor after them), the task whenever it changed (`task`), `idle` when a wait saw neither, and `end`
    once it finished and every line was sent. The one place that knows how changes are noticed (long-polls today)."""
    shown = None
    while True:
        task = (await engine.get(task_id)).model_dump(mode="json")
        if task != shown:
            shown = task
            yield "task", task, None
        chunk = await engine.logs(task_id, cursor=cursor, wait_s=SSE_WAIT_S, limit=1000)
        if chunk.lines:
            cursor = chunk.next_cursor
            yield "lines", {"lines": [ln.model_dump(mode="json") for ln in chunk.lines], "cursor": cursor}, cursor
        elif not chunk.done:
            yield "idle", {}, None
        if chunk.done:
            task = (await engine.get(task_id)).model_dump(mode="json")
            if task != shown:
                yield "task", task, None
            yield "end", {"state": task["state"]}, None
            return


def own_path(path: str) -> bool:
    """Whether a request path is the dashboard's: its routes check the token themselves (reading needs none)."""
    return path == "/" or path.startswith(("/tasks/", "/api/", "/static/"))


def routes(get_engine: Callable[[], Engine], token: str | None, host: str = "127.0.0.1") -> list[BaseRoute]:
    """The dashboard's pages and API. `host` is the bound host: it decides which Host headers are answered
    (as for /mcp). Mount these where no other auth middleware runs: reading needs no token."""
    expected = f"Bearer {token}".encode() if token else None
    streams = 0

    def authorized(request: Request) -> bool:
        if expected is None:
            return True
        return hmac.compare_digest(request.headers.get("authorization", "").encode("latin-1", "replace"), expected)

    def api(handler, mutating: bool = False):
        async def endpoint(request: Request) -> Response:
            if mutating:
                if not _same_origin(request):
                    return _error(403, "refused: this request comes from another site")
                if not authorized(request):
                    return JSONResponse({"error": "sign in with the server's token (CLI_COUNCIL_TOKEN) to do this"},
                                        status_code=401, headers={"WWW-Authenticate": 'Bearer realm="cli-council"'})
            try:
                return await handler(request, get_engine())
            except NotFound as e:
                return _error(404, str(e))
            except CouncilError as e:
                return _error(409 if mutating else 400, str(e))
        return endpoint

    async def auth_state(request: Request, engine: Engine) -> Response:
        return JSONResponse({"token_required": expected is not None, "authorized": authorized(request)})

    async def list_tasks(request: Request, engine: Engine) -> Response:
        limit = _count(request.query_params.get("limit"), "limit", 50)
        return _json(await engine.list(limit=max(1, min(limit, LIST_LIMIT))))

    async def get_task(request: Request, engine: Engine) -> Response:
        return _json(await engine.get(request.path_params["task_id"]))

    async def get_diff(request: Request, engine: Engine) -> Response:
        return _json(await engine.diff(request.path_params["task_id"], request.path_params["agent"]))

    async def cancel(request: Request, engine: Engine) -> Response:
        return _json(await engine.cancel(request.path_params["task_id"]))

    async def merge(request: Request, engine: Engine) -> Response:
        dry_run = request.query_params.get("dry_run") in ("1", "true")
        return _json(await engine.merge(request.path_params["task_id"], request.path_params["agent"],
                                        dry_run=dry_run))

    async def events(request: Request, engine: Engine) -> Response:
        task_id = request.path_params["task_id"]
        task = await engine.get(task_id)  # 404 now, not inside the stream
        # EventSource sends the last `id:` it saw when it reconnects: the stream goes on from there.
        cursor = _count(request.headers.get("last-event-id") or request.query_params.get("cursor"), "cursor", 0)
        if streams >= MAX_STREAMS:
            return _error(503, f"{MAX_STREAMS} live views are open already; close one or reload later")

        async def body() -> AsyncIterator[str]:
            nonlocal streams
            streams += 1  # counted once started: a response never sent has no finally to uncount it
            try:
                yield f"retry: 3000\n: task {task.task_id}\n\n"
                sent = time.monotonic()
                async for event, data, event_id in task_stream(engine, task_id, cursor):
                    if event == "idle":
                        if time.monotonic() - sent >= SSE_PING_S:  # keeps idle proxies from closing the stream
                            sent = time.monotonic()
                            yield ": ping\n\n"
                        continue
                    sent = time.monotonic()
                    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "")
                    # JSON escapes CR and LF: nothing an agent printed can end the data line early.
                    yield f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"
            except CouncilError as e:  # the task went away meanwhile (gc, discard)
                yield f"event: gone\ndata: {json.dumps({'error': str(e)})}\n\n"
            except Exception:  # a store hiccup: the page reconnects and goes on from its last id
                logger.exception("the event stream of task %s failed", task_id)
            finally:
                streams -= 1

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})

    def page(name: str):
        async def endpoint(request: Request) -> Response:
            return FileResponse(STATIC / name, media_type="text/html; charset=utf-8")
        return endpoint

    guard = [Middleware(Guard, host=host)]
    return [
        Route("/", page("index.html"), middleware=guard),
        Route("/tasks/{task_id}", page("task.html"), middleware=guard),
        Route("/api/auth", api(auth_state), middleware=guard),
        Route("/api/tasks", api(list_tasks), middleware=guard),
        Route("/api/tasks/{task_id}", api(get_task), middleware=guard),
        Route("/api/tasks/{task_id}/events", api(events), middleware=guard),
        Route("/api/tasks/{task_id}/attempts/{agent}/diff", api(get_diff), middleware=guard),
        Route("/api/tasks/{task_id}/cancel", api(cancel, mutating=True), methods=["POST"], middleware=guard),
        Route("/api/tasks/{task_id}/attempts/{agent}/merge", api(merge, mutating=True), methods=["POST"],
              middleware=guard),
        Mount("/static", StaticFiles(directory=STATIC), middleware=guard),
    ]


def app(engine: Engine, token: str | None, host: str = "127.0.0.1", own_engine: bool = False) -> Starlette:
    """The dashboard on its own. own_engine: the app's lifespan enters and leaves `engine`."""
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        async with engine if own_engine else contextlib.nullcontext():
            yield

    return Starlette(routes=routes(lambda: engine, token, host), lifespan=lifespan)


def serve(host: str, port: int) -> int:
    """`cli-council dashboard`: serve the dashboard alone until stopped. Its Engine hosts no task: it reads
    the store every process shares, and cancels or merges through it as `cli-council cancel/merge` do."""
    load_config()  # a broken file fails now, before anything listens
    token = os.environ.get("CLI_COUNCIL_TOKEN") or None
    if not auth.is_loopback(host) and not token:
        raise ConfigError(f"refusing to serve the dashboard on {host!r} without CLI_COUNCIL_TOKEN: whoever reaches "
                          "the port could cancel tasks and merge into your repositories. Set it, or use --host 127.0.0.1")
    header_timeout_s, body_timeout_s = http_transport.timeouts(os.environ)
    sockets = http_transport.bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    banner = f"cli-council: dashboard on http://{shown}:{sockets[0].getsockname()[1]}/" + (
        " (sign in with CLI_COUNCIL_TOKEN to cancel or merge)" if token else "")
    return http_transport.run(app(Engine(warm_pool=False), token, host, own_engine=True), sockets,
                              header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s, banner=banner)
