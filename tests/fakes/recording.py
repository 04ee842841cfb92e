#!/usr/bin/env python3
"""A fake CLI that appends what it was run with (argv, stdin) as one JSON line to RECORD_LOG, then
replays a recorded run through tests/fakes/replay (FAKE_FIXTURE, FAKE_WRITE... as replay reads them;
"{n}" in FAKE_WRITE becomes the run's number). Unlike replay's FAKE_RECORD, every run is kept:
tests of follow-up rounds compare them."""

import json
import os
import sys
from pathlib import Path

if sys.argv[1:] == ["--version"]:
    print("2.1.197 (Claude Code)")
    sys.exit(0)
stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
log = Path(os.environ["RECORD_LOG"])
n = len(log.read_text().splitlines()) + 1 if log.exists() else 1
with log.open("a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "stdin": stdin}) + "\n")
if "FAKE_WRITE" in os.environ:  # "{n}" in it: each run writes a file of its own
    os.environ["FAKE_WRITE"] = os.environ["FAKE_WRITE"].replace("{n}", str(n))
os.execv(sys.executable, [sys.executable, str(Path(__file__).with_name("replay"))])
