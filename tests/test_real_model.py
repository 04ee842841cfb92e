"""The real-model tier: the `ollama` agent against a real small model on this CPU.

tests/realmodel/server.mjs serves Qwen2.5-Coder 1.5B (node-llama-cpp) behind Ollama's API, and
bench/local_model.py runs `cli-council run --agents ollama --check ...` on each task of
tests/realmodel/tasks, judging every attempt from git. The tier asserts the issue's goals: no attempt
that writes a file its task did not ask for, or loses code, may succeed; and at least 8 of 10 tasks
pass. The adapter's defaults (low temperature, fixed seed) make the run repeatable. Without node, the
server's node_modules or the model (`bash .ci/install-model`), the tier skips and says why; the task
set and the scoring are tested without a model.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("local_model", ROOT / "bench" / "local_model.py")
LM = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(LM)

CACHE = LM.model_cache()  # read now: the autouse isolated_env fixture replaces HOME for each test
TASKS = {t["name"]: t for t in LM.load_tasks()}
FAKE = str(ROOT / "tests" / "fakes" / "agent.py")


def writes(*files: tuple[str, str]) -> dict:
    """A `command` agent (tests/fakes/agent.py) that writes these files."""
    return {"kind": "command", "argv": [sys.executable, FAKE, *(f"--write={p}={text.rstrip(chr(10))}" for p, text in files)]}


def run_check(task: dict, root: Path, overlay: dict) -> int:
    for rel, text in {**task["files"], **overlay}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return subprocess.run(["sh", "-c", task["check"]], cwd=root, capture_output=True).returncode


def test_task_set_has_ten_tasks_whose_checks_fail_before_and_pass_with_the_reference(tmp_path):
    assert len(TASKS) >= 10
    for name, task in TASKS.items():
        assert task["prompt"] and task["may_touch"] and task["solution"], name
        assert set(task["solution"]) <= set(task["may_touch"]), name
        assert run_check(task, tmp_path / name / "before", {}) != 0, f"{name}: the check passes without any change"
        assert run_check(task, tmp_path / name / "after", task["solution"]) == 0, f"{name}: the reference fails"


def test_scoring_passes_a_clean_result(tmp_path):
    task = TASKS["05-keep-module"]
    r = LM.run_task(task, "fake", writes(*task["solution"].items()), tmp_path, timeout=60)
    assert r["passed"] and r["check_passed"] and r["files"] == ["inventory.py"], r
    assert not r["junk"] and not r["lost"] and not r["unsafe_success"]


def test_scoring_flags_a_success_that_wrote_a_file_nobody_asked_for(tmp_path):
    task = TASKS["05-keep-module"]
    r = LM.run_task(task, "fake", writes(*task["solution"].items(), ("src/app.py", 'print("hello")\n')), tmp_path,
                    timeout=60)
    assert r["succeeded"] and r["junk"] == ["src/app.py"] and r["unsafe_success"] and not r["passed"], r


def test_scoring_flags_a_success_that_lost_code(tmp_path):
    task = TASKS["05-keep-module"]
    whole = task["solution"]["inventory.py"]
    lossy = whole[:whole.index("def format_item")]  # the helper and the __main__ block are gone
    r = LM.run_task(task, "fake", writes(("inventory.py", lossy)), tmp_path, timeout=60)
    assert r["check_passed"] and r["succeeded"] and r["unsafe_success"], r
    assert r["lost"] == ["inventory.py:__main__ block", "inventory.py:format_item"]


def test_scoring_counts_a_second_file_for_a_differently_capitalised_name_as_junk(tmp_path):
    task = TASKS["07-wrong-case"]
    r = LM.run_task(task, "fake", writes(("Shapes.py", task["solution"]["shapes.py"])), tmp_path, timeout=60)
    assert r["junk"] == ["Shapes.py"] and not r["passed"], r


def test_symbols_cover_functions_methods_names_and_the_main_block():
    src = TASKS["05-keep-module"]["files"]["inventory.py"]
    assert LM.symbols(src) == {"Inventory", "Inventory.__init__", "Inventory.add", "Inventory.remove",
                               "Inventory.count", "format_item", "__main__ block"}
    assert LM.symbols("SETTINGS = {}\ndef f(:\n") == {"(module no longer parses)"}


def server_missing() -> str | None:
    reason = LM.missing("1.5b", CACHE)
    return reason if reason and "is missing" not in reason else None  # the model itself is not needed


@pytest.mark.skipif(bool(server_missing()), reason=f"real-model server: {server_missing()}")
def test_server_speaks_ollamas_api_and_errors_without_loading_a_model(tmp_path):
    with LM.model_server("tiny:1b", tmp_path / "never-loaded.gguf") as url:
        assert httpx.get(f"{url}/").text == "Ollama is running"
        assert httpx.get(f"{url}/api/version").json()["version"]
        assert [m["name"] for m in httpx.get(f"{url}/api/tags").json()["models"]] == ["tiny:1b"]
        for stream in (True, False):
            r = httpx.post(f"{url}/api/chat", json={"model": "ghost", "stream": stream, "messages": []})
            assert r.status_code == 404 and r.json() == {"error": 'model "ghost" not found, try pulling it first'}
        assert httpx.post(f"{url}/api/chat", content=b"{nope").status_code == 400
        r = httpx.post(f"{url}/api/chat", json={"model": "tiny:1b", "format": "yaml", "messages": []})
        assert r.status_code == 400 and "format" in r.json()["error"]
        assert httpx.get(f"{url}/api/pull").status_code == 404


@pytest.mark.skipif(bool(LM.missing("1.5b", CACHE)), reason=f"real-model tier: {LM.missing('1.5b', CACHE)}")
def test_server_chats_like_ollama_with_the_real_model():
    name, file = LM.MODELS["1.5b"]
    body = {"model": name, "messages": [{"role": "user", "content": "Write a Python function add(a, b)."}],
            "options": {"temperature": 0, "seed": 7, "num_predict": 12, "num_ctx": 1024}}
    with LM.model_server(name, CACHE / file) as url:
        lines = []
        with httpx.stream("POST", f"{url}/api/chat", json=body, timeout=300) as r:
            lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
        *chunks, done = lines
        assert chunks and not any(c["done"] for c in chunks) and done["done"]
        assert done["done_reason"] == "length" and done["eval_count"] == 12 and done["prompt_eval_count"] > 0
        whole = httpx.post(f"{url}/api/chat", json={**body, "stream": False}, timeout=300).json()
        assert whole["message"]["content"] == "".join(c["message"]["content"] for c in chunks)  # repeatable
        schema = {"type": "object", "properties": {"tier": {"type": "string", "enum": ["cheap", "standard"]}},
                  "required": ["tier"]}
        r = httpx.post(f"{url}/api/chat", timeout=300, json={
            "model": name, "stream": False, "format": schema, "options": {"temperature": 0},
            "messages": [{"role": "user", "content": "Is renaming a variable cheap or standard? Answer in JSON."}]})
        assert json.loads(r.json()["message"]["content"])["tier"] in ("cheap", "standard")
        assert r.json()["done_reason"] == "stop"


def test_real_model_tier():
    reason = LM.missing("1.5b", CACHE)
    if reason:
        pytest.skip(f"real-model tier: {reason}")
    doc = LM.run("1.5b", None, threads=1, timeout=240, cache=CACHE)
    table = "\n".join(f"{r['task']}: passed={r['passed']} state={r.get('state')} check={r['check_passed']} "
                      f"junk={r['junk']} lost={r['lost']} error={r.get('error')}" for r in doc["results"])
    assert doc["unsafe_successes"] == 0, f"attempts that wrote junk or lost code and still succeeded:\n{table}"
    assert doc["passed"] >= 8, f"{doc['passed']}/{doc['tasks']} tasks passed with the 1.5B:\n{table}"
