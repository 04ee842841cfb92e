"""Failures are results: whatever breaks inside an attempt or a task is recorded there, and the engine,
its other tasks and later submissions go on. Each trigger runs beside a task that must still succeed."""

from __future__ import annotations

import shutil
import sys

import anyio
import pytest

from engine.engine import CouncilError
from engine.models import AttemptState, TaskState

from conftest import fake, git


async def beside(engine, repo, hostile: dict, good_agent: str = "good"):
    """Submit the hostile task and a good one at once; return both when finished."""
    bad = await engine.submit(str(repo), "hostile", **hostile)
    good = await engine.submit(str(repo), "fine", agents=[good_agent])
    return await engine.wait(bad.task_id, 60), await engine.wait(good.task_id, 60)


GOOD = fake("--sleep", "1", "--write", "good.txt=ok")


async def test_worktree_deleted_while_the_agent_runs(make_engine, repo, council_home):
    agents = {"victim": fake("--sleep", "2", "--write", "v.txt=v"), "good": GOOD}
    async with make_engine(agents) as engine:
        bad = await engine.submit(str(repo), "hostile", agents=["victim"])
        good = await engine.submit(str(repo), "fine", agents=["good"])
        with anyio.fail_after(20):
            while not (council_home / "worktrees" / bad.task_id / "victim").exists():
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)
        shutil.rmtree(council_home / "worktrees" / bad.task_id / "victim")
        bad, good = await engine.wait(bad.task_id, 60), await engine.wait(good.task_id, 60)
        again = await engine.wait((await engine.submit(str(repo), "again", agents=["good"])).task_id, 60)
    victim = bad.attempt("victim")
    assert victim.state == AttemptState.failed and victim.error.kind == "crash", victim
    assert bad.state == TaskState.failed
    assert good.state == TaskState.succeeded and again.state == TaskState.succeeded


@pytest.mark.parametrize("check", ["./" + "a/" * 2100 + "x", "./runtests"], ids=["path-too-long", "script-without-shebang"])
async def test_a_check_that_cannot_start_fails_that_attempt_only(make_engine, repo, check):
    agents = {"writer": fake("--write", "runtests=echo no shebang here; exit 3"), "good": GOOD}
    async with make_engine(agents) as engine:
        (repo / "runtests").write_text("")  # executable in the repo; the agent rewrites it without a #! line
        (repo / "runtests").chmod(0o755)
        git(repo, "add", "runtests")
        git(repo, "commit", "-qm", "runtests")
        bad, good = await beside(engine, repo, {"agents": ["writer"], "check": check})
    attempt = bad.attempt("writer")
    assert attempt.state == AttemptState.failed and attempt.check is not None and not attempt.check.passed, attempt
    assert good.state == TaskState.succeeded


async def test_an_adapter_that_breaks_fails_its_attempt(make_engine, repo):
    # An ollama agent whose base_url has a port out of range: the adapter raises while building its command.
    agents = {"broken": {"kind": "ollama", "base_url": "http://127.0.0.1:99999"}, "good": GOOD}
    async with make_engine(agents) as engine:
        bad, good = await beside(engine, repo, {"agents": ["broken"]})
    assert bad.attempt("broken").state in (AttemptState.failed, AttemptState.skipped)
    assert bad.state == TaskState.failed and good.state == TaskState.succeeded


async def test_waiting_for_an_agent_slot_holds_no_global_slot(make_engine, repo):
    agents = {"solo": {**fake("--sleep", "3", "--write", "s.txt=s"), "max_parallel": 1},
              "quick": fake("--write", "q.txt=q")}
    async with make_engine(agents, max_parallel=2) as engine:
        first = await engine.submit(str(repo), "one", agents=["solo"])
        second = await engine.submit(str(repo), "two", agents=["solo"])  # waits for solo's only slot
        await anyio.sleep(0.5)
        quick = await engine.wait((await engine.submit(str(repo), "three", agents=["quick"])).task_id, 60)
        first = await engine.wait(first.task_id, 60)
        await engine.wait(second.task_id, 60)
    # One global slot is free the whole time: quick must not wait for solo's first run to end.
    assert quick.state == TaskState.succeeded
    assert quick.finished_at < first.finished_at, (quick.finished_at, first.finished_at)


async def test_merging_a_failed_task_needs_the_agent_named(make_engine, repo):
    agents = {"writer": fake("--write", "w.txt=w")}
    async with make_engine(agents) as engine:
        task = await engine.wait((await engine.submit(str(repo), "w", agents=["writer"],
                                                      check=f"{sys.executable} -c 'raise SystemExit(4)'")).task_id, 60)
        assert task.state == TaskState.failed and task.best == "writer"
        head = git(repo, "rev-parse", "HEAD")
        with pytest.raises(CouncilError, match=r"failed its check .* \(exit 4\).*agent='writer'"):
            await engine.merge(task.task_id)
        assert git(repo, "rev-parse", "HEAD") == head and not git(repo, "for-each-ref", "refs/council")
        result = await engine.merge(task.task_id, agent="writer")
        assert result.merged and result.message.startswith("warning: writer's attempt failed its check")
        with pytest.raises(CouncilError, match=f"already merged as {result.commit}"):
            await engine.merge(task.task_id, agent="writer")


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), -1.0, 0, 10**12, True, "5"])
async def test_non_finite_or_absurd_timeouts_are_refused_and_stored_nowhere(make_engine, repo, timeout):
    async with make_engine({"good": GOOD}) as engine:
        with pytest.raises(CouncilError, match="timeout_s"):
            await engine.submit(str(repo), "x", agents=["good"], timeout_s=timeout)
        assert (await engine.list()).tasks == []


async def test_the_check_is_a_shell_command_line_and_says_why_it_failed(make_engine, repo):
    agents = {"writer": fake("--write", "w.txt=w")}
    async with make_engine(agents) as engine:
        ok = await engine.wait((await engine.submit(str(repo), "w", agents=["writer"],
                                                    check="test -f w.txt && grep -q w w.txt")).task_id, 60)
        missing = await engine.wait((await engine.submit(str(repo), "w", agents=["writer"],
                                                         check="no-such-tool-here --run")).task_id, 60)
        with pytest.raises(CouncilError, match="not a valid shell command line"):
            await engine.submit(str(repo), "w", agents=["writer"], check="pytest 'tests")
    assert ok.attempt("writer").check.passed and ok.state == TaskState.succeeded
    check = missing.attempt("writer").check
    assert not check.passed and check.exit_code == 127 and "not found" in check.error
    assert "exit 127: a command was not found" in missing.attempt("writer").error.message
