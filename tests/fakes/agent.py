#!/usr/bin/env python3
"""A fake coding agent for engine tests, configured as a `command` agent.

    agent.py [--sleep S] [--write PATH=TEXT]... [--child PIDFILE] [--lines N] [--exit CODE] [PROMPT]

--child starts a grandchild that sleeps for an hour and writes its pid to PIDFILE, so tests can
check that killing an attempt leaves no process behind.
"""

import argparse
import os
import subprocess
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--sleep", type=float, default=0)
p.add_argument("--write", action="append", default=[])
p.add_argument("--child")
p.add_argument("--lines", type=int, default=0)
p.add_argument("--exit", type=int, default=0)
p.add_argument("--pidfile")
p.add_argument("prompt", nargs="?", default="")
a = p.parse_args()


def record(path: str, pid: int) -> None:
    """Whole or not at all: a test waiting for the file may read it the moment it appears."""
    with open(f"{path}.tmp", "w") as f:
        f.write(str(pid))
    os.replace(f"{path}.tmp", path)


if a.pidfile:
    record(a.pidfile, os.getpid())
print(f"fake agent got: {a.prompt}", flush=True)
print("working", file=sys.stderr, flush=True)
if a.child:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    record(a.child, child.pid)
for i in range(a.lines):
    print(f"line {i}", flush=True)
time.sleep(a.sleep)
for spec in a.write:
    path, _, text = spec.partition("=")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")
print("done", flush=True)
sys.exit(a.exit)
