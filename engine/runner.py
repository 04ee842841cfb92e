"""The one process runner every agent and check goes through.

It spawns an argv (never a shell) in its own process group, streams each line as it comes, and
on timeout, cancellation or exit kills the whole group (TERM, then KILL after a grace period), so
no child an agent started outlives its attempt. This is the engine's seam to where attempts run:
a distributed runner would take the same Invocation and give the same lines and exit.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import anyio
from anyio.abc import ByteReceiveStream, Process

from adapters.base import Invocation

MAX_LINE = 256 * 1024  # longer lines are cut: one runaway line must not hold the whole output in memory
MAX_ARG_STRLEN = 131072  # Linux: the most one argv or environment string may hold
DRAIN_S = 2.0  # after the group is dead, how long pipes may stay open with nothing coming through them

LineSink = Callable[[str, str], Awaitable[None]]


class SpawnError(OSError):
    """The program could not be started at all; the message says why and what to do."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


@dataclass
class RunResult:
    exit_code: int | None
    timed_out: bool = False


def _stat(pid: int | str) -> list[bytes] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces and parentheses: split after its closing one.
        fields = stat[stat.rindex(b")") + 2:].split()
    except (OSError, ValueError):  # gone, or vanished between open and read
        return None
    return fields if len(fields) > 19 else None


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, a name no other process has."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs. Zombies do not count: an init that reaps
    orphans late would otherwise keep a dead group 'alive' for seconds."""
    return _look(pgid, None)[0]


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# Marking: a process that leaves the group (setsid, a double-forking daemon) keeps the environment
# it was started with, so the run's marker still names it. /proc/PID/environ is the environment the
# process was exec'd with; only a program exec'd with a cleared environment escapes the mark.

MARKER_VAR = "CLI_COUNCIL_RUN"


def _needle(marker: str) -> bytes:
    if not marker or "\0" in marker:
        raise ValueError(f"invalid run marker {marker!r}: must be non-empty and hold no NUL byte")
    return f"\0{MARKER_VAR}={marker}\0".encode()


def marked_pids(marker: str) -> list[int]:
    """Live (non-zombie) processes of this uid, other than this one, whose environment holds
    CLI_COUNCIL_RUN=<marker> exactly. Processes that vanish or cannot be read are skipped."""
    return [pid for pid, _ in _marked(marker)]


def _marked(marker: str) -> list[tuple[int, int]]:
    """(pid, start time) of each live marked process."""
    return _look(None, marker)[1]


def _look(pgid: int | None, marker: str | None) -> tuple[bool, list[tuple[int, int]]]:
    """One pass over /proc for both questions a stop asks: whether group `pgid` has a live (non-zombie)
    process, and (pid, start time) of each live process of this uid, other than this one, carrying
    `marker`. Without /proc, the group is asked with signal 0 and nothing can be found by its mark."""
    needle, uid, me = (_needle(marker) if marker is not None else None), os.getuid(), os.getpid()
    alive, found = False, []
    try:
        entries = list(os.scandir("/proc")) if os.path.isdir("/proc/self") else None
    except OSError:
        entries = None
    if entries is None:
        return pgid is not None and _killpg_alive(pgid), found
    for entry in entries:
        if not entry.name.isdigit():
            continue
        if pgid is not None and not alive:
            fields = _stat(entry.name)
            alive = bool(fields) and int(fields[2]) == pgid and fields[0] != b"Z"
        if needle is None or int(entry.name) == me:
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in b"\0" + env + b"\0":
            fields = _stat(entry.name)
            if fields and fields[0] != b"Z":
                found.append((int(entry.name), int(fields[19])))
    return alive, found


def _killpg_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _running(pid: int, start: int) -> bool:
    """Whether this very process (not a reuse of its pid) has yet to become a zombie."""
    fields = _stat(pid)
    return bool(fields) and int(fields[19]) == start and fields[0] != b"Z"


def _signal_found(found: list[tuple[int, int]], sig: int, signalled: dict[int, int]) -> bool:
    """Send sig to every marked process found (TERM only to those not sent it yet) and note them in
    signalled. Whether any is left, counting those signalled before that are still dying:
    a dying process loses its environment before it becomes a zombie."""
    for pid, start in found:
        if sig != signal.SIGTERM or signalled.get(pid) != start:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        signalled[pid] = start
    return bool(found) or any(_running(pid, start) for pid, start in signalled.items())


KILL_ROUNDS_S = 2.0  # how long KILL keeps sweeping for marked processes that forked meanwhile


async def _stop(pgid: int | None, marker: str | None, grace_s: float, proc: Process | None) -> dict[int, int]:
    """TERM the group and the marked processes, wait up to grace_s for them all to go, then KILL
    what is left (sweeping again for any that forked meanwhile). Returns the marked processes
    signalled (pid: start time)."""
    signalled: dict[int, int] = {}

    def look_and_signal(sig: int, group: bool, reaped: bool) -> tuple[bool, bool]:
        alive, found = _look(pgid, marker)
        # Once the leader is reaped and the group empty, its id may be reused: leave it alone then.
        if group and pgid is not None and (not reaped or alive):
            signal_group(pgid, sig)
        return alive, _signal_found(found, sig, signalled)

    async def sweep(sig: int, group: bool = True) -> tuple[bool, bool]:
        """Signal the marked processes, and the group unless only looking for new marked ones, from
        one look at /proc in a worker thread (it reads every process's stat and environ: not on the
        loop): is the group alive, is any marked one left?"""
        reaped = proc is not None and proc.returncode is not None
        return await anyio.to_thread.run_sync(look_and_signal, sig, group, reaped)

    alive, left = await sweep(signal.SIGTERM)
    with anyio.move_on_after(grace_s):
        while alive or left or (proc is not None and proc.returncode is None):
            if proc is not None and proc.returncode is None:
                with anyio.move_on_after(0.05):
                    await proc.wait()
            else:
                await anyio.sleep(0.05)
            alive, left = await sweep(signal.SIGTERM, group=False)  # TERM any marked one started since
        return signalled
    with anyio.move_on_after(KILL_ROUNDS_S):
        while any(await sweep(signal.SIGKILL)):
            await anyio.sleep(0.01)
    if proc is not None:
        await proc.wait()
    return signalled


async def stop_group(pgid: int, grace_s: float, proc: Process | None = None, marker: str | None = None) -> None:
    """TERM the group (and the processes carrying marker), wait up to grace_s, then KILL what is left."""
    await _stop(pgid, marker, grace_s, proc)


async def stop_marked(marker: str, grace_s: float) -> int:
    """Stop every process carrying this run's marker, e.g. those a crashed host left behind:
    TERM, then KILL after grace_s. Returns how many were signalled."""
    _needle(marker)
    return len(await _stop(None, marker, grace_s, None))


async def stop_recorded_group(pgid: int, start_time: int | None, grace_s: float) -> bool:
    """Stop a group another process started, only if its leader is still the process we recorded
    (a reused pid is never signalled). Returns whether anything was signalled."""
    if start_time is not None and proc_start_time(pgid) != start_time:
        return False
    if not group_alive(pgid):
        return False
    await stop_group(pgid, grace_s)
    return True


async def _pump(stream: ByteReceiveStream | None, name: str, sink: LineSink, seen: list[float]) -> None:
    """Lines to the sink; `seen[0]` is when output last moved, so the drain waits for a slow reader."""
    if stream is None:
        return
    buf = b""
    try:
        async for chunk in stream:
            seen[0] = time.monotonic()
            buf += chunk
            while (nl := buf.find(b"\n")) >= 0:
                line, buf = buf[:nl], buf[nl + 1:]
                await sink(name, line[:MAX_LINE].decode(errors="replace").rstrip("\r"))
                seen[0] = time.monotonic()
            if len(buf) > MAX_LINE:  # a line with no end in sight: flush what fits, drop the rest of it
                await sink(name, buf[:MAX_LINE].decode(errors="replace"))
                buf = b""
    except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass
    if buf:
        await sink(name, buf.decode(errors="replace").rstrip("\r"))


def _spawn_error(inv: Invocation, env: dict[str, str] | None, e: Exception) -> SpawnError:
    """Why the program could not start, said so that the reader knows what to change."""
    prog = str(inv.argv[0])
    shown = prog if len(prog) <= 80 else prog[:60] + f"... ({len(prog.encode())} bytes)"
    head = f"cannot start {shown!r}"
    if isinstance(e, ValueError) and "null" in str(e):
        if "\0" in str(inv.cwd):
            where = "the working directory"
        elif any("\0" in k or "\0" in v for k, v in (env or {}).items()):
            where = "an environment variable"
        else:
            where = f"argument #{next((i for i, a in enumerate(inv.argv) if chr(0) in str(a)), 0)}"
        return SpawnError(errno.EINVAL, f"{head}: {where} holds a NUL byte, which no program can receive — remove it")
    if not isinstance(e, OSError):
        return SpawnError(errno.EINVAL, f"{head}: {e}")
    code, reason = e.errno, e.strerror or str(e)
    cwd = str(inv.cwd)
    if e.filename is not None and str(e.filename) == cwd != prog:
        return SpawnError(code, f"{head}: its working directory {cwd} cannot be entered ({reason}); was it removed?")
    try:
        hint = _hint(inv, env, code, prog, Path(cwd, prog))
    except OSError:  # the path cannot even be looked at: the reason alone will do
        hint = ""
    return SpawnError(code, f"{head}: {reason}" + (f" — {hint}" if hint else ""))


def _hint(inv: Invocation, env: dict[str, str] | None, code: int | None, prog: str, path: Path) -> str:
    """What to do about an exec failure."""
    if code == errno.ENOENT:
        if "/" not in prog:
            return "no such program on PATH: install it or give its full path"
        if path.is_file():
            return f"its #! interpreter was not found ({_first_line(path)!r}): fix the #! line or install it"
        return "no such file"
    if code == errno.EACCES:
        if path.is_dir():
            return "it is a directory"
        return "it is not executable: make it executable (chmod +x) or run it through its interpreter"
    if code == errno.ENOEXEC:
        return "a script needs a #! line (e.g. #!/bin/sh), or run it through its interpreter"
    if code == errno.ENOTDIR:
        return "a part of its path is not a directory"
    if code == errno.ENAMETOOLONG:
        longest = max(len(part.encode()) for part in prog.split("/"))
        return (f"the path is {len(prog.encode())} bytes and its longest name {longest} bytes; at most "
                f"{os.pathconf('/', 'PC_PATH_MAX') - 1} bytes for a path and 255 for one name")
    if code == errno.E2BIG:
        sizes = [len(str(a).encode()) + 1 for a in inv.argv]
        environ = os.environ if env is None else env
        total = sum(sizes) + sum(len(k.encode()) + len(v.encode()) + 2 for k, v in environ.items())
        i = max(range(len(sizes)), key=sizes.__getitem__)
        return (f"{len(sizes)} arguments and the environment take {total:,} bytes, the largest (argument #{i}) "
                f"{sizes[i] - 1:,} bytes; one argument may hold at most {MAX_ARG_STRLEN - 1:,} bytes and all of "
                f"them with the environment about {os.sysconf('SC_ARG_MAX'):,}: pass long text on stdin or in a file")
    return ""


def _first_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.readline(200).decode(errors="replace").rstrip()
    except OSError:
        return ""


async def run(inv: Invocation, *, timeout_s: float, on_line: LineSink,
              on_start: Callable[[int], Awaitable[None]] | None = None, kill_grace_s: float = 5.0,
              marker: str | None = None) -> RunResult:
    """Run one invocation to its end. When it ends, times out, the caller is cancelled or on_line
    raises, its process group and every process carrying `marker` (CLI_COUNCIL_RUN in the
    environment, inherited by all it starts) are stopped before this returns or raises.
    A program that cannot start raises SpawnError; an exception from on_line or on_start
    propagates after the processes are stopped."""
    env = inv.env
    if marker is not None:
        _needle(marker)
        env = {**(os.environ if env is None else env), MARKER_VAR: marker}
    if not inv.argv:
        raise SpawnError(errno.EINVAL, "cannot start anything: the command is empty")
    try:
        proc = await anyio.open_process(
            inv.argv, cwd=str(inv.cwd), env=env, start_new_session=True,
            stdin=subprocess.PIPE if inv.stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except (OSError, ValueError, TypeError) as e:
        raise _spawn_error(inv, env, e) from None
    pgid = proc.pid
    timed_out = stopped = False
    sink_error: list[Exception] = []
    try:
        if on_start is not None:
            await on_start(pgid)
        async with anyio.create_task_group() as tg:
            done = [anyio.Event(), anyio.Event()]
            seen = [time.monotonic()]

            async def pump(stream, name, ev):
                try:
                    await _pump(stream, name, on_line, seen)
                except Exception as e:  # the sink failed: stop the run, raise it once all is dead
                    sink_error.append(e)
                    tg.cancel_scope.cancel()
                finally:
                    ev.set()

            tg.start_soon(pump, proc.stdout, "stdout", done[0])
            tg.start_soon(pump, proc.stderr, "stderr", done[1])
            if inv.stdin is not None:
                tg.start_soon(_feed, proc, inv.stdin)
            with anyio.move_on_after(timeout_s) as scope:
                await proc.wait()
            timed_out = scope.cancelled_caught
            # Reap whatever the agent left running, then let the pipes drain.
            await stop_group(pgid, kill_grace_s if timed_out else min(kill_grace_s, 1.0), proc, marker)
            stopped = True
            # Read what is left in the pipes however slowly the sink takes it (a loaded machine must
            # not lose the end of the output); give up only on a pipe an escaped process holds open
            # with nothing coming through.
            while not all(ev.is_set() for ev in done) and (idle := time.monotonic() - seen[0]) < DRAIN_S:
                with anyio.move_on_after(DRAIN_S - idle):
                    for ev in done:
                        await ev.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if not stopped:
                await stop_group(pgid, kill_grace_s, proc, marker)
            await proc.aclose()
    if sink_error:
        raise sink_error[0]
    return RunResult(exit_code=None if timed_out else proc.returncode, timed_out=timed_out)


async def _feed(proc: Process, data: bytes) -> None:
    try:
        await proc.stdin.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    finally:
        await proc.stdin.aclose()
