"""What a well-formed JSON-RPC message is, for both transports: the checks the SDK skips or gets wrong.

The SDK's stdio reader drops a line it cannot parse without a reply; its HTTP endpoint answers a wrong
shape with -32602 and no id, accepts NaN, and takes a message whose id is not a string or integer for
a notification (never answered). `vet` decides once: bytes that are not UTF-8 or not strict JSON (NaN,
Infinity and lone surrogates included) are a -32700 Parse error, JSON that is not one JSON-RPC message
is -32600 Invalid Request, each carrying the request's id when one can be read.
"""

from __future__ import annotations

import json
from typing import Any

import mcp_types as types
from pydantic import ValidationError

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one message: a stdio line or an HTTP request body

Vetted = str | types.JSONRPCError | None  # pass this text on / send this reply / nothing there (blank)


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
        batch = " (batches are not supported)" if isinstance(message, list) else ""
        return error_reply(None, types.INVALID_REQUEST,
                           f"Invalid Request: a message is a JSON object, not {_json_kind(message)}{batch}")
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
        return "an array"
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
