"""Claude Code (`claude -p`) headless: stream-json lines in, an outcome out.

Written against the recorded runs in the shared `cli-formats.md`: totals come from the `result`
line only (usage on `assistant` lines is a start-of-message snapshot), and success needs exit 0
*and* `is_error == false`, because an API failure still says `"subtype": "success"`.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

from .base import (Adapter, AgentSpec, Availability, ErrorInfo, ErrorKind, Invocation, Job, Outcome, Parser,
                   classify_text, json_object, reset_time, short, status_kind)

AUTH_VARS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN")
OLLAMA_PORT = 11434
LOCAL_TOKEN = "ollama"  # the placeholder token Ollama's Anthropic endpoint accepts: not a secret to redact
# Tools whose refusal means the change the agent reports was not made.
EDIT_TOOLS = frozenset({"Write", "Edit", "MultiEdit", "NotebookEdit"})
# Claude's default is 10 retries over minutes, even for a bad key; the engine retries transient
# failures itself, so fail fast unless the user asked for more.
DEFAULT_MAX_RETRIES = "2"


def is_ollama_url(url: str | None) -> bool:
    try:
        return bool(url) and urlsplit(url).port == OLLAMA_PORT
    except ValueError:
        return False


class ClaudeAdapter(Adapter):
    kind = "claude"
    probes_version = True
    default_command = ["claude"]
    auth_env = AUTH_VARS + ("ANTHROPIC_BASE_URL", "CLAUDE_CODE_MAX_RETRIES", "CLAUDE_CONFIG_DIR")
    config_keys = {"local": bool}  # runs on a local model: report cost 0

    @property
    def local(self) -> bool:
        """Runs on a local model (Ollama): claude prices even unknown models, so report cost 0."""
        return bool(self.spec.extra("local")) or is_ollama_url(self.env().get("ANTHROPIC_BASE_URL"))

    def env(self, **extra: str) -> dict[str, str]:
        defaults = {} if "CLAUDE_CODE_MAX_RETRIES" in self.environ else {"CLAUDE_CODE_MAX_RETRIES": DEFAULT_MAX_RETRIES}
        return super().env(**{**defaults, **extra})

    def secrets(self, env: dict[str, str]) -> list[str]:
        return [s for s in super().secrets(env) if s != LOCAL_TOKEN]

    def invocation(self, job: Job) -> Invocation:
        # The prompt is claude's positional argument: one starting with "-" would be read as an option.
        prompt = job.prompt if job.session_id else job.with_earlier()  # a follow-up without a session: retold
        prompt = " " + prompt if prompt.startswith("-") else prompt
        argv = [*self.command, "-p", prompt, "--output-format", "stream-json", "--verbose",
                "--permission-mode", "acceptEdits"]
        if job.session_id:  # a follow-up round: the same conversation, its earlier turns in claude's own session
            argv += ["--resume", job.session_id]
        if job.check:
            # acceptEdits allows edits, not commands: let it run the check the context asks for.
            # (--allowedTools takes several values; the next flag ends the list.)
            argv += ["--allowedTools", f"Bash({job.check})", f"Bash({job.check}:*)"]
        argv += ["--append-system-prompt", job.context()]
        if self.spec.model:
            argv += ["--model", self.spec.model]
        if job.budget_usd:
            argv += ["--max-budget-usd", f"{job.budget_usd:g}"]
        return self.make(argv, job)

    def review_invocation(self, job: Job) -> Invocation:
        """Plan mode: claude reads and answers but is refused every edit and command."""
        prompt = " " + job.prompt if job.prompt.startswith("-") else job.prompt
        argv = [*self.command, "-p", prompt, "--output-format", "stream-json", "--verbose",
                "--permission-mode", "plan"]
        if self.spec.model:
            argv += ["--model", self.spec.model]
        if job.budget_usd:
            argv += ["--max-budget-usd", f"{job.budget_usd:g}"]
        return self.make(argv, job)

    def parser(self, job: Job) -> ClaudeParser:
        return ClaudeParser(job, self.spec, local=self.local, base_url=self.env().get("ANTHROPIC_BASE_URL"))

    async def available(self) -> Availability:
        found = await super().available()
        if not found.ok:
            return found
        env, exe, version = self.env(), found.details["path"], found.version
        auth = [k for k in AUTH_VARS if env.get(k)]
        creds = credentials_file(env)
        details = {"path": exe, "auth_env": auth, "credentials_file": str(creds) if creds.is_file() else None,
                   "base_url": env.get("ANTHROPIC_BASE_URL"), "local": self.local}
        label = f"claude {version or '(version unknown)'} at {exe}"
        if auth:
            return Availability(True, f"{label}; auth from {', '.join(auth)}", version, details)
        if creds.is_file():
            return Availability(True, f"{label}; auth from `claude login` ({creds})", version, details)
        if sys.platform == "darwin":  # `claude login` keeps its token in the keychain there
            return Availability(True, f"{label}; no auth variable set, relying on `claude login`", version, details)
        return Availability(False, f"{label} but no credentials: {auth_fix(self.spec.name)}", version, details,
                            error_kind=ErrorKind.auth)


def credentials_file(env: dict[str, str]) -> Path:
    """Where `claude login` keeps its token (Auto-Claude runs claude, so it reads the same file)."""
    config_dir = Path(env.get("CLAUDE_CONFIG_DIR") or Path(env.get("HOME", "~")) / ".claude").expanduser()
    return config_dir / ".credentials.json"


def auth_fix(name: str) -> str:
    return (f"set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN / CLAUDE_CODE_OAUTH_TOKEN) in the server's "
            f"environment or in [agents.{name}] env, or run `claude login`")


class ClaudeParser(Parser):
    def __init__(self, job: Job, spec: AgentSpec, local: bool = False, base_url: str | None = None):
        self.worktree = job.worktree
        self.budget_usd = job.budget_usd
        self.name = spec.name
        self.local = local
        self.base_url = base_url
        self.session_id: str | None = None
        self.result: dict | None = None
        self.retry: dict | None = None  # the last api_retry line
        self.other: deque[str] = deque(maxlen=20)  # non-JSON output, for error messages

    def feed(self, stream: str, text: str) -> str | None:
        obj = json_object(text) if stream == "stdout" else None
        if obj is None:
            if text.strip():
                self.other.append(text.strip())
                return short(text)
            return None
        self.session_id = obj.get("session_id") or self.session_id
        kind, subtype = obj.get("type"), obj.get("subtype")
        if kind == "system" and subtype == "init":
            return short(f"started {obj.get('model') or ''} in {obj.get('permissionMode') or '?'} mode")
        if kind == "system" and subtype == "api_retry":
            self.retry = obj
            return short(f"API retry {obj.get('attempt')}/{obj.get('max_retries')}: "
                         f"HTTP {obj.get('error_status')} {obj.get('error') or ''}")
        if kind == "assistant":
            return self._assistant_note(obj.get("message") or {})
        if kind == "user":
            for item in (obj.get("message") or {}).get("content") or []:
                if isinstance(item, dict) and item.get("is_error"):
                    return short(f"tool error: {item.get('content')}")
            return None
        if kind == "result":
            self.result = obj
            return short(f"finished: {subtype}{' (error)' if obj.get('is_error') else ''}")
        return None

    def _assistant_note(self, message: dict) -> str | None:
        notes = []
        for item in message.get("content") or []:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "tool_use":
                notes.append(f"{item.get('name')} {self._target(item.get('input') or {})}".strip())
            elif item.get("type") == "text" and item.get("text", "").strip():
                notes.append(item["text"].strip().splitlines()[0])
        return short("; ".join(notes)) if notes else None

    def _target(self, tool_input: dict) -> str:
        path = tool_input.get("file_path") or tool_input.get("notebook_path")
        if path:
            try:
                return str(Path(path).relative_to(self.worktree))
            except ValueError:
                return str(path)
        return str(tool_input.get("command") or tool_input.get("pattern") or tool_input.get("url") or "")

    def finish(self, exit_code: int) -> Outcome:
        r = self.result
        if r is None:
            tail = " | ".join(list(self.other)[-5:])
            if exit_code == 0:
                return self._fail(Outcome(ok=False), ErrorKind.invalid_output,
                                  "claude exited 0 without a stream-json `result` line; is the configured "
                                  f"command Claude Code 2.x? Last output: {short(tail) or 'none'}")
            kind = classify_text(tail) or ErrorKind.crash
            return self._fail(Outcome(ok=False), kind,
                              f"claude exited with code {exit_code} before reporting a result: "
                              f"{short(tail, 400) or 'no output'}")
        usage = r.get("usage") or {}
        # Cached prompt tokens are input the model read too; `input_tokens` alone can be a handful.
        tokens_in = sum(int(usage.get(k) or 0) for k in
                        ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")) if usage else None
        cost = r.get("total_cost_usd")
        out = Outcome(ok=False, session_id=r.get("session_id") or self.session_id,
                      cost_usd=0.0 if self.local else (float(cost) if cost is not None else None),
                      tokens_in=tokens_in, tokens_out=usage.get("output_tokens"),
                      summary=r.get("result") if isinstance(r.get("result"), str) else None)
        if exit_code == 0 and not r.get("is_error"):
            return self._denials(out, r.get("permission_denials") or [])
        subtype = r.get("subtype")
        text = short(r.get("result") or "; ".join(map(str, r.get("errors") or [])) or subtype or "", 400)
        if subtype == "error_max_turns":
            return self._fail(out, ErrorKind.crash, f"claude stopped at its turn limit ({text}); raise or drop "
                                                    f"--max-turns in [agents.{self.name}] command, or split the task")
        if subtype == "error_max_budget_usd":
            budget = f"${self.budget_usd:g}" if self.budget_usd else "its budget"
            return self._fail(out, ErrorKind.crash, f"claude stopped at {budget} ({text}); "
                                                    "raise the task's budget_usd or split the task")
        if not r.get("is_error"):
            return self._fail(out, ErrorKind.crash, f"claude reported success but exited with code {exit_code}")
        retry_status = (self.retry or {}).get("error_status")
        kind = (status_kind(r.get("api_error_status")) or classify_text(text) or status_kind(retry_status)
                or ErrorKind.crash)
        return self._fail(out, kind, text or f"exit code {exit_code}")

    def _denials(self, out: Outcome, denials: list) -> Outcome:
        """A refused edit fails the attempt: claude still says "done" (exit 0, is_error false) though
        the change is missing. Other refusals (a command, a fetch) leave the edits intact and the
        engine's own check judges them, so they are only noted in the summary."""
        described = [self._describe(d) for d in denials if isinstance(d, dict)]
        edits = [self._describe(d) for d in denials if isinstance(d, dict) and d.get("tool_name") in EDIT_TOOLS]
        if edits:
            return self._fail(out, ErrorKind.crash,
                              f"claude was refused permission for {', '.join(edits)}, so its change is incomplete "
                              "although it reported success; it runs with --permission-mode acceptEdits, which "
                              "allows edits inside the worktree only: remove any deny rule in claude's settings "
                              "(~/.claude/settings.json, .claude/settings.json) or a --permission-mode set in "
                              f"[agents.{self.name}] command")
        if described:
            out.summary = f"{out.summary or ''}\n(claude was refused: {', '.join(described)})".strip()
        out.ok = True
        return out

    def _describe(self, denial: dict) -> str:
        return short(f"{denial.get('tool_name')} {self._target(denial.get('tool_input') or {})}".strip(), 120)

    def _fail(self, out: Outcome, kind: ErrorKind, detail: str) -> Outcome:
        fixes = {
            ErrorKind.auth: f"fix: {auth_fix(self.name)}",
            ErrorKind.rate_limit: f"the engine retries it later; if it persists lower [agents.{self.name}] "
                                  "max_parallel or check the account's limits",
            ErrorKind.network: f"check the network or proxy{self._base_hint()}",
        }
        message = detail if detail.startswith("claude") else f"claude: {detail}"
        if kind == ErrorKind.rate_limit:
            out.retry_at = reset_time(detail, time.time())
        if kind in fixes:
            message = f"{message.rstrip('. ')}; {fixes[kind]}"
        out.ok = False
        out.error = ErrorInfo(kind=kind, message=message)
        return out

    def _base_hint(self) -> str:
        if not self.base_url:
            return ""
        hint = f" and ANTHROPIC_BASE_URL ({self.base_url})"
        return hint + "; is `ollama serve` running?" if self.local else hint
