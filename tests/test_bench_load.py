"""bench/load.py runs end to end on a small load and prints its JSON (figures are read, not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

LOAD = Path(__file__).parents[1] / "bench" / "load.py"


def test_load_bench_prints_json():
    out = subprocess.run([sys.executable, str(LOAD), "--clients", "2", "--calls", "30", "--max-seconds", "60"],
                         capture_output=True, text=True, timeout=180, check=True).stdout
    doc = json.loads(out)
    assert doc["bench"] == "load" and doc["calls"] == 30
    assert doc["transport_errors"] == 0 and doc["unexpected_tool_errors"] == 0
    assert doc["server_alive_after"] and doc["latency_ms"]["p50"] > 0
