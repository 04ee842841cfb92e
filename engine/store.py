"""Tasks, attempts, logs and process groups in SQLite (WAL) under CLI_COUNCIL_HOME.

Every process (a server, a `run`, a `status` from another shell) opens the same council.db. A task
is stored whole as its model's JSON beside the few columns queries need; the process hosting a
task is recorded so that a later start can tell a running task from one whose host died.
Log sequence numbers are picked inside the write transaction that stores the lines, so two
processes writing to one task never pick the same number.
A row this version cannot read (written by an older one, or damaged) is skipped with a warning,
never an error for every caller. sqlite3 blocks, so every call goes through the store's own thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import anyio

from .models import LogLine, Task

T = TypeVar("T")
logger = logging.getLogger("cli_council.store")

# (agent, stream, text, ts) as the engine hands lines to append_logs.
LogRow = tuple[str, str, str, "datetime | str"]

SCHEMA_VERSION = 2

TABLES = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    data TEXT NOT NULL,
    owner_pid INTEGER,
    owner_start INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_by_repo ON tasks (repo, created_at);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state);
CREATE TABLE IF NOT EXISTS logs (
    task_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    agent TEXT NOT NULL,
    stream TEXT NOT NULL,
    text TEXT NOT NULL,
    ts TEXT NOT NULL,
    PRIMARY KEY (task_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS procs (
    task_id TEXT NOT NULL,
    agent TEXT NOT NULL,
    role TEXT NOT NULL DEFAULT 'agent',
    pgid INTEGER NOT NULL,
    start_time INTEGER,
    marker TEXT,
    PRIMARY KEY (task_id, agent, role)
);
"""


def _migrate_v1(db: sqlite3.Connection) -> None:
    """From the first schema: procs gets a role (agent or check) and the attempt's marker."""
    cols = [r[1] for r in db.execute("PRAGMA table_info(procs)")]
    if cols and "role" not in cols:
        db.execute("ALTER TABLE procs RENAME TO procs_v0")
    for stmt in TABLES.split(";"):
        if stmt.strip():
            db.execute(stmt)
    if cols and "role" not in cols:
        db.execute("INSERT INTO procs (task_id, agent, pgid, start_time)"
                   " SELECT task_id, agent, pgid, start_time FROM procs_v0")
        db.execute("DROP TABLE procs_v0")


def _migrate_v2(db: sqlite3.Connection) -> None:
    """Each task row gets a revision, the highest in the table at each save: another process finds
    what changed since its last look with one index range (Events.follow_store)."""
    db.execute("ALTER TABLE tasks ADD COLUMN rev INTEGER NOT NULL DEFAULT 0")
    db.execute("CREATE INDEX IF NOT EXISTS tasks_by_rev ON tasks (rev)")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_v1, _migrate_v2]  # MIGRATIONS[n] takes version n to n+1


class UnreadableTask(ValueError):
    """A stored task this version cannot read; the message names it and says why."""


class LogPage(list):
    """Log lines of one read; `more` says whether the store holds further lines after them."""

    more: bool = False


def _switch_to_wal(db: sqlite3.Connection, patience_s: float = 30.0) -> None:
    """WAL mode for a file that several processes open at once. Changing the journal mode can
    answer "database is locked" at once, without waiting in the busy handler, while another
    connection makes the same change: so it is retried here."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            # Only takes effect on a new, empty file: lets delete_task hand pages back to the disk.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _settle(done: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)


class Store:
    def __init__(self, path: Path):
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        try:
            _switch_to_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._upgrade(db)
        except BaseException:
            db.close()
            raise
        self._db = db

    @staticmethod
    def _upgrade(db: sqlite3.Connection) -> None:
        """Bring the schema to SCHEMA_VERSION once, even when several processes open it at once."""
        if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        with _write(db):
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for migrate in MIGRATIONS[version:]:
                migrate(db)
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(db, *args) on the store's thread. Calls run one at a time, in the order they were made,
        back to back: a limiter held for each call's round trip through the event loop made every
        call wait a loop turn per call ahead of it (100-200 ms each under 20 HTTP clients, for
        queries of 0.1 ms). Like a worker thread's, a started call is not abandoned on cancel."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._jobs.put((fn, args, loop, done))
        with self._worker_lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="council-store", daemon=True)
                self._worker.start()
        with anyio.CancelScope(shield=True):
            return await done

    def _work(self) -> None:
        """Run the queued calls; the thread ends once idle for a second (a new call starts another)."""
        while True:
            try:
                fn, args, loop, done = self._jobs.get(timeout=1.0)
            except queue.Empty:
                with self._worker_lock:
                    if self._jobs.empty():
                        self._worker = None
                        return
                continue
            try:
                if self._db is None:
                    self._open()
                outcome = (fn(self._db, *args), None)
            except BaseException as e:  # handed to the caller, whatever it is
                outcome = (None, e)
            try:
                loop.call_soon_threadsafe(_settle, done, *outcome)
            except RuntimeError:
                pass  # the caller's event loop has closed: nobody is waiting

    async def open(self) -> None:
        await self._call(lambda db: None)

    async def close(self) -> None:
        def close(db):
            db.close()
            self._db = None
        if self._db is not None:
            await self._call(close)

    # tasks

    async def save_task(self, task: Task, owner: tuple[int, int | None] | None = None) -> int:
        """Insert or update the task; returns the revision the row now has."""
        def save(db, data, state) -> int:
            with _write(db):  # the revision is read and used under one write lock
                rev = db.execute("SELECT COALESCE(MAX(rev), 0) + 1 FROM tasks").fetchone()[0]
                db.execute(
                    "INSERT INTO tasks (task_id, repo, state, created_at, data, owner_pid, owner_start, rev)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(task_id) DO UPDATE SET"
                    " state=excluded.state, data=excluded.data, rev=excluded.rev",
                    (task.task_id, task.repo, state, task.created_at.isoformat(), data,
                     owner[0] if owner else None, owner[1] if owner else None, rev))
            return rev
        return await self._call(save, task.model_dump_json(), task.state.value)

    async def get_task(self, task_id: str) -> Task | None:
        """The task, None if there is none; UnreadableTask if its stored row cannot be read."""
        row = await self._call(lambda db: db.execute(
            "SELECT data FROM tasks WHERE task_id = ?", (task_id,)).fetchone())
        if row is None:
            return None
        try:
            return Task.model_validate_json(row[0])
        except ValueError as e:
            raise UnreadableTask(f"task {task_id} is stored in a form this version cannot read "
                                 f"({_first_error(e)}); gc can remove it") from None

    async def list_tasks(self, repo: str | None = None, limit: int = 20, states: list[str] | None = None) -> list[Task]:
        """Newest first; a row that cannot be read is left out (and logged) instead of failing the list."""
        sql, args = "SELECT task_id, data FROM tasks WHERE 1=1", []
        if repo is not None:
            sql += " AND repo = ?"
            args.append(repo)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += states
        sql += " ORDER BY created_at DESC, task_id LIMIT ?"
        args.append(limit)
        rows = await self._call(lambda db: db.execute(sql, args).fetchall())
        return [t for t in (_readable(tid, data) for tid, data in rows) if t is not None]

    async def unreadable_tasks(self) -> list[tuple[str, str]]:
        """(task_id, why) of every stored task this version cannot read, for gc to report or remove."""
        rows = await self._call(lambda db: db.execute("SELECT task_id, data FROM tasks").fetchall())
        bad = []
        for task_id, data in rows:
            try:
                Task.model_validate_json(data)
            except ValueError as e:
                bad.append((task_id, _first_error(e)))
        return bad

    async def owners(self, states: list[str]) -> list[tuple[str, int | None, int | None]]:
        """(task_id, owner_pid, owner_start) of readable tasks in these states: recover() revives
        only what it can read."""
        q = f"SELECT task_id, owner_pid, owner_start, data FROM tasks WHERE state IN ({','.join('?' * len(states))})"
        rows = await self._call(lambda db: db.execute(q, states).fetchall())
        return [(tid, pid, start) for tid, pid, start, data in rows if _readable(tid, data) is not None]

    async def claim(self, task_id: str, owner: tuple[int, int | None]) -> bool:
        """Take a finished task over to run it again (a follow-up round): it becomes `running`, owned
        by `owner`, with no cancel request left from before. False when it is not finished (another
        process claimed it first): one row update decides between racing callers."""
        def claim(db) -> bool:
            with _write(db):
                return db.execute(
                    "UPDATE tasks SET state = 'running', owner_pid = ?, owner_start = ?, cancel_requested = 0"
                    " WHERE task_id = ? AND state NOT IN ('queued', 'running')", (*owner, task_id)).rowcount == 1
        return await self._call(claim)

    async def request_cancel(self, task_id: str) -> None:
        await self._call(lambda db: db.execute(
            "UPDATE tasks SET cancel_requested = 1 WHERE task_id = ?", (task_id,)))

    async def cancel_requested(self, task_ids: list[str]) -> list[str]:
        if not task_ids:
            return []
        q = f"SELECT task_id FROM tasks WHERE cancel_requested = 1 AND task_id IN ({','.join('?' * len(task_ids))})"
        return [r[0] for r in await self._call(lambda db: db.execute(q, task_ids).fetchall())]

    async def delete_task(self, task_id: str, chunk: int = 20_000) -> None:
        """Remove a task with its logs and process records. The logs go first, in chunks, so no
        other process waits long for the write lock and a crash midway leaves a task gc retries."""
        def delete_chunk(db) -> int:
            return db.execute(
                "DELETE FROM logs WHERE task_id = ? AND seq IN"
                " (SELECT seq FROM logs WHERE task_id = ? ORDER BY seq LIMIT ?)", (task_id, task_id, chunk)).rowcount

        def delete_rest(db) -> None:
            with _write(db):
                for table in ("logs", "procs", "tasks"):
                    db.execute(f"DELETE FROM {table} WHERE task_id = ?", (task_id,))
            db.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page only

        while await self._call(delete_chunk) >= chunk:
            pass
        await self._call(delete_rest)

    # changes, for a process following what others write (Events.follow_store)

    async def data_version(self) -> int:
        """A number that changes when another connection (process) commits, and only then."""
        return await self._call(lambda db: db.execute("PRAGMA data_version").fetchone()[0])

    async def max_rev(self) -> int:
        return await self._call(lambda db: db.execute("SELECT COALESCE(MAX(rev), 0) FROM tasks").fetchone()[0])

    async def changed_since(self, rev: int, limit: int = 1000) -> list[tuple[str, int, str, str]]:
        """(task_id, rev, state, data) of the rows saved after revision `rev`, oldest first."""
        return await self._call(lambda db: db.execute(
            "SELECT task_id, rev, state, data FROM tasks WHERE rev > ? ORDER BY rev LIMIT ?", (rev, limit)).fetchall())

    async def last_seqs(self, task_ids: list[str]) -> dict[str, int]:
        """The last stored log seq of each task that has lines (one index seek each)."""
        def read(db) -> dict[str, int]:
            return {tid: seq for tid in task_ids if (seq := _last_seq(db, tid))}
        return await self._call(read) if task_ids else {}

    # figures for /metrics and `cli-council stats`

    async def figures(self) -> dict[str, Any]:
        """What /metrics and `stats` aggregate, read in one go: tasks by state, each readable task's state
        with its attempts as JSON (SQLite cuts them out of the row: prompts stay in the database), and
        the stored log lines. A row whose JSON is damaged is left out."""
        def read(db) -> dict[str, Any]:
            return {
                "tasks": db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall(),
                "attempts": db.execute("SELECT state, json_extract(data, '$.attempts') FROM tasks"
                                       " WHERE json_valid(data)").fetchall(),
                # seqs run 1..n per task, so the last is the count: one index seek per task, no log scan
                "log_lines": db.execute("SELECT COALESCE(SUM((SELECT MAX(seq) FROM logs WHERE logs.task_id ="
                                        " tasks.task_id)), 0) FROM tasks").fetchone()[0],
            }
        return await self._call(read)

    # logs

    async def append_logs(self, task_id: str, rows: Iterable[LogRow]) -> int:
        """Store lines in one transaction, numbered after the task's last stored line; returns the
        last seq. The number is read under the write lock (BEGIN IMMEDIATE) of the write that uses
        it, so every process appending to the task gets its own contiguous block."""
        rows = [(agent, stream, text, ts if isinstance(ts, str) else ts.isoformat()) for agent, stream, text, ts in rows]

        def insert(db, rows) -> int:
            with _write(db):
                first = _last_seq(db, task_id) + 1
                db.executemany(
                    "INSERT INTO logs (task_id, seq, agent, stream, text, ts) VALUES (?, ?, ?, ?, ?, ?)",
                    ((task_id, first + i, *row) for i, row in enumerate(rows)))
            return first + len(rows) - 1

        def append(db) -> int:
            if not rows:
                return _last_seq(db, task_id)
            try:
                return insert(db, rows)
            except UnicodeEncodeError:  # a lone surrogate has no UTF-8 form: store the batch with it replaced
                return insert(db, [tuple(_utf8(v) for v in row) for row in rows])
        return await self._call(append)

    async def last_seq(self, task_id: str) -> int:
        return await self._call(_last_seq, task_id)

    async def read_logs(self, task_id: str, after: int, agent: str | None, limit: int,
                        max_bytes: int = 1_000_000) -> LogPage:
        """Lines after `after`, at most `limit` of them and about `max_bytes` of text (UTF-8), but
        always at least one so a caller makes progress. `.more` on the result: further lines exist."""
        sql = "SELECT seq, agent, stream, text, ts FROM logs WHERE task_id = ? AND seq > ?"
        args: list = [task_id, after]
        if agent is not None:
            sql += " AND agent = ?"
            args.append(agent)
        sql += " ORDER BY seq LIMIT ?"
        args.append(max(1, limit) + 1)

        def read(db) -> LogPage:
            page, size = LogPage(), 0
            for seq, agent_, stream, text, ts in db.execute(sql, args):  # rows come one at a time
                size += len(text.encode("utf-8", "surrogatepass"))
                if page and (len(page) >= limit or size > max_bytes):
                    page.more = True
                    break
                page.append(LogLine(seq=seq, agent=agent_, stream=stream, text=text, ts=ts))
            return page
        return await self._call(read)

    # process groups of running attempts; role "agent" or "check" (one of each per attempt at most)

    async def set_proc(self, task_id: str, agent: str, pgid: int, start_time: int | None,
                       marker: str | None = None, role: str = "agent") -> None:
        await self._call(lambda db: db.execute(
            "INSERT OR REPLACE INTO procs (task_id, agent, role, pgid, start_time, marker) VALUES (?, ?, ?, ?, ?, ?)",
            (task_id, agent, role, pgid, start_time, marker)))

    async def clear_proc(self, task_id: str, agent: str, role: str = "agent") -> None:
        await self._call(lambda db: db.execute(
            "DELETE FROM procs WHERE task_id = ? AND agent = ? AND role = ?", (task_id, agent, role)))

    async def clear_procs(self, task_id: str) -> None:
        """Forget every process record of a task (recover, once it has stopped them)."""
        await self._call(lambda db: db.execute("DELETE FROM procs WHERE task_id = ?", (task_id,)))

    async def procs(self, task_id: str | None = None) -> list[tuple[str, str, int, int | None, str | None]]:
        """(task_id, agent, pgid, start_time, marker) of every recorded process group, of any role."""
        sql = "SELECT task_id, agent, pgid, start_time, marker FROM procs"
        if task_id is None:
            return await self._call(lambda db: db.execute(sql).fetchall())
        return await self._call(lambda db: db.execute(sql + " WHERE task_id = ?", (task_id,)).fetchall())


class _write:
    """BEGIN IMMEDIATE ... COMMIT: takes the write lock up front, so a read-then-write inside
    cannot be overtaken by another process; rolls back on any error."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:  # some errors (disk full) have already rolled it back
            self.db.execute("ROLLBACK")


def _last_seq(db: sqlite3.Connection, task_id: str) -> int:
    return db.execute("SELECT MAX(seq) FROM logs WHERE task_id = ?", (task_id,)).fetchone()[0] or 0


def _utf8(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def _readable(task_id: str, data: str) -> Task | None:
    try:
        return Task.model_validate_json(data)
    except ValueError as e:
        logger.warning("task %s is stored in a form this version cannot read; skipped: %s", task_id, _first_error(e))
        return None


def _first_error(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "the row"
        return f"{where}: {first.get('msg')}"
    return str(e)
