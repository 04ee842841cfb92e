"""Checks on what callers send, shared by every surface (MCP tools, command line).

The engine trusts nothing that crosses its boundary: a NUL byte, a lone surrogate, an infinite
number or an oversized string would otherwise surface deep inside as a subprocess, SQLite or JSON
error. Each check raises CouncilError with what is wrong and what to do, before anything changes.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from adapters.base import Invocation

MAX_ARG_BYTES = 128 * 1024 - 1  # Linux's MAX_ARG_STRLEN (32 pages) less the terminating NUL
MAX_CHECK_BYTES = 8192  # a check is a command line, not a script: put long ones in a file
MAX_REF_BYTES = 1024
MAX_PATH_BYTES = 4096
MAX_AGENTS = 64
MAX_AGENT_BYTES = 64  # config.AGENT_NAME allows 64 characters
MAX_TIMEOUT_S = 7 * 86400
MAX_CURSOR = 2**62  # SQLite integers are 64-bit
TASK_ID = re.compile(r"[0-9a-f]{12}")


class CouncilError(ValueError):
    """Bad input or a request that cannot be met; the message says what to do. Nothing was changed."""


class NotFound(CouncilError):
    pass


def text(name: str, value: object, *, max_bytes: int, empty_ok: bool = False, hint: str = "") -> str:
    """A string that can travel as an argv element, a SQLite value and JSON."""
    if not isinstance(value, str):
        raise CouncilError(f"{name} must be a string, got {type(value).__name__}")
    if "\0" in value:
        raise CouncilError(f"{name} contains a NUL byte, which no command line or file name can hold; remove it")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise CouncilError(f"{name} is not valid Unicode text (it holds a lone surrogate); send UTF-8 text") from None
    if size > max_bytes:
        raise CouncilError(f"{name} is {size} bytes; the limit is {max_bytes}" + (f": {hint}" if hint else ""))
    if not empty_ok and not value.strip():
        raise CouncilError(f"{name} is empty")
    return value


def agent(value: object) -> str:
    """An agent name as callers send it; whether it is configured is the config's to say."""
    return text("agent", value, max_bytes=MAX_AGENT_BYTES)


def number(name: str, value: object, *, low: float, high: float, low_open: bool = False) -> float:
    """A finite number within [low, high] (or (low, high] with low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CouncilError(f"{name} must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise CouncilError(f"{name} must be a finite number, got {value}")
    if value < low or (low_open and value == low) or value > high:
        lo = f"> {low:g}" if low_open else f">= {low:g}"
        raise CouncilError(f"{name} must be {lo} and <= {high:g}, got {value:g}")
    return value


def task_id(value: object) -> str:
    if not isinstance(value, str) or not TASK_ID.fullmatch(value):
        shown = repr(value[:40]) + ("..." if len(value) > 40 else "") if isinstance(value, str) else repr(value)[:40]
        raise NotFound(f"no task {shown}: task ids are 12 hex digits; list_tasks (or `cli-council status`) "
                       "shows the known ones")
    return value


def ref(name: str, value: object) -> str:
    value = text(name, value, max_bytes=MAX_REF_BYTES)
    if value.startswith("-") or value != value.strip():
        raise CouncilError(f"{name} {value!r} is not a valid git ref")
    return value


def repo_path(value: object, allowed_roots: list[str]) -> Path:
    """An absolute directory path, inside one of allowed_roots when any are configured."""
    path = Path(text("repo", value, max_bytes=MAX_PATH_BYTES)).expanduser()
    if not path.is_absolute():
        raise CouncilError(f"repo {value!r} is not an absolute path: give the full path of the repository "
                           "(a server has no current directory of yours to resolve it against)")
    if allowed_roots:
        real = path.resolve()
        roots = [Path(r).expanduser().resolve() for r in allowed_roots]
        if not any(real == r or r in real.parents for r in roots):
            raise CouncilError(f"repo {str(path)!r} is outside the directories this server may work in "
                               f"([server] allowed_roots: {', '.join(map(str, roots))})")
    return path


def argv_fits(agent: str, inv: Invocation) -> None:
    """The kernel refuses one argument over MAX_ARG_STRLEN and argv + env over ARG_MAX: say so now,
    with the prompt and the framing the adapter adds counted, not when the agent fails to start."""
    largest = max((len(a.encode()) for a in inv.argv), default=0)
    if largest > MAX_ARG_BYTES:
        raise CouncilError(f"the prompt is too long for {agent}: with the council's framing one argument is "
                           f"{largest} bytes and Linux allows {MAX_ARG_BYTES}; put the details in a file in the "
                           "repo and refer to it in a shorter prompt")
    total = sum(len(a.encode()) + 1 + 8 for a in inv.argv)
    total += sum(len(k.encode()) + len(v.encode()) + 2 + 8 for k, v in inv.env.items())
    limit = os.sysconf("SC_ARG_MAX") - 16 * 1024  # headroom for what the runner adds (TMPDIR, marker)
    if total > limit:
        raise CouncilError(f"the command line for {agent} would be {total} bytes (limit {limit}); "
                           "shorten the prompt or the check")
