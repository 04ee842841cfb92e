"""What every adapter is: turn a job into an argv + env + stdin, and a CLI's output into an outcome.

Adapters never spawn processes themselves (the engine's one runner does that, so timeouts, kills
and logging behave the same for every agent) and never import the engine or the server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
from pydantic import BaseModel, ConfigDict, Field


class ErrorKind(StrEnum):
    auth = "auth"
    rate_limit = "rate_limit"
    network = "network"
    timeout = "timeout"
    not_installed = "not_installed"
    no_changes = "no_changes"
    check_failed = "check_failed"
    crash = "crash"
    cancelled = "cancelled"
    invalid_output = "invalid_output"
    setup_failed = "setup_failed"  # the repo's worktree setup (.cli-council.toml) failed or timed out


TRANSIENT = frozenset({ErrorKind.rate_limit, ErrorKind.network})
TIERS = ("cheap", "standard", "complex")  # how much a task asks of the council (routing, auto-claude's effort)


class ErrorInfo(BaseModel):
    kind: ErrorKind
    message: str


class AgentSpec(BaseModel):
    """One `[agents.NAME]` table of the config. Adapter-specific keys are kept as extras."""

    model_config = ConfigDict(extra="allow")

    name: str
    kind: str
    command: list[str] | None = Field(None, description="argv prefix of the CLI; None = the kind's default")
    model: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    enabled: bool = True
    max_parallel: int | None = Field(None, ge=1)
    tiers: list[str] = Field(default_factory=list)
    argv: list[str] | None = None

    def extra(self, key: str, default=None):
        return (self.model_extra or {}).get(key, default)


COUNCIL_CONTEXT = (
    "You are one member of a council of coding agents. You work in an isolated git checkout made "
    "for you alone: edit files there, do not push, do not switch or create branches, and do not "
    "touch anything outside this directory. Leave your changes in the working tree (committing "
    "is optional)."
)


@dataclass
class Job:
    """One attempt as an adapter sees it."""

    prompt: str
    worktree: Path
    timeout_s: float
    check: str | None = None
    budget_usd: float | None = None
    tier: str | None = None  # cheap|standard|complex, for CLIs that size their own effort
    # A follow-up round (continue_task): the CLI's session to resume, and the earlier rounds'
    # (prompt, final message) for CLIs that cannot resume one.
    session_id: str | None = None
    earlier: list[tuple[str, str | None]] = field(default_factory=list)

    def context(self) -> str:
        if self.check:
            return f"{COUNCIL_CONTEXT} Before you finish, run `{self.check}` and make it pass."
        return COUNCIL_CONTEXT

    def with_earlier(self) -> str:
        """The prompt, preceded by the earlier rounds when there were any (a CLI without a session)."""
        if not self.earlier:
            return self.prompt
        parts = ["This is a follow-up. Earlier rounds of this task ran in this same checkout; their changes "
                 "are already in the files."]
        for n, (prompt, summary) in enumerate(self.earlier, 1):
            parts.append(f"Round {n}, you were asked:\n{prompt}" + (f"\nYou answered:\n{summary}" if summary else ""))
        parts.append(f"Now:\n{self.prompt}")
        return "\n\n".join(parts)


@dataclass
class Invocation:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    stdin: bytes | None = None  # None: /dev/null
    secrets: list[str] = field(default_factory=list)  # values to redact from logs and status


@dataclass
class Outcome:
    ok: bool
    error: ErrorInfo | None = None
    cost_usd: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    session_id: str | None = None
    summary: str | None = None
    retry_at: float | None = None  # a rate limit's reset as the agent reported it (epoch seconds)


@dataclass
class Availability:
    ok: bool
    message: str
    version: str | None = None
    details: dict = field(default_factory=dict)
    error_kind: ErrorKind = ErrorKind.not_installed  # what a skipped attempt records when not ok


class Parser:
    """Reads one attempt's output as it streams; `finish` gives the outcome once it exits."""

    def feed(self, stream: str, text: str) -> str | None:
        """Take one line; return a short human note for progress displays, or None."""
        return None

    def finish(self, exit_code: int) -> Outcome:
        if exit_code == 0:
            return Outcome(ok=True)
        return Outcome(ok=False, error=ErrorInfo(kind=ErrorKind.crash, message=f"exited with code {exit_code}"))


# The environment an agent gets: these names from ours, plus the adapter's own and the agent's
# `env` table. Nothing else leaks from the server's environment into a CLI.
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "TMPDIR", "TZ",
            "SHELL", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
            "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
            "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "VIRTUAL_ENV")
# Names whose values are secret (MY_PASSWD, MYSQL_PWD, DATABASE_DSN...), but not the author or the
# agent-socket path.
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW(OR)?D|PASSPHRASE|_PWD$|CREDENTIAL|AUTH(?!OR|_SOCK)|COOKIE"
                         r"|PRIVATE|DSN$", re.I)


def allowed_env(environ: dict[str, str]) -> dict[str, str]:
    """The part of our environment any child may see: BASE_ENV names and locale settings."""
    return {k: v for k, v in environ.items() if k in BASE_ENV or k.startswith("LC_")}


def secret_values(env: dict[str, str], min_len: int = 4) -> list[str]:
    """Values of variables whose names say they are secret, longest first (so a key that contains
    another is redacted whole)."""
    found = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= min_len}
    return sorted(found, key=len, reverse=True)


class Adapter:
    """Base for one agent kind. Subclasses set `kind`, `default_command`, `auth_env` and override
    `invocation` and `parser`; `available` answers whether this machine can run it."""

    kind: ClassVar[str] = ""
    default_command: ClassVar[list[str]] = []
    auth_env: ClassVar[tuple[str, ...]] = ()  # extra variables passed through from our environment
    probes_version: ClassVar[bool] = False  # `available` runs `CLI --version` (never for arbitrary commands)
    scratch: ClassVar[tuple[str, ...]] = ()  # dirs the CLI keeps in the worktree that are never part of a result
    # The kind's own `[agents.NAME]` keys (read with `spec.extra`) and the type each must have; the config
    # refuses any other key beyond AgentSpec's common fields.
    config_keys: ClassVar[dict[str, object]] = {}

    def __init__(self, spec: AgentSpec, environ: dict[str, str] | None = None):
        self.spec = spec
        self.environ = dict(os.environ if environ is None else environ)

    @property
    def command(self) -> list[str]:
        return list(self.spec.command or self.default_command)

    def env(self, **extra: str) -> dict[str, str]:
        env = allowed_env(self.environ)
        env.update((k, v) for k, v in self.environ.items() if k in self.auth_env)
        env.update(extra)
        env.update(self.spec.env)
        return env

    def secrets(self, env: dict[str, str]) -> list[str]:
        return secret_values(env)

    def make(self, argv: list[str], job: Job, stdin: bytes | None = None, **extra_env: str) -> Invocation:
        env = self.env(**extra_env)
        return Invocation(argv=argv, env=env, cwd=job.worktree, stdin=stdin, secrets=self.secrets(env))

    def invocation(self, job: Job) -> Invocation:
        raise NotImplementedError

    def parser(self, job: Job) -> Parser:
        return Parser()

    # Cross-review: a kind that can run read-only says how; the prompt is the review's, the answer a JSON verdict.
    can_review: ClassVar[bool] = True

    def review_invocation(self, job: Job) -> Invocation:
        """The command line of a read-only review. By default the review is the prompt like any other (a
        command agent); CLIs with a plan or read-only mode override this to use it."""
        return self.invocation(job)

    async def available(self) -> Availability:
        cmd = self.command
        if not cmd:
            return Availability(False, f"agent {self.spec.name!r} has no command configured")
        env = self.env()
        exe = resolve_executable(cmd[0], env.get("PATH"))
        if exe is None:
            return Availability(False, f"{cmd[0]!r} not found on PATH; install it or set "
                                       f"[agents.{self.spec.name}] command = \"/path/to/{cmd[0]}\"")
        version = await probe_version([exe, *cmd[1:], "--version"], env) if self.probes_version else None
        return Availability(True, f"found {exe}", version=version, details={"path": exe})


def resolve_executable(name: str, path: str | None = None) -> str | None:
    if os.sep in name:
        p = Path(name).expanduser()
        return str(p) if p.is_file() and os.access(p, os.X_OK) else None
    return shutil.which(name, path=path)


def redact(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s and s in text:
            text = text.replace(s, "***")
    return text


# Words in an agent's error text that say which kind of failure it is; rate limits first because
# quota errors often mention the API key too.
_TEXT_KINDS = (
    (ErrorKind.rate_limit, re.compile(r"\b429\b|\b529\b|rate.?limit|quota|resource.?exhausted|too many requests"
                                      r"|overloaded|usage limit|hit your limit", re.I)),
    (ErrorKind.auth, re.compile(r"\b40[13]\b|unauthori[sz]ed|authenticat|invalid.{0,12}key|api key not valid"
                                r"|not logged in|/login|oauth token|permission_denied|forbidden", re.I)),
    (ErrorKind.network, re.compile(r"unable to connect|connection.?(refused|reset|error)|econn|enotfound|eai_again"
                                   r"|etimedout|fetch failed|socket hang up|getaddrinfo|could not resolve"
                                   r"|name or service not known|network", re.I)),
)


def status_kind(status) -> ErrorKind | None:
    """The failure kind of an HTTP status from a model API (529 is Anthropic's 'overloaded')."""
    if not isinstance(status, int):
        return None
    if status in (401, 403):
        return ErrorKind.auth
    if status in (429, 529):
        return ErrorKind.rate_limit
    if status == 408 or 500 <= status < 600:
        return ErrorKind.network
    return None


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def short(text: str, limit: int = 160) -> str:
    """One line for progress notes and error messages: no colour codes, whitespace collapsed, bounded."""
    text = " ".join(ANSI.sub("", str(text)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def classify_text(text: str) -> ErrorKind | None:
    """The failure kind an error message implies (auth, rate_limit, network), or None."""
    for kind, pattern in _TEXT_KINDS:
        if pattern.search(text):
            return kind
    return None


_RESET_EPOCH = re.compile(r"limit reached\|(\d{10})\b", re.I)  # claude: "Claude AI usage limit reached|1767225600"
_RESET_AFTER = re.compile(r"(?:retry|try again|reset)s?\s+(?:in|after)\s+((?:\d+(?:\.\d+)?\s*[hms]\w*\s*)+)"
                          r"|retry-?after\W+(\d+(?:\.\d+)?)|retryDelay\W+(\d+(?:\.\d+)?)s", re.I)
_RESET_CLOCK = re.compile(r"resets?\s+(?:at\s+)?(\d{1,2})(?::(\d{2}))?\s*([ap]m)?(?:\s*\(([\w/+-]+)\))?", re.I)
_UNIT = re.compile(r"(\d+(?:\.\d+)?)\s*([hms])", re.I)


def reset_time(text: str, now: float) -> float | None:
    """When a rate limit resets, from an agent's error text (epoch seconds), or None when it does not say.

    Shapes: claude's `usage limit reached|EPOCH` and `resets 3pm (Europe/Berlin)`; Google's
    `Please retry in 24.5s`, `retryDelay: "24s"` and `reset after 1h2m3s`; a Retry-After header's seconds."""
    if found := _RESET_EPOCH.search(text):
        return float(found.group(1))
    if found := _RESET_AFTER.search(text):
        if found.group(1):
            scale = {"h": 3600, "m": 60, "s": 1}
            return now + sum(float(n) * scale[u.lower()] for n, u in _UNIT.findall(found.group(1)))
        return now + float(found.group(2) or found.group(3))
    if found := _RESET_CLOCK.search(text):
        hour, minute, half, zone = int(found.group(1)), int(found.group(2) or 0), found.group(3), found.group(4)
        if half:
            hour = hour % 12 + (12 if half.lower() == "pm" else 0)
        if hour > 23 or minute > 59:
            return None
        try:
            tz = ZoneInfo(zone) if zone else None
        except (ZoneInfoNotFoundError, ValueError):
            tz = None
        current = datetime.fromtimestamp(now, tz)
        at = current.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if at <= current:
            at += timedelta(days=1)
        return at.timestamp()
    return None


def json_object(text: str) -> dict | None:
    """One JSON-lines record, or None for anything else (banners, warnings, partial lines)."""
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


async def probe_version(argv: list[str], env: dict[str, str], timeout_s: float = 5.0) -> str | None:
    """The version number `CLI --version` prints, best effort: a broken or hanging install must
    not stall doctor."""
    try:
        with anyio.fail_after(timeout_s):
            done = await anyio.run_process(argv, env=env, check=False, stdin=subprocess.DEVNULL)
    except (OSError, TimeoutError):
        return None
    found = re.search(r"\d+\.\d+[\w.+-]*", done.stdout.decode(errors="replace")) if done.returncode == 0 else None
    return found.group() if found else None


# Adapters that are not a CLI (ollama's HTTP client, auto-claude's two-step driver) run one of our
# own modules as the agent process, so the engine's single runner still spawns, logs and kills it.
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def module_argv(module: str, *args: str) -> list[str]:
    """`python -P -m module`: -P keeps the worktree (the cwd) off sys.path, so a user's repo that
    has its own `adapters` package cannot replace ours. The package imports its modules for KINDS,
    so runpy's "found in sys.modules" warning is expected and silenced."""
    return [sys.executable, "-P", "-W", "ignore::RuntimeWarning:runpy", "-m", module, *args]


def module_pythonpath(env: dict[str, str]) -> str:
    """PYTHONPATH that finds this package first, keeping any the agent's env already sets."""
    return os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
