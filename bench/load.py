"""Load held over HTTP: many MCP clients at once against one `cli-council serve --transport http`.

Starts the server on a free 127.0.0.1 port with a fake `command` agent in a temporary
CLI_COUNCIL_HOME, then runs CLIENTS concurrent MCP sessions (JSON-RPC over streamable HTTP with
httpx) making CALLS tool calls in total: list_tasks, get_status, stream_logs, submit_task of a quick
fake-agent task (~10%), and bad calls (an unknown task id, which must be refused). Waits for every
submitted task to end and counts how they ended. Prints one JSON document: calls, errors
(transport errors, unexpected tool errors, refusals that should have been), latency p50/p95/p99 ms,
wall time, server peak RSS (VmHWM), tasks by final state.

    python bench/load.py [--clients 20] [--calls 2000] [--max-seconds 900]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = "2025-06-18"
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
# The fake agent: a new file each time, so every task succeeds with changes. Run with `python -S`, as
# bench/world.py runs its agents: site-packages' .pth files cost each start ~60 ms of the CPU the
# server is measured on.
AGENT = "import uuid; open(uuid.uuid4().hex + '.txt', 'w').write('x')"
MIX = [("list_tasks", 0.25), ("get_status", 0.30), ("stream_logs", 0.25), ("submit_task", 0.10), ("bad", 0.10)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_world(root: Path) -> tuple[Path, dict[str, str]]:
    home = root / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = Bench\n\temail = bench@example.com\n")
    repo = root / "repo"
    repo.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "CLI_COUNCIL_TOKEN"}, "HOME": str(home),
           "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"), "CLI_COUNCIL_HOME": str(root / "council"),
           "CLI_COUNCIL_CONFIG": str(root / "config.toml"), "PYTHONPATH": str(ROOT)}
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-qm", "init"]):
        if args[0] == "add":
            (repo / "README.md").write_text("# bench\n")
        subprocess.run(["git", *args], cwd=repo, env=env, check=True)
    (root / "config.toml").write_text(f'[agents.fake]\nkind = "command"\nargv = [{json.dumps(sys.executable)}, "-S", '
                                      f'"-c", {json.dumps(AGENT)}]\n')
    return repo, env


def start_server(env: dict[str, str], port: int, log) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--transport", "http", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start listening")
            time.sleep(0.05)


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class Session:
    """One MCP client: an initialized streamable-HTTP session and its request ids."""

    def __init__(self, http: httpx.AsyncClient, url: str):
        self.http, self.url, self.headers, self.next_id = http, url, dict(HEADERS), 0

    async def rpc(self, method: str, params: dict | None = None, notify: bool = False) -> dict | None:
        body: dict = {"jsonrpc": "2.0", "method": method, **({"params": params} if params is not None else {})}
        if not notify:
            self.next_id += 1
            body["id"] = self.next_id
        r = await self.http.post(self.url, json=body, headers=self.headers)
        r.raise_for_status()
        if notify:
            return None
        if "mcp-session-id" in r.headers:
            self.headers["mcp-session-id"] = r.headers["mcp-session-id"]
        docs = [json.loads(ln[5:]) for ln in r.text.splitlines() if ln.startswith("data:")] or [r.json()]
        for doc in docs:
            if doc.get("id") == body["id"]:
                return doc
        raise ValueError(f"no reply with id {body['id']} in {r.text[:200]!r}")

    async def open(self) -> None:
        await self.rpc("initialize", {"protocolVersion": PROTOCOL, "capabilities": {},
                                      "clientInfo": {"name": "bench-load", "version": "0"}})
        self.headers["mcp-protocol-version"] = PROTOCOL
        await self.rpc("notifications/initialized", notify=True)

    async def call(self, name: str, args: dict) -> dict:
        reply = await self.rpc("tools/call", {"name": name, "arguments": args})
        if "error" in reply:
            raise ValueError(f"JSON-RPC error: {reply['error']}")
        return reply["result"]


class Stats:
    def __init__(self):
        self.latency: dict[str, list[float]] = {}
        self.transport_errors: list[str] = []
        self.unexpected_tool_errors: list[str] = []
        self.accepted_bad_calls = 0
        self.refused_bad_calls = 0
        self.submitted: list[str] = []

    def record(self, kind: str, seconds: float) -> None:
        self.latency.setdefault(kind, []).append(seconds * 1000)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))], 1) if values else 0.0


async def client(n: int, calls: int, url: str, repo: Path, stats: Stats, rng: random.Random, deadline: float) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        session = Session(http, url)
        try:
            await session.open()
        except Exception as e:
            stats.transport_errors.append(f"client {n} initialize: {type(e).__name__}: {e}"[:300])
            return
        mine: list[str] = []
        kinds, weights = zip(*MIX)
        for i in range(calls):
            if time.monotonic() > deadline:
                return
            kind = rng.choices(kinds, weights)[0]
            known = mine or stats.submitted
            if kind in ("get_status", "stream_logs") and not known:
                kind = "list_tasks"
            if kind == "submit_task":
                name, args = kind, {"repo": str(repo), "prompt": f"load {n}/{i}", "agents": ["fake"]}
            elif kind == "get_status":
                name, args = kind, {"task_id": rng.choice(known)}
            elif kind == "stream_logs":
                name, args = kind, {"task_id": rng.choice(known), "limit": 100}
            elif kind == "bad":
                name, args = "get_status", {"task_id": f"no-such-task-{n}-{i}"}
            else:
                name, args = kind, {"limit": 20}
            t0 = time.perf_counter()
            try:
                result = await session.call(name, args)
            except Exception as e:
                stats.transport_errors.append(f"{kind}: {type(e).__name__}: {e}"[:300])
                continue
            stats.record(kind, time.perf_counter() - t0)
            text = " ".join(c.get("text", "") for c in result.get("content", []))[:300]
            if kind == "bad":
                if result.get("isError"):
                    stats.refused_bad_calls += 1
                else:
                    stats.accepted_bad_calls += 1
            elif result.get("isError"):
                stats.unexpected_tool_errors.append(f"{kind}: {text}")
            elif kind == "submit_task":
                task_id = result["structuredContent"]["task_id"]
                mine.append(task_id)
                stats.submitted.append(task_id)


async def settle(url: str, task_ids: list[str], within: float) -> dict[str, int]:
    """Wait for every submitted task to end; how many ended in each state."""
    async with httpx.AsyncClient(timeout=120) as http:
        session = Session(http, url)
        await session.open()
        states: dict[str, str] = {}
        deadline = time.monotonic() + within
        for task_id in task_ids:
            while True:
                result = await session.call("get_status", {"task_id": task_id, "wait_s": 5})
                state = result["structuredContent"]["state"] if not result.get("isError") else "unreadable"
                if state not in ("queued", "running") or time.monotonic() > deadline:
                    states[task_id] = state
                    break
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    return counts


async def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="cli-council-load-") as tmp:
        root = Path(tmp)
        repo, env = make_world(root)
        port = free_port()
        url = f"http://127.0.0.1:{port}/mcp"
        log = open(root / "server.log", "w+")
        proc = start_server(env, port, log)
        try:
            stats, rng = Stats(), random.Random(args.seed)
            per_client = [args.calls // args.clients + (1 if i < args.calls % args.clients else 0)
                          for i in range(args.clients)]
            start = time.perf_counter()
            deadline = time.monotonic() + args.max_seconds
            async with anyio.create_task_group() as tg:
                for n, calls in enumerate(per_client):
                    tg.start_soon(client, n, calls, url, repo, stats, random.Random(rng.random()), deadline)
            wall = time.perf_counter() - start
            tasks = await settle(url, stats.submitted, within=args.max_seconds)
            alive = proc.poll() is None
            rss = peak_rss_mb(proc.pid)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.seek(0)
            server_log = log.read()
            log.close()
    every = [ms for values in stats.latency.values() for ms in values]
    done = len(every)
    return {
        "bench": "load",
        "clients": args.clients,
        "calls_planned": args.calls,
        "calls": done,
        "wall_s": round(wall, 2),
        "calls_per_s": round(done / wall, 1) if wall else None,
        "transport_errors": len(stats.transport_errors),
        "unexpected_tool_errors": len(stats.unexpected_tool_errors),
        "bad_calls_refused": stats.refused_bad_calls,
        "bad_calls_accepted": stats.accepted_bad_calls,
        "latency_ms": {"p50": pct(every, 50), "p95": pct(every, 95), "p99": pct(every, 99),
                       "max": round(max(every), 1) if every else 0.0,
                       "mean": round(statistics.fmean(every), 1) if every else 0.0},
        "by_call": {k: {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99)} for k, v in sorted(stats.latency.items())},
        "tasks_submitted": len(stats.submitted),
        "tasks_by_state": tasks,
        "server_alive_after": alive,
        "server_peak_rss_mb": rss,
        "server_tracebacks": server_log.count("Traceback"),
        "error_samples": (stats.transport_errors + stats.unexpected_tool_errors)[:5],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--calls", type=int, default=2000, help="tool calls in total, shared by the clients")
    p.add_argument("--max-seconds", type=float, default=900, help="stop making calls after this long")
    p.add_argument("--seed", type=int, default=8)
    args = p.parse_args()
    if not (1 <= args.clients <= 200 and 1 <= args.calls <= 100_000 and 0 < args.max_seconds <= 3600):
        p.error("--clients 1..200, --calls 1..100000, --max-seconds 0..3600")
    print(json.dumps(anyio.run(run, args), indent=2))


if __name__ == "__main__":
    main()
