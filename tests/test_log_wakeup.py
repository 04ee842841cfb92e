"""A waiting stream_logs wakes on this process's new line by an in-process event (not by polling the
store), still sees lines another process stores, and the logbook's in-memory tail answers exactly
what the store would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio

from engine.logbook import TAIL_LINES, Logbook
from engine.store import Store

ROOT = Path(__file__).resolve().parents[1]

# Prints "first", waits for the file `go` next to it, prints "second", waits for `end`, exits.
STEPPER = ("import os, sys, time\nd = sys.argv[1]\nprint('first', flush=True)\n"
           "while not os.path.exists(os.path.join(d, 'go')): time.sleep(0.02)\nprint('second', flush=True)\n"
           "while not os.path.exists(os.path.join(d, 'end')): time.sleep(0.02)\n")


def stepper(flags: Path) -> dict:
    return {"kind": "command", "argv": [sys.executable, "-c", STEPPER, str(flags)]}


async def read_until(engine, task_id: str, text: str, cursor: int = 0) -> tuple[list, int]:
    seen = []
    while not any(line.text == text for line in seen):
        chunk = await engine.logs(task_id, cursor=cursor, wait_s=5)
        seen += chunk.lines
        cursor = chunk.next_cursor
    return seen, cursor


async def test_a_waiting_reader_wakes_on_a_line_written_here_without_polling(make_engine, repo, tmp_path):
    async with make_engine({"step": stepper(tmp_path)}) as engine:
        task = await engine.submit(str(repo), "step", agents=["step"])
        with anyio.fail_after(30):
            _, cursor = await read_until(engine, task.task_id, "first")
        # No poll within the wait: only the event of this process's own write can end it with a line.
        engine.others_poll_s = 3600
        got = []

        async def wait() -> None:
            got.append(await engine.logs(task.task_id, cursor=cursor, wait_s=600))

        with anyio.fail_after(60):  # far under the 600 s wait: the line woke it
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await anyio.sleep(0.2)
                (tmp_path / "go").touch()
        assert [line.text for line in got[0].lines if line.agent == "step"] == ["second"]
        (tmp_path / "end").touch()
        await engine.wait(task.task_id, 30)


async def test_a_line_another_process_stores_is_still_seen(make_engine, repo, tmp_path, council_home):
    async with make_engine({"step": stepper(tmp_path)}) as engine:
        task = await engine.submit(str(repo), "step", agents=["step"])
        with anyio.fail_after(30):
            seen, cursor = await read_until(engine, task.task_id, "first")
        # Another process appends to this running task's log: no event here, the slow poll finds it.
        code = ("import anyio, sys\nfrom engine.store import Store\n"
                "async def main():\n    s = Store(__import__('pathlib').Path(sys.argv[1]))\n"
                "    await s.append_logs(sys.argv[2], [('council', 'council', 'from elsewhere', '2026-01-01T00:00:00+00:00')])\n"
                "    await s.close()\nanyio.run(main)\n")
        subprocess.run([sys.executable, "-c", code, str(council_home / "council.db"), task.task_id],
                       cwd=ROOT, check=True)
        with anyio.fail_after(30):
            chunk = await engine.logs(task.task_id, cursor=cursor, wait_s=20)
        assert [line.text for line in chunk.lines] == ["from elsewhere"]
        cursor = chunk.next_cursor
        # Our next lines are numbered after the other process's and are read right.
        (tmp_path / "go").touch()
        with anyio.fail_after(30):
            more, cursor = await read_until(engine, task.task_id, "second", cursor)
        (tmp_path / "end").touch()
        await engine.wait(task.task_id, 30)
        everything = (await engine.logs(task.task_id, limit=5000)).lines
    seqs = [line.seq for line in everything]
    assert seqs == list(range(1, len(seqs) + 1))
    texts = [line.text for line in everything]
    assert texts.index("first") < texts.index("from elsewhere") < texts.index("second")


async def test_the_tail_answers_as_the_store_does(tmp_path):
    store = Store(tmp_path / "council.db")
    book = Logbook(store, max_bytes=10**9, max_lines=10**6, on_flush=lambda _: None)
    for i in range(30):
        await book.write("t1", "a" if i % 3 else "b", "stdout", f"line {i} \udcff" if i == 7 else f"line {i}")
    await book.flush("t1")
    for after, agent, limit in [(0, None, 500), (5, None, 4), (10, "b", 3), (29, None, 10), (30, "a", 10)]:
        tail = book.read("t1", after, agent, limit)
        stored = await store.read_logs("t1", after, agent, limit)
        assert tail == stored and tail.more == stored.more
    # Another process's lines between two of our batches: the tail restarts after them.
    other = Store(tmp_path / "council.db")
    await other.append_logs("t1", [("x", "stdout", "theirs", "2026-01-01T00:00:00+00:00")])
    await other.close()
    await book.write("t1", "a", "stdout", "ours again")
    await book.flush("t1")
    assert book.read("t1", 0, None, 500) is None  # no longer all in memory: read the store
    assert [line.text for line in book.read("t1", 31, None, 500)] == ["ours again"]
    assert [line.text for line in await store.read_logs("t1", 30, None, 500)] == ["theirs", "ours again"]
    await store.close()


async def test_the_tail_is_bounded_and_older_lines_come_from_the_store(tmp_path):
    store = Store(tmp_path / "council.db")
    book = Logbook(store, max_bytes=10**9, max_lines=10**6, on_flush=lambda _: None)
    n = TAIL_LINES * 3
    for i in range(n):
        await book.write("t1", "a", "stdout", f"line {i}")
        if i % 700 == 0:
            await book.flush("t1")
    await book.flush("t1")
    assert book.read("t1", 0, None, 10) is None
    assert book.read("t1", n - TAIL_LINES - 1, None, 10) is None  # at most TAIL_LINES are kept
    recent = book.read("t1", n - 10, None, 500)
    assert recent == await store.read_logs("t1", n - 10, None, 500) and len(recent) == 10
    book.forget("t1")
    assert book.read("t1", n - 10, None, 500) is None  # a finished task's readers read the store
    await store.close()
