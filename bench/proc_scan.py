"""What finding a run's marked processes costs: one /proc scan, with the machine holding about
--procs processes (sleepers are started to get there, --marked of them carrying the marker).
Prints one JSON document.

    python bench/proc_scan.py [--procs 300] [--marked 5] [--rounds 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
import uuid

from engine import runner


def count() -> int:
    return sum(name.isdigit() for name in os.listdir("/proc"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=300)
    ap.add_argument("--marked", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=200)
    a = ap.parse_args()
    marker = f"bench-{uuid.uuid4().hex}"
    env = {**os.environ, runner.MARKER_VAR: marker}
    n = max(a.marked, a.procs - count())
    sleepers = [subprocess.Popen(["sleep", "600"], env=env if i < a.marked else None) for i in range(n)]
    try:
        while len(runner.marked_pids(marker)) < a.marked:  # until every marked sleeper has exec'd
            time.sleep(0.01)

        def timed(fn, *args) -> list[float]:
            out = []
            for _ in range(a.rounds):
                t = time.perf_counter()
                fn(*args)
                out.append((time.perf_counter() - t) * 1000)
            return out

        scan = timed(runner.marked_pids, marker)
        group = timed(runner.group_alive, 1 << 30)
        print(json.dumps({
            "bench": "proc_scan", "processes": count(), "marked": a.marked, "rounds": a.rounds,
            "marked_pids_ms": {"p50": round(statistics.median(scan), 3),
                               "p99": round(sorted(scan)[int(len(scan) * 0.99) - 1], 3)},
            "group_alive_ms": {"p50": round(statistics.median(group), 3),
                               "p99": round(sorted(group)[int(len(group) * 0.99) - 1], 3)},
        }))
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
