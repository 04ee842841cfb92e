"""Each benchmark runs end to end on a small load and prints its JSON (figures are read by people, never
asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
BENCH = ROOT / "bench"


def test_python_m_bench_quick_prints_a_table_and_a_json_report(tmp_path):
    out_file = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(out_file)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out_file.read_text())
    assert doc["bench"] == "council" and doc["quick"] is True and doc["machine"]["cpus"]
    assert set(doc["results"]) == {"fanout", "warm", "efficiency", "logs", "burst", "round_trips", "http", "merge"}
    names = [f["name"] for f in doc["figures"]]
    for part in ("cold fan-out", "warm fan-out", "parallel efficiency", "log latency p99", "log throughput",
                 "errors", "peak RSS", "submit_task p50", "HTTP", "merge of a 100-file change"):
        assert any(part in n for n in names), part
    for f in doc["figures"]:
        assert set(f) >= {"name", "value", "unit", "floor", "ratio", "target", "status"}
        assert f["status"] in ("met", "missed", "not available", None)
        if f["status"] in ("met", "missed"):
            assert isinstance(f["value"], (int, float)) and f["target"]
    fan = [f for f in doc["figures"] if f["name"].startswith("cold fan-out")]
    assert len(fan) == 2 and all(f["floor"] > 0 and f["ratio"] > 0 for f in fan)  # a floor from the same run
    assert doc["results"]["burst"]["errors"] == 0
    # The table: one row per figure under a header.
    assert out.stdout.splitlines()[0].split()[:3] == ["figure", "value", "floor"]
    assert len(out.stdout.strip().splitlines()) == len(doc["figures"]) + 2


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
