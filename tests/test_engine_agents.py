"""The engine driving the real adapters, with fake CLIs that replay recorded output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine.models import AttemptState, TaskState

from conftest import FAKES, fake, git

KEY = "sk-ant-test-4f9d2c1b7e"


def claude(tmp_path, fails: int, fail_fixture: str = "claude-rate-limit") -> dict:
    return {"kind": "claude", "command": [sys.executable, str(FAKES / "flaky.py")],
            "env": {"ANTHROPIC_API_KEY": KEY, "FLAKY_COUNTER": str(tmp_path / "count"), "FLAKY_FAILS": str(fails),
                    "FLAKY_FAIL": fail_fixture, "FAKE_WRITE": "hello.txt"}}


async def test_rate_limit_is_retried_with_backoff_then_succeeds(make_engine, repo, tmp_path):
    async with make_engine({"claude": claude(tmp_path, fails=2)}, retries=3, retry_base_s=0.05) as engine:
        task = await engine.submit(str(repo), "write hello", agents=["claude"])
        task = await engine.wait(task.task_id, 60)
        lines = (await engine.logs(task.task_id, limit=5000)).lines
    a = task.attempt("claude")
    assert a.state == AttemptState.succeeded and a.retries == 2, a
    assert (tmp_path / "count").read_text() == "3"
    assert a.cost_usd and a.cost_usd > 0 and a.tokens_in and a.tokens_out and a.session_id
    assert git(repo, "show", f"{a.branch}:hello.txt") == "hello"
    retry_notes = [l.text for l in lines if l.stream == "council" and "retry" in l.text]
    assert len(retry_notes) == 2 and "rate_limit" in retry_notes[0]
    assert task.total_cost_usd == pytest.approx(a.cost_usd) and task.state == TaskState.succeeded


async def test_retries_stop_at_the_configured_count(make_engine, repo, tmp_path):
    async with make_engine({"claude": claude(tmp_path, fails=5)}, retries=1, retry_base_s=0.01) as engine:
        task = await engine.wait((await engine.submit(str(repo), "x", agents=["claude"])).task_id, 60)
    a = task.attempt("claude")
    assert a.state == AttemptState.failed and a.retries == 1 and a.error.kind == "rate_limit"
    assert (tmp_path / "count").read_text() == "2"


async def test_auth_failure_is_not_retried(make_engine, repo, tmp_path):
    async with make_engine({"claude": claude(tmp_path, fails=5, fail_fixture="claude-auth-401")},
                           retries=3, retry_base_s=0.01) as engine:
        task = await engine.wait((await engine.submit(str(repo), "x", agents=["claude"])).task_id, 60)
    a = task.attempt("claude")
    assert a.error.kind == "auth" and a.retries == 0 and (tmp_path / "count").read_text() == "1"


async def test_api_keys_never_reach_logs_or_status(make_engine, repo, tmp_path):
    async with make_engine({"claude": claude(tmp_path, fails=0)}) as engine:
        task = await engine.wait((await engine.submit(str(repo), "x", agents=["claude"])).task_id, 60)
        lines = (await engine.logs(task.task_id, limit=5000)).lines
    assert "using key ***" in [l.text for l in lines]
    assert not any(KEY in l.text for l in lines)
    assert KEY not in task.model_dump_json()


async def test_local_model_confirms_the_tier(repo, tmp_path):
    """classify_with_model: a real HTTP server on 127.0.0.1 stands in for Ollama's /api/chat."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from engine.config import parse_config
    from engine.engine import Engine

    asked = []

    class Ollama(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            asked.append(body)
            reply = json.dumps({"message": {"role": "assistant", "content": json.dumps({"tier": "complex"})}, "done": True})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply.encode())

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ollama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = parse_config({"agents": {"ollama": {"base_url": f"http://127.0.0.1:{server.server_port}", "model": "m"},
                                       "big": fake("--write", "b.txt=1"), "small": fake("--write", "s.txt=1")},
                            "routing": {"classify_with_model": True, "cheap": ["small"], "standard": ["small"],
                                        "complex": ["big"]}})
        async with Engine(cfg, home=tmp_path / "h") as engine:
            task = await engine.submit(str(repo), "add a docstring")  # the heuristic says cheap
            assert task.tier == "cheap" and task.tier_reason.startswith("classified")
            task = await engine.wait(task.task_id, 60)
    finally:
        server.shutdown()
    assert asked and asked[0]["format"]["properties"]["tier"]["enum"] == ["cheap", "standard", "complex"]
    assert task.tier == "complex" and "local model m said complex" in task.tier_reason
    assert [a.agent for a in task.attempts] == ["big"] and task.state == TaskState.succeeded


async def test_availability_is_probed_once_not_per_attempt(make_engine, repo, tmp_path):
    """A wrapper around the claude fake counts its `--version` probes."""
    probes = tmp_path / "probes"
    wrapper = tmp_path / "claude"
    wrapper.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && echo x >> {probes}\nexec {sys.executable} {FAKES / 'flaky.py'} \"$@\"\n")
    wrapper.chmod(0o755)
    agent = {**claude(tmp_path, fails=0), "command": [str(wrapper)]}
    async with make_engine({"claude": agent}) as engine:
        for _ in range(3):
            task = await engine.wait((await engine.submit(str(repo), "x", agents=["claude"])).task_id, 60)
            assert task.state == TaskState.succeeded
    assert probes.read_text().count("x") == 1


async def test_only_the_adapter_that_owns_a_scratch_dir_keeps_it_out_of_the_result(make_engine, repo):
    """Auto-Claude's .auto-claude/ specs are its scratch; another agent's .auto-claude/ is just a file it wrote."""
    agents = {"auto-claude": {"home": str(FAKES / "auto_claude"), "python": sys.executable,
                              "env": {"CLAUDE_CODE_OAUTH_TOKEN": "oauth-tok-1234"}},
              "other": fake("--write", ".auto-claude/notes.txt=mine")}
    async with make_engine(agents) as engine:
        task = await engine.wait((await engine.submit(str(repo), "Add hello.py", agents=list(agents))).task_id, 60)
    ac, other = task.attempt("auto-claude"), task.attempt("other")
    assert ac.state == AttemptState.succeeded, ac
    assert git(repo, "ls-tree", "-r", "--name-only", ac.branch).split() == ["README.md", "app.py", "hello.py"]
    assert (Path(ac.worktree) / ".auto-claude" / "specs").is_dir(), "scratch stays in the worktree, uncommitted"
    assert ".auto-claude/notes.txt" in git(repo, "ls-tree", "-r", "--name-only", other.branch).split()
