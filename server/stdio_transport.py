"""The stdio transport's input side: one JSON-RPC message per line, vetted before the SDK sees it.

The SDK's stdio reader drops a line it cannot parse without a word (the client waits forever for its
reply) and reads a line of any length into memory. Here every line is read with a size cap and
checked first: bytes that are not UTF-8 or not JSON (NaN and lone surrogates included) get a -32700
Parse error, JSON that is not a JSON-RPC message gets -32600 Invalid Request, each with the request's
id when one can be read, and the server goes on with the next line. Only lines the SDK will accept
are passed on to it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import anyio
import mcp_types as types
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

logger = logging.getLogger("cli_council.server")

MAX_LINE_BYTES = 4 * 1024 * 1024  # one message; the same cap as an HTTP request body
DISCARD_CHUNK = 64 * 1024  # how much of an oversized line is read (and dropped) at a time

Vetted = str | types.JSONRPCError | None  # pass this line on / send this reply / skip (a blank line)


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
    the next line is read, so a reply is never lost to the end of input that follows it.
    """

    def __init__(self, wire: BinaryIO):
        self.wire = wire
        self._write: Any = None
        self._ready = anyio.Event()

    def reply_through(self, write: Any) -> None:
        self._write = write
        self._ready.set()

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            raw = await anyio.to_thread.run_sync(self.wire.readline, MAX_LINE_BYTES + 1, abandon_on_cancel=True)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                if not await self._discard_rest_of_line():
                    return
                vetted: Vetted = error_reply(None, types.INVALID_REQUEST,
                                             f"message longer than {MAX_LINE_BYTES} bytes; not read")
            else:
                vetted = vet(raw)
            if isinstance(vetted, str):
                yield vetted
            elif vetted is not None:
                logger.warning("stdin: answered a malformed message with %s", vetted.error.message)
                await self._ready.wait()
                try:
                    await self._write.send(SessionMessage(vetted))
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return  # the server is stopping; nobody is left to answer

    async def _discard_rest_of_line(self) -> bool:
        """Read up to the end of the current line; False if input ended first."""
        while True:
            chunk = await anyio.to_thread.run_sync(self.wire.readline, DISCARD_CHUNK, abandon_on_cancel=True)
            if not chunk:
                return False
            if chunk.endswith(b"\n"):
                return True


def vet(raw: bytes) -> Vetted:
    """The line as text if the SDK will take it as a JSON-RPC message, else the error reply it deserves."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return error_reply(_id_in(raw.decode("utf-8", "replace")), types.PARSE_ERROR,
                           f"Parse error: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")
    if not text.strip():
        return None
    try:
        message = _strict_loads(text)
    except (ValueError, RecursionError) as e:
        return error_reply(_id_in(text), types.PARSE_ERROR, f"Parse error: {e}")
    try:
        json.dumps(message, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return error_reply(_id_of(message), types.PARSE_ERROR,
                           "Parse error: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff not in a pair)")
    if not isinstance(message, dict):
        return error_reply(None, types.INVALID_REQUEST,
                           f"Invalid Request: a message is a JSON object, not {_json_kind(message)}")
    if "id" in message and _id_of(message) is None and not (message["id"] is None and "error" in message):
        # The SDK would take it for a notification (and never answer); MCP ids are strings or integers.
        return error_reply(None, types.INVALID_REQUEST,
                           f'Invalid Request: "id" must be a string or an integer, not {_json_kind(message["id"])}')
    try:
        types.jsonrpc_message_adapter.validate_json(text, by_name=False)  # exactly what the SDK's reader runs
    except ValidationError as e:
        return error_reply(_id_of(message), types.INVALID_REQUEST, f"Invalid Request: {_shape_problem(message, e)}")
    return text


def error_reply(request_id: str | int | None, code: int, message: str) -> types.JSONRPCError:
    return types.JSONRPCError(jsonrpc="2.0", id=request_id, error=types.ErrorData(code=code, message=message))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _strict_loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def _id_of(message: Any) -> str | int | None:
    """The message's id if it is one a reply can carry (a string or an integer), else None."""
    request_id = message.get("id") if isinstance(message, dict) else None
    if isinstance(request_id, str) or (isinstance(request_id, int) and not isinstance(request_id, bool)):
        return request_id
    return None


def _id_in(text: str) -> str | int | None:
    """The id of a line that failed strict parsing, if a lenient parse can still read one."""
    try:
        return _id_of(json.loads(text))
    except (ValueError, RecursionError):
        return None


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array (batches are not supported)"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    return "a number" if isinstance(value, (int, float)) and not isinstance(value, bool) else json.dumps(value)


def _shape_problem(message: dict, error: ValidationError) -> str:
    """What is wrong, told against the message kind it most looks like rather than all four."""
    needs = 'a request needs "jsonrpc": "2.0", an "id" (string or integer) and a "method" (string)'
    if "method" in message:
        kind, what = ("JSONRPCRequest", "request") if "id" in message else ("JSONRPCNotification", "notification")
    elif "result" in message or "error" in message:
        kind, what = ("JSONRPCResponse", "response") if "result" in message else ("JSONRPCError", "error response")
    else:
        return f'not a JSON-RPC 2.0 message (no "method"); {needs}'
    problems = [f"{'.'.join(map(str, e['loc'][1:])) or 'message'}: {e['msg']}"
                for e in error.errors(include_url=False) if e["loc"] and e["loc"][0] == kind]
    return f"not a valid JSON-RPC 2.0 {what} ({'; '.join(problems)[:300]}); {needs}"
