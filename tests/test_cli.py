"""`cli-council` as a user runs it: real processes sharing council.db across shells."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import fake, pid_running


def write_config(path: Path, agents: dict, **engine) -> None:
    lines = ["[engine]", "kill_grace_s = 1"] + [f"{k} = {json.dumps(v)}" for k, v in engine.items()]
    for name, table in agents.items():
        lines.append(f'[agents."{name}"]')
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")


def cli(*args: str, check_code: int | None = 0, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check_code is not None:
        assert proc.returncode == check_code, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def start_run(repo: Path, agent: str, prompt: str = "work") -> tuple[subprocess.Popen, str]:
    """`cli-council run` in the background; returns it and the task id it announces on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "run", "--repo", str(repo), "--agents", agent,
                             "--json", prompt], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    first = proc.stderr.readline()
    assert first.startswith("task "), first
    return proc, first.split()[1]


def wait_for(predicate, timeout: float = 20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


@pytest.fixture
def config(tmp_path) -> Path:
    return Path(os.environ["CLI_COUNCIL_CONFIG"])


def test_run_json_prints_the_task_and_exit_codes(repo, config):
    write_config(config, {"good": fake("--write", "g.txt=1"), "bad": fake("--exit", "4")})
    ok = cli("run", "--repo", str(repo), "--agents", "good", "--json", "make g")
    task = json.loads(ok.stdout)
    assert task["state"] == "succeeded" and task["best"] == "good"
    assert ok.stderr.startswith(f"task {task['task_id']}")
    failed = json.loads(cli("run", "--repo", str(repo), "--agents", "bad", "--json", "fail", check_code=1).stdout)
    assert failed["state"] == "failed" and failed["attempts"][0]["exit_code"] == 4
    listed = json.loads(cli("status", "--json").stdout)
    assert {t["task_id"] for t in listed["tasks"]} == {task["task_id"], failed["task_id"]}
    one = json.loads(cli("status", task["task_id"], "--json").stdout)
    assert one == task
    logs = cli("logs", task["task_id"]).stdout
    assert "good/stdout: fake agent got: make g" in logs


def test_bad_input_exits_2_with_a_message_and_records_nothing(repo, config, tmp_path):
    write_config(config, {"good": fake("--write", "g.txt=1")})
    for args in (["--repo", str(tmp_path / "nope"), "--agents", "good", "p"],
                 ["--repo", str(repo), "--agents", "ghost", "p"],
                 ["--repo", str(repo), "--agents", "good", "--base=-x", "p"],
                 ["--repo", str(repo), "--agents", "good", "--timeout", "0", "p"],
                 ["--repo", str(repo), "--agents", "good", ""]):
        proc = cli("run", *args, check_code=2)
        assert proc.stderr.startswith("error: ") and proc.stdout == ""
    assert json.loads(cli("status", "--json").stdout) == {"tasks": []}
    assert cli("status", "nope", check_code=2).stderr.startswith("error: no task")


def test_cancel_from_another_shell_stops_the_run(repo, config, tmp_path):
    child, pidfile = tmp_path / "child.pid", tmp_path / "agent.pid"
    write_config(config, {"slow": fake("--child", str(child), "--pidfile", str(pidfile), "--sleep", "60")})
    run, task_id = start_run(repo, "slow")
    try:
        wait_for(child.exists)
        cancelled = json.loads(cli("cancel", task_id, "--json").stdout)
        assert cancelled["state"] == "cancelled"
        out, _ = run.communicate(timeout=20)
        assert run.returncode == 1 and json.loads(out)["state"] == "cancelled"
    finally:
        run.kill()
    for f in (child, pidfile):
        assert not pid_running(int(f.read_text())), f"{f.name} survived cancel"


def test_restart_after_a_kill_marks_running_attempts_interrupted(repo, config, tmp_path, council_home):
    child, pidfile = tmp_path / "child.pid", tmp_path / "agent.pid"
    write_config(config, {"slow": fake("--child", str(child), "--pidfile", str(pidfile), "--sleep", "60")})
    run, task_id = start_run(repo, "slow")
    wait_for(child.exists)
    os.kill(run.pid, signal.SIGKILL)  # the host dies without any cleanup
    run.wait(10)
    assert pid_running(int(pidfile.read_text())), "the agent should have outlived its killed host"
    task = json.loads(cli("status", task_id, "--json").stdout)  # a new process starts the engine
    assert task["state"] == "interrupted"
    attempt = task["attempts"][0]
    assert attempt["state"] == "interrupted"
    assert Path(attempt["worktree"]).is_dir(), "an interrupted attempt's worktree stays for inspection"
    for f in (child, pidfile):  # and the orphaned agent group was stopped, not left running
        wait_for(lambda: not pid_running(int(f.read_text())), 10)


ESCAPING_CHECK = """import os, signal, sys, time
if os.fork() == 0:  # a grandchild that leaves the process group and ignores SIGTERM
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(sys.argv[2], "w").write(str(os.getpid()))
    time.sleep(600)
    os._exit(0)
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(600)
"""


def test_restart_after_a_kill_stops_a_running_check_and_what_escaped_its_group(repo, config, tmp_path):
    script, check_pid, escaped_pid = tmp_path / "check.py", tmp_path / "check.pid", tmp_path / "escaped.pid"
    script.write_text(ESCAPING_CHECK)
    write_config(config, {"writer": fake("--write", "w.txt=w")})
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "run", "--repo", str(repo), "--agents", "writer",
                             "--check", f"{sys.executable} {script} {check_pid} {escaped_pid}", "--json", "go"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        task_id = proc.stderr.readline().split()[1]
        wait_for(lambda: check_pid.exists() and escaped_pid.exists() and escaped_pid.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        pids = [int(check_pid.read_text()), int(escaped_pid.read_text())]
        assert all(pid_running(p) for p in pids), "both should have outlived their killed host"
        task = json.loads(cli("status", task_id, "--json").stdout)  # a new process recovers
        assert task["state"] == "interrupted"
        for pid in pids:
            wait_for(lambda: not pid_running(pid), 10)
    finally:
        proc.kill()
        for f in (check_pid, escaped_pid):
            if f.exists() and f.read_text():
                try:
                    os.kill(int(f.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_logs_follow_from_another_shell(repo, config):
    write_config(config, {"chatty": fake("--lines", "3", "--sleep", "1.5", "--write", "c.txt=1")})
    run, task_id = start_run(repo, "chatty", "talk")
    try:
        follow = cli("logs", task_id, "--follow", "--agent", "chatty", timeout=30).stdout
        assert "chatty/stdout: line 2" in follow and "chatty/stdout: done" in follow
        run.communicate(timeout=20)
        assert run.returncode == 0
    finally:
        run.kill()


def test_doctor_says_which_agents_work_and_how_to_fix_the_rest(config):
    """A real HTTP server on 127.0.0.1 stands in for Ollama's /api/tags and /api/version."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Ollama(BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/api/tags": {"models": [{"name": "qwen2.5-coder:7b", "model": "qwen2.5-coder:7b"}]},
                    "/api/version": {"version": "0.14.2"}}.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(json.dumps(body or {"error": "not found"}).encode())

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ollama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        write_config(config, {"mine": fake(), "claude": {"command": "/nonexistent/claude"},
                              "ollama": {"base_url": f"http://127.0.0.1:{server.server_port}"}})
        doc = json.loads(cli("doctor", "--json").stdout)
    finally:
        server.shutdown()
    rows = {r["agent"]: r for r in doc["agents"]}
    assert rows["mine"]["ok"] and not rows["claude"]["ok"]
    assert "/nonexistent/claude" in rows["claude"]["message"] and "command =" in rows["claude"]["message"]
    assert rows["ollama"]["ok"] and "qwen2.5-coder:7b" in json.dumps(rows["ollama"])
    assert not rows["auto-claude"]["ok"] and "home" in rows["auto-claude"]["message"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_run_cancels_its_agents(repo, config, tmp_path, sig):
    child, pidfile = tmp_path / "child.pid", tmp_path / "agent.pid"
    write_config(config, {"slow": fake("--child", str(child), "--pidfile", str(pidfile), "--sleep", "60")})
    run, task_id = start_run(repo, "slow")
    try:
        wait_for(child.exists)
        run.send_signal(sig)
        out, _ = run.communicate(timeout=20)
    finally:
        run.kill()
    assert run.returncode == 1 and json.loads(out)["state"] == "cancelled"
    for f in (child, pidfile):
        assert not pid_running(int(f.read_text())), f"{f.name} survived {sig.name}"


def test_run_takes_a_relative_repo_warns_of_a_dirty_checkout_and_reads_plainly(repo, config):
    write_config(config, {"writer": fake("--write", "w.txt=w")})
    (repo / "README.md").write_text("# changed, not committed\n")
    proc = subprocess.run([sys.executable, "-m", "server.cli", "run", "--repo", ".", "--agents", "writer", "go"],
                          cwd=repo, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert f"repo {repo}" in proc.stdout and "in 1 file " in proc.stdout
    assert "warning: the checkout has uncommitted changes" in proc.stdout
    task_id = proc.stderr.split()[1]
    cancelled = cli("cancel", task_id)
    assert f"task {task_id} had already ended (succeeded); nothing to cancel" in cancelled.stdout
    notes = cli("logs", task_id).stdout
    assert "task started: tier - (explicit agents); agents: writer" in notes and "[[" not in notes


def test_when_no_routed_agent_can_run_the_configured_ones_are_named(repo, config):
    write_config(config, {"mine": fake("--write", "m.txt=m"), "claude": {"command": ["/nonexistent/claude"]},
                          "gemini": {"command": ["/nonexistent/gemini"]}})
    proc = cli("run", "--repo", str(repo), "--tier", "standard", "--json", "go", check_code=1)
    reason = json.loads(proc.stdout)["best_reason"]
    assert reason.startswith("no agent could run here: claude:"), reason
    assert "other configured agents: " in reason and "mine" in reason and "--agents" in reason, reason
    assert "[routing] standard" in reason


def test_status_shows_where_each_attempt_is_and_the_tail_of_a_failed_check(repo, config):
    write_config(config, {"writer": fake("--write", "w.txt=w")})
    check = f"{sys.executable} -c \"[print('check line', i) for i in range(9)]; raise SystemExit(2)\""
    task = json.loads(cli("run", "--repo", str(repo), "--agents", "writer", "--check", check, "--json", "go",
                          check_code=1).stdout)
    out = cli("status", task["task_id"]).stdout
    assert f"branch council/{task['task_id']}/writer  worktree {task['attempts'][0]['worktree']}" in out
    assert "| check line 8" in out and "| check line 4" in out and "check line 3" not in out
