"""Contract tier: the REAL Auto-Claude, driven by the engine, against a local model stand-in.

Runs when AUTO_CLAUDE_HOME points at an Auto-Claude checkout (AndyMik90/Auto-Claude, 2.7.5 at
8d18cc81 was used here) whose backend has a venv with its requirements.txt installed
(apps/backend/.venv, or AUTO_CLAUDE_PYTHON); claude-agent-sdk brings its own `claude`, so no npm
is needed. It runs on Python 3.11 as well as 3.12 (only its optional Graphiti memory wants 3.12).
Set up once, outside this repo:

    git clone https://github.com/AndyMik90/Auto-Claude ~/src/Auto-Claude
    python3 -m venv ~/src/Auto-Claude/apps/backend/.venv
    ~/src/Auto-Claude/apps/backend/.venv/bin/pip install claude-agent-sdk python-dotenv pydantic sentry-sdk
    AUTO_CLAUDE_HOME=~/src/Auto-Claude python -m pytest tests/contract/test_real_auto_claude.py

The stand-in (model_standin.py) plays each of Auto-Claude's agent sessions by a script: the quick
spec writes spec.md, context.json and implementation_plan.json; the coder writes hello.py, commits
with `git add . ':!.auto-claude'` as its prompt says, and marks its subtask completed; QA signs
off (or never does). Everything else (phase summaries, side requests) gets plain text.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from model_standin import ModelStandin

from conftest import git
from engine.models import AttemptState, ErrorKind

pytestmark = pytest.mark.contract

HOME = os.environ.get("AUTO_CLAUDE_HOME")
PYTHON = os.environ.get("AUTO_CLAUDE_PYTHON") or (
    str(Path(HOME).expanduser() / "apps" / "backend" / ".venv" / "bin" / "python") if HOME else "")
if not HOME:
    pytest.skip("AUTO_CLAUDE_HOME is not set: point it at an Auto-Claude checkout with its backend venv "
                "(see this module's docstring) to run the real Auto-Claude", allow_module_level=True)
if not Path(PYTHON).is_file():
    pytest.skip(f"Auto-Claude's python {PYTHON} does not exist: create apps/backend/.venv with its "
                f"requirements, or set AUTO_CLAUDE_PYTHON", allow_module_level=True)

TOKEN = "sk-ant-oat01-standin"
QUIET = {"CLAUDE_CODE_MAX_RETRIES": "1", "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
         "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1", "SENTRY_DSN": ""}
HELLO = "print('hello')\n"
SPEC_MD = """# Specification: hello

## Overview
Create a small script, hello.py, that prints hello. It is a new file at the project root.

## Workflow Type
simple: one new file, no changes to existing code.

## Task Scope
In scope: hello.py. Out of scope: everything else in the project, which stays as it is.

## Files to Modify
- `hello.py` (new): prints hello

## Requirements
1. `python hello.py` prints `hello` and exits 0.

## Success Criteria
- [ ] hello.py exists at the project root
- [ ] `python hello.py` prints hello

## QA Acceptance Criteria
- `python hello.py` prints hello
"""


def plan(completed: bool, qa: dict | None = None) -> str:
    subtask = {"id": "subtask-1-1", "description": "Create hello.py", "service": "main",
               "status": "completed" if completed else "pending", "files_to_create": ["hello.py"],
               "files_to_modify": [], "patterns_from": [],
               "verification": {"type": "command", "run": "python hello.py", "expected": "hello"}}
    return json.dumps({"feature": "hello", "workflow_type": "simple", "total_phases": 1,
                       "phases": [{"phase": 1, "name": "Implementation", "depends_on": [], "subtasks": [subtask]}],
                       "metadata": {"complexity": "simple", "estimated_sessions": 1},
                       **({"qa_signoff": qa} if qa else {})}, indent=2)


def _text(blocks) -> str:
    return blocks if isinstance(blocks, str) else " ".join(
        b.get("text", "") for b in blocks or [] if isinstance(b, dict))


def auto_claude_script(qa_signs_off: bool = True, build_refused: bool = False):
    """The stand-in's script for Auto-Claude 2.7.5's sessions, told apart by their prompts;
    `build_refused`: the login is refused (HTTP 401) from the first coder session on."""
    def script(body: dict):
        prompt = _text(((body.get("messages") or [{}])[0]).get("content"))
        workdir = re.search(r"working directory is: (\S+)", _text(body.get("system")))
        spec_dir = re.search(r"\*\*Spec Directory\*\*: (\S+)", prompt)
        in_spec = re.search(r"\./(\.auto-claude/specs/[^/`\s]+)/implementation_plan\.json", prompt)
        qa_session = re.search(r"\*\*QA Session\*\*: (\d+)", prompt)
        if "create the minimal spec.md and implementation_plan.json" in prompt and spec_dir:
            d = spec_dir.group(1)
            context = {"task_description": "Create hello.py that prints hello", "files_to_modify": []}
            return [("Write", {"file_path": f"{d}/spec.md", "content": SPEC_MD}),
                    ("Write", {"file_path": f"{d}/context.json", "content": json.dumps(context)}),
                    ("Write", {"file_path": f"{d}/implementation_plan.json", "content": plan(False)})]
        absolute = re.search(r"(/\S+/\.auto-claude/specs/[^/`\s]+/implementation_plan\.json)", prompt)
        if not (workdir and (in_spec or absolute)):
            return []
        plan_file = absolute.group(1) if absolute else f"{workdir.group(1)}/{in_spec.group(1)}/implementation_plan.json"
        if "**Subtask ID:**" in prompt and build_refused:
            return 401
        if "**Subtask ID:**" in prompt:
            return [("Write", {"file_path": f"{workdir.group(1)}/hello.py", "content": HELLO}),
                    ("Bash", {"command": "git add . ':!.auto-claude' && git commit -q -m 'auto-claude: subtask-1-1'",
                              "description": "Commit the subtask"}),
                    ("Read", {"file_path": plan_file}),
                    ("Write", {"file_path": plan_file, "content": plan(True)})]
        if qa_session and qa_signs_off:
            qa = {"status": "approved", "timestamp": "2026-01-27T20:00:00", "qa_session": int(qa_session.group(1)),
                  "report_file": "qa_report.md", "tests_passed": {"unit": "1/1"}, "verified_by": "qa_agent"}
            return [("Read", {"file_path": plan_file}), ("Write", {"file_path": plan_file, "content": plan(True, qa)})]
        return []
    return script


def agents(standin: ModelStandin, max_iterations: int = 3) -> dict:
    return {"auto-claude": {"home": HOME, "python": PYTHON, "complexity": "simple", "max_iterations": max_iterations,
                            "env": {"ANTHROPIC_BASE_URL": standin.url, "CLAUDE_CODE_OAUTH_TOKEN": TOKEN, **QUIET}}}


async def run_task(make_engine, repo: Path, standin: ModelStandin, timeout: float = 400, max_iterations: int = 3):
    async with make_engine(agents(standin, max_iterations), default_timeout_s=timeout) as engine:
        task = await engine.submit(str(repo), "Create hello.py that prints hello", agents=["auto-claude"])
        return (await engine.wait(task.task_id, timeout + 60)).attempt("auto-claude")


async def test_real_auto_claude_builds_and_only_the_work_reaches_the_branch(make_engine, repo: Path,
                                                                         tmp_path: Path) -> None:
    (tmp_path / ".auto-claude").mkdir()  # a parent of every worktree, like the issue's ~/.auto-claude
    base = git(repo, "rev-parse", "HEAD")
    with ModelStandin("", "", script=auto_claude_script()) as standin:
        ac = await run_task(make_engine, repo, standin)
    assert ac.state == AttemptState.succeeded, (ac.error, standin.summary())
    assert "QA approved" in ac.summary
    assert git(repo, "diff", "--name-only", base, ac.branch).split() == ["hello.py"], \
        "no .gitignore edit, none of its bookkeeping (its coder committed .claude_settings.json & co.)"
    assert git(repo, "show", f"{ac.branch}:hello.py") + "\n" == HELLO
    assert not any((tmp_path / ".auto-claude").iterdir()), "spec_runner.py climbed out of the worktree"
    assert not (tmp_path / ".gitignore").exists() and not (tmp_path / ".claude_settings.json").exists()


async def test_real_auto_claude_without_qa_sign_off_is_not_success(make_engine, repo: Path) -> None:
    with ModelStandin("", "", script=auto_claude_script(qa_signs_off=False)) as standin:
        ac = await run_task(make_engine, repo, standin)
    assert ac.state == AttemptState.failed and ac.error.kind == ErrorKind.check_failed, ac
    assert "never signed off" in ac.error.message


async def test_real_auto_claude_with_a_refused_login_fails_as_auth(make_engine, repo: Path) -> None:
    with ModelStandin("", "", fail_status=401) as standin:
        ac = await run_task(make_engine, repo, standin, timeout=300)
    assert ac.state == AttemptState.failed and ac.error.kind == ErrorKind.auth, (ac.error, standin.summary())


async def test_real_auto_claude_build_stops_at_a_refused_login(make_engine, repo: Path) -> None:
    """Left alone its build starts a new session after each 401 until --max-iterations (40 here)."""
    with ModelStandin("", "", script=auto_claude_script(build_refused=True)) as standin:
        ac = await run_task(make_engine, repo, standin, timeout=600, max_iterations=40)
    refused = [r for r in standin.requests if r.answer.startswith("HTTP 401")]
    assert ac.state == AttemptState.failed and ac.error.kind == ErrorKind.auth, (ac.error, standin.summary())
    assert "run.py" in ac.error.message and "API Error: 401" in ac.error.message
    assert "__TASK_LOG_" not in ac.error.message
    assert 1 <= len(refused) <= 2, f"{len(refused)} refused sessions: the build was not stopped"
