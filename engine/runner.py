"""The one process runner every agent and check goes through.

It spawns an argv (never a shell) in its own process group, streams each line as it comes, and
on timeout, cancellation or exit kills the whole group (TERM, then KILL after a grace period), so
no child an agent started outlives its attempt. This is the engine's seam to where attempts run:
a distributed runner would take the same Invocation and give the same lines and exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from typing import Awaitable, Callable

import anyio
from anyio.abc import ByteReceiveStream, Process

from adapters.base import Invocation

MAX_LINE = 256 * 1024  # longer lines are cut: one runaway line must not hold the whole output in memory
DRAIN_S = 2.0  # after the group is dead, how long pipes held by escaped grandchildren may stay open

LineSink = Callable[[str, str], Awaitable[None]]


class SpawnError(OSError):
    """The program could not be started at all (not found, not executable)."""


@dataclass
class RunResult:
    exit_code: int | None
    timed_out: bool = False


def _stat(pid: int | str) -> list[bytes] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    return stat[stat.rindex(b")") + 2:].split()


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, a name no other process has."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs. Zombies do not count: an init that reaps
    orphans late would otherwise keep a dead group 'alive' for seconds."""
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(entry.name)
            if fields and int(fields[2]) == pgid and fields[0] != b"Z":
                return True
    return False


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def stop_group(pgid: int, grace_s: float, proc: Process | None = None) -> None:
    """TERM the group, wait up to grace_s for it to go, then KILL what is left."""
    signal_group(pgid, signal.SIGTERM)
    with anyio.move_on_after(grace_s):
        while True:
            if proc is not None and proc.returncode is None:
                with anyio.move_on_after(0.05):
                    await proc.wait()
            elif not group_alive(pgid):
                return
            else:
                await anyio.sleep(0.05)
    signal_group(pgid, signal.SIGKILL)
    if proc is not None:
        await proc.wait()


async def stop_recorded_group(pgid: int, start_time: int | None, grace_s: float) -> bool:
    """Stop a group another process started, only if its leader is still the process we recorded
    (a reused pid is never signalled). Returns whether anything was signalled."""
    if start_time is not None and proc_start_time(pgid) != start_time:
        return False
    if not group_alive(pgid):
        return False
    await stop_group(pgid, grace_s)
    return True


async def _pump(stream: ByteReceiveStream | None, name: str, sink: LineSink) -> None:
    if stream is None:
        return
    buf = b""
    try:
        async for chunk in stream:
            buf += chunk
            while (nl := buf.find(b"\n")) >= 0:
                line, buf = buf[:nl], buf[nl + 1:]
                await sink(name, line[:MAX_LINE].decode(errors="replace").rstrip("\r"))
            if len(buf) > MAX_LINE:  # a line with no end in sight: flush what fits, drop the rest of it
                await sink(name, buf[:MAX_LINE].decode(errors="replace"))
                buf = b""
    except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass
    if buf:
        await sink(name, buf.decode(errors="replace").rstrip("\r"))


async def run(inv: Invocation, *, timeout_s: float, on_line: LineSink,
              on_start: Callable[[int], Awaitable[None]] | None = None, kill_grace_s: float = 5.0) -> RunResult:
    """Run one invocation to its end. Cancelling the caller kills the process group first."""
    try:
        proc = await anyio.open_process(
            inv.argv, cwd=str(inv.cwd), env=inv.env, start_new_session=True,
            stdin=subprocess.PIPE if inv.stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
        raise SpawnError(e.errno, f"cannot start {inv.argv[0]!r}: {e.strerror}") from None
    pgid = proc.pid
    timed_out = False
    try:
        if on_start is not None:
            await on_start(pgid)
        async with anyio.create_task_group() as tg:
            done = [anyio.Event(), anyio.Event()]

            async def pump(stream, name, ev):
                try:
                    await _pump(stream, name, on_line)
                finally:
                    ev.set()

            tg.start_soon(pump, proc.stdout, "stdout", done[0])
            tg.start_soon(pump, proc.stderr, "stderr", done[1])
            if inv.stdin is not None:
                tg.start_soon(_feed, proc, inv.stdin)
            with anyio.move_on_after(timeout_s) as scope:
                await proc.wait()
            timed_out = scope.cancelled_caught
            # Reap whatever the agent left running in its group, then let the pipes drain.
            await stop_group(pgid, kill_grace_s if timed_out else min(kill_grace_s, 1.0), proc)
            with anyio.move_on_after(DRAIN_S):
                for ev in done:
                    await ev.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None or group_alive(pgid):
                await stop_group(pgid, kill_grace_s, proc)
            await proc.aclose()
    return RunResult(exit_code=None if timed_out else proc.returncode, timed_out=timed_out)


async def _feed(proc: Process, data: bytes) -> None:
    try:
        await proc.stdin.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    finally:
        await proc.stdin.aclose()
