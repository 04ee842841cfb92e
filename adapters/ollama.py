"""Ollama: a local model as a council member, cost 0.

Chat mode (default) talks to Ollama's HTTP API. So that the engine's one process runner still
spawns, logs, times out and kills it like any CLI, the invocation runs this module
(`python -P -m adapters.ollama`) with the task on stdin and the worktree as cwd. It sends the task
and the relevant files to /api/chat (low temperature, fixed seed, bounded reply), streams the
reply, and applies the edits in it after vetting them (adapters/edits.py). A reply cut off by a
limit, or with an edit that would lose code, writes nothing and fails. Paths that leave the
worktree are refused.

Claude mode (extra mode = "claude") runs Claude Code against Ollama's Anthropic-compatible
endpoint through the claude adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import Field, PositiveInt

from . import edits
from .base import (TIERS, Adapter, AgentSpec, Availability, ErrorInfo, ErrorKind, Invocation, Job, Outcome, Parser,
                   classify_text, json_object, module_argv, module_pythonpath, reset_time, short)
from .claude import LOCAL_TOKEN, ClaudeAdapter

DEFAULT_URL = "http://127.0.0.1:11434"
DEFAULT_MODEL = "qwen2.5-coder:7b"
DEFAULT_CONTEXT_CHARS = 24_000
DEFAULT_TEMPERATURE = 0.0  # Ollama's default 0.8 makes a small model's edits differ run to run
DEFAULT_SEED = 1
DEFAULT_EDIT_FORMAT = "whole"  # measured with Qwen2.5-Coder 1.5B: whole 10/10 tasks, SEARCH/REPLACE 4/10
RESULT = "__OLLAMA_RESULT__:"
ERROR = "__OLLAMA_ERROR__:"
NOTE = "ollama: "  # progress lines; the model's reply is echoed with REPLY so it can never fake the above
REPLY = "> "

RULES = """Edit only the files the task needs; write no example, demo or extra test files it does not ask
for. Start with one sentence saying what you change."""
SYSTEM = {
    "diff": """You edit a software repository by writing edit blocks in your reply. Only edit blocks change
files; everything else you write is read as your explanation.

To change a file whose content you were shown, write its path alone on a line, then a fenced block
with one or more SEARCH/REPLACE blocks. SEARCH copies a few lines of the current file exactly,
indentation included; REPLACE holds the lines that take their place:

<path of the file>
```
<<<<<<< SEARCH
<lines copied exactly from the file>
=======
<the new lines>
>>>>>>> REPLACE
```

To create a new file the task asks for, write its path alone on a line, then a fenced block with
the complete content of the new file.

""" + RULES,
    "whole": """You edit a software repository by writing files in your reply. To change or create a file,
write its path alone on a line, then a fenced block with the COMPLETE new content of that file:
every line of it, also the lines you do not change. Only these blocks change files; everything
else you write is read as your explanation.

""" + RULES,
}


def placeholder(text: str) -> bool:
    """Whether a block's text is an instruction's placeholder (`<the new lines>`), not code."""
    text = text.strip()
    return bool(text) and "\n" not in text and text.startswith("<") and text.endswith(">")


def normalize_url(url: str) -> str:
    """Accept OLLAMA_HOST's forms (`0.0.0.0`, `host:port`, a full URL) and return a URL to call."""
    url = url.strip().rstrip("/")
    has_scheme = "://" in url
    parts = urlsplit(url if has_scheme else f"http://{url}")
    host = parts.hostname or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    port = parts.port or (None if has_scheme else 11434)
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    return f"{parts.scheme}://{netloc}{parts.path}"


def client_options(base_url: str) -> dict:
    """Loopback traffic must not go through the user's HTTP proxy."""
    host = urlsplit(base_url).hostname or ""
    return {"trust_env": not (host in ("localhost", "::1") or host.startswith("127."))}


class OllamaError(Exception):
    def __init__(self, kind: ErrorKind, message: str, retry_at: float | None = None):
        super().__init__(message)
        self.kind, self.message, self.retry_at = kind, message, retry_at


def http_error(status: int, text: str, base_url: str, model: str, retry_after: str | None = None) -> OllamaError:
    detail = f"HTTP {status}: {short(text, 300)}"
    if status == 404 and "model" in text.lower():
        return OllamaError(ErrorKind.not_installed, f"model {model!r} is not on the Ollama server at {base_url} "
                                                    f"({detail}); run `ollama pull {model}` there")
    if status == 404:
        return OllamaError(ErrorKind.crash, f"{base_url} has no Ollama /api/chat ({detail}); check base_url")
    if status == 429:
        return OllamaError(ErrorKind.rate_limit, f"Ollama at {base_url} is busy ({detail}); the engine retries "
                                                 "later, or raise OLLAMA_NUM_PARALLEL / OLLAMA_MAX_QUEUE",
                           retry_at=reset_time(f"retry-after: {retry_after}", time.time()) if retry_after else None)
    if status in (502, 503, 504):
        return OllamaError(ErrorKind.network, f"Ollama at {base_url} is unavailable ({detail})")
    return OllamaError(classify_text(text) or ErrorKind.crash, f"Ollama at {base_url} failed ({detail})")


def unreachable(base_url: str, e: Exception) -> OllamaError:
    return OllamaError(ErrorKind.network, f"cannot reach Ollama at {base_url} ({e.__class__.__name__}: {e}); "
                                          "is `ollama serve` running? Set [agents.ollama] base_url or OLLAMA_HOST "
                                          "if it listens elsewhere")


def model_names(tags: dict) -> set[str]:
    return {str(m.get(k)) for m in tags.get("models") or [] if isinstance(m, dict) for k in ("name", "model") if m.get(k)}


def has_model(names: set[str], model: str) -> bool:
    return model in names or (":" not in model and f"{model}:latest" in names)


async def classify_tier(base_url: str, model: str, prompt: str, timeout: float = 30.0) -> str | None:
    """Ask a local model whether a task is cheap, standard or complex (for routing); None on any failure."""
    base_url = normalize_url(base_url)
    body = {"model": model, "stream": False, "options": {"temperature": 0, "seed": DEFAULT_SEED, "num_predict": 64},
            "format": {"type": "object", "properties": {"tier": {"type": "string", "enum": list(TIERS)}},
                       "required": ["tier"]},
            "messages": [
                {"role": "system", "content": "Classify a coding task for routing. cheap: a small mechanical change "
                                              "in one or two files. standard: an ordinary feature or bug fix. "
                                              "complex: a cross-cutting change, a design, or unclear requirements. "
                                              'Answer as JSON: {"tier": "cheap"|"standard"|"complex"}.'},
                {"role": "user", "content": prompt[:8000]}]}
    try:
        async with httpx.AsyncClient(timeout=timeout, **client_options(base_url)) as client:
            r = await client.post(f"{base_url}/api/chat", json=body)
            r.raise_for_status()
            return tier_in(str(r.json()["message"]["content"]))
    except Exception:  # routing falls back to its default; a classifier failure must never fail a task
        return None


def tier_in(text: str) -> str | None:
    """The tier in a classifier's answer: JSON, JSON in a fenced block or prose (a server that
    ignores `format`), or one bare tier word."""
    for found in re.findall(r"\{[^{}]*\}", text):
        try:
            tier = json.loads(found).get("tier")
        except ValueError:
            continue
        return tier if tier in TIERS else None
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", text)} & set(TIERS)
    return words.pop() if len(words) == 1 and len(text) < 40 else None


class LocalClaude(ClaudeAdapter):
    """Claude Code on Ollama: no real Anthropic credentials are sent to the local server."""

    auth_env = ("CLAUDE_CODE_MAX_RETRIES", "CLAUDE_CONFIG_DIR")


class OllamaAdapter(Adapter):
    kind = "ollama"
    config_keys = {"base_url": str, "mode": Literal["chat", "claude"], "context_chars": PositiveInt,
                   "num_ctx": PositiveInt, "num_predict": PositiveInt,
                   "temperature": Annotated[float, Field(ge=0, le=2)], "seed": int,
                   "edit_format": Literal["diff", "whole"]}

    @property
    def base_url(self) -> str:
        return normalize_url(self.spec.extra("base_url") or self.environ.get("OLLAMA_HOST") or DEFAULT_URL)

    @property
    def model(self) -> str:
        return self.spec.model or DEFAULT_MODEL

    @cached_property
    def claude(self) -> LocalClaude | None:
        """The claude adapter that claude mode delegates to, or None in chat mode."""
        if self.spec.extra("mode", "chat") != "claude":
            return None
        data = self.spec.model_dump()
        data.update(kind="claude", model=self.model, local=True,
                    env={"ANTHROPIC_BASE_URL": self.base_url, "ANTHROPIC_AUTH_TOKEN": LOCAL_TOKEN, **self.spec.env})
        return LocalClaude(AgentSpec.model_validate(data), self.environ)

    @property
    def command(self) -> list[str]:
        return module_argv("adapters.ollama")

    def invocation(self, job: Job) -> Invocation:
        if self.claude:
            return self.claude.invocation(job)
        argv = [*self.command, "--base-url", self.base_url, "--model", self.model,
                "--context-budget", str(int(self.spec.extra("context_chars", DEFAULT_CONTEXT_CHARS)))]
        for key in ("num_ctx", "num_predict", "temperature", "seed", "edit_format"):
            if self.spec.extra(key) is not None:
                argv += [f"--{key.replace('_', '-')}", str(self.spec.extra(key))]
        # Not job.context(): that frames a CLI that runs commands as a council member; a chat model
        # runs nothing, and small ones answered that framing with "I am not a member of the council".
        task = {"prompt": job.prompt, "check": job.check}
        if job.earlier:  # a follow-up round: the chat gets the earlier exchange
            task["earlier"] = [{"prompt": p, "summary": s} for p, s in job.earlier]
        inv = self.make(argv, job, stdin=json.dumps(task).encode())
        inv.env["PYTHONPATH"] = module_pythonpath(inv.env)
        return inv

    def review_invocation(self, job: Job) -> Invocation:
        """Plain chat: the review goes to the model and its reply comes back; nothing is written."""
        if self.claude:
            return self.claude.review_invocation(job)
        argv = [*self.command, "--base-url", self.base_url, "--model", self.model, "--review"]
        for key in ("num_ctx", "temperature", "seed"):
            if self.spec.extra(key) is not None:
                argv += [f"--{key.replace('_', '-')}", str(self.spec.extra(key))]
        inv = self.make(argv, job, stdin=json.dumps({"prompt": job.prompt}).encode())
        inv.env["PYTHONPATH"] = module_pythonpath(inv.env)
        return inv

    def parser(self, job: Job) -> Parser:
        return self.claude.parser(job) if self.claude else OllamaParser()

    async def available(self) -> Availability:
        server = await self._server()
        if self.claude and server.ok:
            cli = await self.claude.available()
            return Availability(cli.ok, f"{cli.message}; {server.message}", cli.version,
                                {**server.details, "claude": cli.details}, cli.error_kind)
        return server

    async def _server(self) -> Availability:
        base, model = self.base_url, self.model
        details = {"base_url": base, "model": model}
        try:
            async with httpx.AsyncClient(timeout=3.0, **client_options(base)) as client:
                tags = (await client.get(f"{base}/api/tags")).raise_for_status().json()
                try:
                    version = (await client.get(f"{base}/api/version")).json().get("version")
                except (httpx.HTTPError, ValueError, AttributeError):
                    version = None
        except (httpx.HTTPError, ValueError) as e:
            return Availability(False, unreachable(base, e).message, details=details, error_kind=ErrorKind.network)
        names = model_names(tags if isinstance(tags, dict) else {})
        details["models"] = sorted(names)
        if not has_model(names, model):
            return Availability(False, f"Ollama {version or ''} at {base} does not have {model!r}; run "
                                       f"`ollama pull {model}` (or set [agents.{self.spec.name}] model to one of: "
                                       f"{', '.join(sorted(names)) or 'none pulled yet'})", version, details)
        return Availability(True, f"Ollama {version or ''} at {base} has {model}", version, details)


class OllamaParser(Parser):
    """Reads the chat driver's machine lines: progress notes, the result, or a classified error."""

    def __init__(self):
        self.result: dict | None = None
        self.error: dict | None = None
        self.tail: deque[str] = deque(maxlen=20)

    def feed(self, stream: str, text: str) -> str | None:
        if stream == "stdout" and text.startswith(RESULT):
            self.result = json_object(text[len(RESULT):])
            return short(f"wrote {len((self.result or {}).get('files') or [])} file(s)")
        if stream == "stdout" and text.startswith(ERROR):
            self.error = json_object(text[len(ERROR):])
            return short(f"error: {(self.error or {}).get('message')}")
        if stream == "stdout" and text.startswith(NOTE):
            return short(text[len(NOTE):])
        if stream == "stderr" and text.strip():
            self.tail.append(short(text, 300))
        return None

    def finish(self, exit_code: int) -> Outcome:
        r = self.result
        if exit_code == 0 and r is not None:
            lines = [r.get("summary") or ""]
            if r.get("files"):
                lines.append(f"Wrote: {', '.join(r['files'])}")
            if r.get("refused"):
                lines.append("Refused: " + "; ".join(f"{x.get('path')} ({x.get('reason')})" for x in r["refused"]))
            return Outcome(ok=True, cost_usd=0.0, tokens_in=r.get("prompt_eval_count"),
                           tokens_out=r.get("eval_count"), summary="\n".join(x for x in lines if x).strip() or None)
        retry_at = None
        if self.error and self.error.get("kind") in ErrorKind.__members__:
            error = ErrorInfo(kind=ErrorKind(self.error["kind"]), message=str(self.error.get("message")))
            if isinstance(self.error.get("retry_at"), (int, float)):
                retry_at = float(self.error["retry_at"])
        elif exit_code == 0:
            error = ErrorInfo(kind=ErrorKind.invalid_output, message="the ollama driver exited without a result line")
        else:
            tail = " | ".join(list(self.tail)[-4:]) or "no output"
            hint = (f"; is cli-council importable by {sys.executable}?" if "No module named" in tail else "")
            error = ErrorInfo(kind=ErrorKind.crash, message=f"the ollama driver exited with code {exit_code}: {tail}{hint}")
        return Outcome(ok=False, error=error, cost_usd=0.0, retry_at=retry_at)


# ---- the chat driver: runs in the attempt's process, cwd = the worktree ----

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
STOP = frozenset("the and for with that this from into add fix make use when then than are was were not you your "
                 "should would could file files code test tests new all any each its our can".split())


def note(text: str) -> None:
    print(NOTE + text, flush=True)


def tracked_files(root: Path) -> list[str]:
    """The repo's tracked files (git ls-files), or a bounded walk when it is not a git checkout."""
    try:
        done = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=60)
        if done.returncode == 0:
            return [p for p in done.stdout.decode(errors="replace").split("\0") if p]
    except (OSError, subprocess.TimeoutExpired):
        pass
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "node_modules"]
        found += [str(Path(dirpath, f).relative_to(root)) for f in filenames]
        if len(found) > 5000:
            break
    return found


def safe_target(root: Path, rel: str) -> tuple[Path | None, str]:
    """Where a relative path lands inside the worktree, or None and why it is refused."""
    if not rel or "\0" in rel or "\\" in rel:
        return None, "not a plain relative path"
    path = PurePosixPath(rel)
    if path.is_absolute() or rel.startswith("~") or re.match(r"^[A-Za-z]:", rel):
        return None, "absolute path"
    if ".." in path.parts:
        return None, "leaves the worktree"
    if any(part.lower() == ".git" for part in path.parts):
        return None, "inside .git"
    top = root.resolve()
    real = (root / path).resolve()
    if real != top and top not in real.parents:
        return None, "a symlink leads outside the worktree"
    if any(part.lower() == ".git" for part in real.relative_to(top).parts):
        return None, "a symlink leads into .git"
    if real.is_dir():
        return None, "is a directory"
    return root / path, ""


def gather_context(root: Path, prompt: str, budget: int,
                   tracked: list[str] | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """Files to show the model: those the prompt names first, then tracked files whose path shares
    words with the prompt, whole files only, within `budget` characters. Also returns the names
    that did not fit (the model is told not to rewrite them)."""
    tracked = tracked_files(root) if tracked is None else tracked
    named = []
    for token in re.findall(r"[\w./@+-]+", prompt):
        token = token.strip(".")
        if ("/" in token or "." in token) and safe_target(root, token)[0] and (root / token).is_file():
            named.append(str(PurePosixPath(token)))
    basenames = {w.lower() for w in re.findall(r"[\w.@+-]+", prompt) if "." in w.strip(".")}
    named += [p for p in tracked if PurePosixPath(p).name.lower() in basenames]
    words = {w.lower() for w in WORD.findall(prompt)} - STOP
    scored = []
    for p in tracked:
        parts = set(re.split(r"[^a-z0-9]+", p.lower()))
        score = len(words & parts)
        if score:
            scored.append((-score, len(p), p))
    order = list(dict.fromkeys(named + [p for _, _, p in sorted(scored)]))
    chosen, skipped, used = [], [], 0
    for rel in order:
        target, _ = safe_target(root, rel)
        try:
            data = target.read_bytes() if target else b""
        except OSError:
            continue
        if not data or b"\0" in data[:4096]:
            continue
        text = data.decode("utf-8", errors="replace")
        if used + len(text) > budget:
            skipped.append(rel)
            continue
        chosen.append((rel, text))
        used += len(text)
    return chosen, skipped


def fenced(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text if text.endswith("\n") else text + "\n"
    return f"{fence}\n{body}{fence}"


def user_message(task: dict, files: list[tuple[str, str]], skipped: list[str], tracked: list[str],
                 edit_format: str, retry: str = "") -> str:
    """The files, then the task and what passing means, then the reply's shape on the task's own
    first file (small models follow a shape shown on a real path; an invented example path was
    copied as a file). Worded for a model that only answers: it is never told to run anything.
    `retry` (why the last answer failed) goes before the task, not last: a small model echoes the
    last thing it reads."""
    parts = []
    if tracked:
        more = f" (and {len(tracked) - 200} more)" if len(tracked) > 200 else ""
        parts.append("Files in the repository: " + ", ".join(tracked[:200]) + more)
    if files:
        parts.append("Current content of the relevant files:")
        parts += [f"{rel}\n{fenced(text)}" for rel, text in files]
    if skipped:
        parts.append(f"Too large to show here (do not rewrite these): {', '.join(skipped[:50])}")
    if retry:
        parts.append(retry)
    parts.append(f"Task:\n{task['prompt'].strip()}")
    if task.get("check"):
        parts.append(f"After your reply, `{task['check']}` runs in the repository and must pass.")
    path = files[0][0] if files else None
    if path and edit_format == "diff":
        parts.append(f"Answer with one sentence, then SEARCH/REPLACE blocks for the files shown above (a whole "
                     f"fenced file only for a new file the task asks for), for example:\n\n{path}\n```\n"
                     f"<<<<<<< SEARCH\n<lines copied exactly from {path}>\n=======\n<the new lines>\n"
                     f">>>>>>> REPLACE\n```")
    elif path:
        parts.append(f"Answer with one sentence, then each file you change or create: its path alone on a line "
                     f"and its complete new content in a fenced block, for example:\n\n{path}\n```\n"
                     f"<the complete new content of {path}>\n```")
    else:
        parts.append("Answer with one sentence, then each file the task asks for: its path alone on a line and "
                     "its complete content in a fenced block.")
    return "\n\n".join(parts)


def stream_chat(base_url: str, model: str, messages: list[dict], options: dict) -> tuple[str, dict]:
    """POST /api/chat with streaming; returns the reply and the final `done` record. Every line is
    checked for {"error": ...}: Ollama reports a mid-stream failure with HTTP 200."""
    body = {"model": model, "messages": messages, "stream": True, "options": options}
    parts: list[str] = []
    pending = ""
    timeout = httpx.Timeout(10.0, read=None)  # loading a model can take minutes: the engine's timeout bounds it
    try:
        with httpx.Client(timeout=timeout, **client_options(base_url)) as client:
            with client.stream("POST", f"{base_url}/api/chat", json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    try:
                        text = str(resp.json().get("error") or resp.text)
                    except (ValueError, AttributeError):
                        text = resp.text
                    raise http_error(resp.status_code, text, base_url, model, resp.headers.get("retry-after"))
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    obj = json_object(line)
                    if obj is None:
                        raise OllamaError(ErrorKind.invalid_output, f"Ollama sent a line that is not JSON: {short(line)}")
                    if obj.get("error"):
                        raise OllamaError(classify_text(str(obj["error"])) or ErrorKind.crash,
                                          f"Ollama failed mid-reply: {short(str(obj['error']), 300)}")
                    chunk = str((obj.get("message") or {}).get("content") or "")
                    parts.append(chunk)
                    *complete, pending = (pending + chunk).split("\n")
                    for text in complete:
                        print(REPLY + text, flush=True)
                    if obj.get("done"):
                        if pending:
                            print(REPLY + pending, flush=True)
                        return "".join(parts), obj
    except httpx.ConnectError as e:
        raise unreachable(base_url, e) from None
    except httpx.TransportError as e:
        raise OllamaError(ErrorKind.network, f"the connection to Ollama at {base_url} broke mid-reply: {e}") from None
    raise OllamaError(ErrorKind.network, f"Ollama's reply ended before `done`; the server at {base_url} may have "
                                         "stopped (see `ollama serve`'s log)")


def cut_off(final: dict, options: dict) -> str | None:
    """Why a reply stopped before the model finished (Ollama's done_reason "length"), naming the
    limit that was hit: the output length (num_predict) or the context window (num_ctx)."""
    if final.get("done_reason") != "length":
        return None
    out, used = final.get("eval_count") or 0, (final.get("prompt_eval_count") or 0) + (final.get("eval_count") or 0)
    if out >= options["num_predict"] or used < options["num_ctx"] * 0.9:
        return (f"the reply was cut off at the output limit ({out} tokens, num_predict {options['num_predict']}); "
                "raise [agents.ollama] num_predict")
    return (f"the reply was cut off when prompt and reply filled the context window ({used} tokens, num_ctx "
            f"{options['num_ctx']}); raise [agents.ollama] num_ctx or lower context_chars")


def fail(kind: ErrorKind, message: str, retry_at: float | None = None) -> int:
    print(ERROR + json.dumps({"kind": str(kind), "message": message, "retry_at": retry_at}), flush=True)
    print(f"ollama: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adapters.ollama",
                                 description="Ask an Ollama model for edits and apply them to the cwd. The task "
                                             'comes on stdin as JSON: {"prompt": ..., "check": ...}.')
    ap.add_argument("--base-url", default=DEFAULT_URL)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--context-budget", type=int, default=DEFAULT_CONTEXT_CHARS, help="characters of files to send")
    ap.add_argument("--num-ctx", type=int, help="the model's context window (default: sized to the prompt)")
    ap.add_argument("--num-predict", type=int, help="most tokens of reply (default: sized to the files shown)")
    ap.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--edit-format", choices=sorted(SYSTEM), default=DEFAULT_EDIT_FORMAT)
    ap.add_argument("--repairs", type=int, default=1, help="follow-ups for a reply that was refused or changed nothing")
    ap.add_argument("--review", action="store_true", help="answer the prompt (a review) over plain chat; write nothing")
    a = ap.parse_args(argv)
    sys.stdout.reconfigure(encoding="utf-8", errors="replace")
    root = Path.cwd()
    raw = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    task = json_object(raw) or {"prompt": raw}
    if a.review:
        return answer(a, task["prompt"])
    tracked = tracked_files(root)
    files, skipped = gather_context(root, task["prompt"], a.context_budget, tracked)
    messages = [{"role": "system", "content": SYSTEM[a.edit_format]}, *earlier_exchange(task),
                {"role": "user", "content": user_message(task, files, skipped, tracked, a.edit_format)}]
    chars = sum(len(m["content"]) for m in messages)
    # A reply rewrites at most the files shown (about 3 characters a token) plus a sentence; a
    # small model stuck in a loop stops there instead of running into the attempt's timeout.
    num_predict = a.num_predict or min(8192, max(1024, sum(len(t) for _, t in files) // 3 + 512))
    # Ollama's default window (a few thousand tokens) silently drops the start of a long prompt;
    # leave room for the prompt (about 3 characters a token), a reply and a repair round's reply.
    num_ctx = a.num_ctx or min(65536, max(8192, -(-(chars // 3 + 2 * num_predict + 512) // 2048) * 2048))
    options = {"num_ctx": num_ctx, "num_predict": num_predict, "temperature": a.temperature, "seed": a.seed}
    note(f"asking {a.model} at {a.base_url} with {len(files)} file(s), {chars} chars, num_ctx {num_ctx}")
    wanted = edits.new_files(task["prompt"], tracked)
    counts = {"prompt_eval_count": 0, "eval_count": 0}
    for round_ in range(1 + a.repairs):
        try:
            reply, final = stream_chat(a.base_url, a.model, messages, options)
        except OllamaError as e:
            return fail(e.kind, e.message, e.retry_at)
        for key in counts:
            counts[key] += final.get(key) or 0
        if why := cut_off(final, options):
            return fail(ErrorKind.invalid_output, f"{why}; nothing was written")
        parsed = edits.parse_reply(reply, set(tracked), dict(files), wanted)
        todo = edits.plan(root, parsed.edits, task["prompt"], tracked, placeholder, safe_target)
        problems = parsed.broken + todo.fatal
        if round_ == a.repairs or (todo.writes and not problems):
            break
        note("the reply " + ("changed no file" if not problems else "was refused") + "; asking once more")
        # Asked afresh rather than after its own reply: a small model at temperature 0 shown its
        # reply repeats it word for word.
        retry = user_message(task, files, skipped, tracked, a.edit_format, repair(problems))
        messages = [*messages[:-1], {"role": "user", "content": retry}]
    if problems:
        return fail(ErrorKind.invalid_output, "refused the reply, nothing was written: "
                    + "; ".join(f"{x['path']}: {x['reason']}" for x in problems))
    written, refused = apply(root, todo.writes)
    for item in todo.dropped:
        note(f"refused {item['path']}: {item['reason']}")
    print(RESULT + json.dumps({**counts, "files": written, "refused": todo.dropped + refused,
                               "summary": short(parsed.prose, 600) if parsed.prose else None}), flush=True)
    return 0


def answer(a: argparse.Namespace, prompt: str) -> int:
    """Review mode: one chat turn, the reply is the result's summary; no file is read or written."""
    num_predict = a.num_predict or 1024
    num_ctx = a.num_ctx or min(65536, max(8192, -(-(len(prompt) // 3 + num_predict + 512) // 2048) * 2048))
    options = {"num_ctx": num_ctx, "num_predict": num_predict, "temperature": a.temperature, "seed": a.seed}
    note(f"asking {a.model} at {a.base_url} for a review, {len(prompt)} chars")
    try:
        reply, final = stream_chat(a.base_url, a.model, [{"role": "user", "content": prompt}], options)
    except OllamaError as e:
        return fail(e.kind, e.message)
    if why := cut_off(final, options):
        return fail(ErrorKind.invalid_output, why)
    print(RESULT + json.dumps({"prompt_eval_count": final.get("prompt_eval_count"), "eval_count": final.get("eval_count"),
                               "files": [], "summary": reply[-20000:]}), flush=True)
    return 0


def earlier_exchange(task: dict) -> list[dict]:
    """A follow-up round's earlier prompts and the model's summaries of its answers, as chat turns
    (the files it wrote then are in the current content shown with the new prompt)."""
    turns = []
    for item in task.get("earlier") or []:
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            turns += [{"role": "user", "content": f"Task:\n{item['prompt'].strip()}"},
                      {"role": "assistant", "content": str(item.get("summary") or "Done: the files were written.")}]
    return turns


def repair(problems: list[dict]) -> str:
    """The note a second try gets after a reply that changed nothing or was refused (what aider
    calls reflection): small models often get it right once told exactly what was wrong."""
    if not problems:
        return ("An earlier answer to this task changed no file: it had no fenced block with the file's path "
                "alone on the line before it.")
    return ("An earlier answer to this task was refused, and nothing was written: "
            + "; ".join(f"{x['path']}: {x['reason']}" for x in problems)
            + ". Keep all the other code of every file you change.")


def apply(root: Path, writes: dict[str, str]) -> tuple[list[str], list[dict]]:
    written, refused = [], []
    for rel, content in writes.items():
        target = root / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
        except OSError as e:
            refused.append({"path": rel, "reason": f"cannot write: {e.strerror or e}"})
            continue
        written.append(rel)
        note(f"wrote {rel}")
    return written, refused


if __name__ == "__main__":
    sys.exit(main())
