"""The engine against real git repos and real subprocesses (fake agents are scripts)."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from engine.engine import CouncilError, NotFound, _Later
from engine.models import ACTIVE_TASK, AttemptState, TaskState

from conftest import fake, git, pid_running


async def run_task(engine, repo, prompt="do it", **kw):
    task = await engine.submit(str(repo), prompt, **kw)
    return await engine.wait(task.task_id, 60)


async def test_two_agents_edit_in_parallel_each_on_its_own_branch(make_engine, repo, council_home):
    agents = {"one": fake("--sleep", "2", "--write", "one.txt=from one"),
              "two": fake("--sleep", "2", "--write", "two.txt=from two")}
    async with make_engine(agents) as engine:
        start = time.monotonic()
        task = await run_task(engine, repo, agents=["one", "two"])
        wall = time.monotonic() - start
    assert task.state == TaskState.succeeded, task
    assert wall < 3.5, f"two 2-second agents took {wall:.2f}s: they did not run in parallel"
    for name in ("one", "two"):
        a = task.attempt(name)
        assert a.state == AttemptState.succeeded and a.files_changed == 1 and a.insertions == 1
        assert a.branch == f"council/{task.task_id}/{name}"
        assert Path(a.worktree).is_relative_to(council_home / "worktrees")
        assert git(repo, "show", f"{a.branch}:{name}.txt") == f"from {name}"
        other = "two" if name == "one" else "one"
        assert f"{other}.txt" not in git(repo, "ls-tree", "--name-only", a.branch)
    # the user's checkout is untouched
    assert git(repo, "status", "--porcelain") == "" and git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"
    assert task.base == git(repo, "rev-parse", "HEAD") and task.into == "main"


async def test_failing_agent_does_not_stop_the_others(make_engine, repo):
    agents = {"bad": fake("--exit", "3"), "good": fake("--sleep", "0.5", "--write", "g.txt=ok")}
    async with make_engine(agents) as engine:
        task = await run_task(engine, repo, agents=["bad", "good"])
    bad, good = task.attempt("bad"), task.attempt("good")
    assert bad.state == AttemptState.failed and bad.exit_code == 3 and bad.error.kind == "crash"
    assert good.state == AttemptState.succeeded
    assert task.state == TaskState.succeeded and task.best == "good"


async def test_timeout_kills_agent_and_its_children(make_engine, repo, tmp_path):
    child, pidfile = tmp_path / "child.pid", tmp_path / "agent.pid"
    agents = {"sleepy": fake("--child", str(child), "--pidfile", str(pidfile), "--sleep", "60")}
    async with make_engine(agents) as engine:
        start = time.monotonic()
        task = await run_task(engine, repo, agents=["sleepy"], timeout_s=1.5)
        assert time.monotonic() - start < 10
    a = task.attempt("sleepy")
    assert a.state == AttemptState.timed_out and a.error.kind == "timeout"
    for pid in (int(pidfile.read_text()), int(child.read_text())):
        assert not pid_running(pid), f"pid {pid} survived the timeout"


async def test_cancel_stops_every_attempt_and_leaves_no_process(make_engine, repo, tmp_path):
    agents = {f"a{i}": fake("--child", str(tmp_path / f"c{i}"), "--pidfile", str(tmp_path / f"p{i}"), "--sleep", "60")
              for i in range(2)}
    async with make_engine(agents) as engine:
        task = await engine.submit(str(repo), "sleep", agents=list(agents))
        with anyio.fail_after(10):
            while not all((tmp_path / f"c{i}").exists() for i in range(2)):
                await anyio.sleep(0.05)
        task = await engine.cancel(task.task_id)
    assert task.state == TaskState.cancelled
    assert {a.state for a in task.attempts} == {AttemptState.cancelled}
    for i in range(2):
        for f in (f"c{i}", f"p{i}"):
            pid = int((tmp_path / f).read_text())
            assert not pid_running(pid), f"{f} (pid {pid}) survived cancel"


async def test_check_command_picks_the_attempt_whose_tests_pass(make_engine, repo):
    agents = {"wrong": fake("--write", "app.py=def add(a, b):\n    return a * b"),
              "right": fake("--write", "app.py=def add(a, b):\n    return a + b", "--sleep", "0.3")}
    check = "python3 -c \"from app import add; assert add(2, 3) == 5\""
    async with make_engine(agents) as engine:
        task = await run_task(engine, repo, agents=["wrong", "right"], check=check)
    assert task.best == "right", task.best_reason
    assert "check passed" in task.best_reason
    assert task.attempt("right").check.passed and task.attempt("right").state == AttemptState.succeeded
    wrong = task.attempt("wrong")
    assert not wrong.check.passed and wrong.state == AttemptState.failed and wrong.error.kind == "check_failed"
    assert task.state == TaskState.succeeded


async def test_agent_without_changes_fails_as_no_changes(make_engine, repo):
    async with make_engine({"idle": fake()}) as engine:
        task = await run_task(engine, repo, agents=["idle"])
    a = task.attempt("idle")
    assert a.state == AttemptState.failed and a.error.kind == "no_changes"
    assert task.state == TaskState.failed and task.best is None


async def test_global_cap_holds_across_tasks(make_engine, repo):
    agents = {"one": fake("--sleep", "1", "--write", "x.txt=1"), "two": fake("--sleep", "1", "--write", "y.txt=2")}
    async with make_engine(agents, max_parallel=1) as engine:
        start = time.monotonic()
        t1 = await engine.submit(str(repo), "a", agents=["one"])
        t2 = await engine.submit(str(repo), "b", agents=["two"])
        t1, t2 = await engine.wait(t1.task_id, 30), await engine.wait(t2.task_id, 30)
        wall = time.monotonic() - start
    assert t1.state == t2.state == TaskState.succeeded
    assert wall >= 2.0, f"max_parallel=1 but two 1 s agents finished in {wall:.2f}s"
    a, b = t1.attempts[0], t2.attempts[0]
    assert a.finished_at <= b.started_at or b.finished_at <= a.started_at


async def test_per_agent_cap(make_engine, repo):
    agents = {"solo": {**fake("--sleep", "1", "--write", "s.txt=1"), "max_parallel": 1}}
    async with make_engine(agents) as engine:
        start = time.monotonic()
        ids = [(await engine.submit(str(repo), f"t{i}", agents=["solo"])).task_id for i in range(2)]
        tasks = [await engine.wait(i, 30) for i in ids]
    assert all(t.state == TaskState.succeeded for t in tasks)
    assert time.monotonic() - start >= 2.0


async def test_logs_have_sequence_and_long_poll(make_engine, repo):
    async with make_engine({"chatty": fake("--lines", "5", "--sleep", "1", "--write", "c.txt=1")}) as engine:
        task = await engine.submit(str(repo), "talk", agents=["chatty"])
        seen, cursor, done = [], 0, False
        with anyio.fail_after(20):
            while not done:
                chunk = await engine.logs(task.task_id, cursor=cursor, wait_s=5, limit=3)
                seen += chunk.lines
                cursor, done = chunk.next_cursor, chunk.done
    seqs = [l.seq for l in seen]
    assert seqs == list(range(1, len(seqs) + 1)), "seq must grow by one per line across the task"
    texts = [l.text for l in seen if l.agent == "chatty" and l.stream == "stdout"]
    assert texts[:1] == ["fake agent got: talk"] and "line 4" in texts and "done" in texts
    assert any(l.stream == "stderr" and l.text == "working" for l in seen)
    assert "task succeeded" in seen[-1].text


async def test_bad_input_is_refused_and_changes_nothing(make_engine, repo, tmp_path, council_home):
    before = git(repo, "for-each-ref")
    async with make_engine({"one": fake("--write", "x=1")}) as engine:
        cases = [
            dict(repo=str(tmp_path / "missing"), prompt="p", agents=["one"]),
            dict(repo=str(tmp_path), prompt="p", agents=["one"]),  # not a git repo
            dict(repo=str(repo), prompt="p", agents=["one"], base="no-such-ref"),
            dict(repo=str(repo), prompt="p", agents=["one"], base="--output=/tmp/x"),
            dict(repo=str(repo), prompt="p", agents=["nobody"]),
            dict(repo=str(repo), prompt="  ", agents=["one"]),
            dict(repo=str(repo), prompt="p", agents=["one"], timeout_s=0),
            dict(repo=str(repo), prompt="p", agents=["one"], timeout_s=-5),
            dict(repo=str(repo), prompt="p", agents=["one"], tier="huge"),
            dict(repo=str(repo), prompt="p", agents=[]),
        ]
        for kw in cases:
            with pytest.raises(CouncilError) as e:
                await engine.submit(kw.pop("repo"), kw.pop("prompt"), **kw)
            assert str(e.value)
        assert (await engine.list()).tasks == []
        with pytest.raises(NotFound):
            await engine.get("nope")
    assert git(repo, "for-each-ref") == before
    assert not (council_home / "worktrees").exists() or not any((council_home / "worktrees").iterdir())


async def test_base_ref_is_resolved_at_submission(make_engine, repo):
    first = git(repo, "rev-parse", "HEAD")
    (repo / "later.txt").write_text("later\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "later")
    async with make_engine({"one": fake("--write", "x.txt=1")}) as engine:
        task = await run_task(engine, repo, agents=["one"], base="HEAD~1")
    assert task.base == first
    assert "later.txt" not in git(repo, "ls-tree", "--name-only", task.attempt("one").branch)


@pytest.mark.parametrize("local, why", [
    (fake("--exit", "1"), "crash"),  # the local attempt fails
    (fake(), "no_changes"),  # it makes no changes
    (fake("--write", "p.txt=wrong"), "check_failed"),  # it fails the check
])
async def test_cheap_tier_escalates_when_the_local_attempt_fails(repo, local, why):
    from engine.config import parse_config
    from engine.engine import Engine
    cfg = parse_config({"engine": {"kill_grace_s": 1},
                        "agents": {"local": local, "paid": fake("--write", "p.txt=paid")},
                        "routing": {"cheap": ["local"], "standard": ["paid"]}})
    async with Engine(cfg, home=repo.parent / "h") as engine:
        task = await run_task(engine, repo, tier="cheap", check="grep -q paid p.txt")
    assert [(a.agent, a.stage, a.state) for a in task.attempts] == [
        ("local", 0, AttemptState.failed), ("paid", 1, AttemptState.succeeded)]
    assert task.attempts[0].error.kind == why
    assert task.best == "paid" and task.state == TaskState.succeeded


async def test_cheap_tier_stays_local_when_it_works(repo):
    from engine.config import parse_config
    from engine.engine import Engine
    cfg = parse_config({"agents": {"local": fake("--write", "l.txt=1"), "paid": fake("--write", "p.txt=1")},
                        "routing": {"cheap": ["local"], "standard": ["paid"]}})
    async with Engine(cfg, home=repo.parent / "h") as engine:
        task = await run_task(engine, repo, tier="cheap")
    assert [a.agent for a in task.attempts] == ["local"] and task.best == "local"


async def test_missing_binary_is_skipped_not_fatal(make_engine, repo):
    agents = {"ghost": {"kind": "command", "argv": ["no-such-agent-binary", "{prompt}"]},
              "real": fake("--write", "r.txt=1")}
    async with make_engine(agents) as engine:
        task = await run_task(engine, repo, agents=["ghost", "real"])
    ghost = task.attempt("ghost")
    assert ghost.state == AttemptState.skipped and ghost.error.kind == "not_installed"
    assert "not found" in ghost.error.message
    assert task.state == TaskState.succeeded


async def test_prompt_travels_as_one_argv_element(make_engine, repo, tmp_path):
    marker = tmp_path / "pwned"
    prompt = f"hello; touch {marker} $(touch {marker}) `touch {marker}`"
    async with make_engine({"one": fake("--write", "x.txt=1")}) as engine:
        task = await run_task(engine, repo, prompt=prompt, agents=["one"])
        lines = (await engine.logs(task.task_id)).lines
    assert not marker.exists()
    assert f"fake agent got: {prompt}" in [l.text for l in lines]


async def test_state_survives_a_new_engine(make_engine, repo):
    async with make_engine({"one": fake("--write", "x.txt=1")}) as engine:
        task = await run_task(engine, repo, agents=["one"])
    async with make_engine({"one": fake()}) as engine:
        again = await engine.get(task.task_id)
        listed = await engine.list(str(repo))
        logs = await engine.logs(task.task_id)
    assert again == task
    assert [t.task_id for t in listed.tasks] == [task.task_id]
    assert logs.done and logs.lines


async def test_each_attempt_gets_a_private_tmpdir_removed_at_the_end(make_engine, repo, council_home):
    code = ("import os; d = os.environ['TMPDIR']; open(os.path.join(d, 'litter'), 'w').write('x'); "
            "print('tmp', d); open('x.txt', 'w').write('1')")
    async with make_engine({"one": {"kind": "command", "argv": ["python3", "-c", code]}}) as engine:
        task = await run_task(engine, repo, agents=["one"])
        lines = [l.text for l in (await engine.logs(task.task_id)).lines if l.text.startswith("tmp ")]
    tmp = Path(lines[0].split(" ", 1)[1])
    assert tmp == council_home / "tmp" / task.task_id / "one"
    assert not tmp.exists() and not tmp.parent.exists()


async def test_a_prompt_too_large_for_one_argument_is_refused(make_engine, repo):
    async with make_engine({"one": fake("--write", "x=1")}) as engine:
        with pytest.raises(CouncilError, match="limit is 120000"):
            await engine.submit(str(repo), "x" * 130_000, agents=["one"])


async def test_a_dirty_checkout_is_warned_of_in_the_answer_and_in_the_stored_task(make_engine, repo):
    """The dirty check runs beside the attempts' start: its warning still reaches the caller and the
    stored task; a task on an explicit base is not warned."""
    (repo / "README.md").write_text("# changed, not committed\n")
    agents = {"gone": {"kind": "command", "argv": ["/nonexistent/agent"]}}
    async with make_engine(agents) as engine:
        task = await engine.submit(str(repo), "do it", agents=["gone"])
        assert any("uncommitted changes" in w for w in task.warnings), task.warnings
        done = await engine.wait(task.task_id, wait_s=30)
        assert done.state not in ACTIVE_TASK
        assert any("uncommitted changes" in w for w in done.warnings), done.warnings
        clean = await engine.submit(str(repo), "do it", agents=["gone"], base="HEAD")
        assert clean.warnings == []


async def test_a_background_question_that_fails_or_is_cancelled_answers_none_and_raises_nowhere():
    """The dirty check runs as a _Later in the engine's own task group: what goes wrong in it must not
    end that group, and a submission refused meanwhile cancels it without waiting for its answer."""
    async def gone():
        raise OSError("the checkout went away")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            failed, cancelled = _Later(), _Later()
            tg.start_soon(failed.ask, gone)
            tg.start_soon(cancelled.ask, lambda: anyio.sleep(3600))
            cancelled.scope.cancel()
            assert await failed.get() is None and await cancelled.get() is None


async def test_a_submission_refused_after_the_dirty_check_began_leaves_the_engine_whole(make_engine, repo):
    """The dirty check starts in the engine's background as soon as the repo is known; a refusal that
    comes after it (here a branch named `council`) cancels it, and the engine goes on."""
    (repo / "README.md").write_text("# changed, not committed\n")
    git(repo, "branch", "council")
    async with make_engine({"one": fake("--write", "x=1")}) as engine:
        for _ in range(3):
            with pytest.raises(CouncilError, match="branch named 'council'"):
                await engine.submit(str(repo), "do it", agents=["one"])
        git(repo, "branch", "-m", "council", "old-council")
        task = await engine.submit(str(repo), "do it", agents=["one"])
        assert any("uncommitted changes" in w for w in task.warnings), task.warnings
        assert (await engine.wait(task.task_id, wait_s=30)).state == "succeeded"
