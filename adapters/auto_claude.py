"""Auto-Claude (AndyMik90/Auto-Claude): write a spec, then build it, inside the council's worktree.

Auto-Claude is two programs run one after the other (spec_runner.py, then run.py), but the engine
spawns one argv per attempt so that timeouts, kills and logs work alike for every agent. So the
invocation runs this module as a small driver (`python -m adapters.auto_claude`) that runs both
steps with stdin /dev/null, streaming their output through. It exits 0 even when Auto-Claude's QA
rejects the build, so the outcome is read from the spec's implementation_plan.json.

Auto-Claude keeps its specs under WORKTREE/.auto-claude/ (SCRATCH_DIR): not part of a result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Literal

from .base import (PACKAGE_ROOT, Adapter, Availability, ErrorInfo, ErrorKind, Invocation, Job, Outcome, Parser,
                   classify_text, json_object, module_argv, module_pythonpath, short)
from .claude import credentials_file

SCRATCH_DIR = ".auto-claude"
SPECS = Path(SCRATCH_DIR) / "specs"
PHASE = "__EXEC_PHASE__:"
DRIVER = "__COUNCIL_AUTO_CLAUDE__:"  # the driver's own events: which step, which spec, exit codes
COMPLEXITY = {"cheap": "simple", "standard": "standard", "complex": "complex"}
AUTH_VARS = ("CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN")


def auth_fix(name: str) -> str:
    return (f"set CLAUDE_CODE_OAUTH_TOKEN (from `claude setup-token`) or ANTHROPIC_AUTH_TOKEN in the server's "
            f"environment, [agents.{name}] env or Auto-Claude's apps/backend/.env (it does not use ANTHROPIC_API_KEY)")


class AutoClaudeAdapter(Adapter):
    kind = "auto-claude"
    scratch = (SCRATCH_DIR,)
    config_keys = {"home": str, "python": str, "complexity": Literal["simple", "standard", "complex"]}
    auth_env = AUTH_VARS + ("ANTHROPIC_BASE_URL", "CLAUDE_CONFIG_DIR")

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
        argv = [*self.command, "--home", str(self.home), "--python", str(self.python),
                "--project-dir", str(job.worktree), "--complexity", complexity]
        if self.spec.model:
            argv += ["--model", self.spec.model]
        argv += ["--task", f"{job.context()}\n\nTask:\n{job.prompt}"]
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
        creds = credentials_file(env)
        auth = [k for k in AUTH_VARS if env.get(k)] + ([str(dotenv)] if in_dotenv else [])
        details["auth"] = auth
        label = f"Auto-Claude {version or '(version unknown)'} at {self.home}"
        if auth or creds.is_file() or sys.platform == "darwin":
            return Availability(True, f"{label}; auth from {', '.join(auth) or '`claude login`'}", version, details)
        return Availability(False, f"{label} but no Claude OAuth token: {auth_fix(self.spec.name)}", version, details,
                            error_kind=ErrorKind.auth)


class AutoClaudeParser(Parser):
    def __init__(self, job: Job, name: str):
        self.specs = job.worktree / SPECS
        self.name = name
        self.spec: str | None = None
        self.failed_step: dict | None = None  # {"step": ..., "exit": ...} or {"error": ...}
        self.phase: dict = {}
        self.tail: deque[str] = deque(maxlen=30)

    def feed(self, stream: str, text: str) -> str | None:
        for prefix in (PHASE, DRIVER):
            if text.startswith(prefix):
                obj = json_object(text[len(prefix):]) or {}
                return self._phase(obj) if prefix == PHASE else self._driver(obj)
        if text.strip():
            self.tail.append(short(text, 300))
        return None

    def _phase(self, obj: dict) -> str:
        self.phase = obj
        progress = obj.get("progress")
        pct = f" ({progress}%)" if isinstance(progress, (int, float)) else ""
        return short(f"{obj.get('phase')}{pct}: {obj.get('message') or ''}".rstrip(": "))

    def _driver(self, obj: dict) -> str | None:
        if obj.get("spec"):
            self.spec = str(obj["spec"])
            return short(f"spec {self.spec} written; building")
        if obj.get("error") or obj.get("exit"):
            self.failed_step = self.failed_step or obj  # the first failure is the cause
            return None
        return short(f"{obj['step']} step started") if obj.get("step") else None

    def finish(self, exit_code: int) -> Outcome:
        out = Outcome(ok=False)
        detail = short(" | ".join(list(self.tail)[-4:]), 400) or "no output"
        step = self.failed_step or ({"step": "build", "exit": exit_code} if exit_code else None)
        if step:
            if step.get("error"):
                return self._fail(out, ErrorKind.crash, f"Auto-Claude driver: {step['error']}")
            script = "spec_runner.py" if step.get("step") == "spec" else "run.py"
            kind = classify_text(detail) or ErrorKind.crash
            return self._fail(out, kind, f"Auto-Claude's {step.get('step')} step ({script}) exited with code "
                                         f"{step.get('exit', exit_code)}: {detail}")
        plan = self._plan()
        qa = (plan or {}).get("qa_signoff") or {}
        status = qa.get("status")
        if status == "rejected":
            issues = [issue_title(i) for i in (qa.get("issues_found") or qa.get("issues") or [])][:3]
            return self._fail(out, ErrorKind.check_failed,
                              f"Auto-Claude's QA rejected the build of spec {self.spec or '?'}"
                              + (f": {'; '.join(issues)}" if issues else "")
                              + f"; its report is in {SPECS / (self.spec or '*')} in the worktree")
        if self.phase.get("phase") == "failed":
            return self._fail(out, ErrorKind.crash, f"Auto-Claude reported failure: {self.phase.get('message') or detail}")
        out.ok = True
        out.summary = f"Auto-Claude built spec {self.spec or '?'}; QA {status or 'not run'}" + (
            f". {self.phase['message']}" if self.phase.get("message") else "")
        return out

    def _plan(self) -> dict | None:
        """The built spec's plan (the newest one if the driver never named the spec)."""
        if self.spec:
            path = self.specs / self.spec / "implementation_plan.json"
        else:
            plans = sorted(self.specs.glob("*/implementation_plan.json"), key=lambda p: p.stat().st_mtime)
            path = plans[-1] if plans else None
        try:
            plan = json.loads(path.read_text()) if path else None
        except (OSError, ValueError):
            return None
        return plan if isinstance(plan, dict) else None

    def _fail(self, out: Outcome, kind: ErrorKind, message: str) -> Outcome:
        if kind == ErrorKind.auth:
            message += f"; fix: {auth_fix(self.name)}"
        out.error = ErrorInfo(kind=kind, message=message)
        return out


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


def run_step(step: str, argv: list[str], cwd: Path) -> int:
    say({"step": step})
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, env=child_env(), cwd=cwd).returncode
    except OSError as e:
        say({"error": f"cannot run {argv[0]}: {e}"})
        return 127


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adapters.auto_claude",
                                 description="Run Auto-Claude's spec and build steps in one project directory.")
    ap.add_argument("--home", type=Path, required=True, help="the Auto-Claude checkout")
    ap.add_argument("--python", required=True, help="the interpreter of its backend venv")
    ap.add_argument("--project-dir", type=Path, required=True)
    ap.add_argument("--complexity", choices=["simple", "standard", "complex"], default="standard")
    ap.add_argument("--model")
    ap.add_argument("--task", required=True)
    a = ap.parse_args(argv)
    backend = a.home / "apps" / "backend"
    specs = a.project_dir / SPECS
    before = {p.name for p in specs.iterdir() if p.is_dir()} if specs.is_dir() else set()
    model = ["--model", a.model] if a.model else []
    code = run_step("spec", [a.python, str(backend / "runners" / "spec_runner.py"), "--task", a.task,
                             "--project-dir", str(a.project_dir), "--complexity", a.complexity,
                             "--auto-approve", "--no-build", *model], backend)
    if code:
        say({"step": "spec", "exit": code})
        return code
    new = sorted(p.name for p in specs.iterdir() if p.is_dir() and p.name not in before) if specs.is_dir() else []
    if not new:
        say({"error": f"spec_runner.py exited 0 but wrote no new spec under {specs}"})
        return 1
    say({"spec": new[-1]})
    code = run_step("build", [a.python, str(backend / "run.py"), "--spec", new[-1], "--project-dir",
                              str(a.project_dir), "--auto-continue", "--direct"], backend)
    if code:
        say({"step": "build", "exit": code})
    return code


if __name__ == "__main__":
    sys.exit(main())
