"""`python -m bench [--json FILE] [--quick]`: the council's performance against git's own floor.

Builds its repos (~3,000 and ~20,000 files) in a temporary directory, drives `cli-council serve`
over stdio with the MCP SDK's client (HTTP load over streamable HTTP), and prints a table: each
figure, its floor measured in the same run, the target from issue 11 and whether it was met.
--json writes the whole report (every sample) as one JSON document ("-": to stdout, the table
then goes to stderr). --quick: small repos and few samples, a smoke run, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from . import measure
from .repos import make_repo
from .world import World

FULL = {"sizes": {"3k": 3000, "20k": 20000}, "samples": 5, "eff_samples": 3, "sleep_s": 2.0, "ticks": 250,
        "flood": 200_000, "burst": 50, "round_trips": 50, "http": (20, 2000), "merge_samples": 5}
QUICK = {"sizes": {"200": 200, "1k": 1000}, "samples": 1, "eff_samples": 1, "sleep_s": 0.5, "ticks": 20,
         "flood": 5000, "burst": 3, "round_trips": 3, "http": (2, 20), "merge_samples": 1}
SECTIONS = ("fanout", "warm", "efficiency", "logs", "burst", "round_trips", "http", "merge")


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    return {"cpus": os.cpu_count(), "cpu": model, "system": platform.platform(), "python": platform.python_version(),
            "git": subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def figure(name: str, value, unit: str, target: str | None = None, ok: bool | None = None,
           floor=None, note: str | None = None) -> dict:
    ratio = value / floor if isinstance(value, (int, float)) and floor else None
    met = None if target is None or value is None else ("met" if ok else "missed")
    return {"name": name, "value": _round(value), "unit": unit, "floor": _round(floor),
            "ratio": _round(ratio), "target": target, "status": met if value is not None else "not available",
            **({"note": note} if note else {})}


def _round(x):
    return round(x, 4) if isinstance(x, float) else x


def figures(r: dict) -> list[dict]:
    out = []
    for size, f in (r.get("fanout") or {}).items():
        ratio = f["engine_s"] / f["floor_s"]
        out.append(figure(f"cold fan-out, {size} files (4 agents)", f["engine_s"], "s", "<= 1.1x floor",
                          ratio <= 1.1, floor=f["floor_s"], note="floor: 4 parallel `git worktree add` + 4 execs"))
    for size, f in (r.get("warm") or {}).items():
        hit = sum(h == 4 for h in f["pool_hits"])
        out.append(figure(f"warm fan-out, {size} files (4 agents)", f["engine_s"], "s", "<= 0.1 s",
                          f["engine_s"] is not None and f["engine_s"] <= 0.1,
                          note=f"{hit} of {len(f['pool_hits'])} samples took all 4 from the pool"))
    if e := r.get("efficiency"):
        out.append(figure(f"parallel efficiency (4 agents sleeping {e['sleep_s']:g} s)", e["efficiency"], "",
                          ">= 0.95", e["efficiency"] >= 0.95, note=f"wall {e['wall_s']:.2f} s, fresh clones"))
        w = e["warm"]
        out.append(figure("  the same from the warm pool", w["efficiency"], "", ">= 0.95",
                          w["efficiency"] is not None and w["efficiency"] >= 0.95,
                          note=f"{sum(h == 4 for h in w['pool_hits'])} of {len(w['pool_hits'])} samples took all 4 "
                               "from the pool"))
    if lg := r.get("logs"):
        out.append(figure("log latency p50", lg["latency_ms"]["p50"], "ms", floor=lg["floor_latency_ms"]["p50"],
                          note="floor: the same agent's pipe read directly"))
        out.append(figure("log latency p99", lg["latency_ms"]["p99"], "ms", "<= 20 ms", lg["latency_ms"]["p99"] <= 20,
                          floor=lg["floor_latency_ms"]["p99"]))
        out.append(figure("log throughput, one agent", round(lg["lines_per_s"]), "lines/s", ">= 50,000",
                          lg["lines_per_s"] >= 50_000, note=f"{lg['flood_lines']:,} lines, agent start to its last line logged"))
        out.append(figure("  stream_logs read rate (SDK client)", round(lg["client_read_lines_per_s"]), "lines/s",
                          note="the SDK client checks every result against the tool's output schema"))
    if b := r.get("burst"):
        out.append(figure(f"{b['tasks']} tasks x 4 agents at once: errors", b["errors"], "", "0", b["errors"] == 0))
        out.append(figure("  server peak RSS", b["peak_rss_mb"], "MB", "<= 300 MB",
                          b["peak_rss_mb"] is not None and b["peak_rss_mb"] <= 300))
        out.append(figure("  RSS per attempt", b["rss_per_attempt_mb"], "MB"))
    if rt := r.get("round_trips"):
        out.append(figure("submit_task p50 over stdio", rt["submit_ms"]["p50"], "ms", "<= 20 ms",
                          rt["submit_ms"]["p50"] <= 20))
        out.append(figure("get_status p50 over stdio", rt["get_status_ms"]["p50"], "ms"))
    if h := r.get("http"):
        out.append(figure(f"HTTP {h['clients']} clients, {h['calls']} mixed calls: p99", h["latency_ms"]["p99"], "ms",
                          "<= 150 ms", h["latency_ms"]["p99"] <= 150,
                          note=f"p50 {h['latency_ms']['p50']} ms; errors {h['transport_errors'] + h['unexpected_tool_errors']}"))
    if m := r.get("merge"):
        for part, what, floor in (("cleanup", "with its cleanup", "+ worktree remove + branch -D"),
                                  ("merge_only", "cleanup=false", "")):
            f = m[part]
            out.append(figure(f"merge of a {m['files']}-file change, {what}", f["engine_s"], "s", "<= 1.5x raw git",
                              f["engine_s"] <= 1.5 * f["raw_s"], floor=f["raw_s"],
                              note=f"floor: git merge --squash + commit {floor}".rstrip()))
    return out


def table(figs: list[dict]) -> str:
    rows = [("figure", "value", "floor", "x floor", "target", "status")]
    for f in figs:
        num = lambda v: "-" if v is None else (f"{v:,.3f}" if isinstance(v, float) else f"{v:,}")
        value = "-" if f["value"] is None else f"{num(f['value'])} {f['unit']}".strip()
        rows.append((f["name"], value, num(f["floor"]),
                     "-" if f["ratio"] is None else f"{f['ratio']:.2f}x", f["target"] or "-", f["status"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def run(args, root: Path) -> dict:
    plan = QUICK if args.quick else FULL
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    report: dict = {"bench": "council", "quick": args.quick, "machine": machine(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    world = World(root)
    t0 = time.perf_counter()
    repos = {size: make_repo(root / f"src-{size}", n, world.env) for size, n in plan["sizes"].items()}
    small = make_repo(root / "src-small", 120, world.env)  # for what is not about repo size
    report["repos_built_s"] = round(time.perf_counter() - t0, 2)
    results: dict = {}
    steps = {
        "fanout": lambda: measure.fanout(world, repos, plan["samples"]),
        "warm": lambda: measure.warm_fanout(world, repos, plan["samples"]),
        "efficiency": lambda: measure.efficiency(world, small, plan["eff_samples"], plan["sleep_s"]),
        "logs": lambda: measure.logs(world, small, plan["ticks"], plan["flood"]),
        "burst": lambda: measure.burst(world, small, plan["burst"]),
        "round_trips": lambda: measure.round_trips(world, small, plan["round_trips"]),
        "http": lambda: measure.http_load(*plan["http"]),
        "merge": lambda: measure.merge(world, small, plan["merge_samples"]),
    }
    for name in SECTIONS:
        if name in only:
            print(f"bench: {name}...", file=sys.stderr, flush=True)
            results[name] = await steps[name]()
    report["results"] = results
    report["figures"] = figures(results)
    return report


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the report as JSON here ('-': stdout)")
    p.add_argument("--quick", action="store_true", help="small repos, few samples: a smoke run")
    p.add_argument("--only", metavar="A,B", help=f"only these parts: {','.join(SECTIONS)}")
    args = p.parse_args()
    if args.only and not set(args.only.split(",")) <= set(SECTIONS):
        p.error(f"--only takes {','.join(SECTIONS)}")
    root = Path(tempfile.mkdtemp(prefix="cli-council-bench-"))
    try:
        report = anyio.run(run, args, root)
        text = table(report["figures"])
        print(text, file=sys.stderr if args.json == "-" else sys.stdout, flush=True)
        if args.json == "-":
            print(json.dumps(report, indent=2), flush=True)
        elif args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        print("bench: removing its repos and worktrees...", file=sys.stderr, flush=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
