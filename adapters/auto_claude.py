"""Auto-Claude (AndyMik90/Auto-Claude): write a spec, then build it, inside the council's worktree.

Auto-Claude is two programs run one after the other (spec_runner.py, then run.py), but the engine
spawns one argv per attempt so that timeouts, kills and logs work alike for every agent. So the
invocation runs this module as a small driver (`python -m adapters.auto_claude`) that runs both
steps with stdin /dev/null, streaming their output through. What it does, read from Auto-Claude's
source (v2.7.5, apps/backend):

- The spec goes to a directory the driver names (`--spec-dir .auto-claude/specs/NNN-council`):
  left to itself spec_runner.py creates `NNN-pending`, renames it to `NNN-<slug>` after the
  requirements phase and keeps writing into `NNN-pending`. The build takes the spec named on the
  "Spec saved to:" line, else that directory, else the one new directory holding spec.md.
- The build runs with `--force`, as later spec_runner.py versions chain it: the spec step already
  approved the spec (`--auto-approve`), and run.py would refuse it if its hash of spec.md and
  implementation_plan.json changed in between.
- run.py exits 0 whether QA approved or not, and also when it stops with subtasks unfinished, so
  the outcome is read from the spec's implementation_plan.json: success is every subtask
  `completed` and `qa_signoff.status == "approved"`, nothing less.
- Its build loop ends only when every subtask is done, at `--max-iterations` sessions, or on a
  PAUSE file; on a refused login it prints "Not logged in · Please run /login" (no credentials)
  or "Failed to authenticate. API Error: 401" and starts another session, forever. So the build
  is bounded by `--max-iterations`, and the driver stops a step as soon as an authentication
  failure shows in its output: that is an auth error, not a timeout.
- Auth (core/auth.py): CLAUDE_CODE_OAUTH_TOKEN, ANTHROPIC_AUTH_TOKEN, then the credentials file in
  CLAUDE_CONFIG_DIR (only when that is set), then the OS keychain (Linux: Secret Service, which a
  headless server rarely has); never ANTHROPIC_API_KEY. `available()` follows the same order.

Its bookkeeping stays out of the result branch. spec_runner.py climbs parent directories for a
`.auto-claude/` when the project has none (it once wrote into HOME that way), and on a project's
first use it appends its entries to `.gitignore` and commits that (init.py does so when it creates
`.auto-claude/` or finds no `.auto-claude/.gitignore_checked`). The driver creates both in the
worktree before the spec step, so Auto-Claude stays inside the worktree and leaves `.gitignore` and
the history alone. Its files at the project root (.claude_settings.json, .auto-claude-security.json,
.auto-claude-status) and `.auto-claude/` are this adapter's `scratch`: the engine never commits them
and takes them back when Auto-Claude's coder committed them itself (it runs `git add .
':!.auto-claude'`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from .base import (PACKAGE_ROOT, Adapter, Availability, ErrorInfo, ErrorKind, Invocation, Job, Outcome, Parser,
                   classify_text, json_object, module_argv, module_pythonpath, short)

SCRATCH_DIR = ".auto-claude"
SPECS = Path(SCRATCH_DIR) / "specs"
GITIGNORE_CHECKED = Path(SCRATCH_DIR) / ".gitignore_checked"  # init.py's "gitignore already handled" marker
PHASE = "__EXEC_PHASE__:"
TASK_LOG = "__TASK_LOG_"
DRIVER = "__COUNCIL_AUTO_CLAUDE__:"  # the driver's own events: which step, which spec, exit codes
SAVED = re.compile(r"Spec saved to:\s*(\S.*?)\s*$")
# What a rejected login looks like in its output: the claude CLI's own words for a 401, the API's
# error type. Narrow on purpose: the build's output also carries the code it writes.
AUTH_FAILURE = re.compile(r"Please run /login|API Error: 401\b|authentication_error|OAuth token has expired")
COMPLEXITY = {"cheap": "simple", "standard": "standard", "complex": "complex"}
MAX_ITERATIONS = {"simple": 10, "standard": 25, "complex": 50}  # agent sessions of the build step
AUTH_VARS = ("CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN")
TOKEN_PREFIXES = ("sk-ant-oat01-", "enc:")


def auth_fix(name: str) -> str:
    return (f"set CLAUDE_CODE_OAUTH_TOKEN (from `claude setup-token`) or ANTHROPIC_AUTH_TOKEN in the server's "
            f"environment, [agents.{name}] env or Auto-Claude's apps/backend/.env, or point CLAUDE_CONFIG_DIR at "
            f"a `claude login` config dir (it does not use ANTHROPIC_API_KEY)")


def config_dir_token(env: dict[str, str]) -> Path | None:
    """The credentials file in CLAUDE_CONFIG_DIR that Auto-Claude would take a token from, or None.
    Without CLAUDE_CONFIG_DIR it never reads ~/.claude on Linux (it asks the keychain instead)."""
    if not env.get("CLAUDE_CONFIG_DIR"):
        return None
    config_dir = Path(env["CLAUDE_CONFIG_DIR"]).expanduser()
    for path in (config_dir / ".credentials.json", config_dir / "credentials.json"):
        try:
            data = json.loads(path.read_text())
            oauth = (data.get("claudeAiOauth") or data.get("oauthAccount") or {}) if isinstance(data, dict) else {}
            token = oauth.get("accessToken") if isinstance(oauth, dict) else None
        except (OSError, ValueError):
            continue
        if isinstance(token, str) and token.startswith(TOKEN_PREFIXES):
            return path
    return None


class AutoClaudeAdapter(Adapter):
    kind = "auto-claude"
    scratch = (SCRATCH_DIR, ".auto-claude-security.json", ".auto-claude-status", ".claude_settings.json")
    config_keys = {"home": str, "python": str, "complexity": Literal["simple", "standard", "complex"],
                   "max_iterations": Annotated[int, Field(ge=1)]}
    auth_env = AUTH_VARS + ("ANTHROPIC_BASE_URL", "CLAUDE_CONFIG_DIR")
    can_review = False  # its pipeline plans, codes and QAs in the worktree: it has no read-only mode

    @property
    def home(self) -> Path:
        return Path(self.spec.extra("home") or "~/src/Auto-Claude").expanduser()

    @property
    def python(self) -> Path:
        configured = self.spec.extra("python")
        return Path(configured).expanduser() if configured else self.home / "apps" / "backend" / ".venv" / "bin" / "python"

    @property
    def command(self) -> list[str]:
        return module_argv("adapters.auto_claude")

    def invocation(self, job: Job) -> Invocation:
        complexity = self.spec.extra("complexity") or COMPLEXITY.get(job.tier or "", "standard")
        iterations = self.spec.extra("max_iterations") or MAX_ITERATIONS[complexity]
        argv = [*self.command, "--home", str(self.home), "--python", str(self.python),
                "--project-dir", str(job.worktree), "--complexity", complexity, "--max-iterations", str(iterations)]
        if self.spec.model:
            argv += ["--model", self.spec.model]
        argv += ["--task", f"{job.context()}\n\nTask:\n{job.with_earlier()}"]
        inv = self.make(argv, job, GRAPHITI_ENABLED="false", ENABLE_FANCY_UI="false", PYTHONUNBUFFERED="1")
        inv.env["PYTHONPATH"] = module_pythonpath(inv.env)
        return inv

    def parser(self, job: Job) -> AutoClaudeParser:
        return AutoClaudeParser(job, self.spec.name)

    async def available(self) -> Availability:
        backend = self.home / "apps" / "backend"
        scripts = [backend / "runners" / "spec_runner.py", backend / "run.py"]
        details = {"home": str(self.home), "python": str(self.python)}
        missing = [str(p) for p in scripts if not p.is_file()]
        if missing:
            return Availability(False, f"Auto-Claude not found: missing {', '.join(missing)}; clone "
                                       f"https://github.com/AndyMik90/Auto-Claude to {self.home} or set "
                                       f"[agents.{self.spec.name}] home = \"/path/to/Auto-Claude\"", details=details)
        if not (self.python.is_file() and os.access(self.python, os.X_OK)):
            return Availability(False, f"Auto-Claude's python {self.python} does not exist; create its venv "
                                       f"(cd {backend} && python3 -m venv .venv && .venv/bin/pip install -r "
                                       f"requirements.txt) or set [agents.{self.spec.name}] python", details=details)
        version = None
        try:
            version = json.loads((self.home / "package.json").read_text()).get("version")
        except (OSError, ValueError, AttributeError):
            pass
        env = self.env()
        dotenv = backend / ".env"
        in_dotenv = dotenv.is_file() and re.search(rf"^\s*({'|'.join(AUTH_VARS)})\s*=\s*\S", dotenv.read_text(), re.M)
        creds = config_dir_token(env)
        auth = [k for k in AUTH_VARS if env.get(k)] + ([str(dotenv)] if in_dotenv else []) + \
            ([f"CLAUDE_CONFIG_DIR ({creds})"] if creds else [])
        details["auth"] = auth
        label = f"Auto-Claude {version or '(version unknown)'} at {self.home}"
        if auth or sys.platform == "darwin":
            source = ", ".join(auth) or "the macOS keychain (`claude login`)"
            return Availability(True, f"{label}; auth from {source}", version, details)
        return Availability(False, f"{label} but no Claude OAuth token: {auth_fix(self.spec.name)}", version, details,
                            error_kind=ErrorKind.auth)


class AutoClaudeParser(Parser):
    def __init__(self, job: Job, name: str):
        self.specs = job.worktree / SPECS
        self.name = name
        self.spec: str | None = None
        self.failed_step: dict | None = None  # {"step", "exit"} or {"step", "auth"} or {"error"}
        self.auth: str | None = None  # the first line that said the login was refused
        self.phase: dict = {}
        self.tail: deque[str] = deque(maxlen=30)

    def feed(self, stream: str, text: str) -> str | None:
        if text.startswith(DRIVER):
            return self._driver(json_object(text[len(DRIVER):]) or {})
        if self.auth is None and AUTH_FAILURE.search(text):
            self.auth = auth_line(text)
        if text.startswith(PHASE):
            return self._phase(json_object(text[len(PHASE):]) or {})
        if text.strip() and not text.startswith(TASK_LOG):
            self.tail.append(short(text, 300))
        return None

    def _phase(self, obj: dict) -> str:
        self.phase = obj
        return short(f"{obj.get('phase')}: {obj.get('message') or ''}".rstrip(": "))

    def _driver(self, obj: dict) -> str | None:
        if obj.get("spec"):
            self.spec = str(obj["spec"])
            return short(f"spec {self.spec} written; building")
        if obj.get("error") or obj.get("exit") or obj.get("auth"):
            self.failed_step = self.failed_step or obj  # the first failure is the cause
            return None
        return short(f"{obj['step']} step started") if obj.get("step") else None

    def finish(self, exit_code: int) -> Outcome:
        out = Outcome(ok=False)
        detail = short(" | ".join(list(self.tail)[-4:]), 400) or "no output"
        step = self.failed_step or ({"step": "build", "exit": exit_code} if exit_code else None)
        script = "spec_runner.py" if (step or {}).get("step") == "spec" else "run.py"
        if (step or {}).get("auth") or self.auth:
            return self._fail(out, ErrorKind.auth, f"Auto-Claude's login was refused ({script}): "
                                                   f"{(step or {}).get('auth') or self.auth}")
        if step:
            if step.get("error"):
                return self._fail(out, ErrorKind.crash, f"Auto-Claude driver: {step['error']}")
            kind = classify_text(detail) or ErrorKind.crash
            return self._fail(out, kind, f"Auto-Claude's {step.get('step')} step ({script}) exited with code "
                                         f"{step.get('exit', exit_code)}: {detail}")
        where = f"{SPECS / (self.spec or '?')} in the worktree"
        plan = self._plan()
        if plan is None:
            return self._fail(out, ErrorKind.invalid_output, f"Auto-Claude's build left no readable "
                                                             f"implementation_plan.json in {where}: {detail}")
        done, total = subtask_counts(plan)
        if not total or done < total:
            return self._fail(out, ErrorKind.crash, f"Auto-Claude stopped with {total - done} of {total} subtasks "
                                                    f"unfinished (its build ends after --max-iterations sessions); "
                                                    f"its plan is in {where}: {detail}")
        qa = plan.get("qa_signoff") if isinstance(plan.get("qa_signoff"), dict) else {}
        status = qa.get("status")
        if status != "approved":
            issues = [issue_title(i) for i in (qa.get("issues_found") or qa.get("issues") or [])][:3]
            said = ("rejected the build" if status == "rejected" else
                    f"ended with status {status!r}" if status else "never signed off (QA validation incomplete)")
            return self._fail(out, ErrorKind.check_failed,
                              f"Auto-Claude's QA {said} for spec {self.spec or '?'}"
                              + (f": {'; '.join(issues)}" if issues else "") + f"; its report is in {where}")
        out.ok = True
        out.summary = f"Auto-Claude built spec {self.spec or '?'}: {done} subtasks, QA approved" + (
            f". {self.phase['message']}" if self.phase.get("message") else "")
        return out

    def _plan(self) -> dict | None:
        if not self.spec:
            return None
        try:
            plan = json.loads((self.specs / self.spec / "implementation_plan.json").read_text())
        except (OSError, ValueError):
            return None
        return plan if isinstance(plan, dict) else None

    def _fail(self, out: Outcome, kind: ErrorKind, message: str) -> Outcome:
        if kind == ErrorKind.auth:
            message += f"; fix: {auth_fix(self.name)}"
        out.error = ErrorInfo(kind=kind, message=message)
        return out


def auth_line(text: str) -> str:
    """The words of a refused-login line. Auto-Claude prints the agent's text and then, on the same
    line, its `__TASK_LOG_TEXT__:{...}` marker carrying that text again."""
    said, _, marker = text.partition(TASK_LOG)
    if not said.strip() and marker:
        said = str((json_object(marker.partition(":")[2]) or {}).get("content") or marker)
    return short(said, 300)


def subtask_counts(plan: dict) -> tuple[int, int]:
    """(completed, total) subtasks, counted as Auto-Claude's progress.count_subtasks does."""
    subtasks = [s for phase in plan.get("phases") or [] if isinstance(phase, dict)
                for s in phase.get("subtasks") or [] if isinstance(s, dict)]
    return sum(s.get("status") == "completed" for s in subtasks), len(subtasks)


def issue_title(issue) -> str:
    if isinstance(issue, dict):
        issue = issue.get("title") or issue.get("description") or issue
    return short(str(issue), 120)


# ---- the driver: runs in the attempt's process, spawned by the engine's runner ----

def say(event: dict) -> None:
    print(DRIVER + json.dumps(event), flush=True)


def child_env() -> dict[str, str]:
    """Our environment without the PYTHONPATH entry that found this package (Auto-Claude has its own)."""
    env = dict(os.environ)
    rest = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and p != PACKAGE_ROOT]
    if rest:
        env["PYTHONPATH"] = os.pathsep.join(rest)
    return env


@dataclass
class Step:
    code: int
    auth: str | None = None  # the output line that showed the login refused; the step was stopped
    saved: str | None = None  # the path on spec_runner's "Spec saved to:" line


def run_step(step: str, argv: list[str], cwd: Path) -> Step:
    """Run one of Auto-Claude's programs, passing its output through line by line; stop it at the
    first sign of a refused login (left alone, its build retries that forever)."""
    say({"step": step})
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=child_env(), cwd=cwd)
    except OSError as e:
        say({"error": f"cannot run {argv[0]}: {e}"})
        return Step(127)
    result = Step(0)
    refused = threading.Event()

    def pump(src, dst) -> None:
        for raw in iter(src.readline, b""):
            dst.write(raw)
            dst.flush()
            text = raw.decode(errors="replace")
            if saved := SAVED.search(text):
                result.saved = saved.group(1)
            if result.auth is None and AUTH_FAILURE.search(text):
                result.auth = auth_line(text)
                refused.set()

    pumps = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout.buffer), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, sys.stderr.buffer), daemon=True)]
    for t in pumps:
        t.start()
    while proc.poll() is None and not refused.wait(0.2):
        pass
    if proc.poll() is None:  # refused: stop it; what it started dies with our process group
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for t in pumps:
        t.join(2)  # a grandchild may hold the pipes open; the runner kills it with our group
    result.code = proc.returncode
    return result


def prepare(project: Path) -> None:
    """Give Auto-Claude its `.auto-claude/` in the worktree, marked as gitignore-handled, so that it
    neither climbs to a parent's `.auto-claude/` nor edits and commits the project's .gitignore."""
    (project / SPECS).mkdir(parents=True, exist_ok=True)
    (project / GITIGNORE_CHECKED).touch()


def spec_dir_for(specs: Path) -> Path:
    """A new NNN-council spec directory name, after the highest number already there."""
    numbers = [int(p.name[:3]) for p in specs.iterdir() if p.is_dir() and p.name[:3].isdigit()]
    return specs / f"{max(numbers, default=0) + 1:03d}-council"


def pick_spec(saved: str | None, asked: Path, specs: Path, before: set[str]) -> Path | None:
    """The spec spec_runner wrote: the one it named, else the directory we asked for, else the one
    new directory holding spec.md."""
    new = [p for p in specs.iterdir() if p.name not in before and (p / "spec.md").is_file()]
    for candidate in ([Path(saved)] if saved else []) + [asked] + (new if len(new) == 1 else []):
        if candidate.parent.resolve() == specs.resolve() and (candidate / "spec.md").is_file():
            return candidate
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adapters.auto_claude",
                                 description="Run Auto-Claude's spec and build steps in one project directory.")
    ap.add_argument("--home", type=Path, required=True, help="the Auto-Claude checkout")
    ap.add_argument("--python", required=True, help="the interpreter of its backend venv")
    ap.add_argument("--project-dir", type=Path, required=True)
    ap.add_argument("--complexity", choices=["simple", "standard", "complex"], default="standard")
    ap.add_argument("--max-iterations", type=int, default=MAX_ITERATIONS["standard"])
    ap.add_argument("--model")
    ap.add_argument("--task", required=True)
    a = ap.parse_args(argv)
    backend = a.home / "apps" / "backend"
    project = a.project_dir.resolve()
    specs = project / SPECS
    try:
        prepare(project)
    except OSError as e:
        say({"error": f"cannot prepare {project / SCRATCH_DIR}: {e}"})
        return 1
    before = {p.name for p in specs.iterdir()}
    asked = spec_dir_for(specs)
    model = ["--model", a.model] if a.model else []
    step = run_step("spec", [a.python, str(backend / "runners" / "spec_runner.py"), "--task", a.task,
                             "--project-dir", str(project), "--spec-dir", str(asked), "--complexity", a.complexity,
                             "--auto-approve", "--no-build", *model], backend)
    if step.auth or step.code:
        say({"step": "spec", "auth": step.auth} if step.auth else {"step": "spec", "exit": step.code})
        return step.code if step.code > 0 else 1
    spec = pick_spec(step.saved, asked, specs, before)
    if spec is None:
        say({"error": f"spec_runner.py exited 0 but wrote no spec.md under {specs}"})
        return 1
    say({"spec": spec.name})
    step = run_step("build", [a.python, str(backend / "run.py"), "--spec", spec.name, "--project-dir", str(project),
                              "--auto-continue", "--direct", "--force", "--max-iterations", str(a.max_iterations),
                              *model],
                    backend)
    if step.auth or step.code:
        say({"step": "build", "auth": step.auth} if step.auth else {"step": "build", "exit": step.code})
        return step.code if step.code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
