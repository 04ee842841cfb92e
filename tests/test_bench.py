"""The benchmark harness runs and prints its JSON (figures are read by people, never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench" / "fanout.py"


def test_fanout_bench_prints_ratio_json():
    out = subprocess.run([sys.executable, str(BENCH), "--files", "20", "--agents", "2", "--rounds", "1"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    doc = json.loads(out)
    assert doc["bench"] == "fanout" and doc["agents"] == 2
    assert doc["floor_s"] > 0 and doc["engine_s"] > 0
    assert doc["ratio"] == pytest.approx(doc["engine_s"] / doc["floor_s"], rel=0.01)  # figures are rounded apart
