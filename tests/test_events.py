"""The engine's event stream: a subscriber sees a real task's state changes, log batches and its merge;
a task run by another process (`cli-council run` in a subprocess on the same state directory) reaches
it too; and a subscriber that never reads stays bounded without holding the publisher back."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio

from engine.events import Event, Events
from tests.conftest import fake
from tests.test_cli import write_config

ROOT = Path(__file__).resolve().parents[1]


async def collect_until(sub, done) -> list[Event]:
    seen: list[Event] = []
    with anyio.fail_after(60):
        async for event in sub:
            seen.append(event)
            if done(event):
                return seen


async def test_a_subscriber_sees_states_log_batches_and_the_merge(make_engine, repo):
    async with make_engine({"fake": fake("--lines", "30", "--write", "hello.txt=hi")}) as engine:
        async with engine.events.subscribe() as everything:
            task = await engine.submit(str(repo), "say hi", agents=["fake"])
            async with engine.events.subscribe(task.task_id) as sub:
                seen = await collect_until(sub, lambda e: e.kind == "task" and e.state == "succeeded")
                states = [e.state for e in seen if e.kind == "task"]
                assert states[0] == "running" and states[-1] == "succeeded"
                attempt_states = [dict(e.attempts)["fake"] for e in seen if e.kind == "task"]
                assert "running" in attempt_states and attempt_states[-1] == "succeeded"
                logs = [e.seq for e in seen if e.kind == "logs"]
                assert logs == sorted(logs) and logs[-1] == await engine.store.last_seq(task.task_id)
                assert all(e.task_id == task.task_id and e.local for e in seen)

                result = await engine.merge(task.task_id)
                assert result.merged
                merged = await collect_until(sub, lambda e: e.kind == "merge")
                assert merged[-1].agent == "fake" and merged[-1].commit == result.commit
                assert any(e.kind == "task" and e.state == "merged" for e in merged)
        # The unfiltered subscriber, never read meanwhile, holds one event per kind: the latest.
        pending = {e.kind: e for e in everything.drain()}
        assert set(pending) == {"task", "logs", "merge"} and pending["task"].state == "merged"


async def test_a_task_run_by_another_process_reaches_a_subscriber(make_engine, repo, tmp_path):
    write_config(Path(os.environ["CLI_COUNCIL_CONFIG"]), {"fake": fake("--lines", "5", "--write", "x.txt=1")})
    async with make_engine({}) as engine:
        async with engine.events.subscribe() as sub:
            await anyio.sleep(0.5)  # the store watcher has taken its first look
            run = await anyio.open_process([sys.executable, "-m", "server.cli", "run", "--repo", str(repo),
                                            "--agents", "fake", "--json", "work"], cwd=ROOT)
            try:
                seen = await collect_until(sub, lambda e: e.kind == "task" and e.state == "succeeded")
                with anyio.fail_after(60):
                    await run.wait()
            finally:
                if run.returncode is None:
                    run.kill()
                await run.aclose()
            assert run.returncode == 0
            task_id = seen[-1].task_id
            assert all(not e.local for e in seen)
            # The watcher reads each task's row as it is at its look: states between two looks may be
            # skipped, never reordered.
            states = [e.state for e in seen if e.kind == "task"]
            order = ["queued", "running", "succeeded"]
            assert states == sorted(states, key=order.index) and dict(seen[-1].attempts) == {"fake": "succeeded"}
            # The closing note is stored before the final state: the last batch is announced with it.
            with anyio.fail_after(10):
                while not (logs := [e.seq for e in seen + sub.drain() if e.kind == "logs"]) or \
                        logs[-1] < await engine.store.last_seq(task_id):
                    await anyio.sleep(0.3)
            # And a merge another process makes.
            out = await anyio.run_process([sys.executable, "-m", "server.cli", "merge", task_id, "--json"],
                                          cwd=ROOT, check=False)
            assert out.returncode == 0, out.stderr
            merged = await collect_until(sub, lambda e: e.kind == "merge")
            assert merged[-1].task_id == task_id and not merged[-1].local and merged[-1].commit


async def test_a_subscriber_that_never_reads_stays_bounded_and_never_blocks():
    events = Events()
    async with events.subscribe(max_pending=8) as idle, events.subscribe("t0") as one:
        with anyio.fail_after(5):  # emit never waits: a stuck reader cannot hold it
            for seq in range(1, 10_001):
                events.emit(Event("logs", "t0", seq=seq), wake=False)
            for i in range(100):
                events.emit(Event("task", f"t{i}", state="running"))
        # One task's log batches coalesce into its last seq.
        assert one.drain() == [Event("logs", "t0", seq=10_000), Event("task", "t0", state="running")]
        # Many tasks overflow the buffer: the oldest go, and a gap says to re-read the store.
        pending = idle.drain()
        assert len(pending) == 9 and pending[0].kind == "gap" and idle.dropped == 100 + 1 - 8
        assert [e.task_id for e in pending[1:]] == [f"t{i}" for i in range(92, 100)]
    assert events.subscribers == 0
