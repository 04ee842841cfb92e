"""Log lines on their way to the store: buffered, written in batches, capped per attempt.

One INSERT per line held a fast agent back to what SQLite commits per second and kept every line
it ever printed. Here a line is appended to its task's buffer and written with the others of its
task in one transaction by a background flusher, every ~50 ms or as soon as a buffer is full; the
writer goes on reading the agent meanwhile and waits for SQLite only when it is BEHIND buffers
ahead, so memory stays bounded.
Each attempt, (task_id, agent), may store at most max_bytes / max_lines of capped output: the first
line over either cap becomes one council line saying so, and later lines are only counted.

A reader waiting for a task's next line must not wait for the timer: when `hurry(task_id)` says
someone waits, a write wakes the flusher at once (lines that come meanwhile join the next batch,
so a fast agent still gets big batches). What was stored is also kept in memory, the task's tail,
so that reader gets the new lines without reading them back from SQLite.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable

import anyio

from .models import LogLine, now
from .store import LogPage, LogRow, Store

logger = logging.getLogger("cli_council.logbook")

FLUSH_INTERVAL_S = 0.05
BUFFER_LINES = 500
BUFFER_BYTES = 256 * 1024
BEHIND = 4  # buffers a writer may be ahead of the flusher before it waits for the store
TAIL_LINES = 1000  # per task, of what was stored last: enough for a reader keeping up
TAIL_BYTES = 256 * 1024
TAIL_TASKS = 32  # tasks whose tails are kept, the most recently written


class Tail:
    """The lines stored last for one task: every stored line with after < seq <= after + len(rows).
    Lines of another process interleaved with ours break the run; the tail then restarts."""

    def __init__(self) -> None:
        self.after = 0
        self.rows: list[tuple[str, str, str, str]] = []
        self.bytes = 0

    def extend(self, last_seq: int, rows: list[LogRow]) -> None:
        first = last_seq - len(rows) + 1
        if first != self.after + len(self.rows) + 1:
            self.after, self.rows, self.bytes = first - 1, [], 0
        self.rows += rows
        self.bytes += sum(len(r[2]) for r in rows)
        while len(self.rows) > TAIL_LINES or (self.bytes > TAIL_BYTES and len(self.rows) > 1):
            cut = max(len(self.rows) - TAIL_LINES, len(self.rows) // 4, 1)  # a quarter at a time: amortized
            self.bytes -= sum(len(r[2]) for r in self.rows[:cut])
            self.after += cut
            del self.rows[:cut]

    def read(self, after: int, agent: str | None, limit: int, max_bytes: int) -> LogPage | None:
        """As Store.read_logs, or None when lines after `after` may be older than the tail."""
        if after < self.after:
            return None
        page, size = LogPage(), 0
        for i in range(after - self.after, len(self.rows)):
            agent_, stream, text, ts = self.rows[i]
            if agent is not None and agent_ != agent:
                continue
            try:
                size += len(text.encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate: the store kept it replaced, so do we
                text = text.encode("utf-8", "replace").decode("utf-8")
                size += len(text.encode("utf-8"))
            if page and (len(page) >= limit or size > max_bytes):
                page.more = True
                break
            page.append(LogLine(seq=self.after + i + 1, agent=agent_, stream=stream, text=text, ts=ts))
        return page


class Logbook:
    def __init__(self, store: Store, *, max_bytes: int, max_lines: int, on_flush: Callable[[str], None],
                 hurry: Callable[[str], bool] = lambda task_id: False,
                 on_stored: Callable[[str, int], None] | None = None):
        """on_flush(task_id) after a task's lines are stored, then on_stored(task_id, last seq) (the
        event stream); hurry(task_id): someone waits for them."""
        self.store = store
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self.on_flush = on_flush
        self.on_stored = on_stored
        self.hurry = hurry
        self._tails: OrderedDict[str, Tail] = OrderedDict()
        self._buf: dict[str, list[LogRow]] = {}
        self._buf_bytes: dict[str, int] = {}
        self._locks: dict[str, anyio.Lock] = {}  # one writer per task at a time keeps seqs in order
        self._used: dict[tuple[str, str], list[int]] = {}  # [bytes, lines] stored per attempt
        self._dropped: dict[tuple[str, str], int] = {}
        self._pending = anyio.Event()
        self._urgent = anyio.Event()
        self._flusher = False  # run() is on duty
        self._stamp = (0.0, "")  # (time.time(), its ISO form): lines of one millisecond share it

    async def run(self) -> None:
        """Write what is buffered every FLUSH_INTERVAL_S while there is anything; start it in the
        engine's task group. When it is cancelled, close() writes the rest."""
        self._flusher = True
        try:
            await self._flush_when_due()
        finally:
            self._flusher = False

    async def _flush_when_due(self) -> None:
        while True:
            await self._pending.wait()
            with anyio.move_on_after(FLUSH_INTERVAL_S):
                await self._urgent.wait()
            self._pending, self._urgent = anyio.Event(), anyio.Event()
            for task_id in list(self._buf):
                try:
                    await self.flush(task_id)
                except Exception:  # a failed write loses that batch, never the engine
                    logger.exception("writing log lines of task %s failed", task_id)

    async def write(self, task_id: str, agent: str, stream: str, text: str, *, capped: bool = True) -> None:
        """Queue one line; returns at once unless the task's buffer is well over full, then writes it first.
        Capped lines count against the attempt's caps; council notes pass capped=False."""
        if capped:
            key = (task_id, agent)
            if key in self._dropped:
                self._dropped[key] += 1
                return
            used = self._used.setdefault(key, [0, 0])
            size = len(text.encode("utf-8", "surrogatepass"))
            if used[0] + size > self.max_bytes or used[1] + 1 > self.max_lines:
                self._dropped[key] = 1
                stream, text = "council", (f"output cut: this attempt reached the log cap of {self.max_bytes} bytes"
                                           f" / {self.max_lines} lines; later output is not stored")
            else:
                used[0] += size
                used[1] += 1
        buf = self._buf.setdefault(task_id, [])
        t = time.time()
        if t - self._stamp[0] >= 0.001:
            self._stamp = (t, now().isoformat())
        buf.append((agent, stream, text, self._stamp[1]))
        self._buf_bytes[task_id] = self._buf_bytes.get(task_id, 0) + len(text)
        self._pending.set()
        if self.hurry(task_id):
            self._urgent.set()
        if len(buf) >= BUFFER_LINES or self._buf_bytes[task_id] >= BUFFER_BYTES:
            # With the flusher on duty the writer goes on reading while a full batch is stored, and
            # waits only when several batches are behind; without it, the writer stores it.
            if not self._flusher or len(buf) >= BEHIND * BUFFER_LINES or self._buf_bytes[task_id] >= BEHIND * BUFFER_BYTES:
                await self.flush(task_id)
            else:
                self._urgent.set()

    async def flush(self, task_id: str | None = None) -> None:
        """Write what is buffered for this task (every task if None) now."""
        for tid in [task_id] if task_id is not None else list(self._buf):
            lock = self._locks.setdefault(tid, anyio.Lock())
            async with lock:
                rows = self._buf.pop(tid, None)
                self._buf_bytes.pop(tid, None)
                if rows:
                    # Taken from the buffer: written even if the caller is cancelled meanwhile.
                    with anyio.CancelScope(shield=True):
                        last = await self.store.append_logs(tid, rows)
                    tail = self._tails.pop(tid, None) or Tail()
                    tail.extend(last, rows)
                    self._tails[tid] = tail
                    while len(self._tails) > TAIL_TASKS:
                        self._tails.popitem(last=False)
                    self.on_flush(tid)
                    if self.on_stored is not None:
                        self.on_stored(tid, last)

    async def close(self) -> None:
        """Write everything still buffered; call it after cancelling run(), before the store closes."""
        with anyio.CancelScope(shield=True):
            await self.flush()

    def urge(self, task_id: str) -> None:
        """Store the task's buffered lines now, not at the timer (someone waits for them)."""
        if self._buf.get(task_id):
            self._urgent.set()

    def read(self, task_id: str, after: int, agent: str | None, limit: int,
             max_bytes: int = 1_000_000) -> LogPage | None:
        """Stored lines after `after` from memory, as Store.read_logs gives them, or None when this
        process does not hold them all (read the store then). Lines another process stored after
        ours are not known here."""
        tail = self._tails.get(task_id)
        return tail.read(after, agent, limit, max_bytes) if tail is not None else None

    def dropped(self, task_id: str, agent: str) -> int:
        """Lines of this attempt not stored because it reached a cap (the cut line's included)."""
        return self._dropped.get((task_id, agent), 0)

    def forget(self, task_id: str) -> None:
        """Drop a finished task's counters (read dropped() first); buffered lines are still written."""
        for key in [k for k in self._used if k[0] == task_id] + [k for k in self._dropped if k[0] == task_id]:
            self._used.pop(key, None)
            self._dropped.pop(key, None)
        self._tails.pop(task_id, None)  # a finished task's readers read the store
        lock = self._locks.get(task_id)
        if lock is not None and not lock.locked() and task_id not in self._buf:
            del self._locks[task_id]
