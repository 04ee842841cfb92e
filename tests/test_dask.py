"""The engine on the Dask runner, against a real LocalCluster whose worker runs in its own process.

The worker is this machine, but it is reached only through the scheduler: the repo travels as a
bundle, the agents run in the worker's clone, lines come back as events, the result as a bundle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

distributed = pytest.importorskip("distributed")
import dask  # noqa: E402  (installed with distributed)

from engine.config import ConfigError, parse_config  # noqa: E402
from engine.dask_host import CLONE, PYTHON, TOPIC, portable  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.models import AttemptState, TaskState  # noqa: E402
from adapters.base import PACKAGE_ROOT, Invocation  # noqa: E402

from conftest import fake, git, pid_running  # noqa: E402


@pytest.fixture(scope="module")
def worker_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("worker-home")


@pytest.fixture(scope="module")
def cluster(worker_home):
    """One scheduler and one worker process (with its nanny) for the whole module: ~1 s to start.
    The worker has a HOME of its own, as another machine would."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(worker_home))
        stack = distributed.LocalCluster(n_workers=1, threads_per_worker=4, processes=True, dashboard_address=None,
                                         worker_dashboard_address=None)
    with stack as cluster, distributed.Client(cluster) as client:
        yield cluster, client


@pytest.fixture
def make_dask_engine(cluster, council_home):
    def make(agents: dict, **engine_settings) -> Engine:
        cfg = parse_config({"agents": agents, "engine": {"kill_grace_s": 1, **engine_settings},
                            "runner": {"kind": "dask", "scheduler": cluster[0].scheduler_address}})
        return Engine(cfg, home=council_home, environ=dict(os.environ))
    return make


def wait_until(predicate, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"waited {timeout_s:g}s for {what}"
        time.sleep(0.05)


async def run_task(engine, repo, prompt="do it", **kw):
    task = await engine.submit(str(repo), prompt, **kw)
    return await engine.wait(task.task_id, 60)


def worker_dirs(client) -> set[str]:
    """The attempt clones on the worker (in its temp dir)."""
    def look():
        import tempfile
        return [str(p) for p in Path(tempfile.gettempdir()).glob(f"{CLONE}*")]
    return set(next(iter(client.run(look).values())))


async def test_agents_fan_out_to_the_worker_and_their_branches_come_back(make_dask_engine, repo, cluster):
    before = worker_dirs(cluster[1])
    agents = {"one": fake("--write", "one.txt=from one", "--lines", "3"),
              "two": fake("--write", "two.txt=from two", "--sleep", "0.2")}
    async with make_dask_engine(agents) as engine:
        task = await run_task(engine, repo, agents=["one", "two"])
        logs = await engine.logs(task.task_id, limit=1000)
    assert task.state == TaskState.succeeded, task
    for agent in ("one", "two"):
        attempt = task.attempt(agent)
        assert attempt.state == AttemptState.succeeded and attempt.files_changed == 1 and attempt.worktree is None
        assert git(repo, "show", f"{attempt.branch}:{agent}.txt") == f"from {agent}"
        assert git(repo, "rev-parse", f"{attempt.branch}~1") == task.base
    texts = [(line.agent, line.stream, line.text) for line in logs.lines]
    assert [t for a, s, t in texts if a == "one" and s == "stdout"] == [
        "fake agent got: do it", "line 0", "line 1", "line 2", "done"]
    assert ("two", "stderr", "working") in texts
    assert any(a == "one" and "on Dask worker tcp://" in t for a, s, t in texts)
    assert worker_dirs(cluster[1]) - before == set()  # each clone is removed once its branch is home


async def test_timeout_kills_the_agent_and_its_children_on_the_worker(make_dask_engine, repo, tmp_path):
    child, pidfile = tmp_path / "child.pid", tmp_path / "agent.pid"
    agents = {"sleepy": fake("--child", str(child), "--pidfile", str(pidfile), "--sleep", "60")}
    async with make_dask_engine(agents) as engine:
        task = await run_task(engine, repo, agents=["sleepy"], timeout_s=1.5)
    a = task.attempt("sleepy")
    assert a.state == AttemptState.timed_out and a.error.kind == "timeout"
    for pid in (int(pidfile.read_text()), int(child.read_text())):  # the worker is this machine: pids are ours to see
        assert not pid_running(pid), f"pid {pid} survived the timeout"


async def test_cancel_stops_the_remote_process_group_before_the_task_ends(make_dask_engine, repo, tmp_path, cluster):
    """One agent ignores TERM, so its group dies only at the KILL after the grace: the task ends after that."""
    before = worker_dirs(cluster[1])
    stubborn = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"open({str(tmp_path / 'p1')!r}, 'w').write(str(__import__('os').getpid())); time.sleep(60)")
    agents = {"a0": fake("--child", str(tmp_path / "c0"), "--pidfile", str(tmp_path / "p0"), "--sleep", "60"),
              "a1": {"kind": "command", "argv": [sys.executable, "-c", stubborn, "{prompt}"]}}
    async with make_dask_engine(agents) as engine:
        task = await engine.submit(str(repo), "sleep", agents=list(agents))
        with anyio.fail_after(20):
            while not all((tmp_path / f).exists() and (tmp_path / f).read_text() for f in ("c0", "p1")):
                await anyio.sleep(0.05)
        task = await engine.cancel(task.task_id)
    assert task.state == TaskState.cancelled
    assert {a.state for a in task.attempts} == {AttemptState.cancelled}
    for f in ("c0", "p0", "p1"):
        pid = int((tmp_path / f).read_text())
        assert not pid_running(pid), f"{f} (pid {pid}) survived cancel"
    assert worker_dirs(cluster[1]) - before == set()


async def test_the_check_runs_on_the_worker_and_the_best_attempt_merges(make_dask_engine, repo, worker_home):
    agents = {"wrong": fake("--write", "app.py=def add(a, b):\n    return a * b"),
              "right": fake("--write", "app.py=def add(a, b):\n    return a + b", "--sleep", "0.3")}
    # With the worker's HOME and a TMPDIR beside its clone: nothing of the server's places.
    check = (f"python3 -c \"from app import add; assert add(2, 3) == 5\" && test \"$HOME\" = {worker_home} && "
             "case \"$TMPDIR\" in */cli-council-dask-*/tmp) true;; *) false;; esac")
    async with make_dask_engine(agents) as engine:
        task = await run_task(engine, repo, agents=["wrong", "right"], check=check)
        assert task.best == "right", task.best_reason
        wrong = task.attempt("wrong")
        assert not wrong.check.passed and wrong.error.kind == "check_failed"
        result = await engine.merge(task.task_id)
    assert result.merged, result.message
    assert (repo / "app.py").read_text() == "def add(a, b):\n    return a + b\n"
    assert git(repo, "for-each-ref", f"refs/heads/council/{task.task_id}/") == ""  # branches cleaned up


async def test_a_retried_agent_starts_again_from_the_base_in_the_workers_clone(make_dask_engine, repo, tmp_path):
    """The claude adapter (a fake CLI replaying recorded output) rate limited twice: the engine decides the
    retries, the worker's clone goes back to the base between them, the key never shows in the log."""
    key = "sk-ant-test-4f9d2c1b7e"
    claude = {"kind": "claude", "command": [sys.executable, str(Path(__file__).parent / "fakes" / "flaky.py")],
              "env": {"ANTHROPIC_API_KEY": key, "FLAKY_COUNTER": str(tmp_path / "count"), "FLAKY_FAILS": "2",
                      "FLAKY_FAIL": "claude-rate-limit", "FAKE_WRITE": "hello.txt"}}
    async with make_dask_engine({"claude": claude}, retries=3, retry_base_s=0.05) as engine:
        task = await run_task(engine, repo, "write hello", agents=["claude"])
        lines = (await engine.logs(task.task_id, limit=5000)).lines
    a = task.attempt("claude")
    assert a.state == AttemptState.succeeded and a.retries == 2, a
    assert (tmp_path / "count").read_text() == "3"
    assert a.cost_usd and a.session_id
    assert git(repo, "show", f"{a.branch}:hello.txt") == "hello"
    assert len([line for line in lines if line.stream == "council" and "retry" in line.text]) == 2
    assert not any(key in line.text for line in lines)


async def test_a_cli_missing_on_the_worker_fails_its_attempt_as_not_installed(make_dask_engine, repo):
    agents = {"ghost": {"kind": "command", "argv": ["no-such-cli-on-any-worker", "{prompt}"]},
              "real": fake("--write", "r.txt=r")}
    async with make_dask_engine(agents) as engine:
        task = await run_task(engine, repo, agents=["ghost", "real"])
    ghost = task.attempt("ghost")
    assert ghost.state == AttemptState.failed and ghost.error.kind == "not_installed"
    assert "no-such-cli-on-any-worker" in ghost.error.message and "PATH" in ghost.error.message
    assert task.state == TaskState.succeeded and task.best == "real"


def test_what_a_worker_receives_names_none_of_the_servers_places():
    environ = {"PATH": "/server/bin", "HOME": "/server/home", "TMPDIR": "/server/tmp", "LANG": "C.UTF-8"}
    inv = Invocation(argv=[sys.executable, "-m", "adapters.ollama", "--x"], cwd=Path("/worker/clone"),
                     env={**environ, "PYTHONPATH": f"{PACKAGE_ROOT}{os.pathsep}/agent/lib", "HOME": "/agent/own/home",
                          "API_KEY": "k"})
    argv, env = portable(inv, environ)
    assert argv == [PYTHON, "-m", "adapters.ollama", "--x"]
    assert env == {"LANG": "C.UTF-8", "HOME": "/agent/own/home", "PYTHONPATH": "/agent/lib", "API_KEY": "k"}
    sent = repr((argv, env))
    assert not any(place in sent for place in (sys.executable, PACKAGE_ROOT, "/server/"))


async def test_an_unreachable_scheduler_fails_the_attempts_clearly(council_home, repo):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = parse_config({"agents": {"a": fake("--write", "a.txt=a"), "b": fake("--write", "b.txt=b")},
                        "runner": {"kind": "dask", "scheduler": f"tcp://127.0.0.1:{port}"}})
    async with Engine(cfg, home=council_home, environ=dict(os.environ)) as engine:
        engine.host.connect_s = 0.5
        task = await run_task(engine, repo, agents=["a", "b"])
    assert task.state == TaskState.failed
    for a in task.attempts:
        assert a.state == AttemptState.failed and a.error.kind == "setup_failed"
        assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in a.error.message


async def test_a_scheduler_that_would_rerun_a_dead_workers_task_is_refused(make_dask_engine, repo, cluster):
    def allow(dask_scheduler, n):
        dask_scheduler.allowed_failures = n
    cluster[1].run_on_scheduler(allow, n=3)
    try:
        async with make_dask_engine({"a": fake("--write", "a.txt=a")}) as engine:
            task = await run_task(engine, repo, agents=["a"])
    finally:
        cluster[1].run_on_scheduler(allow, n=0)
    a = task.attempt("a")
    assert a.state == AttemptState.failed and a.error.kind == "setup_failed"
    assert "allowed-failures = 3" in a.error.message and "ALLOWED_FAILURES=0" in a.error.message


def test_runner_config_is_checked():
    with pytest.raises(ConfigError, match=r'kind = "dask" needs scheduler'):
        parse_config({"runner": {"kind": "dask"}})
    with pytest.raises(ConfigError, match=r"\[runner\] kind = \"k8s\" should be 'local' or 'dask'"):
        parse_config({"runner": {"kind": "k8s"}})
    with pytest.raises(ConfigError, match=r"scheduler = \"8786\" is refused"):
        parse_config({"runner": {"kind": "dask", "scheduler": "8786"}})


def test_the_dask_runner_without_distributed_installed_is_a_clear_config_error(monkeypatch, council_home):
    monkeypatch.setitem(sys.modules, "distributed", None)  # what `import distributed` meets when it is absent
    monkeypatch.delitem(sys.modules, "engine.dask_host")
    cfg = parse_config({"runner": {"kind": "dask", "scheduler": "tcp://127.0.0.1:8786"}})
    with pytest.raises(ConfigError, match=r"pip install 'cli-council\[dask\]'"):
        Engine(cfg, home=council_home, environ=dict(os.environ))


def test_a_server_killed_mid_run_leaves_nothing_running_or_cloned_on_the_worker(cluster, repo, tmp_path):
    """The scheduler drops a dead client's tasks; the worker's Reaper stops the run that loses its task
    and removes the clone whose making task was released."""
    before = worker_dirs(cluster[1])
    pidfile = tmp_path / "agent.pid"
    table = fake("--pidfile", str(pidfile), "--sleep", "60")
    Path(os.environ["CLI_COUNCIL_CONFIG"]).write_text(
        f'[runner]\nkind = "dask"\nscheduler = "{cluster[0].scheduler_address}"\n\n'
        f'[agents.sleepy]\nkind = "command"\nargv = {json.dumps(table["argv"])}\n')
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "run", "--repo", str(repo), "--agents", "sleepy",
                             "work"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    agent_pid = None
    try:
        wait_until(lambda: proc.poll() is None and pidfile.exists() and pidfile.read_text(), "the agent to start")
        agent_pid = int(pidfile.read_text())
        proc.kill()
        proc.wait(10)
        assert worker_dirs(cluster[1]) - before
        wait_until(lambda: not pid_running(agent_pid), f"agent pid {agent_pid} to stop with its server gone")
        wait_until(lambda: not worker_dirs(cluster[1]) - before, "the dead server's clone to be removed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if agent_pid and pid_running(agent_pid):
            os.kill(agent_pid, signal.SIGKILL)


async def test_a_worker_that_dies_mid_run_interrupts_its_attempt_and_nothing_reruns(make_dask_engine, repo, tmp_path,
                                                                                    cluster):
    """Kept last: the nanny starts a new worker, which the next module would wait for."""
    _, client = cluster
    pidfile = tmp_path / "agent.pid"
    agents = {"doomed": fake("--pidfile", str(pidfile), "--sleep", "60", "--write", "x.txt=x")}
    worker_pid = next(iter(client.run(os.getpid).values()))
    agent_pid = None
    try:
        async with make_dask_engine(agents) as engine:
            task = await engine.submit(str(repo), "work", agents=["doomed"])
            with anyio.fail_after(20):
                while not (pidfile.exists() and pidfile.read_text()):  # written, not just created
                    await anyio.sleep(0.05)
            agent_pid = int(pidfile.read_text())
            os.kill(worker_pid, signal.SIGKILL)
            task = await engine.wait(task.task_id, 60)
        doomed = task.attempt("doomed")
        assert doomed.state == AttemptState.interrupted and doomed.error.kind == "crash"
        assert "the Dask worker tcp://" in doomed.error.message and "died" in doomed.error.message
        assert "not re-run" in doomed.error.message and task.state == TaskState.failed
        assert git(repo, "rev-parse", doomed.branch) == task.base  # nothing came back
        client.wait_for_workers(1, timeout=60)
        assert int(pidfile.read_text()) == agent_pid  # the new worker did not start the agent again
        with anyio.fail_after(30):  # the new worker's Reaper stops what the dead one left, and removes its clone
            while pid_running(agent_pid) or worker_dirs(client):
                await anyio.sleep(0.1)
    finally:
        if agent_pid and pid_running(agent_pid):
            os.kill(agent_pid, signal.SIGKILL)
        client.wait_for_workers(1, timeout=60)



async def test_reviews_run_on_this_machine_while_the_attempts_ran_on_the_worker(make_dask_engine, repo):
    """A review reads a patch in a directory of the server's machine: it must not be sent to the
    attempt's worker (whose clone is gone by then)."""
    reviewer = str(Path(__file__).parent / "fakes" / "reviewer.py")
    verdict = json.dumps({"score": 8, "verdict": "approve", "issues": [], "summary": "fine"})
    agents = {name: {"kind": "command", "argv": [sys.executable, reviewer, "--write", f"{name}.txt=x", "--say",
                                                 verdict, "{prompt}"]} for name in ("one", "two")}
    async with make_dask_engine(agents) as engine:
        task = await run_task(engine, repo, agents=["one", "two"], review=True)
    assert task.state == TaskState.succeeded, task
    for agent, other in (("one", "two"), ("two", "one")):
        reviews = task.attempt(agent).reviews
        assert [(r.reviewer, r.score, r.error) for r in reviews] == [(other, 8, None)], reviews


async def test_a_flood_of_lines_from_the_worker_arrives_whole_and_in_order(make_dask_engine, repo, cluster):
    """Lines travel in batches (by time and size), a scheduler event per batch rather than per line:
    every one arrives, in order, the last ones too."""
    n = 30_000
    since = time.time()
    agents = {"flood": fake("--write", "f.txt=x", "--lines", str(n))}
    async with make_dask_engine(agents, log_max_lines=n + 100) as engine:
        task = await run_task(engine, repo, agents=["flood"])
        lines, cursor = [], 0
        while chunk := (await engine.logs(task.task_id, agent="flood", cursor=cursor, limit=5000)).lines:
            lines += chunk
            cursor = chunk[-1].seq
    assert task.state == TaskState.succeeded, task
    out = [line.text for line in lines if line.stream == "stdout"]
    assert out == ["fake agent got: do it", *(f"line {i}" for i in range(n)), "done"]
    assert not [line.text for line in lines if "dropped" in line.text]
    events = [msg for t, msg in cluster[1].get_events(TOPIC) if t >= since and "end" not in msg]
    assert 0 < len(events) < n / 50, len(events)


async def test_attempts_starting_together_share_one_bundle_of_the_repo(make_dask_engine, repo):
    """The repo's history is bundled once for the attempts that clone it at the same time, and the
    bundle is let go once they have (nothing kept per repo and base afterwards)."""
    base = git(repo, "rev-parse", "HEAD")
    branches = [f"council/t/{name}" for name in ("a", "b", "c")]
    for branch in branches:
        git(repo, "branch", branch, base)
    async with make_dask_engine({}) as engine:
        host = engine.host
        got: list = [None] * 3

        async def one(i: int) -> None:
            got[i] = await host._base_bundle(str(repo), base, branches[i])

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i)
        assert got[0] is got[1] is got[2] and got[0].data.startswith(b"# v2 git bundle")
        assert not host._bundling
        got.clear()
        assert not host._bases  # the last holder gone: so is the bundle
