"""Tasks, attempts, logs and process groups in SQLite (WAL) under CLI_COUNCIL_HOME.

Every process (a server, a `run`, a `status` from another shell) opens the same council.db. A task
is stored whole as its model's JSON beside the few columns queries need; the process hosting a
task is recorded so that a later start can tell a running task from one whose host died.
sqlite3 blocks, so every call goes through one worker thread at a time.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import anyio

from .models import LogLine, Task

T = TypeVar("T")

SCHEMA = """
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
    pgid INTEGER NOT NULL,
    start_time INTEGER,
    PRIMARY KEY (task_id, agent)
);
"""


class Store:
    def __init__(self, path: Path):
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._limiter = anyio.CapacityLimiter(1)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=30000")
        db.executescript(SCHEMA)
        self._db = db

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        def locked():
            with self._lock:
                if self._db is None:
                    self._open()
                return fn(self._db, *args)
        return await anyio.to_thread.run_sync(locked, limiter=self._limiter)

    async def open(self) -> None:
        await self._call(lambda db: None)

    async def close(self) -> None:
        def close(db):
            db.close()
            self._db = None
        if self._db is not None:
            await self._call(close)

    # tasks

    async def save_task(self, task: Task, owner: tuple[int, int | None] | None = None) -> None:
        def save(db, data, state):
            db.execute(
                "INSERT INTO tasks (task_id, repo, state, created_at, data, owner_pid, owner_start)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(task_id) DO UPDATE SET"
                " state=excluded.state, data=excluded.data",
                (task.task_id, task.repo, state, task.created_at.isoformat(), data,
                 owner[0] if owner else None, owner[1] if owner else None))
        await self._call(save, task.model_dump_json(), task.state.value)

    async def get_task(self, task_id: str) -> Task | None:
        row = await self._call(lambda db: db.execute(
            "SELECT data FROM tasks WHERE task_id = ?", (task_id,)).fetchone())
        return Task.model_validate_json(row[0]) if row else None

    async def list_tasks(self, repo: str | None = None, limit: int = 20, states: list[str] | None = None) -> list[Task]:
        sql, args = "SELECT data FROM tasks WHERE 1=1", []
        if repo is not None:
            sql += " AND repo = ?"
            args.append(repo)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += states
        sql += " ORDER BY created_at DESC, task_id LIMIT ?"
        args.append(limit)
        rows = await self._call(lambda db: db.execute(sql, args).fetchall())
        return [Task.model_validate_json(r[0]) for r in rows]

    async def owners(self, states: list[str]) -> list[tuple[str, int | None, int | None]]:
        """(task_id, owner_pid, owner_start) of tasks in these states."""
        q = f"SELECT task_id, owner_pid, owner_start FROM tasks WHERE state IN ({','.join('?' * len(states))})"
        return await self._call(lambda db: db.execute(q, states).fetchall())

    async def request_cancel(self, task_id: str) -> None:
        await self._call(lambda db: db.execute(
            "UPDATE tasks SET cancel_requested = 1 WHERE task_id = ?", (task_id,)))

    async def cancel_requested(self, task_ids: list[str]) -> list[str]:
        if not task_ids:
            return []
        q = f"SELECT task_id FROM tasks WHERE cancel_requested = 1 AND task_id IN ({','.join('?' * len(task_ids))})"
        return [r[0] for r in await self._call(lambda db: db.execute(q, task_ids).fetchall())]

    # logs

    async def append_log(self, task_id: str, line: LogLine) -> None:
        await self._call(lambda db: db.execute(
            "INSERT INTO logs (task_id, seq, agent, stream, text, ts) VALUES (?, ?, ?, ?, ?, ?)",
            (task_id, line.seq, line.agent, line.stream, line.text, line.ts.isoformat())))

    async def last_seq(self, task_id: str) -> int:
        row = await self._call(lambda db: db.execute(
            "SELECT MAX(seq) FROM logs WHERE task_id = ?", (task_id,)).fetchone())
        return row[0] or 0

    async def read_logs(self, task_id: str, after: int, agent: str | None, limit: int) -> list[LogLine]:
        sql = "SELECT seq, agent, stream, text, ts FROM logs WHERE task_id = ? AND seq > ?"
        args: list = [task_id, after]
        if agent is not None:
            sql += " AND agent = ?"
            args.append(agent)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        rows = await self._call(lambda db: db.execute(sql, args).fetchall())
        return [LogLine(seq=r[0], agent=r[1], stream=r[2], text=r[3], ts=r[4]) for r in rows]

    # process groups of running attempts

    async def set_proc(self, task_id: str, agent: str, pgid: int, start_time: int | None) -> None:
        await self._call(lambda db: db.execute(
            "INSERT OR REPLACE INTO procs (task_id, agent, pgid, start_time) VALUES (?, ?, ?, ?)",
            (task_id, agent, pgid, start_time)))

    async def clear_proc(self, task_id: str, agent: str) -> None:
        await self._call(lambda db: db.execute(
            "DELETE FROM procs WHERE task_id = ? AND agent = ?", (task_id, agent)))

    async def procs(self, task_id: str | None = None) -> list[tuple[str, str, int, int | None]]:
        if task_id is None:
            return await self._call(lambda db: db.execute(
                "SELECT task_id, agent, pgid, start_time FROM procs").fetchall())
        return await self._call(lambda db: db.execute(
            "SELECT task_id, agent, pgid, start_time FROM procs WHERE task_id = ?", (task_id,)).fetchall())

