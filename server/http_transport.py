"""The HTTP transport: uvicorn, with what it lacks for a server that strangers can reach.

uvicorn's h11 protocol has no time limit for a request's headers or body (a client sending one byte
every few seconds holds its connection forever), starts the app before it knows the port is free,
and when the app's lifespan dies (the Engine) it keeps answering 500 to every request. Here the
port is bound first, each connection gets a deadline for its headers and one for its body, the
"MCP on ..." line is printed once uvicorn listens, and a dead lifespan stops the process.
A POSTed message is read whole (at most MAX_BODY_BYTES, else 413) and vetted by jsonrpc.vet, so
HTTP answers malformed messages exactly as stdio does.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import sys
from collections.abc import Callable, Mapping

import anyio
import h11
import mcp_types as types
import uvicorn
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.config import ConfigError

from . import jsonrpc

logger = logging.getLogger("cli_council.server")

HEADER_TIMEOUT_S = 10.0  # from connect (or the previous response) to a request's last header line
BODY_TIMEOUT_S = 30.0  # from the last header line to the last byte of the body
MAX_BODY_BYTES = jsonrpc.MAX_MESSAGE_BYTES  # larger request bodies get 413
HEADER_TIMEOUT_ENV = "CLI_COUNCIL_HTTP_HEADER_TIMEOUT_S"
BODY_TIMEOUT_ENV = "CLI_COUNCIL_HTTP_BODY_TIMEOUT_S"
LINGER_S = 2.0  # after refusing a request, how long its unread bytes are still read (and dropped)


def _plain_response(status: int, reason: str, text: str) -> bytes:
    body = text.encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def timeouts(environ: Mapping[str, str]) -> tuple[float, float]:
    """(header, body) time limits in seconds: the defaults, or the environment's (tests shorten them)."""
    def seconds(name: str, default: float) -> float:
        raw = environ.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name}={raw!r}: expected a positive number of seconds")
        return value
    return seconds(HEADER_TIMEOUT_ENV, HEADER_TIMEOUT_S), seconds(BODY_TIMEOUT_ENV, BODY_TIMEOUT_S)


def bind(host: str, port: int) -> list[socket.socket]:
    """The listening sockets (one per address the host has, as asyncio would make), bound before anything starts,
    so that a busy port is an error and not a half-started server (uvicorn starts the Engine first)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"{port} is not a port number (0-65535)")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise ConfigError(f"cannot listen on {host!r}: {e}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio does, so that "" can take :: beside 0.0.0.0
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]  # --port 0: the rest on the port the first one got
    except OSError as e:
        for sock in sockets:
            sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} is in use on {host}: stop what holds it (another cli-council serve?) "
                              "or pick another with --port") from None
        raise ConfigError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None
    return sockets


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers and one for its body.

    The phase is read from h11's own state after every event: their_state IDLE is "waiting for
    headers" (the deadline is not reset by each byte, which is the point), SEND_BODY is "reading the
    body", anything else (the app is working or answering) has no deadline. Headers that run out of
    time get a 408; a body that does closes the connection (the app already has the request).
    A refused request (408, or uvicorn's 400 for bad or oversized headers) is answered, then the
    connection lingers, dropping what the client still sends: closing at once would make the kernel
    answer those unread bytes with a reset, which can destroy the answer before the client reads it.
    On uvicorn upgrades, check that H11Protocol still keeps its h11.Connection in `self.conn`, its
    FlowControl in `self.flow`, calls `on_response_complete` when a response ends and
    `send_400_response` (then expects the connection closed) for a request h11 cannot parse.
    """

    header_timeout_s = HEADER_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._phase: str | None = None
        self._deadline = None
        self._lingering = False
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        super().data_received(data)
        self._watch()

    def send_400_response(self, msg: str) -> None:
        self._refuse(_plain_response(400, "Bad Request", msg))

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = None
        self._rearm(None)
        super().connection_lost(exc)

    def _watch(self) -> None:
        if self._lingering:
            return
        state = self.conn.their_state
        phase = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if self.transport.is_closing():
            phase = None
        if phase != self._phase:
            self._phase = phase
            self._rearm({"headers": self.header_timeout_s, "body": self.body_timeout_s}.get(phase))

    def _rearm(self, timeout_s: float | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None if timeout_s is None else self.loop.call_later(timeout_s, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        started = self._phase == "body" or bool(self.conn.trailing_data[0])
        if started:
            logger.warning("HTTP: closed a connection from %s whose request %s took too long", self.client,
                           self._phase)
        if self._phase == "headers" and started:
            self._refuse(_plain_response(408, "Request Timeout", "the request's headers took too long to arrive\n"))
        else:
            self.transport.close()

    def _refuse(self, response: bytes) -> None:
        """Answer, stop sending, drop whatever still comes, and close after LINGER_S (or the client's EOF)."""
        self.transport.write(response)
        self._lingering = True
        self._phase = None
        self._rearm(None)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self._deadline = self.loop.call_later(LINGER_S, self.transport.close)


def timed_h11(header_timeout_s: float, body_timeout_s: float) -> type[TimedH11Protocol]:
    """The protocol class to hand uvicorn (it builds one per connection from the class alone)."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout_s": header_timeout_s,
                                                          "body_timeout_s": body_timeout_s})


class VetMessages:
    """ASGI middleware: a POSTed JSON body is read whole, at most `max_bytes` (413 beyond), and a malformed
    message is answered 400 with its JSON-RPC error; a well-formed one is replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        if headers is None or scope["method"] != "POST" or \
                not headers.get("content-type", "").lower().startswith("application/json"):
            return await self.app(scope, receive, send)
        too_big = jsonrpc.error_reply(None, types.INVALID_REQUEST,
                                      f"Invalid Request: a message is at most {self.max_bytes} bytes")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _reply(too_big, 413, scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await _reply(too_big, 413, scope, receive, send)
            if not message.get("more_body", False):
                break
        body = bytes(body)
        # A big message takes a while to parse (0.4 s for 4 MB of numbers); not on the event loop.
        vetted = jsonrpc.vet(body) if len(body) < 64 * 1024 else await anyio.to_thread.run_sync(jsonrpc.vet, body)
        if vetted is None:
            vetted = jsonrpc.error_reply(None, types.PARSE_ERROR, "Parse error: the request body is empty")
        if not isinstance(vetted, str):
            return await _reply(vetted, 400, scope, receive, send)

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class CheckHost:
    """ASGI middleware: the SDK's Host/Origin check (against DNS rebinding) for every route, not only /mcp
    (which checks again): a page a browser loads from a rebound name must not read /metrics either."""

    def __init__(self, app: ASGIApp, settings: TransportSecuritySettings):
        self.app = app
        self.check = TransportSecurityMiddleware(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refused = await self.check.validate_request(Request(scope))
            if refused is not None:
                return await refused(scope, receive, send)
        await self.app(scope, receive, send)


async def _reply(error: types.JSONRPCError, status: int, scope: Scope, receive: Receive, send: Send) -> None:
    response = Response(error.model_dump_json(by_alias=True, exclude_unset=True), status_code=status,
                        media_type="application/json")
    await response(scope, receive, send)


class LifespanWatch:
    """ASGI middleware: tells `on_end` when the app's lifespan ends without having been asked to.

    The Engine lives in the lifespan; if it dies, uvicorn carries on (it takes the app for one
    without lifespan support) and every later request fails. Stopping is the honest answer.
    """

    def __init__(self, app: ASGIApp, on_end: Callable[[], None]):
        self.app = app
        self.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        asked = False

        async def watched_receive():
            nonlocal asked
            message = await receive()
            asked = asked or message["type"] == "lifespan.shutdown"
            return message

        try:
            await self.app(scope, watched_receive, send)
        finally:
            if not asked:
                self.on_end()


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, listening: Callable[[], None]):
        super().__init__(config)
        self.listening = listening

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self.listening()


def run(app: ASGIApp, sockets: list[socket.socket], *, header_timeout_s: float = HEADER_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S, banner: str = "") -> int:
    """Serve `app` on the bound `sockets` until SIGINT/SIGTERM (0) or until its lifespan dies (1).
    `banner` goes to stderr once the socket accepts connections."""
    died = False

    def on_end() -> None:
        nonlocal died
        if server.started and not server.should_exit:
            died = True
            print("error: the server's engine stopped unexpectedly (traceback above); shutting down so that "
                  "clients get a refused connection rather than errors. Start it again.", file=sys.stderr, flush=True)
            server.should_exit = True

    def listening() -> None:
        if banner:
            print(banner, file=sys.stderr, flush=True)

    config = uvicorn.Config(LifespanWatch(app, on_end), http=timed_h11(header_timeout_s, body_timeout_s), ws="none",
                            lifespan="on", log_level="warning", timeout_graceful_shutdown=5)
    server = _Server(config, listening)
    server.run(sockets=sockets)
    return 1 if died else 0
