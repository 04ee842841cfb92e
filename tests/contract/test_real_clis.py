"""Contract tier: the real `claude` and `gemini` CLIs from npm, driven through our adapters.

Each test starts a local stand-in for the CLI's model API (model_standin.py) that answers with one
scripted file write and then `Done.`, builds the adapter's invocation for a fresh git repo, runs
the real CLI as a subprocess (own process group, stdin /dev/null, its own HOME), feeds every
output line to the adapter's parser, and checks that the file landed in the worktree and that the
outcome carries the tokens, cost and session the CLI reported.

The CLIs are installed at pinned versions by `bash .ci/install-clis` into
tests/contract/node_modules. Without npm the tier is skipped with a visible reason; with npm but
without the install it is skipped locally and fails under CI, where .ci/run installs first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import anyio
import pytest

from model_standin import ANTHROPIC_IN, ANTHROPIC_OUT, GEMINI_IN, GEMINI_OUT, ModelStandin

from adapters import make_adapter
from adapters.base import COUNCIL_CONTEXT, AgentSpec, ErrorKind, Job, Outcome

pytestmark = pytest.mark.contract

HERE = Path(__file__).resolve().parent
BIN = HERE / "node_modules" / ".bin"
PINNED = json.loads((HERE / "package.json").read_text())["dependencies"]
TIMEOUT_S = 120

# Keeps the CLIs off the network: no updater, telemetry, error reporting or feedback traffic.
CLAUDE_QUIET_ENV = {
    "CLAUDE_CODE_MAX_RETRIES": "1",
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_BUG_COMMAND": "1",
    "DISABLE_COST_WARNINGS": "1",
    "CLAUDE_CODE_DISABLE_TERMINAL_TITLE": "1",
}
# Gemini reads these from $HOME/.gemini/settings.json. `selectedType` is what makes it use
# GOOGLE_GEMINI_BASE_URL with the API key; without `usageStatisticsEnabled: false` it resolves
# play.googleapis.com for usage logging (seen with strace).
GEMINI_SETTINGS = {
    "security": {"auth": {"selectedType": "gemini-api-key"}},
    "privacy": {"usageStatisticsEnabled": False},
    "telemetry": {"enabled": False},
    "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False},
}
GEMINI_PRICE_IN, GEMINI_PRICE_OUT = 1.25, 10.0  # USD per million tokens


def cli_path(name: str) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm not found: the contract tier installs the real claude/gemini CLIs with npm "
                    "(install node + npm, then run .ci/install-clis)")
    exe = BIN / name
    if not exe.exists():
        message = f"{exe.relative_to(HERE.parent.parent)} is missing: run .ci/install-clis"
        if os.environ.get("CI"):
            pytest.fail(message + " (npm is here, so CI must install the CLIs before pytest)")
        pytest.skip(message)
    return exe


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL).stdout


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    """A fresh git repo with one commit, standing in for an attempt's worktree."""
    wt = tmp_path / "worktree"
    wt.mkdir()
    git(wt, "init", "-q", "-b", "main")
    (wt / "README.md").write_text("# sample project\n")
    git(wt, "add", "README.md")
    git(wt, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "init")
    return wt


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def base_environ(home: Path) -> dict[str, str]:
    """What the adapter sees as our environment: only the basics, with a private HOME and TMPDIR
    (gemini drops `gemini-client-error-*.json` reports into the temp dir on API errors)."""
    tmp = home.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TMPDIR": str(tmp),
           "LANG": "C.UTF-8"}
    for name in ("SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS"):
        if name in os.environ:
            env[name] = os.environ[name]
    # Proxies from the host must not catch our loopback traffic.
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


class Run:
    def __init__(self, outcome: Outcome, code: int, stdout: list[str], stderr: list[str], notes: list[str]):
        self.outcome, self.code, self.stdout, self.stderr, self.notes = outcome, code, stdout, stderr, notes

    def events(self) -> list[dict]:
        out = []
        for line in self.stdout:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def describe(self, standin: ModelStandin) -> str:
        return (f"exit {self.code}; outcome {self.outcome}\n--- requests to the stand-in\n{standin.summary()}"
                f"\n--- stdout\n" + "\n".join(self.stdout)[-6000:] + "\n--- stderr\n" + "\n".join(self.stderr)[-3000:])


async def drive(adapter, job: Job) -> Run:
    """Run the adapter's invocation for real and feed its output to the adapter's parser."""
    inv = adapter.invocation(job)
    parser = adapter.parser(job)
    lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
    notes: list[str] = []

    async def pump(name: str, stream) -> None:
        buf = b""
        async for chunk in stream:
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                take(name, raw)
        if buf:
            take(name, buf)

    def take(name: str, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        lines[name].append(text)
        note = parser.feed(name, text)
        if note:
            notes.append(note)

    stdin = subprocess.PIPE if inv.stdin is not None else subprocess.DEVNULL
    proc = await anyio.open_process(inv.argv, cwd=inv.cwd, env=inv.env, stdin=stdin,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        with anyio.fail_after(job.timeout_s):
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump, "stdout", proc.stdout)
                tg.start_soon(pump, "stderr", proc.stderr)
                if inv.stdin is not None:
                    await proc.stdin.send(inv.stdin)
                    await proc.stdin.aclose()
            code = await proc.wait()
    finally:
        if proc.returncode is None:  # timed out or failed: take the whole process group down
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            with anyio.move_on_after(5, shield=True):
                await proc.wait()
    return Run(parser.finish(code), code, lines["stdout"], lines["stderr"], notes)


def claude_adapter(standin: ModelStandin, home: Path, model: str | None = None):
    spec = AgentSpec(name="claude", kind="claude", command=[str(cli_path("claude"))], model=model,
                     env={"ANTHROPIC_BASE_URL": standin.url, "ANTHROPIC_API_KEY": CLAUDE_KEY, **CLAUDE_QUIET_ENV})
    return make_adapter(spec, environ=base_environ(home))


def gemini_adapter(standin: ModelStandin, home: Path, model: str | None = None):
    exe = cli_path("gemini")
    (home / ".gemini").mkdir(exist_ok=True)
    (home / ".gemini" / "settings.json").write_text(json.dumps(GEMINI_SETTINGS))
    spec = AgentSpec(name="gemini", kind="gemini", command=[str(exe)], model=model,
                     env={"GOOGLE_GEMINI_BASE_URL": standin.url, "GEMINI_API_KEY": GEMINI_KEY},
                     price_in_per_mtok=GEMINI_PRICE_IN, price_out_per_mtok=GEMINI_PRICE_OUT)
    return make_adapter(spec, environ=base_environ(home))


CLAUDE_KEY = "sk-ant-standin-contract-0000"
GEMINI_KEY = "standin-contract-0000"
CHECK = "git status --short"

# (model, check, budget_usd): the defaults, and every optional flag the adapter can add.
CLAUDE_CASES = [pytest.param(None, None, None, id="defaults"),
                pytest.param("claude-sonnet-4-5", CHECK, 2.0, id="model-check-budget")]
GEMINI_CASES = [pytest.param(None, None, id="defaults"),
                pytest.param("gemini-2.5-pro", CHECK, id="model-check")]


@pytest.mark.parametrize(("model", "check", "budget"), CLAUDE_CASES)
async def test_claude_writes_file_and_reports_cost(worktree: Path, home: Path, model, check, budget) -> None:
    target = worktree / "notes" / "claude.txt"
    content = "hello from claude\n"
    prompt = "Create notes/claude.txt containing the line: hello from claude"
    with ModelStandin(str(target), content) as standin:
        adapter = claude_adapter(standin, home, model)
        run = await drive(adapter, Job(prompt=prompt, worktree=worktree, timeout_s=TIMEOUT_S,
                                       check=check, budget_usd=budget))
        why = run.describe(standin)
        print(why)

        assert target.is_file(), f"the file did not land in the worktree\n{why}"
        assert target.read_text() == content, why
        assert run.code == 0, why
        assert run.outcome.ok and run.outcome.error is None, why

        result = [e for e in run.events() if e.get("type") == "result"][-1]
        init = [e for e in run.events() if e.get("type") == "system" and e.get("subtype") == "init"][0]
        assert result["is_error"] is False and result["permission_denials"] == [], why
        # Two model turns (the write, then Done.), each billed ANTHROPIC_IN in / ANTHROPIC_OUT out.
        assert run.outcome.tokens_in == 2 * ANTHROPIC_IN, why
        assert run.outcome.tokens_out == 2 * ANTHROPIC_OUT, why
        assert run.outcome.cost_usd is not None and run.outcome.cost_usd > 0, why
        assert run.outcome.cost_usd == pytest.approx(result["total_cost_usd"]), why
        assert run.outcome.session_id == init["session_id"] == result["session_id"], why
        assert run.outcome.summary and "Done." in run.outcome.summary, why

        # What the real CLI sent: our key, the prompt, and the council's framing as system prompt.
        calls = [r for r in standin.requests if r.route == "/v1/messages"]
        assert len(calls) >= 2, why
        assert all(r.headers.get("x-api-key") == CLAUDE_KEY for r in calls), why
        assert "notes/claude.txt" in json.dumps(calls[0].body["messages"]), why
        system = json.dumps(calls[0].body.get("system"))
        assert COUNCIL_CONTEXT[:60] in system, f"the council context is not in the system prompt\n{why}"
        if check:
            assert CHECK in system, f"the check command is not in the system prompt\n{why}"
        if model:
            assert all(r.body["model"] == model for r in calls), why
        assert not standin.unknown, f"claude called routes the stand-in does not know\n{why}"


@pytest.mark.parametrize(("model", "check"), GEMINI_CASES)
async def test_gemini_writes_file_and_prices_tokens(worktree: Path, home: Path, model, check) -> None:
    target = worktree / "notes" / "gemini.txt"
    content = "hello from gemini\n"
    prompt = "Create notes/gemini.txt containing the line: hello from gemini"
    with ModelStandin(str(target), content) as standin:
        adapter = gemini_adapter(standin, home, model)
        run = await drive(adapter, Job(prompt=prompt, worktree=worktree, timeout_s=TIMEOUT_S, check=check))
        why = run.describe(standin)
        print(why)

        assert target.is_file(), f"the file did not land in the worktree\n{why}"
        assert target.read_text() == content, why
        assert run.code == 0, why
        assert run.outcome.ok and run.outcome.error is None, why

        init = [e for e in run.events() if e.get("type") == "init"][0]
        result = [e for e in run.events() if e.get("type") == "result"][-1]
        # Every generateContent call the stand-in answered costs GEMINI_IN in / GEMINI_OUT out: the
        # two turns of the task (write_file, then Done.) and, with no -m, gemini's own routing call.
        calls = [r for r in standin.requests if "generatecontent" in r.path.lower()]
        tokens_in, tokens_out = len(calls) * GEMINI_IN, len(calls) * GEMINI_OUT
        assert (result["stats"]["input_tokens"], result["stats"]["output_tokens"]) == (tokens_in, tokens_out), why
        assert run.outcome.tokens_in == tokens_in, why
        assert run.outcome.tokens_out == tokens_out, why
        expected_cost = (tokens_in * GEMINI_PRICE_IN + tokens_out * GEMINI_PRICE_OUT) / 1_000_000
        assert run.outcome.cost_usd == pytest.approx(expected_cost), why
        assert run.outcome.session_id == init["session_id"], why
        assert run.outcome.summary and "Done." in run.outcome.summary, why

        turns = [r for r in calls if ":streamGenerateContent" in r.path]
        assert len(turns) >= 2, why
        assert all(r.path.startswith("/v1beta/models/") and r.path.endswith("?alt=sse") for r in turns), why
        assert all(r.headers.get("x-goog-api-key") == GEMINI_KEY for r in calls), why
        sent = json.dumps(turns[0].body["contents"])
        assert "notes/gemini.txt" in sent, why
        assert COUNCIL_CONTEXT[:60] in sent, f"the council context did not reach the model\n{why}"
        if check:
            assert CHECK in sent, f"the check command did not reach the model\n{why}"
        if model:
            assert calls == turns and all(f"/models/{model}:" in r.path for r in turns), \
                f"with -m {model} every call should go to that model, with no routing call\n{why}"
        assert not standin.unknown, f"gemini called routes the stand-in does not know\n{why}"


async def test_claude_rejected_key_is_an_auth_error(worktree: Path, home: Path) -> None:
    target = worktree / "notes" / "claude.txt"
    with ModelStandin(str(target), "never\n", fail_status=401) as standin:
        run = await drive(claude_adapter(standin, home), Job(prompt="Create notes/claude.txt", worktree=worktree,
                                                             timeout_s=TIMEOUT_S))
        why = run.describe(standin)
        print(why)
        assert not target.exists(), why
        assert run.code != 0, why
        assert not run.outcome.ok and run.outcome.error is not None, why
        assert run.outcome.error.kind == ErrorKind.auth, why
        assert any(r.answer.startswith("HTTP 401") for r in standin.requests), why


async def test_gemini_refused_key_is_an_auth_error(worktree: Path, home: Path) -> None:
    target = worktree / "notes" / "gemini.txt"
    with ModelStandin(str(target), "never\n", fail_status=403) as standin:
        run = await drive(gemini_adapter(standin, home, "gemini-2.5-pro"),
                          Job(prompt="Create notes/gemini.txt", worktree=worktree, timeout_s=TIMEOUT_S))
        why = run.describe(standin)
        print(why)
        assert not target.exists(), why
        assert run.code != 0, why
        assert not run.outcome.ok and run.outcome.error is not None, why
        assert run.outcome.error.kind == ErrorKind.auth, why
        assert any("HTTP 403" in r.answer for r in standin.requests), why


def test_pinned_versions_are_installed(home: Path) -> None:
    """The binaries in node_modules are the versions package.json pins (a stale install fails here)."""
    (home / ".gemini").mkdir()
    (home / ".gemini" / "settings.json").write_text(json.dumps(GEMINI_SETTINGS))
    env = {**base_environ(home), **CLAUDE_QUIET_ENV}
    for name, package in (("claude", "@anthropic-ai/claude-code"), ("gemini", "@google/gemini-cli")):
        exe = cli_path(name)
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL, env=env).stdout
        assert PINNED[package] in out, f"{name} --version printed {out!r}; package.json pins {PINNED[package]}"
