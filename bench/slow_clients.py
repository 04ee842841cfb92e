"""How `serve --transport http` holds up against slow clients: N connections dripping their headers a
byte at a time (slowloris) while one MCP client calls list_tasks over and over. Prints JSON: when the
slow connections were cut off, and the normal client's latency meanwhile.

    python bench/slow_clients.py --slow 200 --calls 100 --header-timeout 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client

ROOT = Path(__file__).resolve().parents[1]


async def slowloris(port: int, give_up_s: float, cut: list[float]) -> None:
    t0 = time.monotonic()
    try:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            for byte in b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 10_000:
                if time.monotonic() - t0 > give_up_s:
                    return
                await stream.send(bytes([byte]))
                with anyio.move_on_after(0.5):
                    if not await stream.receive():
                        break
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        pass
    cut.append(time.monotonic() - t0)


async def bench(port: int, slow: int, calls: int, give_up_s: float) -> dict:
    cut: list[float] = []
    latencies: list[float] = []
    async with anyio.create_task_group() as tg:
        for _ in range(slow):
            tg.start_soon(slowloris, port, give_up_s, cut)
        await anyio.sleep(0.5)  # let them all connect
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            for _ in range(calls):
                t0 = time.perf_counter()
                await client.call_tool("list_tasks", {})
                latencies.append(time.perf_counter() - t0)
    latencies.sort()
    return {"slow_connections": slow, "slow_cut_off": len(cut),
            "cut_after_s_max": round(max(cut), 2) if cut else None,
            "cut_after_s_p50": round(statistics.median(cut), 2) if cut else None,
            "calls": calls, "call_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "call_p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slow", type=int, default=200)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--header-timeout", type=float, default=3.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CLI_COUNCIL_HOME": f"{tmp}/home", "CLI_COUNCIL_CONFIG": f"{tmp}/config.toml",
               "CLI_COUNCIL_HTTP_HEADER_TIMEOUT_S": str(args.header_timeout)}
        env.pop("CLI_COUNCIL_TOKEN", None)
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--transport", "http", "--port", "0"],
                                cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        try:
            port = int(re.search(r":(\d+)/mcp", proc.stderr.readline()).group(1))
            doc = anyio.run(bench, port, args.slow, args.calls, 10 * args.header_timeout)
        finally:
            proc.terminate()
            proc.wait(15)
    print(json.dumps({"bench": "slow_clients", "header_timeout_s": args.header_timeout, **doc}, indent=2))


if __name__ == "__main__":
    main()
