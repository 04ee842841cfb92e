"""Gemini CLI (`gemini -p`) headless with stream-json output.

Gemini has no system-prompt flag, so the council's context goes ahead of the prompt. It reports
tokens but no cost: cost is tokens x the agent's configured prices. Its exit codes carry the
failure kind; an HTTP error exits with the status mod 256 (403 -> 147), seen in the recorded runs.
"""

from __future__ import annotations

import re
import time
from collections import deque
from pathlib import Path
from typing import Annotated

from pydantic import Field

from .base import (Adapter, AgentSpec, Availability, ErrorInfo, ErrorKind, Invocation, Job, Outcome, Parser,
                   classify_text, json_object, reset_time, short, status_kind)

AUTH_VARS = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GENAI_USE_GCA")
# Banners and stack-dump lines that never explain a failure (kept out of error messages).
NOISE = re.compile(r"Warning: 256-color|YOLO mode is enabled|Approval mode overridden|Ripgrep is not available"
                   r"|at |status: \d+$|[{}\[\]]+$")
PRICE_IN_PER_MTOK = 1.25
PRICE_OUT_PER_MTOK = 10.0
Price = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # USD per million tokens


def auth_fix(name: str) -> str:
    return (f"set GEMINI_API_KEY (or GOOGLE_API_KEY with GOOGLE_GENAI_USE_VERTEXAI=true, or "
            f"GOOGLE_GENAI_USE_GCA=true) in the server's environment or [agents.{name}] env, or run `gemini` "
            "once interactively to log in")


def exit_codes(name: str) -> dict[int, tuple[ErrorKind, str]]:
    """Gemini CLI's documented exit codes, each with what to do about it."""
    return {
        41: (ErrorKind.auth, f"gemini could not authenticate (exit 41); {auth_fix(name)}"),
        42: (ErrorKind.crash, "gemini rejected its input (exit 42); check the prompt and the flags in "
                              f"[agents.{name}] command"),
        44: (ErrorKind.crash, "gemini's sandbox failed (exit 44); check the sandbox settings in "
                              "~/.gemini/settings.json or GEMINI_SANDBOX"),
        52: (ErrorKind.crash, "gemini's configuration is invalid (exit 52); fix ~/.gemini/settings.json or "
                              "the repo's .gemini/settings.json"),
        53: (ErrorKind.crash, "gemini stopped at its session turn limit (exit 53); raise model.maxSessionTurns "
                              "in ~/.gemini/settings.json or split the task"),
        55: (ErrorKind.crash, "gemini refused an untrusted folder (exit 55) despite --skip-trust; upgrade the "
                              f"gemini CLI or set GEMINI_CLI_TRUST_WORKSPACE=true in [agents.{name}] env"),
    }


class GeminiAdapter(Adapter):
    kind = "gemini"
    config_keys = {"price_in_per_mtok": Price, "price_out_per_mtok": Price,
                   "prices": dict[str, Annotated[list[Price], Field(min_length=2, max_length=2)]]}  # model -> [in, out]
    probes_version = True
    default_command = ["gemini"]
    auth_env = AUTH_VARS + ("GOOGLE_GEMINI_BASE_URL", "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION",
                            "GOOGLE_APPLICATION_CREDENTIALS")

    def invocation(self, job: Job) -> Invocation:
        # Its headless mode documents no way to resume a session: a follow-up round retells the earlier ones.
        prompt = f"{job.context()}\n\nYour task:\n{job.with_earlier()}"
        argv = [*self.command, "-p", prompt, "--skip-trust", "--approval-mode", "yolo", "--output-format", "stream-json"]
        if self.spec.model:
            argv += ["-m", self.spec.model]
        return self.make(argv, job)

    def review_invocation(self, job: Job) -> Invocation:
        """The default approval mode: headless, gemini is never offered a tool that writes or runs."""
        argv = [*self.command, "-p", job.prompt, "--skip-trust", "--approval-mode", "default",
                "--output-format", "stream-json"]
        if self.spec.model:
            argv += ["-m", self.spec.model]
        return self.make(argv, job)

    def parser(self, job: Job) -> GeminiParser:
        return GeminiParser(job, self.spec)

    async def available(self) -> Availability:
        found = await super().available()
        if not found.ok:
            return found
        env, exe, version = self.env(), found.details["path"], found.version
        auth = [k for k in AUTH_VARS if env.get(k)]
        gemini_dir = Path(env.get("HOME", "~")).expanduser() / ".gemini"
        logged_in = (gemini_dir / "oauth_creds.json").is_file()
        details = {"path": exe, "auth_env": auth, "oauth_creds": logged_in}
        label = f"gemini {version or '(version unknown)'} at {exe}"
        if auth or logged_in:
            how = ", ".join(auth) if auth else f"a cached login ({gemini_dir / 'oauth_creds.json'})"
            return Availability(True, f"{label}; auth from {how}", version, details)
        return Availability(False, f"{label} but no credentials: {auth_fix(self.spec.name)}", version, details,
                            error_kind=ErrorKind.auth)


class GeminiParser(Parser):
    def __init__(self, job: Job, spec: AgentSpec):
        self.name = spec.name
        self.price_in = float(spec.extra("price_in_per_mtok", PRICE_IN_PER_MTOK))
        self.price_out = float(spec.extra("price_out_per_mtok", PRICE_OUT_PER_MTOK))
        self.prices = {name: (float(p[0]), float(p[1])) for name, p in (spec.extra("prices") or {}).items()}
        self.worktree = job.worktree
        self.session_id: str | None = None
        self.reply: list[str] = []
        self.result: dict | None = None
        self.other: deque[str] = deque(maxlen=20)

    def feed(self, stream: str, text: str) -> str | None:
        obj = json_object(text) if stream == "stdout" else None
        if obj is None:
            line = short(text, 400)
            if not line:
                return None
            if not NOISE.match(line):
                self.other.append(line)
            return short(line)
        kind = obj.get("type")
        if kind == "init":
            self.session_id = obj.get("session_id") or self.session_id
            return short(f"started {obj.get('model') or ''}")
        if kind == "message" and obj.get("role") == "assistant":
            self.reply.append(str(obj.get("content") or ""))
            return None
        if kind == "tool_use":
            params = obj.get("parameters") or {}
            target = params.get("file_path") or params.get("command") or params.get("dir_path") or ""
            try:
                target = str(Path(target).relative_to(self.worktree))
            except ValueError:
                pass
            return short(f"{obj.get('tool_name')} {target}".strip())
        if kind == "tool_result" and obj.get("status") == "error":
            return short(f"tool error: {(obj.get('error') or {}).get('message')}")
        if kind == "error":
            return short(f"warning: {obj.get('message') or obj.get('error')}")
        if kind == "result":
            self.result = obj
            return short(f"finished: {obj.get('status')}")
        return None

    def cost(self, stats: dict, tokens_in: int, tokens_out: int) -> float:
        """USD for the run. Without -m gemini routes through a classifier model first and reports
        every model's tokens together, so each model in stats.models is priced on its own when the
        config has a `prices` entry for it ({"model" = [in, out]} per million tokens)."""
        models = stats.get("models") if isinstance(stats.get("models"), dict) else {}
        if not self.prices or not models:
            return (tokens_in * self.price_in + tokens_out * self.price_out) / 1e6
        total = 0.0
        for name, m in models.items():
            p_in, p_out = self.prices.get(name, (self.price_in, self.price_out))
            total += ((m.get("input_tokens") or 0) * p_in + (m.get("output_tokens") or 0) * p_out) / 1e6
        return total

    def finish(self, exit_code: int) -> Outcome:
        stats = (self.result or {}).get("stats") or {}
        tokens_in, tokens_out = stats.get("input_tokens"), stats.get("output_tokens")
        cost = None
        if tokens_in is not None or tokens_out is not None:
            cost = self.cost(stats, tokens_in or 0, tokens_out or 0)
        out = Outcome(ok=False, cost_usd=cost, tokens_in=tokens_in, tokens_out=tokens_out,
                      session_id=self.session_id, summary="".join(self.reply).strip() or None)
        status = (self.result or {}).get("status")
        if exit_code == 0 and status == "success":
            out.ok = True
            return out
        error = (self.result or {}).get("error") or {}
        kind_name = error.get("type") if error.get("type") not in (None, "unknown") else ""
        detail = short(f"{kind_name} {error.get('message') or ''}".strip() or " | ".join(list(self.other)[-2:]), 400)
        if exit_code in exit_codes(self.name):
            kind, message = exit_codes(self.name)[exit_code]
            out.error = ErrorInfo(kind=kind, message=f"{message}: {detail}" if detail else message)
            return out
        if exit_code == 0:
            out.error = ErrorInfo(kind=ErrorKind.invalid_output,
                                  message="gemini exited 0 without a successful stream-json `result` line; is the "
                                          f"configured command Gemini CLI >= 0.61? Last output: {detail or 'none'}")
            return out
        http_status = exit_code + 256 if 0 < exit_code < 256 else None  # 403 exits 147
        kind = status_kind(http_status) or classify_text(detail) or ErrorKind.crash
        fixes = {ErrorKind.auth: auth_fix(self.name),
                 ErrorKind.rate_limit: "the engine retries it later; if it persists check the API quota or lower "
                                       f"[agents.{self.name}] max_parallel",
                 ErrorKind.network: "check the network, proxy or GOOGLE_GEMINI_BASE_URL"}
        message = f"gemini failed (exit {exit_code}): {detail or 'no output'}"
        if kind == ErrorKind.rate_limit:
            out.retry_at = reset_time(f"{error.get('message') or ''} {' '.join(self.other)}", time.time())
        out.error = ErrorInfo(kind=kind, message=f"{message}; {fixes[kind]}" if kind in fixes else message)
        return out
