"""Attempts on Dask distributed workers (`[runner] kind = "dask"`): many machines, one council.

An attempt's first step goes to whichever worker the scheduler picks: it receives the repo as a
git bundle of the attempt's branch at the base commit and clones it into a directory of its own.
Every later step (agent, check, commit, reset, result) is pinned to that worker. Processes run
there through the same process runner as here (process groups, timeouts, markers); their lines
come back as they are printed through the scheduler's event topic. The result branch comes back
as a bundle, fetched into the user's repo under the usual branch name.

Stopping: a cancelled run is stopped on its worker (the runner kills its group) before the
attempt ends; a WorkerPlugin stops any run whose task leaves `executing` otherwise (its client,
i.e. this server, went away). The scheduler must have `allowed-failures` 0, so that a worker dying
mid-run ends the attempt (interrupted) instead of starting the agent again elsewhere.
Argv and env are built here but carry none of this machine's paths: the interpreter, PATH, HOME,
TMPDIR and this package's root are the worker's own.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

import anyio
import anyio.from_thread
import anyio.lowlevel
from distributed import Client, Future, KilledWorker, WorkerPlugin, get_worker
from distributed.client import FutureCancelledError

from adapters.base import PACKAGE_ROOT, ErrorInfo, ErrorKind, Invocation, allowed_env

from . import runner
from .config import RunnerSettings
from .gitcmd import GitError, git
from .gitcmd import _run as _git_run
from .hosts import HostLost
from .models import AttemptState
from .pool import Workspace
from .worktrees import Worktrees, branch_name

if TYPE_CHECKING:
    from .engine import Engine
    from .models import Attempt, Task

TOPIC = "cli-council"  # one topic for every run: the scheduler keeps a bounded log per topic, forever
CONNECT_S = 10.0
STEP_S = 300.0  # a git step on a worker (clone, commit, bundle) answers within this, or the worker is lost
STOP_S = 30.0  # beyond the kill grace: how long a remote stop may take to confirm
END_S = 5.0  # after a run's result, how long its last lines may take to arrive
# A run's lines travel in batches: one scheduler event per line cost a message each way per line.
BATCH_S = 0.02  # a line waits at most this long on the worker
BATCH_BYTES = 64 * 1024  # or until this much is waiting
PENDING_BATCHES = 512  # batches the server holds for a run before it drops lines (and says so)
PYTHON = "{python}"  # argv[0] standing for the worker's own interpreter
MACHINE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR", "VIRTUAL_ENV", "XDG_CONFIG_HOME",
               "XDG_DATA_HOME", "XDG_CACHE_HOME")  # where things are on a machine: the worker's own


# On the worker ---------------------------------------------------------------------------------

@dataclass
class _Running:
    token: object  # the run's event loop, for cancelling it from another thread
    scope: anyio.CancelScope
    done: threading.Event
    root: Path  # the clone it runs in

    def stop(self) -> None:
        try:
            anyio.from_thread.run_sync(self.scope.cancel, token=self.token)
        except RuntimeError:  # its loop has already ended
            pass


_RUNNING: dict[str, _Running] = {}  # on a worker: Dask task key -> the run it executes
# On a worker: the key of the task that made a clone -> the clone's root. The server holds that
# task's future until the attempt ends; the scheduler releases it when the server goes away.
_CLONES: dict[str, Path] = {}


class Reaper(WorkerPlugin):
    """Stops a run whose task stops executing for any reason but its end: Future.cancel() alone
    leaves the subprocess running, e.g. when the server that submitted it is gone. Removes a clone
    once the task that made it is released (the attempt ended, or its server is gone). When a
    worker starts (a nanny's restart after a crash, or a new worker), the clones a dead worker on
    this machine left are removed, and the processes still running in them stopped by their markers."""

    name = "cli-council-reaper"

    def setup(self, worker) -> None:
        threading.Thread(target=anyio.run, args=(_reap_orphans,), daemon=True).start()

    def transition(self, key, start, finish, **kwargs):
        # Never block the worker's loop: stopping waits for processes to die.
        if start == "executing" and finish not in ("memory", "error") and (run := _RUNNING.get(key)):
            threading.Thread(target=run.stop, daemon=True).start()
        # Not while its clone is still being made (a cancelled clone ends as cancelled -> released).
        elif start != "executing" and finish in ("released", "forgotten") and (root := _CLONES.pop(key, None)):
            threading.Thread(target=_drop_clone, args=(root,), daemon=True).start()


def _drop_clone(root: Path) -> None:
    """Stop what still runs in the clone (its server is gone), then remove it."""
    runs = [run for run in list(_RUNNING.values()) if run.root == root]
    for run in runs:
        run.stop()
    for run in runs:
        run.done.wait(STOP_S)
    shutil.rmtree(root, ignore_errors=True)


CLONE = "cli-council-dask-"  # a clone's root: this prefix in the worker's temp dir
OWNER = "owner"  # in a clone's root: "pid start-time" of the worker process that made it
RUNS = "runs"  # in a clone's root: one file per running process, named by its marker


def _owner_alive(root: Path) -> bool:
    """Whether the worker process that made this clone still runs (not a reuse of its pid)."""
    try:
        pid, start = (int(x) for x in (root / OWNER).read_text().split())
    except (OSError, ValueError):  # half made, or not ours: its maker may still be writing it
        return True
    return runner.proc_start_time(pid) == start


async def _reap_orphans(grace_s: float = 5.0) -> None:
    for root in Path(tempfile.gettempdir()).glob(f"{CLONE}*"):
        if (root / OWNER).is_file() and not _owner_alive(root):
            for marker in [p.name for p in (root / RUNS).glob("*")]:
                await runner.stop_marked(marker, grace_s)
            await anyio.to_thread.run_sync(shutil.rmtree, root, True)


def _open(bundle: bytes, bundled: str, branch: str) -> tuple[str, str]:
    """A clone of the bundle (whose branch is `bundled`) on `branch` in a new directory; (this worker's
    address, the clone)."""
    root = Path(tempfile.mkdtemp(prefix=CLONE))
    _CLONES[get_worker().get_current_task()] = root
    (root / OWNER).write_text(f"{os.getpid()} {runner.proc_start_time(os.getpid())}")
    (root / RUNS).mkdir()
    (root / "base.bundle").write_bytes(bundle)
    work = root / "work"
    (root / "tmp").mkdir()
    try:
        anyio.run(partial(git, root, "clone", "--quiet", "--branch", bundled, str(root / "base.bundle"), str(work)))
        if bundled != branch:
            anyio.run(partial(git, work, "branch", "-m", bundled, branch))
    except GitError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"git clone of the bundle failed on the worker: {e.stderr[-500:]}") from None
    return get_worker().address, str(work)


def _local_env(env: dict[str, str], cwd: str) -> dict[str, str]:
    """The invocation's environment with this worker's own places filled in."""
    out = {**allowed_env(dict(os.environ)), **env, "TMPDIR": str(Path(cwd).parent / "tmp")}
    if "PYTHONPATH" in env:  # the server's had its package root first: ours goes there
        out["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env["PYTHONPATH"]) if p)
    return out


def _run(argv: list[str], env: dict[str, str], cwd: str, stdin: bytes | None, timeout_s: float,
         kill_grace_s: float, marker: str, run_id: str) -> tuple[int | None, bool, tuple[int, str] | None]:
    """One process to its end through the process runner, its lines sent as events as they come:
    (exit code, timed out, why it could not start: a user's setup, not the worker's failure)."""
    worker = get_worker()
    key = worker.get_current_task()
    argv = [sys.executable if i == 0 and a == PYTHON else a for i, a in enumerate(argv)]
    inv = Invocation(argv=argv, env=_local_env(env, cwd), cwd=Path(cwd), stdin=stdin)

    batch: list[tuple[str, str]] = []
    size = [0]

    def send() -> None:
        if batch:
            worker.log_event(TOPIC, {"run": run_id, "lines": batch.copy()})
            batch.clear()
            size[0] = 0

    async def on_line(stream: str, text: str) -> None:
        batch.append((stream, text))
        size[0] += len(text)
        if size[0] >= BATCH_BYTES:
            send()

    async def every_batch_s() -> None:
        while True:
            await anyio.sleep(BATCH_S)
            send()

    async def main() -> tuple[int | None, bool, tuple[int, str] | None]:
        with anyio.CancelScope() as scope:
            _RUNNING[key] = _Running(anyio.lowlevel.current_token(), scope, done, Path(cwd).parent)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(every_batch_s)
                    try:
                        result = await runner.run(inv, timeout_s=timeout_s, on_line=on_line,
                                                  kill_grace_s=kill_grace_s, marker=marker)
                    except runner.SpawnError as e:
                        return None, False, (e.errno, str(e))
                    finally:
                        tg.cancel_scope.cancel()
            finally:
                send()
            return result.exit_code, result.timed_out, None
        return None, False, None  # stopped: nobody waits for this answer

    done = threading.Event()
    running = Path(cwd).parent / RUNS / marker  # for the reaper, should this worker die mid-run
    running.touch()
    try:
        return anyio.run(main)
    finally:
        running.unlink(missing_ok=True)
        _RUNNING.pop(key, None)
        done.set()
        worker.log_event(TOPIC, {"run": run_id, "end": True})  # after its last line, on the same stream


async def _stop(key: str, wait_s: float) -> bool:
    """Run on the worker's loop (Client.run): stop the run and wait until its processes are gone."""
    run = _RUNNING.get(key)
    if run is None:
        return True
    await anyio.to_thread.run_sync(run.stop)
    return await anyio.to_thread.run_sync(run.done.wait, wait_s)


def _commit(path: str, message: str, scratch: tuple[str, ...], base: str) -> tuple[list[str], int, int]:
    return anyio.run(Worktrees(Path(path).parent).commit_and_count, Path(path), message, scratch, base)


def _reset(path: str, base: str, keep: tuple[str, ...]) -> None:
    anyio.run(Worktrees(Path(path).parent).reset, Path(path), base, keep)


def _close(path: str, branch: str, base: str) -> bytes | None:
    """The branch's commits since base as a bundle (None: it has none), then the clone is removed."""
    try:
        return anyio.run(_bundle, path, f"{base}..refs/heads/{branch}")
    finally:
        shutil.rmtree(Path(path).parent, ignore_errors=True)


# On the server ---------------------------------------------------------------------------------

def portable(inv: Invocation, environ: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """argv and env without this machine's places: our interpreter becomes the worker's, and the
    variables naming where things are (PATH, HOME, TMPDIR...) that come from our own environment are
    left out for the worker to fill in, as is this package's root on PYTHONPATH. Values an agent's
    config set explicitly stay."""
    argv = [PYTHON if i == 0 and a == sys.executable else a for i, a in enumerate(inv.argv)]
    env = {k: v for k, v in inv.env.items() if not (k in MACHINE_ENV and (k == "TMPDIR" or environ.get(k) == v))}
    if "PYTHONPATH" in env:
        rest = [p for p in env["PYTHONPATH"].split(os.pathsep) if p and p != PACKAGE_ROOT]
        env["PYTHONPATH"] = os.pathsep.join(rest)  # kept (maybe empty): the worker puts its root first
    return argv, env


@dataclass
class _Session:
    worker: str
    path: str
    opened: Future  # the task that made the clone: held while the attempt runs (see _CLONES)
    lost: str | None = None  # why the worker is gone


class _Bundle:
    """A repo at a base commit as a bundle's bytes, made once for the attempts that start there
    together: held only while they clone it (see DaskHost._bases)."""

    def __init__(self, data: bytes, branch: str):
        self.data, self.branch = data, branch


class DaskHost:
    """Attempts on the workers of one Dask scheduler; one client for the server's lifetime."""

    local = False

    def __init__(self, settings: RunnerSettings, environ: dict[str, str]):
        self.address = settings.scheduler
        self.environ = environ
        self.connect_s = CONNECT_S
        self._client: Client | None = None
        self._refused: tuple[float, str] | None = None  # the last failed connection: when, and why
        self._connecting = anyio.Lock()
        self._sessions: dict[str, _Session] = {}  # the worktree's path on its worker: where it is
        self._bases: weakref.WeakValueDictionary[tuple[str, str], _Bundle] = weakref.WeakValueDictionary()
        self._bundling: dict[tuple[str, str], anyio.Lock] = {}  # (repo, base): one bundle made at a time
        self._lines: dict[str, anyio.abc.ObjectSendStream] = {}  # run id: where its lines go
        self._dropped: dict[str, int] = {}  # run id: lines dropped since its pump last looked

    async def _connected(self) -> Client:
        async with self._connecting:
            if self._client is None:
                # Attempts that queued behind a connection that just failed get its answer, not a wait each.
                if self._refused and time.monotonic() - self._refused[0] < self.connect_s:
                    raise OSError(self._refused[1])
                try:
                    with anyio.fail_after(self.connect_s + 1):
                        client = await Client(self.address, asynchronous=True, timeout=self.connect_s)
                except (OSError, TimeoutError) as e:
                    why = f"cannot reach the Dask scheduler at {self.address} ([runner] scheduler): {e}"
                    self._refused = time.monotonic(), why
                    raise OSError(why) from None
                try:
                    failures = await client.run_on_scheduler(_allowed_failures)
                    if failures != 0:
                        raise OSError(
                            f"the Dask scheduler at {self.address} re-runs a task whose worker died "
                            f"(allowed-failures = {failures}); an agent must not run twice unseen: start it with "
                            "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0")
                    await client.register_plugin(Reaper(), name=Reaper.name)
                    client.subscribe_topic(TOPIC, self._event)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await client.close()
                    raise
                self._client = client
            return self._client

    def _event(self, event) -> None:
        """A run's batch of lines or its end, from whichever worker; anything else on the topic is
        ignored. A run whose lines come faster than its log takes them loses lines, counted."""
        msg = event[1] if isinstance(event, tuple) and len(event) == 2 else None
        if isinstance(msg, dict) and (send := self._lines.get(msg.get("run"))) is not None:
            try:
                send.send_nowait(msg)
            except anyio.WouldBlock:
                lines = msg.get("lines")
                self._dropped[msg["run"]] = self._dropped.get(msg["run"], 0) + (
                    len(lines) if isinstance(lines, list) else 0)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    async def _pinned(self, session: _Session, fn, *args, timeout_s: float = STEP_S):
        """A step on the session's worker; a worker that died or stopped answering loses the session."""
        if session.lost:
            raise HostLost(session.lost)
        client = await self._connected()
        future = client.submit(fn, *args, workers=[session.worker], allow_other_workers=False, pure=False)
        try:
            with anyio.fail_after(timeout_s):
                return await future
        except LOST as e:
            session.lost = _lost(session.worker, e)
        finally:
            if not future.done():
                with anyio.CancelScope(shield=True):
                    await future.cancel()
        raise HostLost(session.lost)

    async def workspace(self, engine: "Engine", task: "Task", attempt: "Attempt") -> Workspace | None:
        """A clone of the repo at the base on a worker; its branch here at the base until the result comes."""
        def refuse(why: str) -> None:
            attempt.state, attempt.error = AttemptState.failed, ErrorInfo(kind=ErrorKind.setup_failed, message=why)

        ws = await engine.repo_configs.settings(engine.config, task.repo, task.base)
        if ws.setup or ws.copy or ws.ports:
            return refuse("the repo's [worktree] setup, copy and ports (.cli-council.toml) are not supported on "
                          "the Dask runner yet; use [runner] kind = \"local\" for this repo")
        branch = branch_name(task.task_id, attempt.agent)
        await git(task.repo, "branch", branch, task.base)
        attempt.branch = branch
        await engine._save(task)
        try:
            bundle = await self._base_bundle(task.repo, task.base, branch)
            client = await self._connected()
        except (OSError, GitError) as e:
            return refuse(str(e))
        future = client.submit(_open, bundle.data, bundle.branch, branch, pure=False)
        try:
            with anyio.fail_after(STEP_S):
                worker, path = await future
        except LOST as e:
            raise HostLost(_lost("cloning this attempt's repo", e)) from None
        except RuntimeError as e:
            return refuse(str(e))
        finally:
            if not future.done():
                with anyio.CancelScope(shield=True):
                    await future.cancel()
        self._sessions[path] = _Session(worker, path, future)
        await engine._note(task, f"on Dask worker {worker}: {path}", attempt.agent)
        return Workspace(path=Path(path), branch=branch)

    async def _base_bundle(self, repo: str, base: str, branch: str) -> _Bundle:
        """The repo at `base` as a bundle (of `branch`, made at base), shared with the attempts that
        clone it meanwhile: a task's 4 attempts bundle the repo's history once, not 4 times."""
        key = (repo, base)
        lock = self._bundling.setdefault(key, anyio.Lock())
        try:
            async with lock:
                if (got := self._bases.get(key)) is None:
                    got = self._bases[key] = _Bundle(await _bundle(repo, f"refs/heads/{branch}"), branch)
                return got
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._bundling.pop(key, None)

    async def run(self, inv: Invocation, *, timeout_s: float, on_line: runner.LineSink,
                  on_start: Callable[[int], Awaitable[None]], kill_grace_s: float,
                  marker: str) -> runner.RunResult:
        """The process on the attempt's worker; its pid is that machine's, so on_start (which records
        pids for this machine's reaper) is not called: the worker's Reaper stands for it."""
        session = self._sessions[str(inv.cwd)]
        if session.lost:
            raise HostLost(session.lost)
        client = await self._connected()
        argv, env = portable(inv, self.environ)
        run_id = uuid.uuid4().hex
        send, receive = anyio.create_memory_object_stream[dict](PENDING_BATCHES)
        self._lines[run_id] = send
        future = client.submit(_run, argv, env, str(inv.cwd), inv.stdin, timeout_s, kill_grace_s, marker, run_id,
                               workers=[session.worker], allow_other_workers=False, pure=False)
        ended = anyio.Event()

        async def pump() -> None:
            async with receive:
                async for msg in receive:
                    if dropped := self._dropped.pop(run_id, 0):
                        await on_line("stderr", f"[cli-council: {dropped} line(s) from the worker dropped: "
                                                "they came faster than the log could take them]")
                    if "end" in msg:
                        break
                    for line in msg.get("lines") or ():
                        if isinstance(line, (list, tuple)) and len(line) == 2:
                            await on_line(str(line[0]), str(line[1]))
            ended.set()

        exit_code = timed_out = unstarted = failed = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump)
                try:
                    with anyio.fail_after(timeout_s + kill_grace_s + STOP_S):
                        exit_code, timed_out, unstarted = await future
                except LOST as e:
                    session.lost = _lost(session.worker, e)
                except Exception as e:  # raised as itself below, not inside the task group's ExceptionGroup
                    failed = e
                else:
                    with anyio.move_on_after(END_S):
                        await ended.wait()
                tg.cancel_scope.cancel()
        finally:
            self._lines.pop(run_id, None)
            self._dropped.pop(run_id, None)
            send.close()
            if not future.done():  # cancelled, or lost: make sure nothing of it runs on
                with anyio.CancelScope(shield=True), anyio.move_on_after(kill_grace_s + STOP_S):
                    try:
                        await client.run(_stop, future.key, kill_grace_s + STOP_S, workers=[session.worker])
                    except Exception:  # the worker is gone: so is its process; the Reaper covers the rest
                        pass
                    await future.cancel()
        if session.lost:
            raise HostLost(session.lost)
        if failed is not None:
            raise failed
        if unstarted:
            raise runner.SpawnError(*unstarted)
        return runner.RunResult(exit_code=exit_code, timed_out=bool(timed_out))

    async def commit_and_count(self, path: Path, message: str, scratch: tuple[str, ...],
                               base: str) -> tuple[list[str], int, int]:
        return await self._pinned(self._sessions[str(path)], _commit, str(path), message, scratch, base)

    async def reset(self, path: Path, base: str, keep: tuple[str, ...]) -> None:
        await self._pinned(self._sessions[str(path)], _reset, str(path), base, keep)

    async def finish(self, task: "Task", attempt: "Attempt", work: Workspace) -> None:
        """The result branch from the worker into the user's repo; the worker's clone is removed."""
        session = self._sessions.pop(str(work.path), None)
        if session is None:
            return
        try:
            if not session.lost and (bundle := await self._pinned(session, _close, session.path, work.branch,
                                                                  task.base)) is not None:
                await _fetch(task.repo, bundle, work.branch)
        finally:
            session.opened.release()

    async def tmpdir(self, home: Path, task_id: str, agent: str) -> str | None:
        return None  # the worker's: beside its clone (see _local_env)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with anyio.move_on_after(CONNECT_S):
                try:
                    await client.close()
                except Exception:  # the scheduler already gone: nothing left to close
                    pass


LOST = (KilledWorker, FutureCancelledError, TimeoutError)  # what a worker or scheduler gone looks like here


def _lost(worker: str, e: BaseException) -> str:
    """Why an attempt's worker counts as gone, said for its record."""
    why = {KilledWorker: "died", TimeoutError: "gave no answer in time"}.get(type(e), "was lost to the scheduler")
    return f"the Dask worker {worker} {why} ({type(e).__name__}: {str(e)[:300]}); the attempt is not re-run"


def _allowed_failures(dask_scheduler) -> int:
    return dask_scheduler.allowed_failures


async def _bundle(repo: str, revs: str) -> bytes | None:
    """What `revs` names, with its history, as the bytes of a git bundle; None when that is nothing.
    As every git of ours (gitcmd): no hooks, no fsmonitor, the allow-listed environment."""
    done = await _git_run(repo, ("bundle", "create", "--quiet", "-", revs))  # bytes out, stderr read on failure
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace")
        if "empty bundle" in stderr:
            return None
        raise GitError(["bundle", "create", "-", revs], done.returncode, stderr)
    return done.stdout


async def _fetch(repo: str, bundle: bytes, branch: str) -> None:
    """The bundle's branch into the repo under the same name (git fetches from a file only)."""
    tmp = Path(await anyio.to_thread.run_sync(partial(tempfile.mkdtemp, prefix="cli-council-bundle-")))
    try:
        await anyio.Path(tmp / "result.bundle").write_bytes(bundle)
        await git(repo, "fetch", "--quiet", "--no-tags", str(tmp / "result.bundle"),
                  f"+refs/heads/{branch}:refs/heads/{branch}")
    finally:
        await anyio.to_thread.run_sync(shutil.rmtree, tmp, True)
