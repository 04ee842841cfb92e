"""Each benchmark runs end to end on a small load and prints its JSON (figures are read by people, never
asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"


def test_fanout_bench_prints_ratio_json():
    out = subprocess.run([sys.executable, str(BENCH / "fanout.py"), "--files", "20", "--agents", "2", "--rounds", "1"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    doc = json.loads(out)
    assert doc["bench"] == "fanout" and doc["agents"] == 2
    assert doc["floor_s"] > 0 and doc["engine_s"] > 0
    assert doc["ratio"] == pytest.approx(doc["engine_s"] / doc["floor_s"], rel=0.01)  # figures are rounded apart


def test_load_bench_prints_json():
    out = subprocess.run([sys.executable, str(BENCH / "load.py"), "--clients", "2", "--calls", "30", "--max-seconds", "60"],
                         capture_output=True, text=True, timeout=180, check=True).stdout
    doc = json.loads(out)
    assert doc["bench"] == "load" and doc["calls"] == 30
    assert doc["transport_errors"] == 0 and doc["unexpected_tool_errors"] == 0
    assert doc["server_alive_after"] and doc["latency_ms"]["p50"] > 0


def test_slow_clients_bench_prints_json():
    out = subprocess.run([sys.executable, str(BENCH / "slow_clients.py"), "--slow", "5", "--calls", "5",
                          "--header-timeout", "1"], capture_output=True, text=True, timeout=120, check=True).stdout
    doc = json.loads(out)
    assert doc["bench"] == "slow_clients" and doc["slow_connections"] == 5 and doc["calls"] == 5
