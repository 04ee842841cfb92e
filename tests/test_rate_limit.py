"""Rate limits with a reset time the agent reported: waited out within the attempt's means, else failed fast."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone

import pytest

from adapters.base import reset_time
from engine.config import parse_config
from engine.engine import Engine
from engine.models import AttemptState, TaskState

from conftest import FAKES, git
from fakes.ollama_http import MODEL, OllamaStandin

SESSION = "0ed88cd1-5a7e-4c1e-9a51-0c0ffee00009"


def claude_limited(fixtures, reset_epoch: int) -> None:
    """A claude run that hit the subscription's usage limit, in the shape Claude Code reports it."""
    lines = [
        {"type": "system", "subtype": "init", "cwd": "/w", "session_id": SESSION, "model": "claude-sonnet-5",
         "permissionMode": "acceptEdits"},
        {"type": "result", "subtype": "success", "is_error": True, "api_error_status": None, "num_turns": 1,
         "result": f"Claude AI usage limit reached|{reset_epoch}", "session_id": SESSION, "total_cost_usd": 0,
         "usage": {"input_tokens": 0, "output_tokens": 0}, "permission_denials": []}]
    (fixtures / "claude-limited.stdout").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (fixtures / "claude-limited.exit").write_text("1\n")


def gemini_limited(fixtures, retry_s: float) -> None:
    """gemini's result line for a 429 whose API error says when to retry (Google's wording)."""
    error = json.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message":
                                  f"You exceeded your current quota. Please retry in {retry_s}s."}})
    lines = [{"type": "init", "session_id": "7bb7d609-0000", "model": "gemini-2.5-pro"},
             {"type": "result", "status": "error", "error": {"type": "unknown", "message": f"[API Error: {error}]"},
              "stats": {"input_tokens": 0, "output_tokens": 0}}]
    (fixtures / "gemini-limited.stdout").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (fixtures / "gemini-limited.exit").write_text("1\n")


def flaky(kind: str, tmp_path, fail: str, ok: str) -> dict:
    """The CLI fails once with `fail`, then succeeds with `ok` (tests/fakes/flaky.py)."""
    return {"kind": kind, "command": [sys.executable, str(FAKES / "flaky.py")],
            "env": {"ANTHROPIC_API_KEY": "sk-ant-test-0000000000", "GEMINI_API_KEY": "gm-test-0000000000",
                    "FLAKY_COUNTER": str(tmp_path / "count"), "FLAKY_FAILS": "1", "FLAKY_FAIL": fail,
                    "FLAKY_OK": ok, "FAKE_FIXTURE_DIR": str(tmp_path), "FAKE_WRITE": "hello.txt"}}


async def run(engine, repo, agent: str, **submit):
    task = await engine.submit(str(repo), "create hello.txt saying hello", agents=[agent], **submit)
    task = await engine.wait(task.task_id, 120)
    lines = [line.text for line in (await engine.logs(task.task_id, limit=5000)).lines]
    return task, task.attempt(agent), lines


async def test_claude_usage_limit_within_the_timeout_is_waited_out(make_engine, repo, tmp_path):
    reset = int(time.time()) + 2
    claude_limited(tmp_path, reset)
    async with make_engine({"claude": flaky("claude", tmp_path, "claude-limited", "claude-success")},
                           retries=2) as engine:
        task, a, lines = await run(engine, repo, "claude")
    clock = datetime.fromtimestamp(reset, timezone.utc).strftime("%H:%M:%S")
    assert any(t.startswith(f"rate limited until {clock} UTC, waiting") for t in lines), lines
    assert a.state == AttemptState.succeeded and a.retries == 1 and task.state == TaskState.succeeded
    assert (tmp_path / "count").read_text() == "2" and git(repo, "show", f"{a.branch}:hello.txt") == "hello"


async def test_claude_usage_limit_beyond_the_timeout_fails_fast(make_engine, repo, tmp_path):
    claude_limited(tmp_path, int(time.time()) + 3600)
    async with make_engine({"claude": flaky("claude", tmp_path, "claude-limited", "claude-success")},
                           retries=2) as engine:
        task, a, lines = await run(engine, repo, "claude", timeout_s=60)
    assert a.state == AttemptState.failed and a.error.kind == "rate_limit" and a.retries == 0
    assert "did not wait for its reset" in a.error.message and "beyond the" in a.error.message
    assert (tmp_path / "count").read_text() == "1" and not any("waiting" in t for t in lines)


async def test_a_known_reset_is_not_waited_for_without_retries_left(make_engine, repo, tmp_path):
    claude_limited(tmp_path, int(time.time()) + 2)
    async with make_engine({"claude": flaky("claude", tmp_path, "claude-limited", "claude-success")},
                           retries=0) as engine:
        _, a, _ = await run(engine, repo, "claude")
    assert a.error.kind == "rate_limit" and "no retries left" in a.error.message


async def test_a_failed_fast_cheap_agent_lets_the_cascade_move_on(repo, tmp_path, council_home):
    claude_limited(tmp_path, int(time.time()) + 3600)
    agents = {"claude": flaky("claude", tmp_path, "claude-limited", "claude-success"),
              "py": {"kind": "command", "argv": [sys.executable, "-c", "open('py.txt', 'w').write('py')"]}}
    config = parse_config({"agents": agents, "engine": {"retries": 2, "kill_grace_s": 1},
                           "routing": {"cheap": ["claude"], "standard": ["py"]}})  # cheap first, then escalate
    async with Engine(config, home=council_home, environ=dict(os.environ)) as engine:
        task = await engine.wait((await engine.submit(str(repo), "x", tier="cheap", timeout_s=60)).task_id, 60)
    assert [a.agent for a in task.attempts] == ["claude", "py"] and task.best == "py", task
    assert task.attempt("claude").error.kind == "rate_limit"


async def test_gemini_retry_delay_is_waited_out(make_engine, repo, tmp_path):
    gemini_limited(tmp_path, 1.5)
    async with make_engine({"gemini": flaky("gemini", tmp_path, "gemini-limited", "gemini-success")},
                           retries=2) as engine:
        task, a, lines = await run(engine, repo, "gemini")
    assert any(t.startswith("rate limited until") for t in lines), lines
    assert a.state == AttemptState.succeeded and a.retries == 1


@pytest.mark.parametrize("retry_after, waited", [("1", True), ("3600", False)])
async def test_ollama_retry_after_is_waited_out_or_fails_fast(make_engine, repo, retry_after, waited):
    with OllamaStandin() as ollama:
        ollama.server.busy, ollama.server.retry_after = 1, retry_after
        ollama.server.answers.append("Done.\n\nhello.txt\n```\nhello\n```\n")
        async with make_engine({"ollama": {"kind": "ollama", "base_url": ollama.url, "model": MODEL}},
                               retries=2) as engine:
            task, a, lines = await run(engine, repo, "ollama", timeout_s=60)
    if waited:
        assert a.state == AttemptState.succeeded and a.retries == 1, a
        assert any(t.startswith("rate limited until") for t in lines)
        assert len(ollama.server.chats) == 2
    else:
        assert a.error.kind == "rate_limit" and "did not wait for its reset" in a.error.message, a
        assert len(ollama.server.chats) == 1


def test_reset_times_in_the_shapes_agents_report_them():
    now = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
    assert reset_time("Claude AI usage limit reached|1767229200", now) == 1_767_229_200
    assert reset_time("Please retry in 24.5s.", now) == now + 24.5
    assert reset_time('"retryDelay": "30s"', now) == now + 30
    assert reset_time("Your quota will reset after 1h2m3s.", now) == now + 3723
    assert reset_time("retry-after: 7", now) == now + 7
    assert reset_time("5-hour limit reached · resets 3pm (UTC)", now) == now + 15 * 3600
    assert reset_time("You've hit your limit · resets 2:30am (UTC)", now) == now + 2.5 * 3600
    assert reset_time("This request would exceed your account's rate limit. Please try again later.", now) is None
