"""The stdio transport's input side: one JSON-RPC message per line, vetted before the SDK sees it.

The SDK's stdio reader drops a line it cannot parse without a word (the client waits forever for its
reply) and reads a line of any length into memory. Here every line is read with a size cap and
checked by jsonrpc.vet; a malformed one is answered with its JSON-RPC error and the server goes on
with the next line. Only lines the SDK will accept are passed on to it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import anyio
import anyio.from_thread
import anyio.lowlevel
import mcp_types as types
from mcp.shared.message import SessionMessage

from .jsonrpc import MAX_MESSAGE_BYTES, Vetted, error_reply, vet

logger = logging.getLogger("cli_council.server")

DISCARD_CHUNK = 64 * 1024  # how much of an oversized line is read (and dropped) at a time


@contextmanager
def claimed_stdin() -> Iterator[BinaryIO]:
    """The wire end of stdin, with fd 0 itself pointed at /dev/null while serving.

    The SDK does this for the stdin it reads itself; a transport given its own stdin must do it too,
    so that no handler or child process inheriting fd 0 can read (and steal) the client's messages.
    """
    wire = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        # closefd=False: a worker thread may still be blocked reading it when serving ends.
        yield os.fdopen(wire, "rb", closefd=False)
    finally:
        os.dup2(wire, 0)


class VettedStdin:
    """stdin for the SDK's stdio_server(stdin=...): yields well-formed message lines, answers the rest.

    Replies go out through the SDK's write stream, handed over with `reply_through` once stdio_server
    has made it; a malformed line read before then waits for it. Sending a reply completes before
    the next line is taken, so a reply is never lost to the end of input that follows it.
    """

    def __init__(self, wire: BinaryIO):
        self.wire = wire
        self._write: Any = None
        self._ready = anyio.Event()

    def reply_through(self, write: Any) -> None:
        self._write = write
        self._ready.set()

    async def __aiter__(self) -> AsyncIterator[str]:
        # A daemon thread reads and vets (parsing 4 MB of JSON takes a while). Unlike a worker thread it
        # cannot keep the process alive after the server stopped with the client's stdin still open.
        send, receive = anyio.create_memory_object_stream[Vetted | object](0)
        threading.Thread(target=self._pump, args=(send, anyio.lowlevel.current_token()), daemon=True,
                         name="cli-council stdin").start()
        async with receive:
            async for vetted in receive:
                if vetted is _END:
                    return
                if isinstance(vetted, str):
                    yield vetted
                elif vetted is not None:
                    logger.warning("stdin: answered a malformed message with %s", vetted.error.message)
                    await self._ready.wait()
                    try:
                        await self._write.send(SessionMessage(vetted))
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                        return  # the server is stopping; nobody is left to answer

    def _pump(self, send: Any, token: Any) -> None:
        try:
            while True:
                vetted = self._next()
                anyio.from_thread.run(send.send, vetted, token=token)
                if vetted is _END:
                    return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, RuntimeError):
            return  # the server stopped reading (its event loop may be gone too)

    def _next(self) -> Vetted | object:
        """The next line, vetted; _END when input ends (or breaks). An oversized line is read to its end and
        dropped."""
        try:
            raw = self.wire.readline(MAX_MESSAGE_BYTES + 1)
            oversized = len(raw) > MAX_MESSAGE_BYTES and not raw.endswith(b"\n")
            while oversized and raw and not raw.endswith(b"\n"):
                raw = self.wire.readline(DISCARD_CHUNK)
        except (OSError, ValueError):
            logger.exception("stdin: reading failed; taking it as the end of input")
            return _END
        if not raw:
            return _END
        if oversized:
            return error_reply(None, types.INVALID_REQUEST,
                               f"Invalid Request: a message is at most {MAX_MESSAGE_BYTES} bytes; this line was not read")
        try:
            return vet(raw)
        except Exception:  # a bug in vetting must cost this message, not the connection
            logger.exception("stdin: vetting a message failed")
            return error_reply(None, types.INTERNAL_ERROR, "Internal error: the message could not be checked")


_END = object()  # what _next returns at the end of input
