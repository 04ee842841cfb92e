"""The runner leaves no process behind and turns every failure to start into a SpawnError.

Real subprocesses throughout: an "agent" (python -c) starts a grandchild that calls setsid() (so it
leaves the agent's process group) and ignores SIGTERM, the hardest child to reap. Every test kills
what it started through the pid files, whatever the runner did.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anyio
import pytest

from adapters.base import Invocation
from engine import runner
from engine.runner import SpawnError
from tests.conftest import pid_running

# Leaves the group, ignores TERM, writes its pid (atomically) to argv[1], sleeps.
ESCAPEE = """
import os, signal, sys, time
os.setsid()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(3600)
"""

# A daemon: forks, the child calls setsid() and forks again, both parents exit at once.
DAEMON = """
import os, signal, sys, time
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(3600)
"""

# The agent: starts the escapee (argv[1]: ESCAPEE or DAEMON source), waits until it is up,
# says so, then sleeps argv[3] seconds and exits 0.
AGENT = """
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
print("escapee up", flush=True)
time.sleep(float(sys.argv[3]))
"""


@pytest.fixture
def pidfiles(tmp_path):
    """Hands out pid file paths; at teardown KILLs every pid written to one, whatever happened."""
    made: list[Path] = []

    def new() -> Path:
        made.append(tmp_path / f"pid{len(made)}")
        return made[-1]

    yield new
    for path in made:
        try:
            os.kill(int(path.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture
def marker() -> str:
    return f"test-{uuid.uuid4().hex}"


def agent(tmp_path: Path, pidfile: Path, sleep_s: float, source: str = ESCAPEE) -> Invocation:
    return Invocation(argv=[sys.executable, "-c", AGENT, source, str(pidfile), str(sleep_s)],
                      env=dict(os.environ), cwd=tmp_path)


def escapee_pid(pidfile: Path) -> int:
    assert pidfile.exists(), "the escapee never started: the test proves nothing"
    return int(pidfile.read_text())


async def collect(lines: list[str]):
    async def on_line(stream: str, text: str) -> None:
        lines.append(text)
    return on_line


@pytest.mark.parametrize("source", [ESCAPEE, DAEMON], ids=["setsid", "double-fork"])
async def test_escaped_grandchild_is_gone_after_normal_exit(tmp_path, pidfiles, marker, source):
    pidfile = pidfiles()
    lines: list[str] = []
    result = await runner.run(agent(tmp_path, pidfile, 0, source), timeout_s=60, on_line=await collect(lines),
                              kill_grace_s=0.5, marker=marker)
    assert result.exit_code == 0 and "escapee up" in lines
    assert not pid_running(escapee_pid(pidfile))
    assert runner.marked_pids(marker) == []


async def test_without_a_marker_the_grandchild_escapes_the_group(tmp_path, pidfiles):
    """Why the marker exists: killing the process group alone misses a setsid() child."""
    pidfile = pidfiles()
    await runner.run(agent(tmp_path, pidfile, 0), timeout_s=60, on_line=await collect([]), kill_grace_s=0.5)
    assert pid_running(escapee_pid(pidfile))


async def test_escaped_grandchild_is_gone_after_a_timeout(tmp_path, pidfiles, marker):
    pidfile = pidfiles()
    lines: list[str] = []
    result = await runner.run(agent(tmp_path, pidfile, 3600), timeout_s=5, on_line=await collect(lines),
                              kill_grace_s=0.5, marker=marker)
    assert result.timed_out and result.exit_code is None
    assert "escapee up" in lines, "the timeout came before the escapee started: the test proves nothing"
    assert not pid_running(escapee_pid(pidfile))


async def test_escaped_grandchild_is_gone_after_the_caller_is_cancelled(tmp_path, pidfiles, marker):
    pidfile = pidfiles()
    up = anyio.Event()
    pgids: list[int] = []

    async def on_line(stream: str, text: str) -> None:
        if text == "escapee up":
            up.set()

    async def on_start(pgid: int) -> None:
        pgids.append(pgid)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            async def go():
                await runner.run(agent(tmp_path, pidfile, 3600), timeout_s=3600, on_line=on_line,
                                 on_start=on_start, kill_grace_s=0.5, marker=marker)
            tg.start_soon(go)
            await up.wait()
            tg.cancel_scope.cancel()
    assert not pid_running(escapee_pid(pidfile))
    assert not runner.group_alive(pgids[0])


async def test_an_on_line_that_raises_propagates_after_everything_is_stopped(tmp_path, pidfiles, marker):
    pidfile = pidfiles()
    # The agent also floods stdout, so a runner that stopped reading would leave it blocked on the pipe.
    inv = agent(tmp_path, pidfile, 0)
    inv.argv[2] = AGENT.replace("time.sleep(float(sys.argv[3]))", "while True: print('x' * 1000, flush=True)")
    pgids: list[int] = []

    async def on_line(stream: str, text: str) -> None:
        if text == "escapee up":
            raise RuntimeError("sink broke")

    async def on_start(pgid: int) -> None:
        pgids.append(pgid)

    with anyio.fail_after(60), pytest.raises(RuntimeError, match="sink broke"):
        await runner.run(inv, timeout_s=3600, on_line=on_line, on_start=on_start, kill_grace_s=0.5, marker=marker)
    assert not pid_running(escapee_pid(pidfile))
    assert not runner.group_alive(pgids[0])


async def test_an_on_start_that_raises_leaves_no_process(tmp_path, pidfiles, marker):
    pidfile = pidfiles()
    pgids: list[int] = []

    async def on_start(pgid: int) -> None:
        pgids.append(pgid)
        while not pidfile.exists():  # let the escapee get away first
            await anyio.sleep(0.02)
        raise RuntimeError("store broke")

    with anyio.fail_after(60), pytest.raises(RuntimeError, match="store broke"):
        await runner.run(agent(tmp_path, pidfile, 3600), timeout_s=3600, on_line=await collect([]),
                         on_start=on_start, kill_grace_s=0.5, marker=marker)
    assert not pid_running(escapee_pid(pidfile))
    assert not runner.group_alive(pgids[0])


async def test_the_marker_reaches_the_child_and_the_callers_env_is_untouched(tmp_path, marker):
    env = dict(os.environ)
    env.pop(runner.MARKER_VAR, None)
    lines: list[str] = []
    inv = Invocation(argv=[sys.executable, "-c", f"import os; print(os.environ['{runner.MARKER_VAR}'])"],
                     env=env, cwd=tmp_path)
    await runner.run(inv, timeout_s=60, on_line=await collect(lines), marker=marker)
    assert lines == [marker] and runner.MARKER_VAR not in env


def start_marked(env_marker: str | None, pidfile: Path, var: str = runner.MARKER_VAR) -> subprocess.Popen:
    """A process as a crashed host would leave it: its own session, TERM ignored, marked."""
    env = dict(os.environ)
    env.pop(runner.MARKER_VAR, None)
    if env_marker is not None:
        env[var] = env_marker
    return subprocess.Popen([sys.executable, "-c", ESCAPEE, str(pidfile)], env=env)  # ESCAPEE calls setsid()


async def test_stop_marked_kills_exactly_what_a_crashed_host_left_behind(tmp_path, pidfiles, marker):
    files = [pidfiles() for _ in range(4)]
    procs = {name: start_marked(m, file, var) for file, (name, m, var) in zip(files, [
        ("ours", marker, runner.MARKER_VAR),
        ("longer marker", marker + "x", runner.MARKER_VAR),
        ("prefix", marker[:-1], runner.MARKER_VAR),
        ("other variable", marker, "OTHER_RUN"),
    ])}
    try:
        with anyio.fail_after(30):
            while not all(f.exists() for f in files):  # until each has left its session and ignores TERM
                await anyio.sleep(0.02)
        assert runner.marked_pids(marker) == [procs["ours"].pid]
        assert await runner.stop_marked(marker, grace_s=0.5) == 1
        assert not pid_running(procs["ours"].pid)
        assert runner.marked_pids(marker) == []  # the zombie (not yet waited for) does not count
        assert all(pid_running(p.pid) for name, p in procs.items() if name != "ours")
        assert await runner.stop_marked(marker, grace_s=0.5) == 0
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


async def test_bad_markers_are_refused(tmp_path):
    for bad in ("", "a\0b"):
        with pytest.raises(ValueError):
            runner.marked_pids(bad)
        with pytest.raises(ValueError):
            await runner.stop_marked(bad, 0.1)


def spawn_cases(tmp: Path) -> list[tuple[str, list[str], dict | None, Path, str]]:
    """(id, argv, env, cwd, what the message must say)."""
    (tmp / "runtests").write_text("echo no shebang\n")
    (tmp / "runtests").chmod(0o755)
    (tmp / "plain.sh").write_text("#!/bin/sh\necho hi\n")
    (tmp / "badinterp").write_text("#!/no/such/interpreter\necho hi\n")
    (tmp / "badinterp").chmod(0o755)
    (tmp / "adir").mkdir()
    (tmp / "afile").write_text("")
    py = sys.executable
    return [
        ("not on PATH", ["no-such-program-cli-council"], None, tmp, "no such program on PATH"),
        ("no such file", ["./missing"], None, tmp, "No such file or directory — no such file"),
        ("no shebang", ["./runtests"], None, tmp,
         "cannot start './runtests': Exec format error — a script needs a #! line"),
        ("not executable", ["./plain.sh"], None, tmp, "chmod +x"),
        ("bad interpreter", ["./badinterp"], None, tmp, "#! interpreter was not found ('#!/no/such/interpreter')"),
        ("a directory", ["./adir"], None, tmp, "it is a directory"),
        ("not a directory", ["./afile/x"], None, tmp, "is not a directory"),
        ("name too long", ["./" + "a" * 300], None, tmp, "File name too long — the path is 302 bytes and its longest name 300"),
        ("argument too long", [py, "-c", "pass", "x" * 200_000], None, tmp,
         "Argument list too long — 4 arguments and the environment take"),
        ("arguments too long in all", [py, "-c", "pass", *["x" * 100_000] * 40], None, tmp,
         "the largest (argument #3) 100,000 bytes"),
        ("NUL in argument", [py, "-c", "pass", "a\0b"], None, tmp, "argument #3 holds a NUL byte"),
        ("NUL in environment", [py, "-c", "pass"], {"A": "a\0b"}, tmp, "an environment variable holds a NUL byte"),
        ("working directory gone", [py, "-c", "pass"], None, tmp / "gone", f"working directory {tmp / 'gone'} cannot be entered"),
        ("empty command", [], None, tmp, "the command is empty"),
        ("not a string", [py, "-c", "pass", None], None, tmp, "expected str, bytes or os.PathLike object"),
    ]


@pytest.mark.parametrize("case", range(15))
async def test_each_spawn_failure_is_a_spawn_error_that_says_what_to_do(tmp_path, case, marker):
    cases = spawn_cases(tmp_path)
    assert len(cases) == 15
    name, argv, env, cwd, message = cases[case]
    env = dict(os.environ) if env is None else env
    with pytest.raises(SpawnError) as info:
        await runner.run(Invocation(argv=argv, env=env, cwd=cwd), timeout_s=10, on_line=await collect([]),
                         marker=marker)
    assert message in str(info.value), name
    assert "[Errno" not in str(info.value)


async def test_a_large_argument_in_the_message_is_measured_not_quoted(tmp_path):
    argv = [sys.executable, "-c", "pass", "secret-ish prompt " * 12_000]
    with pytest.raises(SpawnError) as info:
        await runner.run(Invocation(argv=argv, env=dict(os.environ), cwd=tmp_path), timeout_s=10,
                         on_line=await collect([]))
    assert "secret-ish" not in str(info.value) and "216,000 bytes" in str(info.value)


def test_marked_pids_survives_processes_vanishing_mid_scan(marker):
    """Many short-lived marked processes come and go while we scan: no exception, no zombie listed."""
    env = {**os.environ, runner.MARKER_VAR: marker}
    procs = [subprocess.Popen([sys.executable, "-c", "pass"], env=env) for _ in range(20)]
    try:
        deadline = time.monotonic() + 30
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            for pid in runner.marked_pids(marker):
                assert pid in {p.pid for p in procs}
        assert all(p.poll() is not None for p in procs)
        assert runner.marked_pids(marker) == []
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_the_scan_bench_prints_its_figures():
    bench = Path(__file__).parents[1] / "bench" / "proc_scan.py"
    out = subprocess.run([sys.executable, str(bench), "--procs", "1", "--marked", "2", "--rounds", "3"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    doc = json.loads(out)
    assert doc["bench"] == "proc_scan" and doc["marked"] == 2 and doc["marked_pids_ms"]["p50"] > 0


@pytest.mark.skipif(os.getuid() != 0, reason="starting a process as another user needs root")
async def test_another_users_marked_process_is_left_alone(tmp_path, marker):
    theirs = subprocess.Popen(["sleep", "600"], env={**os.environ, runner.MARKER_VAR: marker}, user=65534, cwd="/")
    try:
        with anyio.fail_after(30):
            while Path(f"/proc/{theirs.pid}/exe").resolve().name != "sleep":  # until it has exec'd
                await anyio.sleep(0.02)
        assert runner.marked_pids(marker) == []
        assert await runner.stop_marked(marker, grace_s=0.1) == 0 and pid_running(theirs.pid)
    finally:
        theirs.kill()
        theirs.wait()


async def test_a_slow_reader_still_gets_every_line_after_the_process_exits(tmp_path):
    """The process prints 300 lines and exits at once; the sink takes 3 s to read them (longer than
    the drain grace), as a loaded machine would. Nothing may be lost."""
    got = []

    async def slow(stream: str, text: str) -> None:
        await anyio.sleep(0.01)
        got.append(text)

    inv = Invocation(argv=[sys.executable, "-c", "for i in range(300): print(i)"], env=dict(os.environ), cwd=tmp_path)
    result = await runner.run(inv, timeout_s=60, on_line=slow, kill_grace_s=1)
    assert result.exit_code == 0 and got == [str(i) for i in range(300)]
