"""Fan-out cost of the engine as a ratio to git's own floor, measured in the same run.

floor:  for each agent, raw `git worktree add -b` of the repo plus the exec of the agent process,
        one after the other (git 2.39 cannot add worktrees to one repo concurrently).
engine: from submit_task's call until every agent process has started, for the same agents.
Also: how long submit itself takes, and the process's peak RSS. Prints one JSON document.

    python bench/fanout.py [--files 2000] [--agents 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from engine.config import parse_config
from engine.engine import Engine

# The agent records the moment it started running, then exits without changes.
STAMP = "import sys, time, pathlib; pathlib.Path(sys.argv[1]).write_text(repr(time.time()))"


def make_repo(root: Path, files: int) -> Path:
    repo = root / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    for i in range(files):
        d = repo / f"pkg{i % 50}"
        d.mkdir(exist_ok=True)
        (d / f"mod{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * 40)
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init"], cwd=repo, check=True)
    return repo


def floor(repo: Path, root: Path, agents: int, tag: str) -> float:
    start = time.perf_counter()
    for i in range(agents):
        wt = root / f"floor-{tag}-{i}"
        subprocess.run(["git", "worktree", "add", "-q", "-b", f"floor/{tag}/{i}", str(wt), "HEAD"], cwd=repo, check=True)
        subprocess.Popen([sys.executable, "-c", STAMP, str(root / f"floor-{tag}-{i}.stamp")], cwd=wt).wait()
    return time.perf_counter() - start


async def engine_round(engine: Engine, repo: Path, stamps: Path, names: list[str]) -> tuple[float, float]:
    for n in names:
        (stamps / n).unlink(missing_ok=True)
    t0 = time.time()
    task = await engine.submit(str(repo), "bench", agents=names)
    submit_s = time.time() - t0
    await engine.wait(task.task_id, 120)
    started = max(float((stamps / n).read_text()) for n in names)
    return started - t0, submit_s


async def main(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="council-bench-"))
    try:
        repo = make_repo(root, args.files)
        stamps = root / "stamps"
        stamps.mkdir()
        names = [f"a{i}" for i in range(args.agents)]
        cfg = parse_config({"agents": {n: {"kind": "command", "argv": [sys.executable, "-c", STAMP, str(stamps / n)]}
                                       for n in names}})
        floors, engines, submits = [], [], []
        async with Engine(cfg, home=root / "home") as engine:
            for r in range(args.rounds):
                floors.append(await anyio.to_thread.run_sync(floor, repo, root, args.agents, str(r)))
                e, s = await engine_round(engine, repo, stamps, names)
                engines.append(e)
                submits.append(s)
        f, e = statistics.median(floors), statistics.median(engines)
        return {
            "bench": "fanout", "files": args.files, "agents": args.agents, "rounds": args.rounds,
            "floor_s": round(f, 4), "engine_s": round(e, 4), "ratio": round(e / f, 3),
            "submit_ms": round(statistics.median(submits) * 1000, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    os.environ.setdefault("GIT_CONFIG_NOSYSTEM", "1")
    print(json.dumps(anyio.run(main, p.parse_args())))
