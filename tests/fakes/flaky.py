#!/usr/bin/env python3
"""A fake CLI that fails with a recorded transient error FLAKY_FAILS times, then succeeds.

Each run counts itself in FLAKY_COUNTER, prints the API key it was given to stderr (so tests can
check that logs redact it), and then replays FLAKY_FAIL (default claude-rate-limit) or
FLAKY_OK (default claude-success, writing FAKE_WRITE) through tests/fakes/replay.
"""

import os
import sys
from pathlib import Path

if sys.argv[1:] == ["--version"]:
    print("2.1.197 (Claude Code)")
    sys.exit(0)
counter = Path(os.environ["FLAKY_COUNTER"])
n = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(n + 1))
print(f"using key {os.environ.get('ANTHROPIC_API_KEY')}", file=sys.stderr, flush=True)
failing = n < int(os.environ.get("FLAKY_FAILS", "1"))
fixture = os.environ.get("FLAKY_FAIL", "claude-rate-limit") if failing else os.environ.get("FLAKY_OK", "claude-success")
if failing:
    os.environ.pop("FAKE_WRITE", None)
replay = str(Path(__file__).with_name("replay"))
os.execv(sys.executable, [sys.executable, replay, fixture])
