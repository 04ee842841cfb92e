"""Ollama: a local model as a council member, cost 0.

Chat mode (default) talks to Ollama's HTTP API. So that the engine's one process runner still
spawns, logs, times out and kills it like any CLI, the invocation runs this module
(`python -P -m adapters.ollama`) with the prompt on stdin and the worktree as cwd. It sends the
prompt and the relevant files to /api/chat, streams the reply, and writes the whole files the
reply contains: the path alone on the line before a fenced block, or `path=` in the fence's
info string. Paths that leave the worktree are refused.

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
from collections import deque
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlsplit

import httpx
from pydantic import PositiveInt

from .base import (TIERS, Adapter, AgentSpec, Availability, ErrorInfo, ErrorKind, Invocation, Job, Outcome, Parser,
                   classify_text, json_object, module_argv, module_pythonpath, short)
from .claude import LOCAL_TOKEN, ClaudeAdapter

DEFAULT_URL = "http://127.0.0.1:11434"
DEFAULT_MODEL = "qwen2.5-coder:7b"
DEFAULT_CONTEXT_CHARS = 24_000
RESULT = "__OLLAMA_RESULT__:"
ERROR = "__OLLAMA_ERROR__:"
NOTE = "ollama: "  # progress lines; the model's reply is echoed with REPLY so it can never fake the above
REPLY = "> "

SYSTEM = """You are a careful coding assistant working on a repository. You cannot run commands.
To change or create a file, write its path (relative to the repository root) alone on one line,
then a fenced code block holding the COMPLETE new content of that file, for example:

src/app.py
```python
print("hello")
```

Write only files that need to change, always in full. Never rewrite a file whose content you were
not shown unless you create it. Start with one or two sentences saying what you changed."""


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
    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def http_error(status: int, text: str, base_url: str, model: str) -> OllamaError:
    detail = f"HTTP {status}: {short(text, 300)}"
    if status == 404 and "model" in text.lower():
        return OllamaError(ErrorKind.not_installed, f"model {model!r} is not on the Ollama server at {base_url} "
                                                    f"({detail}); run `ollama pull {model}` there")
    if status == 404:
        return OllamaError(ErrorKind.crash, f"{base_url} has no Ollama /api/chat ({detail}); check base_url")
    if status == 429:
        return OllamaError(ErrorKind.rate_limit, f"Ollama at {base_url} is busy ({detail}); the engine retries "
                                                 "later, or raise OLLAMA_NUM_PARALLEL / OLLAMA_MAX_QUEUE")
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
    body = {"model": model, "stream": False, "options": {"temperature": 0},
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
            tier = json.loads(r.json()["message"]["content"]).get("tier")
    except Exception:  # routing falls back to its default; a classifier failure must never fail a task
        return None
    return tier if tier in TIERS else None


class LocalClaude(ClaudeAdapter):
    """Claude Code on Ollama: no real Anthropic credentials are sent to the local server."""

    auth_env = ("CLAUDE_CODE_MAX_RETRIES", "CLAUDE_CONFIG_DIR")


class OllamaAdapter(Adapter):
    kind = "ollama"
    config_keys = {"base_url": str, "mode": Literal["chat", "claude"], "context_chars": PositiveInt,
                   "num_ctx": PositiveInt}

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
        if self.spec.extra("num_ctx"):
            argv += ["--num-ctx", str(int(self.spec.extra("num_ctx")))]
        inv = self.make(argv, job, stdin=f"{job.context()}\n\nTask:\n{job.prompt}".encode())
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
        if self.error and self.error.get("kind") in ErrorKind.__members__:
            error = ErrorInfo(kind=ErrorKind(self.error["kind"]), message=str(self.error.get("message")))
        elif exit_code == 0:
            error = ErrorInfo(kind=ErrorKind.invalid_output, message="the ollama driver exited without a result line")
        else:
            tail = " | ".join(list(self.tail)[-4:]) or "no output"
            hint = (f"; is cli-council importable by {sys.executable}?" if "No module named" in tail else "")
            error = ErrorInfo(kind=ErrorKind.crash, message=f"the ollama driver exited with code {exit_code}: {tail}{hint}")
        return Outcome(ok=False, error=error, cost_usd=0.0)


# ---- the chat driver: runs in the attempt's process, cwd = the worktree ----

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
STOP = frozenset("the and for with that this from into add fix make use when then than are was were not you your "
                 "should would could file files code test tests new all any each its our can".split())
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
INFO_PATH = re.compile(r"""^(?:path|file|filename)=["']?([^"'\s]+)["']?$""")
PATH_LINE = re.compile(r"^(?:~?/)?[\w.@+-]+(?:/[\w.@+-]+)*$")  # absolute ones too, to refuse them by name


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


def gather_context(root: Path, prompt: str, budget: int) -> tuple[list[tuple[str, str]], list[str]]:
    """Files to show the model: those the prompt names first, then tracked files whose path shares
    words with the prompt, whole files only, within `budget` characters. Also returns the names
    that did not fit (the model is told not to rewrite them)."""
    tracked = tracked_files(root)
    named = []
    for token in re.findall(r"[\w./@+-]+", prompt):
        token = token.strip(".")
        if ("/" in token or "." in token) and safe_target(root, token)[0] and (root / token).is_file():
            named.append(str(PurePosixPath(token)))
    basenames = {w for w in re.findall(r"[\w.@+-]+", prompt) if "." in w.strip(".")}
    named += [p for p in tracked if PurePosixPath(p).name in basenames]
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


def user_message(prompt: str, files: list[tuple[str, str]], skipped: list[str]) -> str:
    parts = [prompt.strip()]
    if files:
        parts.append("Current content of the relevant repository files:")
        parts += [f"{rel}\n{fenced(text)}" for rel, text in files]
    if skipped:
        parts.append(f"Too large to show here (do not rewrite these): {', '.join(skipped[:50])}")
    parts.append("Answer with a short explanation, then each file to write: its path alone on a line, then its "
                 "complete content in a fenced block.")
    return "\n\n".join(parts)


def path_before(lines: list[str], i: int, known: set[str]) -> str | None:
    """The path written alone on the nearest non-blank line above a fence (two lines at most)."""
    for j in (i - 1, i - 2):
        if j < 0:
            return None
        line = lines[j].strip()
        if not line:
            continue
        line = re.sub(r"^(#+\s*|[-*]\s+)", "", line)
        line = re.sub(r"^(file(name)?|path)\s*:\s*", "", line.strip("*_`'\" "), flags=re.I).strip("*_`'\" :")
        if PATH_LINE.match(line) and ("/" in line or re.search(r"\.[A-Za-z0-9]+$", line) or line in known):
            return line
        return None
    return None


def parse_reply(reply: str, known: set[str] = frozenset()) -> tuple[list[tuple[str, str]], list[dict], str]:
    """Whole-file edits in a model's reply: (path, content) pairs, blocks refused for being cut
    off, and the prose outside the code blocks."""
    lines = reply.split("\n")
    edits, refused, prose = [], [], []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or (m.group(1)[0] == "`" and "`" in m.group(2)):
            prose.append(lines[i])
            i += 1
            continue
        fence, info = m.group(1), m.group(2).split()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() and set(lines[j].strip()) == {fence[0]}
                    and len(lines[j].strip()) >= len(fence)), None)
        path = next((pm.group(1) for tok in info if (pm := INFO_PATH.match(tok))), None) or path_before(lines, i, known)
        if path and prose and prose[-1].strip() and path in prose[-1]:
            prose.pop()
        if end is None:
            if path:
                refused.append({"path": path, "reason": "its code block never closes (the reply was cut off?)"})
            break
        body = lines[i + 1:end]
        if path:
            edits.append((path, "\n".join(body) + "\n" if body else ""))
        i = end + 1
    return edits, refused, "\n".join(prose).strip()


def apply_edits(root: Path, edits: list[tuple[str, str]]) -> tuple[list[str], list[dict]]:
    written, refused = [], []
    for rel, content in dict(edits).items():  # a path given twice: the last version wins
        target, reason = safe_target(root, rel)
        if target is None:
            refused.append({"path": rel, "reason": reason})
            note(f"refused {rel}: {reason}")
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
        except OSError as e:
            refused.append({"path": rel, "reason": f"cannot write: {e.strerror or e}"})
            continue
        written.append(str(PurePosixPath(rel)))
        note(f"wrote {rel}")
    return written, refused


def stream_chat(base_url: str, model: str, messages: list[dict], num_ctx: int) -> tuple[str, dict]:
    """POST /api/chat with streaming; returns the reply and the final `done` record. Every line is
    checked for {"error": ...}: Ollama reports a mid-stream failure with HTTP 200."""
    body = {"model": model, "messages": messages, "stream": True, "options": {"num_ctx": num_ctx}}
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
                    raise http_error(resp.status_code, text, base_url, model)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adapters.ollama",
                                 description="Ask an Ollama model for whole-file edits and write them into the cwd. "
                                             "The prompt comes on stdin.")
    ap.add_argument("--base-url", default=DEFAULT_URL)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--context-budget", type=int, default=DEFAULT_CONTEXT_CHARS, help="characters of files to send")
    ap.add_argument("--num-ctx", type=int, help="the model's context window (default: sized to the prompt)")
    a = ap.parse_args(argv)
    sys.stdout.reconfigure(encoding="utf-8", errors="replace")
    root = Path.cwd()
    prompt = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    files, skipped = gather_context(root, prompt, a.context_budget)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_message(prompt, files, skipped)}]
    chars = sum(len(m["content"]) for m in messages)
    # Ollama's default window (a few thousand tokens) silently drops the start of a long prompt;
    # leave room for a reply as long as the prompt (whole files come back).
    num_ctx = a.num_ctx or min(65536, max(8192, -(-(2 * chars // 3 + 2048) // 2048) * 2048))
    note(f"asking {a.model} at {a.base_url} with {len(files)} file(s), {chars} chars, num_ctx {num_ctx}")
    try:
        reply, final = stream_chat(a.base_url, a.model, messages, num_ctx)
    except OllamaError as e:
        print(ERROR + json.dumps({"kind": str(e.kind), "message": e.message}), flush=True)
        print(f"ollama: {e.message}", file=sys.stderr)
        return 1
    edits, cut_off, prose = parse_reply(reply, set(tracked_files(root)))
    if cut_off and final.get("done_reason") == "length":
        for item in cut_off:
            item["reason"] += "; the model hit its length limit, raise [agents.ollama] num_ctx"
    written, refused = apply_edits(root, edits)
    print(RESULT + json.dumps({"prompt_eval_count": final.get("prompt_eval_count"),
                               "eval_count": final.get("eval_count"), "files": written,
                               "refused": cut_off + refused, "summary": short(prose, 600) if prose else None}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
