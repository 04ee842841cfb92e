"""The auto-claude adapter: its driver runs a fake Auto-Claude checkout's two steps for real.

The fake (tests/fakes/auto_claude, copied per test) behaves like the real Auto-Claude 2.7.5 where
the council depends on it: see its fake_common.py. Words in the task pick a failure. Tests run the
driver the way the engine does (the adapter's argv, env and cwd, stdin /dev/null) in a real git
repo, and the last ones run whole tasks through the engine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapters import make_adapter
from adapters.auto_claude import pick_spec
from adapters.base import COUNCIL_CONTEXT, PACKAGE_ROOT, AgentSpec, ErrorKind, Job
from conftest import FAKES, git
from engine.cleanup import remove_attempt
from engine.models import AttemptState

TOKEN = "sk-ant-oat01-fake-token-1234"
SCRATCH = [".auto-claude", ".auto-claude-security.json", ".auto-claude-status", ".claude_settings.json"]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fake Auto-Claude checkout of its own (tests write its apps/backend/.env)."""
    return Path(shutil.copytree(FAKES / "auto_claude", tmp_path / "Auto-Claude"))


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


def adapter(home: Path, log: Path | None = None, environ: dict | None = None, **kw):
    env = {"FAKE_AC_LOG": str(log)} if log else {}
    spec = AgentSpec(name="auto-claude", kind="auto-claude", home=str(home), python=sys.executable, env=env, **kw)
    if environ is None:
        environ = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], "CLAUDE_CODE_OAUTH_TOKEN": TOKEN,
                   "FOO_SECRET_TOKEN": "leak-me-not"}
    return make_adapter(spec, environ)


def drive(ad, job: Job, timeout: float = 60):
    inv = ad.invocation(job)
    done = subprocess.run(inv.argv, cwd=inv.cwd, env=inv.env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout)
    parser = ad.parser(job)
    notes = [parser.feed(stream, line) for stream, data in (("stdout", done.stdout), ("stderr", done.stderr))
             for line in data.decode().splitlines()]
    return parser.finish(done.returncode), [n for n in notes if n], done


def calls(log: Path, event: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [r for r in rows if event is None or r["event"] == event]


def job(repo: Path, prompt: str = "Add hello.py", **kw) -> Job:
    return Job(prompt=prompt, worktree=repo, timeout_s=60, **kw)


def test_spec_then_build_approved(home: Path, repo: Path, log: Path) -> None:
    base = git(repo, "rev-parse", "HEAD")
    ad = adapter(home, log, model="sonnet")
    outcome, notes, done = drive(ad, job(repo, tier="cheap"))
    assert outcome.ok, (outcome, done.stdout.decode(), done.stderr.decode())
    assert outcome.error is None and "001-council" in outcome.summary and "QA approved" in outcome.summary
    assert (repo / "hello.py").read_text() == "def hello():\n    return 'hello'\n\n\nprint(hello())\n"
    assert "coding: Continuing implementation" in notes and "complete: QA validation passed" in notes
    spec_call, build_call = calls(log, "spec_runner")[0], calls(log, "run")[0]
    argv = spec_call["argv"]
    task = argv[argv.index("--task") + 1]
    assert task.startswith(COUNCIL_CONTEXT) and task.endswith("Add hello.py")
    assert argv[argv.index("--project-dir") + 1] == str(repo.resolve())
    assert argv[argv.index("--spec-dir") + 1] == str(repo.resolve() / ".auto-claude" / "specs" / "001-council")
    assert argv[argv.index("--complexity") + 1] == "simple" and argv[argv.index("--model") + 1] == "sonnet"
    assert "--auto-approve" in argv and "--no-build" in argv
    assert build_call["argv"] == ["--spec", "001-council", "--project-dir", str(repo.resolve()), "--auto-continue",
                                  "--direct", "--force", "--max-iterations", "10", "--model", "sonnet"]
    for call in (spec_call, build_call):
        assert call["stdin"] == ""  # /dev/null: an interactive prompt cannot hang it
        env = call["env"]
        assert env["GRAPHITI_ENABLED"] == "false" and env["ENABLE_FANCY_UI"] == "false"
        assert env["CLAUDE_CODE_OAUTH_TOKEN"] == TOKEN and "FOO_SECRET_TOKEN" not in env
        assert PACKAGE_ROOT not in env.get("PYTHONPATH", "").split(os.pathsep)
    assert TOKEN in ad.invocation(job(repo)).secrets
    # Auto-Claude never touched .gitignore nor made a commit of its own; its coder's commits are the work's.
    assert not (repo / ".gitignore").exists()
    assert git(repo, "log", "--format=%s", f"{base}..HEAD").splitlines() == [
        "auto-claude: Complete subtask-1-2", "auto-claude: Complete subtask-1-1"]


def test_spec_runner_never_climbs_out_of_the_worktree(home: Path, tmp_path: Path, log: Path) -> None:
    """With a `.auto-claude/` in a parent (the issue's ~/.auto-claude), the real spec_runner.py
    works there when the project has none: the driver gives the worktree its own first."""
    parent = tmp_path / "someone"
    (parent / ".auto-claude").mkdir(parents=True)
    wt = parent / "src" / "wt"
    wt.mkdir(parents=True)
    git(wt, "init", "-q", "-b", "main")
    git(wt, "commit", "-q", "--allow-empty", "-m", "initial")
    before = sorted(str(p.relative_to(parent)) for p in parent.rglob("*") if wt not in (p, *p.parents))
    environ = {"PATH": os.environ["PATH"], "HOME": str(parent), "CLAUDE_CODE_OAUTH_TOKEN": TOKEN}
    outcome, _, done = drive(adapter(home, log, environ=environ), job(wt))
    assert outcome.ok, (outcome, done.stdout.decode())
    after = sorted(str(p.relative_to(parent)) for p in parent.rglob("*") if wt not in (p, *p.parents))
    assert after == before == [".auto-claude", "src"], "nothing written into HOME or any parent"
    assert (wt / ".auto-claude" / "specs" / "001-council" / "spec.md").is_file()
    assert (wt / ".claude_settings.json").is_file() and not (wt / ".gitignore").exists()


def test_qa_rejected_fails_with_issues(home: Path, repo: Path) -> None:
    outcome, _, done = drive(adapter(home), job(repo, "QA-REJECT this"))
    assert done.returncode == 0  # Auto-Claude exits 0 when QA rejects: the plan tells
    assert not outcome.ok and outcome.error.kind == ErrorKind.check_failed
    assert "rejected" in outcome.error.message and "hello.py has no tests" in outcome.error.message
    assert "001-council" in outcome.error.message


def test_qa_that_never_signed_off_is_not_success(home: Path, repo: Path) -> None:
    outcome, _, done = drive(adapter(home), job(repo, "QA-NOSIGNOFF"))
    assert done.returncode == 0 and b"QA VALIDATION INCOMPLETE" in done.stdout
    assert not outcome.ok and outcome.error.kind == ErrorKind.check_failed
    assert "never signed off" in outcome.error.message


def test_unfinished_subtasks_are_not_success_and_the_build_is_bounded(home: Path, repo: Path, log: Path) -> None:
    outcome, _, done = drive(adapter(home, log, max_iterations=3), job(repo, "UNFINISHED"))
    assert done.returncode == 0 and b"Reached max iterations (3)" in done.stdout
    assert len(calls(log, "session")) == 3
    assert not outcome.ok and outcome.error.kind == ErrorKind.crash
    assert "1 of 2 subtasks unfinished" in outcome.error.message


def test_a_refused_login_stops_the_build_at_once(home: Path, repo: Path, log: Path) -> None:
    """On a 401 the real build prints "Not logged in · Please run /login" and starts another
    session until --max-iterations (unbounded by default): the driver stops it at the first."""
    outcome, notes, done = drive(adapter(home, log, max_iterations=40), job(repo, "BUILD-401"))
    sessions = calls(log, "session")
    assert 1 <= len(sessions) <= 2, f"{len(sessions)} sessions: the driver did not stop the build"
    assert not outcome.ok and outcome.error.kind == ErrorKind.auth, outcome
    assert "Please run /login" in outcome.error.message and "run.py" in outcome.error.message
    assert "__TASK_LOG_" not in outcome.error.message
    assert "CLAUDE_CODE_OAUTH_TOKEN" in outcome.error.message  # the fix


def test_a_refused_login_in_the_spec_step(home: Path, repo: Path, log: Path) -> None:
    outcome, _, done = drive(adapter(home, log), job(repo, "SPEC-401"))
    assert len(calls(log, "session")) == 1 and not calls(log, "run")
    assert outcome.error.kind == ErrorKind.auth and "spec_runner.py" in outcome.error.message


def test_spec_step_failures(home: Path, repo: Path) -> None:
    outcome, _, done = drive(adapter(home), job(repo, "SPEC-FAIL"))
    assert done.returncode == 1 and not (repo / "hello.py").exists()
    assert outcome.error.kind == ErrorKind.crash and "spec_runner.py" in outcome.error.message
    assert "quick_spec" in outcome.error.message
    no_token = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], "ANTHROPIC_API_KEY": "sk-ant-api-unused"}
    outcome, _, done = drive(adapter(home, environ=no_token), job(repo))
    assert done.returncode == 1 and outcome.error.kind == ErrorKind.auth
    assert "No OAuth token found" in outcome.error.message


def test_a_fatal_build_error(home: Path, repo: Path) -> None:
    outcome, _, done = drive(adapter(home), job(repo, "BUILD-CRASH"))
    assert done.returncode == 1
    assert outcome.error.kind == ErrorKind.crash
    assert "run.py" in outcome.error.message and "Fatal error: the agent session died" in outcome.error.message


def test_the_build_gets_the_spec_spec_runner_wrote(tmp_path: Path) -> None:
    """Left to itself spec_runner.py renames 001-pending to 001-<slug> and writes spec.md into
    001-pending; "Spec saved to:" names it. sorted()[-1] would take 001-zzz-slug."""
    specs = tmp_path / "specs"
    for name in ("000-old", "001-pending", "001-zzz-slug"):
        (specs / name).mkdir(parents=True)
    (specs / "000-old" / "spec.md").write_text("older")
    (specs / "001-pending" / "spec.md").write_text("the spec")
    (specs / "001-zzz-slug" / "requirements.json").write_text("{}")
    before = {"000-old"}
    asked = specs / "002-council"
    assert pick_spec(str(specs / "001-pending"), asked, specs, before) == specs / "001-pending"
    assert pick_spec(None, asked, specs, before) == specs / "001-pending", "the one new dir holding spec.md"
    assert pick_spec(str(tmp_path / "elsewhere"), asked, specs, before) == specs / "001-pending"
    (specs / "001-zzz-slug" / "spec.md").write_text("another")
    assert pick_spec(None, asked, specs, before) is None, "two candidates: no guess"
    asked.mkdir()
    (asked / "spec.md").write_text("asked")
    assert pick_spec(None, asked, specs, before) == asked


def test_the_fake_spec_runner_left_to_itself_writes_into_the_pending_dir(home: Path, repo: Path) -> None:
    """Without --spec-dir the fake, like the real one, renames NNN-pending and keeps writing there."""
    (repo / ".auto-claude" / "specs").mkdir(parents=True)
    (repo / ".auto-claude" / ".gitignore_checked").touch()
    specs = repo / ".auto-claude" / "specs"
    done = subprocess.run([sys.executable, str(home / "apps" / "backend" / "runners" / "spec_runner.py"), "--task",
                           "Add a zebra module", "--project-dir", str(repo), "--auto-approve", "--no-build"],
                          env={**os.environ, "CLAUDE_CODE_OAUTH_TOKEN": TOKEN}, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=True)
    assert sorted(p.name for p in specs.iterdir()) == ["001-pending", "001-zebra-module"]
    assert (specs / "001-pending" / "spec.md").is_file() and not (specs / "001-zebra-module" / "spec.md").exists()
    saved = [line.split("Spec saved to:")[1].strip() for line in done.stdout.splitlines() if "Spec saved to:" in line]
    assert pick_spec(saved[0], specs / "002-council", specs, set()) == specs / "001-pending"
    assert "__EXEC_PHASE__" not in done.stdout


def test_the_fake_run_py_exits_as_the_real_one(home: Path, repo: Path) -> None:
    """1 for a missing token, a missing spec or an unapproved one without --force; else 0."""
    spec = repo / ".auto-claude" / "specs" / "001-x"
    spec.mkdir(parents=True)
    (spec / "spec.md").write_text("Add hello.py")
    (spec / "implementation_plan.json").write_text(json.dumps({"phases": [{"subtasks": [
        {"id": "subtask-1-1", "status": "pending"}]}]}))

    def run(*args: str, token: bool = True) -> int:
        env = {k: v for k, v in os.environ.items() if k != "CLAUDE_CODE_OAUTH_TOKEN"}
        return subprocess.run([sys.executable, str(home / "apps" / "backend" / "run.py"), "--project-dir", str(repo),
                               "--direct", *args], env={**env, **({"CLAUDE_CODE_OAUTH_TOKEN": TOKEN} if token else {})},
                              capture_output=True, stdin=subprocess.DEVNULL).returncode
    assert run("--spec", "001") == 1  # not approved
    assert run("--spec", "002") == 1  # no such spec
    assert run("--spec", "001", "--force", token=False) == 1
    assert run("--spec", "001", "--force", "--max-iterations", "1") == 0


def test_missing_python_is_reported_by_the_driver(home: Path, repo: Path) -> None:
    spec = AgentSpec(name="auto-claude", kind="auto-claude", home=str(home), python=str(home / "nope" / "python"))
    outcome, _, _ = drive(make_adapter(spec, {"PATH": os.environ.get("PATH", "")}), job(repo))
    assert outcome.error.kind == ErrorKind.crash and "cannot run" in outcome.error.message


def test_invocation_runs_the_driver_module(home: Path, repo: Path) -> None:
    inv = adapter(home).invocation(job(repo))
    assert inv.argv[:6] == [sys.executable, "-P", "-W", "ignore::RuntimeWarning:runpy", "-m", "adapters.auto_claude"]
    assert inv.argv[inv.argv.index("--complexity") + 1] == "standard"
    assert inv.argv[inv.argv.index("--max-iterations") + 1] == "25"
    assert inv.env["PYTHONPATH"].split(os.pathsep)[0] == PACKAGE_ROOT and inv.stdin is None
    assert adapter(home).scratch == tuple(SCRATCH)


async def test_available(home: Path, tmp_path: Path) -> None:
    avail = await adapter(home).available()
    assert avail.ok and avail.version == "2.7.5", avail
    no_python = AgentSpec(name="auto-claude", kind="auto-claude", home=str(home))
    avail = await make_adapter(no_python, {"PATH": ""}).available()
    assert not avail.ok and ".venv" in avail.message
    avail = await make_adapter(AgentSpec(name="auto-claude", kind="auto-claude", home=str(tmp_path / "none")),
                               {}).available()
    assert not avail.ok and avail.error_kind == ErrorKind.not_installed and "git" in avail.message.lower()
    if sys.platform != "darwin":
        bare = AgentSpec(name="auto-claude", kind="auto-claude", home=str(home), python=sys.executable)
        avail = await make_adapter(bare, {"HOME": str(tmp_path), "ANTHROPIC_API_KEY": "sk-ant-api"}).available()
        assert not avail.ok and avail.error_kind == ErrorKind.auth and "CLAUDE_CODE_OAUTH_TOKEN" in avail.message
        assert "ANTHROPIC_API_KEY" in avail.message  # said not to count
        (home / "apps" / "backend" / ".env").write_text("CLAUDE_CODE_OAUTH_TOKEN=abc\n")
        assert (await make_adapter(bare, {"HOME": str(tmp_path)}).available()).ok


@pytest.mark.skipif(sys.platform == "darwin", reason="Auto-Claude asks the keychain there")
async def test_a_claude_login_counts_only_through_claude_config_dir(home: Path, tmp_path: Path) -> None:
    """Auto-Claude (core/auth.py) reads a credentials file only in CLAUDE_CONFIG_DIR, and only a
    token that looks like one; ~/.claude/.credentials.json alone does not count on Linux."""
    bare = AgentSpec(name="auto-claude", kind="auto-claude", home=str(home), python=sys.executable)
    default = tmp_path / ".claude"
    default.mkdir()
    (default / ".credentials.json").write_text(json.dumps({"claudeAiOauth": {"accessToken": TOKEN}}))
    assert not (await make_adapter(bare, {"HOME": str(tmp_path)}).available()).ok
    config_dir = tmp_path / "claude-config"
    env = {"HOME": str(tmp_path), "CLAUDE_CONFIG_DIR": str(config_dir)}
    config_dir.mkdir()
    (config_dir / ".credentials.json").write_text(json.dumps({"claudeAiOauth": {"accessToken": "not-a-token"}}))
    assert not (await make_adapter(bare, env).available()).ok
    (config_dir / ".credentials.json").write_text(json.dumps({"claudeAiOauth": {"accessToken": TOKEN}}))
    avail = await make_adapter(bare, env).available()
    assert avail.ok and "CLAUDE_CONFIG_DIR" in avail.message
    assert TOKEN not in avail.message and TOKEN not in json.dumps(avail.details)


# ---- through the engine: what lands on the result branch ----

def engine_agents(home: Path, log: Path | None = None) -> dict:
    env = {"CLAUDE_CODE_OAUTH_TOKEN": TOKEN, **({"FAKE_AC_LOG": str(log)} if log else {})}
    return {"auto-claude": {"home": str(home), "python": sys.executable, "env": env}}


def branch_files(repo: Path, branch: str, base: str) -> tuple[list[str], list[str]]:
    return (git(repo, "ls-tree", "-r", "--name-only", branch).split(),
            git(repo, "diff", "--name-only", base, branch).split())


async def gc_removes(repo: Path, council_home: Path, attempt) -> None:
    """Cleanup sees the bookkeeping as scratch, not as unsaved work, ignored by git or not."""
    report = await remove_attempt(repo, root=council_home / "worktrees", worktree=attempt.worktree,
                                  branch=attempt.branch, discard=True)
    assert report.removed == [str(Path(attempt.worktree).resolve()), attempt.branch], report


async def test_a_task_commits_the_work_and_none_of_auto_claudes_bookkeeping(make_engine, repo: Path, home: Path,
                                                                            council_home: Path) -> None:
    base = git(repo, "rev-parse", "HEAD")
    async with make_engine(engine_agents(home)) as engine:
        task = await engine.wait((await engine.submit(str(repo), "Add hello.py", agents=["auto-claude"])).task_id, 60)
    ac = task.attempt("auto-claude")
    assert ac.state == AttemptState.succeeded, ac
    tree, changed = branch_files(repo, ac.branch, base)
    assert tree == ["README.md", "app.py", "hello.py"] and changed == ["hello.py"], "no .gitignore, no scratch"
    assert ac.files_changed == 1
    wt = Path(ac.worktree)
    assert all((wt / p).exists() for p in SCRATCH), "the scratch stays in the worktree, uncommitted"
    await gc_removes(repo, council_home, ac)


async def test_a_repo_that_already_ignores_auto_claudes_files(make_engine, repo: Path, home: Path,
                                                              council_home: Path) -> None:
    """A repo where Auto-Claude ran before has its entries in .gitignore: git 2.39's `add` refused
    the engine's `:(exclude).auto-claude` then, and the attempt ended as a crash with 0 files."""
    (repo / ".gitignore").write_text("# Auto Claude generated files\n.auto-claude/\n.auto-claude-security.json\n"
                                     ".auto-claude-status\n.claude_settings.json\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-qm", "ignore auto-claude")
    base = git(repo, "rev-parse", "HEAD")
    async with make_engine(engine_agents(home)) as engine:
        task = await engine.wait((await engine.submit(str(repo), "Add hello.py", agents=["auto-claude"])).task_id, 60)
    ac = task.attempt("auto-claude")
    assert ac.state == AttemptState.succeeded, ac
    assert branch_files(repo, ac.branch, base)[1] == ["hello.py"]
    await gc_removes(repo, council_home, ac)


async def test_a_worktree_without_the_drivers_preparation_would_carry_the_gitignore_edit(repo: Path, home: Path,
                                                                                      tmp_path: Path) -> None:
    """What the fake does when nobody prepares `.auto-claude/` (as the real one did before the
    fix): edits .gitignore and commits it. The engine's commit step still works on such a
    worktree, and the scratch stays out of the commit."""
    from engine.worktrees import Worktrees
    env = {**os.environ, "CLAUDE_CODE_OAUTH_TOKEN": TOKEN}
    backend = home / "apps" / "backend"
    subprocess.run([sys.executable, str(backend / "runners" / "spec_runner.py"), "--task", "Add hello.py",
                    "--project-dir", str(repo), "--auto-approve", "--no-build"], env=env, check=True,
                   capture_output=True, stdin=subprocess.DEVNULL)
    assert git(repo, "log", "-1", "--format=%s") == "chore: add auto-claude entries to .gitignore"
    assert ".claude_settings.json" in (repo / ".gitignore").read_text()
    (repo / "work.txt").write_text("the work\n")
    base = git(repo, "rev-parse", "HEAD~1")
    assert await Worktrees(tmp_path / "wts").commit_all(repo, "council: test", tuple(SCRATCH), base=base)
    assert git(repo, "show", "--name-only", "--format=", "HEAD").split() == ["work.txt"]
