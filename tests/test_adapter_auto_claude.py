"""The auto-claude adapter: its driver runs a fake Auto-Claude checkout's two steps for real.

The fake spec_runner.py / run.py behave like the real ones as described in the shared
cli-formats.md: the spec step writes .auto-claude/specs/NNN-name/, the build step prints
__EXEC_PHASE__ lines, edits the project and writes implementation_plan.json with a QA verdict
(and still exits 0 when QA rejects). Words in the task pick a failure: SPEC-FAIL, QA-REJECT, BUILD-CRASH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters import make_adapter
from adapters.base import COUNCIL_CONTEXT, PACKAGE_ROOT, AgentSpec, ErrorKind, Job

RECORD = """
def record(step, args):
    import json, os, sys
    if "FAKE_AC_LOG" not in os.environ:
        return
    with open(os.environ["FAKE_AC_LOG"], "a") as f:
        f.write(json.dumps({"step": step, "argv": sys.argv[1:], "cwd": os.getcwd(), "stdin": sys.stdin.read(),
                            "env": dict(os.environ)}) + "\\n")
"""

SPEC_RUNNER = RECORD + """
import argparse, sys
from pathlib import Path
ap = argparse.ArgumentParser()
for flag in ("--task", "--project-dir", "--complexity", "--model"):
    ap.add_argument(flag)
ap.add_argument("--auto-approve", action="store_true")
ap.add_argument("--no-build", action="store_true")
a = ap.parse_args()
record("spec", a)
if "SPEC-FAIL" in a.task:
    print("Error: No OAuth token found. Run `claude setup-token`.")
    sys.exit(1)
print('__EXEC_PHASE__:{"phase":"planning","message":"Writing the spec","progress":10}')
specs = Path(a.project_dir) / ".auto-claude" / "specs"
specs.mkdir(parents=True, exist_ok=True)
spec = specs / f"{len(list(specs.iterdir())) + 1:03d}-add-hello"
spec.mkdir()
(spec / "spec.md").write_text(a.task)
print(f"Spec written to {spec}")
"""

RUN = RECORD + """
import argparse, json, sys
from pathlib import Path
ap = argparse.ArgumentParser()
ap.add_argument("--spec")
ap.add_argument("--project-dir")
ap.add_argument("--auto-continue", action="store_true")
ap.add_argument("--direct", action="store_true")
a = ap.parse_args()
record("build", a)
project = Path(a.project_dir)
spec = project / ".auto-claude" / "specs" / a.spec
task = (spec / "spec.md").read_text()
print('__EXEC_PHASE__:{"phase":"coding","message":"Implementing subtask 1/1","progress":40}')
(project / "hello.py").write_text("print('hello')\\n")
if "BUILD-CRASH" in task:
    print("Traceback (most recent call last):\\nRuntimeError: the agent session died", file=sys.stderr)
    sys.exit(3)
print('__EXEC_PHASE__:{"phase":"qa_review","message":"QA reviewing","progress":80}')
rejected = "QA-REJECT" in task
signoff = {"status": "rejected" if rejected else "approved",
           "issues_found": [{"title": "hello.py has no tests", "type": "critical"}] if rejected else []}
(spec / "implementation_plan.json").write_text(json.dumps({"feature": "hello", "qa_signoff": signoff}))
print('__EXEC_PHASE__:{"phase":"complete","message":"Build complete","progress":100}')
"""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fake Auto-Claude checkout."""
    backend = tmp_path / "Auto-Claude" / "apps" / "backend"
    (backend / "runners").mkdir(parents=True)
    (backend / "runners" / "spec_runner.py").write_text(SPEC_RUNNER)
    (backend / "run.py").write_text(RUN)
    (tmp_path / "Auto-Claude" / "package.json").write_text('{"version": "2.7.1"}')
    return tmp_path / "Auto-Claude"


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    wt = tmp_path / "wt"
    wt.mkdir()
    return wt


def adapter(home: Path, log: Path | None = None, **kw):
    env = {"FAKE_AC_LOG": str(log)} if log else {}
    spec = AgentSpec(name="auto-claude", kind="auto-claude", home=str(home), python=sys.executable, env=env, **kw)
    return make_adapter(spec, {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent",
                               "CLAUDE_CODE_OAUTH_TOKEN": "oauth-tok-1234", "FOO_SECRET_TOKEN": "leak-me-not"})


def drive(ad, job: Job):
    inv = ad.invocation(job)
    done = subprocess.run(inv.argv, cwd=inv.cwd, env=inv.env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=60)
    parser = ad.parser(job)
    notes = [parser.feed(stream, line) for stream, data in (("stdout", done.stdout), ("stderr", done.stderr))
             for line in data.decode().splitlines()]
    return parser.finish(done.returncode), [n for n in notes if n], done


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_spec_then_build_approved(home: Path, worktree: Path, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    ad = adapter(home, log, model="sonnet")
    job = Job(prompt="Add hello.py", worktree=worktree, timeout_s=60, tier="cheap")
    outcome, notes, done = drive(ad, job)
    assert outcome.ok, (outcome, done.stdout.decode(), done.stderr.decode())
    assert outcome.error is None and "001-add-hello" in outcome.summary and "approved" in outcome.summary
    assert (worktree / "hello.py").read_text() == "print('hello')\n"
    assert "planning (10%): Writing the spec" in notes and "complete (100%): Build complete" in notes
    spec_call, build_call = calls(log)
    argv = spec_call["argv"]
    assert argv[argv.index("--task") + 1].startswith(COUNCIL_CONTEXT) and argv[argv.index("--task") + 1].endswith("Add hello.py")
    assert argv[argv.index("--project-dir") + 1] == str(worktree)
    assert argv[argv.index("--complexity") + 1] == "simple" and argv[argv.index("--model") + 1] == "sonnet"
    assert "--auto-approve" in argv and "--no-build" in argv
    assert build_call["argv"] == ["--spec", "001-add-hello", "--project-dir", str(worktree), "--auto-continue", "--direct"]
    for call in (spec_call, build_call):
        assert call["stdin"] == ""  # /dev/null: an interactive prompt cannot hang it
        env = call["env"]
        assert env["GRAPHITI_ENABLED"] == "false" and env["ENABLE_FANCY_UI"] == "false"
        assert env["CLAUDE_CODE_OAUTH_TOKEN"] == "oauth-tok-1234" and "FOO_SECRET_TOKEN" not in env
        assert PACKAGE_ROOT not in env.get("PYTHONPATH", "").split(os.pathsep)
    assert "oauth-tok-1234" in ad.invocation(job).secrets


def test_qa_rejected_fails_with_issues(home: Path, worktree: Path) -> None:
    outcome, _, done = drive(adapter(home), Job(prompt="QA-REJECT this", worktree=worktree, timeout_s=60))
    assert done.returncode == 0  # Auto-Claude exits 0 when QA rejects: the plan tells
    assert not outcome.ok and outcome.error.kind == ErrorKind.check_failed
    assert "hello.py has no tests" in outcome.error.message and "001-add-hello" in outcome.error.message


def test_spec_step_failure_is_classified(home: Path, worktree: Path) -> None:
    outcome, _, done = drive(adapter(home), Job(prompt="SPEC-FAIL", worktree=worktree, timeout_s=60))
    assert done.returncode == 1 and not (worktree / "hello.py").exists()
    assert outcome.error.kind == ErrorKind.auth
    assert "spec_runner.py" in outcome.error.message and "CLAUDE_CODE_OAUTH_TOKEN" in outcome.error.message


def test_build_crash_and_existing_specs(home: Path, worktree: Path) -> None:
    (worktree / ".auto-claude" / "specs" / "001-older").mkdir(parents=True)
    outcome, notes, done = drive(adapter(home), Job(prompt="BUILD-CRASH", worktree=worktree, timeout_s=60))
    assert done.returncode == 3
    assert "spec 002-add-hello written; building" in notes  # the new spec, not the older one
    assert outcome.error.kind == ErrorKind.crash
    assert "run.py" in outcome.error.message and "the agent session died" in outcome.error.message


def test_missing_python_is_reported_by_the_driver(home: Path, worktree: Path) -> None:
    spec = AgentSpec(name="auto-claude", kind="auto-claude", home=str(home), python=str(home / "nope" / "python"))
    outcome, _, _ = drive(make_adapter(spec, {"PATH": os.environ.get("PATH", "")}),
                          Job(prompt="x", worktree=worktree, timeout_s=60))
    assert outcome.error.kind == ErrorKind.crash and "cannot run" in outcome.error.message


def test_invocation_runs_the_driver_module(home: Path, worktree: Path) -> None:
    inv = adapter(home).invocation(Job(prompt="x", worktree=worktree, timeout_s=60))
    assert inv.argv[:6] == [sys.executable, "-P", "-W", "ignore::RuntimeWarning:runpy", "-m", "adapters.auto_claude"]
    assert inv.argv[inv.argv.index("--complexity") + 1] == "standard"
    assert inv.env["PYTHONPATH"].split(os.pathsep)[0] == PACKAGE_ROOT and inv.stdin is None


async def test_available(home: Path, tmp_path: Path) -> None:
    avail = await adapter(home).available()
    assert avail.ok and avail.version == "2.7.1", avail
    no_python = AgentSpec(name="auto-claude", kind="auto-claude", home=str(home))
    avail = await make_adapter(no_python, {"PATH": ""}).available()
    assert not avail.ok and ".venv" in avail.message
    avail = await make_adapter(AgentSpec(name="auto-claude", kind="auto-claude", home=str(tmp_path / "none")),
                               {}).available()
    assert not avail.ok and avail.error_kind == ErrorKind.not_installed and "git" in avail.message.lower()
    if sys.platform != "darwin":
        bare = AgentSpec(name="auto-claude", kind="auto-claude", home=str(home), python=sys.executable)
        avail = await make_adapter(bare, {"HOME": str(tmp_path)}).available()
        assert not avail.ok and avail.error_kind == ErrorKind.auth and "CLAUDE_CODE_OAUTH_TOKEN" in avail.message
        (home / "apps" / "backend" / ".env").write_text("CLAUDE_CODE_OAUTH_TOKEN=abc\n")
        assert (await make_adapter(bare, {"HOME": str(tmp_path)}).available()).ok


@pytest.mark.skipif(sys.platform == "darwin", reason="claude login uses the keychain there")
async def test_a_claude_login_counts_as_auth(home: Path, tmp_path: Path) -> None:
    """Auto-Claude runs claude, so the file `claude login` writes is enough (CLAUDE_CONFIG_DIR honoured)."""
    bare = AgentSpec(name="auto-claude", kind="auto-claude", home=str(home), python=sys.executable)
    config_dir = tmp_path / "claude-config"
    env = {"HOME": str(tmp_path), "CLAUDE_CONFIG_DIR": str(config_dir)}
    assert not (await make_adapter(bare, env).available()).ok
    config_dir.mkdir()
    (config_dir / ".credentials.json").write_text("{}")
    avail = await make_adapter(bare, env).available()
    assert avail.ok and "claude login" in avail.message
