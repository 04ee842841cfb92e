"""Log lines buffered, written in batches and capped per attempt on their way into council.db."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio

from engine.logbook import BUFFER_LINES, Logbook
from engine.store import Store


class Flushes:
    """on_flush as the engine wires it: remembers which task each write woke."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, task_id: str) -> None:
        self.calls.append(task_id)


async def all_lines(store: Store, task_id: str, agent: str | None = None):
    return await store.read_logs(task_id, 0, agent, 10**6, max_bytes=10**9)


async def test_lines_are_written_in_batches_and_a_full_buffer_is_written_at_once(tmp_path):
    store, flushes = Store(tmp_path / "council.db"), Flushes()
    book = Logbook(store, max_bytes=10**9, max_lines=10**6, on_flush=flushes)  # no run(): no timer
    for i in range(2 * BUFFER_LINES + 10):
        await book.write("t1", "a", "stdout", f"line {i}")
    # Two full buffers went out as two writes; the rest waits for a flush.
    assert flushes.calls == ["t1", "t1"]
    assert len(await all_lines(store, "t1")) == 2 * BUFFER_LINES
    await book.flush("t1")
    lines = await all_lines(store, "t1")
    assert [(line.seq, line.text) for line in lines] == [(i + 1, f"line {i}") for i in range(2 * BUFFER_LINES + 10)]
    assert flushes.calls == ["t1"] * 3
    await store.close()


async def test_the_background_flusher_writes_within_moments_and_close_writes_the_rest(tmp_path):
    store, flushes = Store(tmp_path / "council.db"), Flushes()
    book = Logbook(store, max_bytes=10**9, max_lines=10**6, on_flush=flushes)
    async with anyio.create_task_group() as tg:
        tg.start_soon(book.run)
        await book.write("t1", "a", "stdout", "first")
        await book.write("t2", "b", "stderr", "other task")
        with anyio.fail_after(10):
            while len(set(flushes.calls)) < 2:
                await anyio.sleep(0.01)
        assert [line.text for line in await all_lines(store, "t1")] == ["first"]
        tg.cancel_scope.cancel()
    await book.write("t1", "a", "stdout", "after the flusher stopped")
    await book.close()
    assert [line.text for line in await all_lines(store, "t1")] == ["first", "after the flusher stopped"]
    assert [line.stream for line in await all_lines(store, "t2")] == ["stderr"]
    await store.close()


async def test_the_line_cap_cuts_one_attempt_once_and_counts_what_it_dropped(tmp_path):
    store = Store(tmp_path / "council.db")
    book = Logbook(store, max_bytes=10**9, max_lines=10, on_flush=lambda _: None)
    for i in range(25):
        await book.write("t1", "a", "stdout", f"a {i}")
        if i < 10:
            await book.write("t1", "b", "stdout", f"b {i}")
    await book.write("t1", "a", "council", "a's attempt failed", capped=False)
    await book.flush()

    a = await all_lines(store, "t1", "a")
    assert [line.text for line in a[:10]] == [f"a {i}" for i in range(10)]
    cut = [line for line in a if line.text.startswith("output cut")]
    assert len(cut) == 1 and cut[0].stream == "council" and "10 lines" in cut[0].text
    assert a[10] == cut[0] and [line.text for line in a[11:]] == ["a's attempt failed"]
    assert book.dropped("t1", "a") == 15
    assert [line.text for line in await all_lines(store, "t1", "b")] == [f"b {i}" for i in range(10)]
    assert book.dropped("t1", "b") == 0

    book.forget("t1")
    assert book.dropped("t1", "a") == 0
    await book.write("t1", "a", "stdout", "a new run of the task starts counting again")
    await book.flush()
    assert (await all_lines(store, "t1", "a"))[-1].text.startswith("a new run")
    await store.close()


async def test_the_byte_cap_counts_utf8_bytes(tmp_path):
    store = Store(tmp_path / "council.db")
    book = Logbook(store, max_bytes=1000, max_lines=10**6, on_flush=lambda _: None)
    for i in range(30):
        await book.write("t1", "a", "stdout", "é" * 50)  # 100 bytes, 50 characters
    await book.flush()
    texts = [line.text for line in await all_lines(store, "t1")]
    assert texts[:10] == ["é" * 50] * 10
    assert len(texts) == 11 and "1000 bytes" in texts[10]
    assert book.dropped("t1", "a") == 20
    await store.close()


async def test_concurrent_writers_to_one_task_keep_their_order(tmp_path):
    store = Store(tmp_path / "council.db")
    book = Logbook(store, max_bytes=10**9, max_lines=10**6, on_flush=lambda _: None)

    async def agent(name: str) -> None:
        for i in range(3 * BUFFER_LINES):
            await book.write("t1", name, "stdout", f"{name} {i}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(book.run)
        async with anyio.create_task_group() as agents:
            for name in "abcd":
                agents.start_soon(agent, name)
        tg.cancel_scope.cancel()
    await book.close()
    lines = await all_lines(store, "t1")
    assert [line.seq for line in lines] == list(range(1, 4 * 3 * BUFFER_LINES + 1))
    for name in "abcd":
        assert [line.text for line in lines if line.agent == name] == [f"{name} {i}" for i in range(3 * BUFFER_LINES)]
    await store.close()


async def test_flush_returns_only_once_lines_written_by_another_caller_are_stored(tmp_path):
    """A writer's full buffer is on its way to SQLite when the engine flushes at a task's end: the
    flush must wait for that write, or a reader told the task is done could miss lines."""
    path = tmp_path / "council.db"
    store = Store(path)
    await store.open()
    book = Logbook(store, max_bytes=10**9, max_lines=10**6, on_flush=lambda _: None)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock for a while
    flushed = anyio.Event()

    async def flush() -> None:
        await book.flush("t1")
        flushed.set()

    async with anyio.create_task_group() as tg:
        for i in range(BUFFER_LINES - 1):
            await book.write("t1", "a", "stdout", f"line {i}")
        tg.start_soon(book.write, "t1", "a", "stdout", "the line that fills the buffer")
        await anyio.sleep(0.2)
        tg.start_soon(flush)
        await anyio.sleep(0.3)
        try:
            assert not flushed.is_set()
        finally:
            other.execute("COMMIT")
    assert len(await all_lines(store, "t1")) == BUFFER_LINES
    other.close()
    await store.close()


def test_the_log_bench_runs_and_prints_its_json():
    bench = Path(__file__).parents[1] / "bench" / "logs.py"
    out = subprocess.run([sys.executable, str(bench), "--mb", "1", "--agents", "2"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    doc = json.loads(out)
    assert doc["bench"] == "logs"
    assert doc["uncapped"]["lines_stored"] == doc["uncapped"]["lines_offered"] == 10_000
    assert doc["capped"]["lines_dropped"] == 0 and doc["capped"]["peak_rss_mb"] > 0
