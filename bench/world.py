"""The benchmark's world: a temporary HOME, git identity, council home and config, and a real
`cli-council serve` over stdio driven by the MCP SDK's client, as an assistant would drive it."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from mcp import Client, StdioServerParameters

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# Agent programs (kind = "command"); each gets its argv prefix here and its own arguments in the config.
# Writes the moment it started (time.time()) to argv[1], then exits without changes.
STAMP = "import sys, time; open(sys.argv[1], 'w').write(repr(time.time()))"
# Sleeps argv[1] seconds, then changes a file.
SLEEPER = "import sys, time; time.sleep(float(sys.argv[1])); open('slept.txt', 'w').write('x')"
# Prints argv[1] lines, one every argv[2] seconds, each with its timestamp; then changes a file.
TICKER = ("import sys, time\nn, every = int(sys.argv[1]), float(sys.argv[2])\n"
          "for i in range(n):\n    print('tick', i, repr(time.time()), flush=True)\n    time.sleep(every)\n"
          "open('ticked.txt', 'w').write('x')\n")
# Prints its start time, then argv[1] lines as fast as it can, then END; then changes a file.
FLOOD = ("import sys, time\nn = int(sys.argv[1])\nprint('start', repr(time.time()), flush=True)\n"
         "out = sys.stdout\nfor base in range(0, n, 10000):\n"
         "    out.write(''.join('line %d of the flood, some text as agents print it\\n' % i "
         "for i in range(base, min(n, base + 10000))))\nout.write('END\\n')\nout.flush()\n"
         "open('flooded.txt', 'w').write('x')\n")
# Changes argv[1] tracked files (the first of the generated repo's layout) and adds one.
EDITOR = ("import sys, pathlib\nfrom itertools import islice\nfiles = sorted(pathlib.Path('src').rglob('*.py'))\n"
          "for p in islice(files, int(sys.argv[1])):\n    p.write_text(p.read_text() + 'edited = True\\n')\n"
          "pathlib.Path('NEW.md').write_text('new\\n')\n")
# A quick agent that changes one file.
QUICK = "import uuid; open(uuid.uuid4().hex + '.txt', 'w').write('x')"


def run_program(program: str, *args: str) -> list[str]:
    """The argv of an agent program. `-S`: without `site`, a start costs ~10 ms instead of the 60 ms that
    site-packages' .pth files cost on the development machine; what is measured is the engine."""
    return [PY, "-S", "-c", program, *args]


def agent(program: str, *args: str) -> dict:
    return {"kind": "command", "argv": run_program(program, *args)}


def toml(config: dict) -> str:
    """Just enough TOML for the bench's config: tables of scalars and lists (JSON strings are TOML strings)."""
    out = []
    for section, table in config.items():
        if section == "agents":
            for name, spec in table.items():
                out.append(f"[agents.{name}]")
                out += [f"{k} = {json.dumps(v)}" for k, v in spec.items()]
        else:
            out.append(f"[{section}]")
            out += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


class World:
    def __init__(self, root: Path):
        self.root = root
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        (home / ".gitconfig").write_text("[user]\n\tname = Bench\n\temail = bench@example.com\n")
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith(("CLI_COUNCIL_", "GIT_"))},
                    "HOME": str(home), "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"), "GIT_CONFIG_NOSYSTEM": "1",
                    "PYTHONPATH": str(ROOT)}

    def server_env(self, name: str, config: dict) -> dict[str, str]:
        where = self.root / name
        where.mkdir(exist_ok=True)
        # No warm pool unless a measurement asks for one: cold figures must start from nothing, and
        # pool refills would compete for the CPU with whatever is measured.
        (where / "config.toml").write_text(toml({"pool": {"size": 0}, **config}))
        return {**self.env, "CLI_COUNCIL_HOME": str(where / "council"), "CLI_COUNCIL_CONFIG": str(where / "config.toml")}

    @asynccontextmanager
    async def serve(self, name: str, config: dict) -> AsyncIterator["Session"]:
        """A fresh `cli-council serve` (its own council home) with `config`, and a client session to it."""
        env = self.server_env(name, config)
        params = StdioServerParameters(command=PY, args=["-m", "server.cli", "serve"], env=env, cwd=str(ROOT))
        before = set(_children())
        async with Client(params) as client:
            pids = [p for p in _children() if p not in before] or _children()
            yield Session(client, pids[0] if pids else None, Path(env["CLI_COUNCIL_HOME"]))


class ToolFailed(RuntimeError):
    pass


class Session:
    def __init__(self, client: Client, pid: int | None, home: Path):
        self.client = client
        self.pid = pid
        self.home = home  # the server's CLI_COUNCIL_HOME

    async def call(self, tool: str, **args) -> dict:
        r = await self.client.call_tool(tool, args)
        if r.is_error:
            raise ToolFailed(f"{tool}: {r.content[0].text if r.content else r}")
        return r.structured_content

    async def timed(self, tool: str, **args) -> tuple[float, dict]:
        t0 = time.perf_counter()
        doc = await self.call(tool, **args)
        return time.perf_counter() - t0, doc

    async def finish(self, task_id: str, within: float = 300) -> dict:
        deadline = time.monotonic() + within
        while True:
            task = await self.call("get_status", task_id=task_id, wait_s=min(30.0, max(0.1, deadline - time.monotonic())))
            if task["state"] not in ("queued", "running") or time.monotonic() > deadline:
                return task

    def rss_mb(self) -> tuple[float | None, float | None]:
        """(current, peak) resident memory of the server process, MB."""
        if self.pid is None:
            return None, None
        got = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    got[key] = round(int(value.split()[0]) / 1024, 1)
        except OSError:
            return None, None
        return got.get("VmRSS"), got.get("VmHWM")


def _children() -> list[int]:
    """Our child processes running the server (the SDK starts it; it does not tell the pid)."""
    me, found = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == me and b"server.cli" in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    return found
