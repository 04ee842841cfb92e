"""An attempt's changes as a patch, read from git without holding more than the caller asked for.

An agent can write gigabytes; the patch is read from `git diff` as a stream and git is stopped as
soon as max_bytes (plus a small margin, so a secret across the cut is still redacted whole) have
arrived. Programs a repo's config could name for diffs (diff.external, textconv) are switched off:
an agent can write that config, and this git runs on the server's behalf.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import anyio

from adapters.base import redact

from .gitcmd import NO_HOOKS, GitError, git_env, numstat
from .models import DiffFile

MAX_BYTES = 10_000_000
_MARGIN = 4096  # read past the cut, so redaction sees a secret the cut would split
_STDERR_KEEP = 65536
# Fixed output whatever the repo's config says (color, prefixes, relative paths, external tools).
_PATCH = ("diff", "--no-color", "--no-ext-diff", "--no-textconv", "--no-renames", "--no-relative",
          "--src-prefix=a/", "--dst-prefix=b/")


async def git_head(cwd: str | Path, *args: str, max_bytes: int) -> tuple[bytes, bool]:
    """The first max_bytes of git's stdout and whether there was more; git is killed once it has
    written that much, so memory stays bounded whatever the output's size. Its own process group,
    so a program git started cannot keep the pipes (and this call) open after the cut."""
    out, err, more = bytearray(), bytearray(), False
    async with await anyio.open_process(["git", *NO_HOOKS, *args], cwd=str(cwd), env=git_env(),
                                        stdin=subprocess.DEVNULL, start_new_session=True) as proc:
        async def drain_stderr() -> None:
            async for chunk in proc.stderr:
                err.extend(chunk[:max(0, _STDERR_KEEP - len(err))])

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain_stderr)
            async for chunk in proc.stdout:
                out.extend(chunk)
                if len(out) > max_bytes:
                    more = True
                    with contextlib.suppress(ProcessLookupError):  # git and whatever it started
                        os.killpg(proc.pid, signal.SIGKILL)
                    break
            code = await proc.wait()
    if not more and code != 0:
        raise GitError(list(args), code, err.decode(errors="replace"))
    return bytes(out[:max_bytes]), more


async def files(repo: str | Path, base: str, tip: str) -> list[DiffFile]:
    """Every file changed between two commits, with its line counts (binary files count none)."""
    return [DiffFile(path=path, insertions=ins or 0, deletions=dels or 0, binary=ins is None or dels is None)
            for path, ins, dels in await numstat(repo, base, tip)]


async def patch(repo: str | Path, base: str, tip: str, max_bytes: int, secrets: list[str]) -> tuple[str, bool]:
    """`git diff base tip`, secrets redacted, cut to at most max_bytes of UTF-8 at a line's end when
    one is in reach; and whether it was cut."""
    raw, more = await git_head(repo, *_PATCH, base, tip, "--", max_bytes=max_bytes + _MARGIN)
    data = redact(raw.decode(errors="replace"), secrets).encode()
    if not more and len(data) <= max_bytes:
        return data.decode(), False
    cut = data[:max_bytes]
    line_end = cut.rfind(b"\n")
    if line_end >= 0:
        cut = cut[:line_end + 1]
    return cut.decode(errors="ignore"), True
