"""bench/slow_clients.py runs and prints its JSON (figures are read by people, never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "bench" / "slow_clients.py"


def test_slow_clients_bench_prints_json():
    out = subprocess.run([sys.executable, str(BENCH), "--slow", "5", "--calls", "5", "--header-timeout", "1"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    doc = json.loads(out)
    assert doc["bench"] == "slow_clients" and doc["slow_connections"] == 5 and doc["calls"] == 5
