"""The measurements of `python -m bench`, each against its floor taken in the same run.

Every function takes the World, the prepared repos and the sample counts, drives a real server
over stdio, and returns plain figures (seconds, MB, counts) for the report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import anyio

from . import load
from .repos import fresh_clone
from .world import EDITOR, FLOOD, QUICK, SLEEPER, STAMP, TICKER, World, agent, run_program

AGENTS = 4


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def _stamps(paths: list[Path], within: float = 900) -> float:
    """The latest of the agents' start times, once all have written theirs."""
    deadline = time.monotonic() + within
    while not all(p.exists() and p.read_text() for p in paths):
        if time.monotonic() > deadline:
            raise TimeoutError("not every agent started")
        await anyio.sleep(0.005)
    return max(float(p.read_text()) for p in paths)


# cold fan-out: submit_task -> all 4 agents started, vs 4 parallel `git worktree add` + 4 execs

def parallel_floor(repo: Path, root: Path, env: dict[str, str]) -> float:
    """4 `git worktree add` at once on a fresh clone (a failed one retried: git 2.39 races), each
    followed by the exec of the same stamp program the agents run: until the last one started."""
    stamps = [root / f"floor-{i}.stamp" for i in range(AGENTS)]

    def one(i: int) -> None:
        wt = root / f"floor-wt-{i}"
        for _ in range(5):
            done = subprocess.run(["git", "-c", "core.hooksPath=/dev/null", "worktree", "add", "-q", "-b",
                                   f"floor/{i}", str(wt), "HEAD"], cwd=repo, env=env, capture_output=True)
            if done.returncode == 0:
                break
            subprocess.run(["git", "worktree", "prune"], cwd=repo, env=env)
            subprocess.run(["git", "branch", "-D", f"floor/{i}"], cwd=repo, env=env, capture_output=True)
        else:
            raise RuntimeError(done.stderr.decode())
        subprocess.run(run_program(STAMP, str(stamps[i])), cwd=wt, env=env, check=True)

    t0 = time.time()
    with ThreadPoolExecutor(AGENTS) as pool:
        list(pool.map(one, range(AGENTS)))
    return max(float(p.read_text()) for p in stamps) - t0


async def fanout(world: World, repos: dict[str, Path], samples: int) -> dict:
    stamps = world.root / "stamps"
    stamps.mkdir(exist_ok=True)
    names = [f"a{i}" for i in range(AGENTS)]
    config = {"agents": {n: agent(STAMP, str(stamps / n)) for n in names}}
    out = {}
    async with world.serve("fanout", config) as s:
        for size, src in repos.items():
            floors, engine, submits = [], [], []
            for k in range(samples):  # interleaved, the order alternating: floor, engine, engine, floor, ...
                where = world.root / f"fan-{size}-{k}"
                where.mkdir()
                floor_repo = fresh_clone(src, where / "floor-repo", world.env)
                repo = fresh_clone(src, where / "repo", world.env)
                await anyio.to_thread.run_sync(refresh_indexes, [repo], world.env)

                async def floor() -> None:
                    await anyio.to_thread.run_sync(settle)
                    floors.append(await anyio.to_thread.run_sync(parallel_floor, floor_repo, where, world.env))

                async def ours() -> None:
                    for n in names:
                        (stamps / n).unlink(missing_ok=True)
                    await anyio.to_thread.run_sync(settle)
                    t0 = time.time()
                    call_s, task = await s.timed("submit_task", repo=str(repo), prompt="start", agents=names)
                    engine.append(await _stamps([stamps / n for n in names]) - t0)
                    submits.append(call_s)
                    await s.finish(task["task_id"])
                    await s.call("discard_task", task_id=task["task_id"])

                for part in ((floor, ours) if k % 2 == 0 else (ours, floor)):
                    await part()
                await anyio.to_thread.run_sync(shutil.rmtree, where)  # 20,000-file checkouts add up
            out[size] = {"floor_s": median(floors), "engine_s": median(engine), "submit_s": median(submits),
                         "floor_samples": floors, "engine_samples": engine}
    return out


def settle() -> None:
    """Write back what earlier steps left dirty (clones, removed checkouts), so that a sample pays
    for its own disk writes only, whichever ran before it."""
    os.sync()


async def pool_full(home: Path, repo: Path, size: int, within: float = 300) -> None:
    """Until the server's warm pool holds `size` checked-out entries of `repo` (worktrees/pool/<owner>/<id>)
    and no git is still writing one, plus the moment the pool takes to note them ready (it refreshes
    an entry's index in the second after its checkout, then checks it)."""
    deadline = time.monotonic() + within
    entries = home / "worktrees" / "pool"
    while time.monotonic() < deadline:
        ready = [e for e in entries.glob("*/*") if _git_dir(e) and _git_dir(e).is_relative_to(repo / ".git")]
        if len(ready) >= size and not any(_locked(e) for e in ready):
            await anyio.sleep(1.5)
            return
        await anyio.sleep(0.05)
    raise TimeoutError(f"the warm pool did not fill to {size} within {within:g} s")


def _git_dir(worktree: Path) -> Path | None:
    """The worktree's private git dir (under its repo's .git/worktrees), from its `.git` file."""
    try:
        return Path(worktree.joinpath(".git").read_text().split(":", 1)[1].strip())
    except (OSError, IndexError):
        return None


def _locked(worktree: Path) -> bool:
    """Whether git still holds the worktree's index lock (its checkout is running)."""
    gitdir = _git_dir(worktree)
    return gitdir is None or (gitdir / "index.lock").exists() or not (gitdir / "index").exists()


async def _pool_hits(s, task_id: str) -> int:
    """How many of the task's attempts say in their log that their worktree came from the pool."""
    chunk = await s.call("stream_logs", task_id=task_id, limit=5000)
    return len({line["agent"] for line in chunk["lines"] if "ready from the warm pool" in line["text"]})


async def warm_fanout(world: World, repos: dict[str, Path], samples: int) -> dict:
    """As fanout, with `[pool] size = 4`: ready worktrees made ahead."""
    stamps = world.root / "warm-stamps"
    stamps.mkdir(exist_ok=True)
    names = [f"a{i}" for i in range(AGENTS)]
    config = {"pool": {"size": AGENTS, "max_files": 10**7},
              "agents": {n: agent(STAMP, str(stamps / n)) for n in names}}
    out = {}
    async with world.serve("warm", config) as s:
        for size, src in repos.items():
            repo = fresh_clone(src, world.root / f"warm-{size}", world.env)
            await anyio.to_thread.run_sync(refresh_indexes, [repo], world.env)
            times, hits = [], []
            for k in range(samples + 1):  # the first task makes the pool; it is not counted
                for n in names:
                    (stamps / n).unlink(missing_ok=True)
                if k:  # the pool refills in the background: measure a full one
                    await pool_full(s.home, repo, AGENTS)
                await anyio.to_thread.run_sync(settle)
                t0 = time.time()
                task = await s.call("submit_task", repo=str(repo), prompt="start", agents=names)
                started = await _stamps([stamps / n for n in names]) - t0
                await s.finish(task["task_id"])
                if k:
                    times.append(started)
                    hits.append(await _pool_hits(s, task["task_id"]))
                await s.call("discard_task", task_id=task["task_id"])
            # The figure is of takes from the pool: a sample where an agent got a fresh worktree
            # (the pool had not verified its entries yet) is reported beside it, not in it.
            warm = [t for t, h in zip(times, hits) if h == AGENTS]
            out[size] = {"engine_s": median(warm), "samples": times, "pool_hits": hits}
    return out


async def efficiency(world: World, repo_src: Path, samples: int, sleep_s: float = 2.0) -> dict:
    """4 agents that each sleep `sleep_s`: sleep_s / (submit_task call -> task finished), each sample on
    a fresh clone (4 cold worktrees); then `warm`: the same with `[pool] size = 4`, measured once the
    pool holds 4 entries again (as warm_fanout)."""
    names = [f"s{i}" for i in range(AGENTS)]
    config = {"agents": {n: agent(SLEEPER, str(sleep_s)) for n in names}}

    async def sample(s, repo: Path) -> tuple[float, str]:
        await anyio.to_thread.run_sync(settle)
        t0 = time.perf_counter()
        task = await s.call("submit_task", repo=str(repo), prompt="sleep", agents=names)
        task = await s.finish(task["task_id"])
        assert task["state"] == "succeeded", task
        return time.perf_counter() - t0, task["task_id"]

    walls, warm, hits = [], [], []
    async with world.serve("efficiency", config) as s:
        for k in range(samples):
            repo = fresh_clone(repo_src, world.root / f"eff-{k}", world.env)
            await anyio.to_thread.run_sync(refresh_indexes, [repo], world.env)
            walls.append((await sample(s, repo))[0])
    async with world.serve("efficiency-warm", {**config, "pool": {"size": AGENTS}}) as s:
        repo = fresh_clone(repo_src, world.root / "eff-warm", world.env)
        await anyio.to_thread.run_sync(refresh_indexes, [repo], world.env)
        for k in range(samples + 1):  # the first task makes the pool; it is not counted
            if k:
                await pool_full(s.home, repo, AGENTS)
            wall, task_id = await sample(s, repo)
            if k:
                warm.append(wall)
                hits.append(await _pool_hits(s, task_id))
            await s.call("discard_task", task_id=task_id)
    full = [w for w, h in zip(warm, hits) if h == AGENTS]
    return {"sleep_s": sleep_s, "wall_s": median(walls), "efficiency": sleep_s / median(walls), "samples": walls,
            "warm": {"wall_s": median(full), "efficiency": sleep_s / median(full) if full else None,
                     "samples": warm, "pool_hits": hits}}


async def logs(world: World, repo_src: Path, ticks: int, flood_lines: int) -> dict:
    """Latency: an agent prints a timestamped line every 20 ms while a client long-polls stream_logs;
    each line's latency is from its timestamp to the moment the client has it. Throughput: an agent
    prints flood_lines as fast as it can; lines/s from its start to the engine's timestamp on its
    last line. The client's own read rate (pages of 5,000 lines) is reported beside it."""
    config = {"engine": {"log_max_lines": flood_lines + 1000, "log_max_bytes": flood_lines * 200 + 10**6},
              "agents": {"ticker": agent(TICKER, str(ticks), "0.02"), "flood": agent(FLOOD, str(flood_lines))}}
    latencies: list[float] = []
    async with world.serve("logs", config) as s:
        repo = fresh_clone(repo_src, world.root / "logs-repo", world.env)
        task = await s.call("submit_task", repo=str(repo), prompt="tick", agents=["ticker"])
        cursor, done = 0, False
        while not done:
            chunk = await s.call("stream_logs", task_id=task["task_id"], cursor=cursor, wait_s=10, limit=5000)
            got = time.time()
            for line in chunk["lines"]:
                if line["agent"] == "ticker" and line["text"].startswith("tick "):
                    latencies.append(got - float(line["text"].split()[2]))
            cursor, done = chunk["next_cursor"], chunk["done"]

        task = await s.call("submit_task", repo=str(repo), prompt="flood", agents=["flood"])
        task_id = (await s.finish(task["task_id"]))["task_id"]
        first = await s.call("stream_logs", task_id=task_id, agent="flood", cursor=0, limit=3)
        start = next(float(line["text"].split()[1]) for line in first["lines"] if line["text"].startswith("start "))
        last = await s.call("stream_logs", task_id=task_id, agent="flood", cursor=flood_lines - 5, limit=50)
        end = next(line for line in last["lines"] if line["text"] == "END")
        stored = end["seq"] - first["lines"][0]["seq"] - 1
        ingest_s = datetime.fromisoformat(end["ts"]).timestamp() - start
        cursor, read, t0 = 0, 0, time.perf_counter()
        for _ in range(3):
            chunk = await s.call("stream_logs", task_id=task_id, cursor=cursor, limit=5000)
            read, cursor = read + len(chunk["lines"]), chunk["next_cursor"]
        read_s = time.perf_counter() - t0
    floor = await pipe_latency(ticks, world.root)
    return {"floor_latency_ms": {"p50": _ms(pct(floor, 50)), "p99": _ms(pct(floor, 99)), "max": _ms(max(floor))},
            "latency_ms": {"n": len(latencies), "p50": _ms(pct(latencies, 50)), "p90": _ms(pct(latencies, 90)),
                           "p99": _ms(pct(latencies, 99)), "max": _ms(max(latencies) if latencies else None),
                           "worst": sorted(_ms(x) for x in latencies)[-10:]},
            "flood_lines": stored, "ingest_s": ingest_s, "lines_per_s": stored / ingest_s,
            "client_read_lines_per_s": read / read_s}


async def pipe_latency(ticks: int, cwd: Path) -> list[float]:
    """The floor of log latency: the same ticker read straight from its pipe by this process."""
    got = []
    async with await anyio.open_process(run_program(TICKER, str(ticks), "0.02"), cwd=cwd) as proc:
        buf = b""
        async for chunk in proc.stdout:
            now = time.time()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            got += [now - float(line.split()[2]) for line in lines if line.startswith(b"tick ")]
    return got


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 2)


async def burst(world: World, repo_src: Path, tasks: int) -> dict:
    """`tasks` tasks of 4 quick agents each, submitted at once: errors, the server's peak RSS, RSS per attempt."""
    names = [f"q{i}" for i in range(AGENTS)]
    config = {"agents": {n: agent(QUICK) for n in names}}
    repo = fresh_clone(repo_src, world.root / "burst-repo", world.env)
    errors: list[str] = []
    ids: list[str] = []
    async with world.serve("burst", config) as s:
        await s.call("list_tasks")
        base_rss, _ = s.rss_mb()

        async def submit(i: int) -> None:
            try:
                ids.append((await s.call("submit_task", repo=str(repo), prompt=f"task {i}", agents=names))["task_id"])
            except Exception as e:
                errors.append(f"submit {i}: {e}")

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(tasks):
                tg.start_soon(submit, i)
        states: dict[str, int] = {}
        for task_id in ids:
            task = await s.finish(task_id, within=900)
            states[task["state"]] = states.get(task["state"], 0) + 1
            if task["state"] != "succeeded":
                errors.append(f"{task_id}: {task['state']}")
        wall = time.perf_counter() - t0
        _, peak = s.rss_mb()
    attempts = tasks * AGENTS
    per = (peak - base_rss) / attempts if peak is not None and base_rss is not None else None
    return {"tasks": tasks, "attempts": attempts, "errors": len(errors), "error_samples": errors[:5],
            "states": states, "wall_s": wall, "rss_before_mb": base_rss, "peak_rss_mb": peak,
            "rss_per_attempt_mb": per}


async def round_trips(world: World, repo_src: Path, n: int) -> dict:
    """submit_task and get_status call latency over stdio, one call at a time (no load)."""
    config = {"agents": {"quick": agent(QUICK)}}
    repo = fresh_clone(repo_src, world.root / "rt-repo", world.env)
    submits, statuses, ids = [], [], []
    async with world.serve("roundtrips", config) as s:
        await s.call("list_tasks")  # the session is warm
        for i in range(n):
            t, task = await s.timed("submit_task", repo=str(repo), prompt=f"rt {i}", agents=["quick"])
            submits.append(t)
            ids.append(task["task_id"])
            await s.finish(task["task_id"])
        for i in range(n * 4):
            t, _ = await s.timed("get_status", task_id=ids[i % len(ids)])
            statuses.append(t)
    return {"submit_ms": {"p50": _ms(median(submits)), "p99": _ms(pct(submits, 99))},
            "get_status_ms": {"p50": _ms(median(statuses)), "p99": _ms(pct(statuses, 99))}}


async def http_load(clients: int, calls: int) -> dict:
    """bench/load.py: `clients` MCP sessions over HTTP making `calls` mixed calls in all."""
    return await load.run(argparse.Namespace(clients=clients, calls=calls, max_seconds=900, seed=8))


def refresh_indexes(checkouts: list[Path], env: dict[str, str]) -> None:
    """Make fresh clones' indexes trustworthy, as a user's checkout is (any `git status` of theirs
    refreshes it): an index written in the same second as the files it lists makes git re-read every
    file at its next look ("racily clean"), and the server's look (submit_task's check for uncommitted
    changes, which writes nothing back) would pay that at every sample."""
    time.sleep(1.1)
    for repo in checkouts:
        subprocess.run(["git", "update-index", "-q", "--refresh"], cwd=repo, env=env, check=True)


def raw_merge(repo: Path, branch: str, env: dict[str, str], worktree: Path | None = None) -> float:
    """What git alone takes: squash the branch into main in a clean checkout and commit; given the
    branch's `worktree`, then also remove it and the branch, as merge_result's cleanup does."""
    steps = [["merge", "-q", "--squash", branch], ["commit", "-qm", "squash"]]
    if worktree:
        steps += [["worktree", "remove", "--force", str(worktree)], ["branch", "-D", branch]]
    t0 = time.perf_counter()
    for step in steps:
        subprocess.run(["git", *step], cwd=repo, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


async def merge(world: World, repo_src: Path, samples: int, files: int = 100) -> dict:
    """merge_result (squash) of a `files`-file change vs raw git doing the same in a clone of the
    same repo: with its cleanup (the default) vs merge, commit, `worktree remove` and `branch -D` of the
    branch's worktree; and with cleanup=false vs merge and commit."""
    config = {"agents": {"editor": agent(EDITOR, str(files - 1))}}
    out: dict = {"files": files}
    async with world.serve("merge", config) as s:
        for part, cleanup in (("cleanup", True), ("merge_only", False)):
            engine, raw = [], []
            clones = [fresh_clone(repo_src, world.root / f"merge-{part}-{k}", world.env) for k in range(samples)]
            refresh_indexes(clones, world.env)
            for k, repo in enumerate(clones):
                task = await s.call("submit_task", repo=str(repo), prompt="edit", agents=["editor"])
                task = await s.finish(task["task_id"])
                branch = task["attempts"][0]["branch"]
                assert task["attempts"][0]["files_changed"] == files, task["attempts"][0]
                other = fresh_clone(repo, world.root / f"merge-raw-{part}-{k}", world.env)
                refresh_indexes([other], world.env)
                subprocess.run(["git", "fetch", "-q", "origin", f"{branch}:{branch}"], cwd=other, env=world.env,
                               check=True)
                wt = None
                if cleanup:
                    wt = world.root / f"merge-raw-{part}-{k}-wt"
                    subprocess.run(["git", "worktree", "add", "-q", str(wt), branch], cwd=other, env=world.env,
                                   check=True)
                raw.append(await anyio.to_thread.run_sync(raw_merge, other, branch, world.env, wt))
                t, result = await s.timed("merge_result", task_id=task["task_id"], cleanup=cleanup)
                assert result["merged"], result
                engine.append(t)
            out[part] = {"engine_s": median(engine), "raw_s": median(raw), "engine_samples": engine,
                         "raw_samples": raw}
    return out
