"""Log ingestion through the Logbook into council.db, and what a flood costs. Prints one JSON document.

uncapped: --mb of --line-bytes lines from --agents agents of one task, caps high enough not to cut:
          lines/s and MB/s into SQLite, council.db size.
capped:   the same flood under the default per-attempt caps (20 MB / 200,000 lines): council.db
          size, lines stored and dropped.
Each scenario runs in a fresh process so its peak RSS (getrusage) is its own; while the flood is
written, a reader pages the task (1 MB pages, as stream_logs does) and its latency is reported.

    python bench/logs.py [--mb 100] [--line-bytes 100] [--agents 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from engine.config import EngineSettings
from engine.logbook import Logbook
from engine.store import Store


async def flood(db: Path, mb: int, line_bytes: int, agents: int, max_bytes: int, max_lines: int) -> dict:
    store = Store(db)
    await store.open()
    book = Logbook(store, max_bytes=max_bytes, max_lines=max_lines, on_flush=lambda _: None)
    n = mb * 1_000_000 // line_bytes // agents
    reads: list[float] = []
    done = anyio.Event()

    async def agent(name: str) -> None:
        body = "x" * (line_bytes - 12)
        for i in range(n):
            await book.write("t1", name, "stdout", f"{i:>11} {body}")

    async def reader() -> None:
        cursor = 0
        while not done.is_set():
            t = time.perf_counter()
            page = await store.read_logs("t1", cursor, None, 5000, max_bytes=1_000_000)
            reads.append(time.perf_counter() - t)
            cursor = page[-1].seq if page else cursor
            await anyio.sleep(0.1)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(book.run)
        tg.start_soon(reader)
        async with anyio.create_task_group() as writers:
            for a in range(agents):
                writers.start_soon(agent, f"agent{a}")
        await book.close()
        done.set()
        tg.cancel_scope.cancel()
    elapsed = time.perf_counter() - t0
    stored = await store.last_seq("t1")
    dropped = sum(book.dropped("t1", f"agent{a}") for a in range(agents))
    await store.close()
    with sqlite3.connect(db) as c:  # fold the WAL in so the file size is the data's
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return {
        "lines_offered": n * agents, "lines_stored": stored, "lines_dropped": dropped,
        "seconds": round(elapsed, 2),
        "lines_per_s": round(n * agents / elapsed), "mb_per_s": round(n * agents * line_bytes / elapsed / 1e6, 1),
        "db_mb": round(db.stat().st_size / 1e6, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "read_1mb_page_ms": {"n": len(reads), "p50": round(statistics.median(reads) * 1000, 1) if reads else None,
                             "max": round(max(reads) * 1000, 1) if reads else None},
    }


def scenario(args) -> dict:
    caps = EngineSettings()
    max_bytes, max_lines = ((caps.log_max_bytes, caps.log_max_lines) if args.scenario == "capped"
                            else (10**12, 10**9))
    with tempfile.TemporaryDirectory() as tmp:
        return anyio.run(flood, Path(tmp) / "council.db", args.mb, args.line_bytes, args.agents, max_bytes, max_lines)


def main(args) -> dict:
    out = {"bench": "logs", "mb": args.mb, "line_bytes": args.line_bytes, "agents": args.agents}
    for name in ("uncapped", "capped"):
        cmd = [sys.executable, __file__, "--scenario", name, "--mb", str(args.mb),
               "--line-bytes", str(args.line_bytes), "--agents", str(args.agents)]
        out[name] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    caps = EngineSettings()
    out["caps"] = {"log_max_bytes": caps.log_max_bytes, "log_max_lines": caps.log_max_lines}
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=100)
    p.add_argument("--line-bytes", type=int, default=100)
    p.add_argument("--agents", type=int, default=1)
    p.add_argument("--scenario", choices=["uncapped", "capped"])
    a = p.parse_args()
    print(json.dumps(scenario(a) if a.scenario else main(a)))
