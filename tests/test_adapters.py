"""The claude and gemini adapters against recorded runs of the real CLIs.

Every recorded fixture (tests/fakes/recorded) (and every synthetic one in
tests/fakes/data) is replayed through the parser; the same runs are also replayed as real
processes by tests/fakes/replay, spawned with the adapter's own invocation.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from adapters import KINDS, make_adapter
from adapters.base import COUNCIL_CONTEXT, AgentSpec, ErrorKind, Job, Outcome

REPO = Path(__file__).resolve().parents[1]
RECORDED = REPO / "tests" / "fakes" / "recorded"
SYNTHETIC = REPO / "tests" / "fakes" / "data"
REPLAY = REPO / "tests" / "fakes" / "replay"
ENVIRON = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent-home", "LANG": "C.UTF-8",
           "ANTHROPIC_API_KEY": "sk-ant-test-key-1234", "GEMINI_API_KEY": "AIza-test-key-5678",
           "FOO_SECRET_TOKEN": "must-not-leak-9999", "AWS_SECRET_ACCESS_KEY": "aws-must-not-leak"}

# name: (ok, error kind, cost, tokens in, tokens out, session id, text in summary, text in error message)
EXPECTED = {
    "claude-success": (True, None, 0.0141, 2400, 84, "33f10894-2508-4607-a4ab-55f2726bfd60",
                       "Done: the requested change is in place.", None),
    "claude-auth-401": (False, ErrorKind.auth, 0.0, 0, 0, "c562fe1d-47de-4f3e-b0e4-5edfd25d5e66",
                        "Invalid API key", "claude login"),
    "claude-connection-refused": (False, ErrorKind.network, 0.0, 0, 0, "74f7a430-3f07-4927-9a1e-8b871a437ac6",
                                  "Unable to connect", "ConnectionRefused"),
    "claude-max-turns": (False, ErrorKind.crash, 0.00705, 1200, 42, "bc379b42-5701-4b4c-9276-aefa652cbc7f",
                         None, "turn limit"),
    "claude-permission-denied": (False, ErrorKind.crash, 0.0141, 2400, 84, "489b6068-911a-40e3-88a7-e491c6e70ff7",
                                 "Done", "refused permission for Write notes/claude.txt"),
    "gemini-success": (True, None, 0.0029, 2000, 40, "7bb7d609-c8b1-41fc-83ea-160d435d5bf5",
                       "Done: the requested change is in place.", None),
    "gemini-403": (False, ErrorKind.auth, 0.0, 0, 0, "d150a2df-f7af-4257-99bb-d07bbce48f00", None, "GEMINI_API_KEY"),
    "gemini-untrusted": (False, ErrorKind.crash, None, None, None, None, None, "GEMINI_CLI_TRUST_WORKSPACE"),
    # synthetic (tests/fakes/data)
    "claude-not-logged-in": (False, ErrorKind.auth, 0.0, 0, 0, "0ed88cd1-5a7e-4c1e-9a51-0c0ffee00001",
                             "Not logged in", "claude login"),
    "claude-rate-limit": (False, ErrorKind.rate_limit, 0.0, 0, 0, "0ed88cd1-5a7e-4c1e-9a51-0c0ffee00001",
                          "429", "retries it later"),
    "claude-max-budget": (False, ErrorKind.crash, 0.0123, 5000, 120, "0ed88cd1-5a7e-4c1e-9a51-0c0ffee00001",
                          None, "budget"),
    "claude-no-verbose": (False, ErrorKind.crash, None, None, None, None, None, "requires --verbose"),
    "claude-bash-denied": (True, None, 0.02, 3610, 90, "0ed88cd1-5a7e-4c1e-9a51-0c0ffee00001",
                           "refused: Bash git push origin HEAD", None),
    "gemini-auth-41": (False, ErrorKind.auth, None, None, None, None, None, "Please set an Auth method"),
    "gemini-turn-limit-53": (False, ErrorKind.crash, 0.00725, 5000, 100, "7bb7d609-c8b1-41fc-83ea-000000000053",
                             "Working on it.", "maxSessionTurns"),
    "gemini-rate-limit": (False, ErrorKind.rate_limit, 0.0, 0, 0, "7bb7d609-c8b1-41fc-83ea-000000000053",
                          None, "RESOURCE_EXHAUSTED"),
}


def fixture_names(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.exit")) if directory.is_dir() else []


def spec(kind: str, **kw) -> AgentSpec:
    return AgentSpec(name=kw.pop("name", kind), kind=kind, **kw)


def job_for(worktree: Path, prompt: str = "Create notes/claude.txt", **kw) -> Job:
    return Job(prompt=prompt, worktree=worktree, timeout_s=30, **kw)


def replay_lines(parser, directory: Path, name: str) -> int:
    for stream in ("stdout", "stderr"):
        for line in (directory / f"{name}.{stream}").read_text().splitlines():
            parser.feed(stream, line)
    return int((directory / f"{name}.exit").read_text())


def check_expected(name: str, outcome: Outcome) -> None:
    ok, kind, cost, tokens_in, tokens_out, session, summary, message = EXPECTED[name]
    assert outcome.ok is ok, outcome
    assert (outcome.error.kind if outcome.error else None) == kind, outcome
    assert outcome.cost_usd == (pytest.approx(cost) if cost is not None else None), outcome
    assert (outcome.tokens_in, outcome.tokens_out, outcome.session_id) == (tokens_in, tokens_out, session), outcome
    if summary:
        assert summary in (outcome.summary or ""), outcome
    if message:
        assert message in outcome.error.message, outcome


def adapter_for(name: str, **kw):
    kind = name.split("-")[0]
    return make_adapter(spec(kind, **kw), ENVIRON)


@pytest.mark.parametrize("name", fixture_names(RECORDED))
def test_recorded_fixture(name: str) -> None:
    assert name in EXPECTED, f"new recorded fixture {name!r}: add its expected outcome to EXPECTED"
    adapter = adapter_for(name)
    parser = adapter.parser(job_for(Path("/home/dev/project")))
    check_expected(name, parser.finish(replay_lines(parser, RECORDED, name)))


@pytest.mark.parametrize("name", fixture_names(SYNTHETIC))
def test_synthetic_fixture(name: str) -> None:
    assert name in EXPECTED, f"synthetic fixture {name!r} has no expected outcome"
    adapter = adapter_for(name)
    parser = adapter.parser(job_for(Path("/w"), budget_usd=0.01))
    check_expected(name, parser.finish(replay_lines(parser, SYNTHETIC, name)))


def run_real(adapter, job: Job) -> tuple[Outcome, list[str]]:
    """Spawn the adapter's invocation as the engine would (argv, cwd, exact env, stdin) and parse it."""
    inv = adapter.invocation(job)
    done = subprocess.run(inv.argv, cwd=inv.cwd, env=inv.env, input=inv.stdin,
                          stdin=None if inv.stdin is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=60)
    parser = adapter.parser(job)
    notes = []
    for stream, data in (("stdout", done.stdout), ("stderr", done.stderr)):
        for line in data.decode().splitlines():
            notes.append(parser.feed(stream, line))
    return parser.finish(done.returncode), [n for n in notes if n]


@pytest.mark.parametrize("kind", ["claude", "gemini"])
def test_real_process_writes_file_and_gets_exact_argv_and_env(kind: str, tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    worktree = tmp_path / "wt"
    worktree.mkdir()
    prompt = 'Fix "it"; $(touch pwned) `id` && rm -rf / \n second line'
    adapter = make_adapter(spec(kind, command=[str(REPLAY)], model="m-1", env={
        "FAKE_FIXTURE": f"{kind}-success", "FAKE_WRITE": f"notes/{kind}.txt", "FAKE_RECORD": str(record)}), ENVIRON)
    job = job_for(worktree, prompt)
    outcome, notes = run_real(adapter, job)
    check_expected(f"{kind}-success", outcome)
    assert (worktree / "notes" / f"{kind}.txt").read_text() == "hello\n"
    assert not (worktree / "pwned").exists()
    assert any("notes/" in n for n in notes), notes
    seen = json.loads(record.read_text())
    argv = seen["argv"][1:]
    assert argv[0] == "-p"
    assert seen["cwd"] == str(worktree)
    if kind == "claude":
        assert argv[1] == prompt
        assert argv[argv.index("--append-system-prompt") + 1] == COUNCIL_CONTEXT
        assert argv[argv.index("--model") + 1] == "m-1"
        assert "ANTHROPIC_API_KEY" in seen["env"] and "GEMINI_API_KEY" not in seen["env"]
    else:
        assert argv[1].startswith(COUNCIL_CONTEXT) and argv[1].endswith(prompt)
        assert argv[argv.index("-m") + 1] == "m-1"
        assert "GEMINI_API_KEY" in seen["env"] and "ANTHROPIC_API_KEY" not in seen["env"]
    assert seen["stdin"] == ""
    assert "FOO_SECRET_TOKEN" not in seen["env"] and "AWS_SECRET_ACCESS_KEY" not in seen["env"]
    assert seen["env"]["FAKE_FIXTURE"] == f"{kind}-success"  # spec.env is added


@pytest.mark.parametrize("name", ["gemini-auth-41", "gemini-turn-limit-53", "claude-no-verbose"])
def test_real_process_failures(name: str, tmp_path: Path) -> None:
    adapter = adapter_for(name, command=[str(REPLAY), name])
    outcome, _ = run_real(adapter, job_for(tmp_path))
    check_expected(name, outcome)


def test_claude_argv_flags() -> None:
    adapter = make_adapter(spec("claude"), ENVIRON)
    argv = adapter.invocation(job_for(Path("/w"), check="pytest -q", budget_usd=1.5)).argv
    assert argv[:3] == ["claude", "-p", "Create notes/claude.txt"]
    assert argv[argv.index("--output-format") + 1] == "stream-json" and "--verbose" in argv
    assert argv[argv.index("--permission-mode") + 1] == "acceptEdits"
    assert argv[argv.index("--max-budget-usd") + 1] == "1.5"
    assert "--model" not in argv
    ctx = argv[argv.index("--append-system-prompt") + 1]
    assert ctx.startswith(COUNCIL_CONTEXT) and "pytest -q" in ctx
    # the variadic --allowedTools list is closed by the next flag, never swallowing a value
    tools = argv[argv.index("--allowedTools") + 1: argv.index("--append-system-prompt")]
    assert tools == ["Bash(pytest -q)", "Bash(pytest -q:*)"]
    dashed = adapter.invocation(job_for(Path("/w"), "--help me")).argv
    assert dashed[2].strip() == "--help me" and not dashed[2].startswith("-")


def test_gemini_argv_flags() -> None:
    argv = make_adapter(spec("gemini"), ENVIRON).invocation(job_for(Path("/w"), "do X")).argv
    assert argv == ["gemini", "-p", argv[2], "--skip-trust", "--approval-mode", "yolo", "--output-format", "stream-json"]
    assert argv[2].index(COUNCIL_CONTEXT) < argv[2].index("do X")


def test_env_allow_list_secrets_and_spec_env() -> None:
    adapter = make_adapter(spec("claude", env={"CUSTOM": "1", "ANTHROPIC_AUTH_TOKEN": "tok-abcdef"}), ENVIRON)
    inv = adapter.invocation(job_for(Path("/w")))
    assert "FOO_SECRET_TOKEN" not in inv.env and "must-not-leak-9999" not in inv.env.values()
    assert inv.env["CUSTOM"] == "1" and inv.env["CLAUDE_CODE_MAX_RETRIES"] == "2"
    assert {"sk-ant-test-key-1234", "tok-abcdef"} <= set(inv.secrets)
    assert "must-not-leak-9999" not in inv.secrets
    user_retries = make_adapter(spec("claude"), {**ENVIRON, "CLAUDE_CODE_MAX_RETRIES": "7"})
    assert user_retries.invocation(job_for(Path("/w"))).env["CLAUDE_CODE_MAX_RETRIES"] == "7"
    gem = make_adapter(spec("gemini"), ENVIRON).invocation(job_for(Path("/w")))
    assert gem.secrets == ["AIza-test-key-5678"] and "ANTHROPIC_API_KEY" not in gem.env


@pytest.mark.parametrize("env, extra, cost", [
    ({"ANTHROPIC_BASE_URL": "http://127.0.0.1:11434", "ANTHROPIC_AUTH_TOKEN": "ollama"}, {}, 0.0),
    ({}, {"local": True}, 0.0),
    ({"ANTHROPIC_BASE_URL": "http://127.0.0.1:9000"}, {}, 0.0141),
])
def test_claude_cost_is_zero_on_a_local_model(env: dict, extra: dict, cost: float) -> None:
    adapter = make_adapter(spec("claude", env=env, **extra), ENVIRON)
    parser = adapter.parser(job_for(Path("/home/dev/project")))
    outcome = parser.finish(replay_lines(parser, RECORDED, "claude-success"))
    assert outcome.ok and outcome.cost_usd == pytest.approx(cost)
    assert "ollama" not in adapter.invocation(job_for(Path("/w"))).secrets


def test_gemini_prices_from_extras() -> None:
    adapter = make_adapter(spec("gemini", price_in_per_mtok=2.0, price_out_per_mtok=20.0), ENVIRON)
    parser = adapter.parser(job_for(Path("/w")))
    outcome = parser.finish(replay_lines(parser, SYNTHETIC, "gemini-turn-limit-53"))
    assert outcome.cost_usd == pytest.approx((5000 * 2.0 + 100 * 20.0) / 1e6)


def test_gemini_prices_each_model_of_an_auto_routed_run() -> None:
    """Without -m, gemini's result counts a classifier model's tokens with the main model's
    (seen with the real 0.61.0 in the contract tier); `prices` prices each one on its own."""
    adapter = make_adapter(spec("gemini", prices={"lite": [0.1, 0.4]}, price_in_per_mtok=2.0,
                                price_out_per_mtok=20.0), ENVIRON)
    parser = adapter.parser(job_for(Path("/w")))
    models = {"lite": {"input_tokens": 1000, "output_tokens": 20}, "flash": {"input_tokens": 2000, "output_tokens": 40}}
    parser.feed("stdout", json.dumps({"type": "result", "status": "success", "stats": {
        "input_tokens": 3000, "output_tokens": 60, "models": models}}))
    outcome = parser.finish(0)
    assert outcome.tokens_in == 3000 and outcome.tokens_out == 60
    assert outcome.cost_usd == pytest.approx((1000 * 0.1 + 20 * 0.4 + 2000 * 2.0 + 40 * 20.0) / 1e6)


def fake_cli(directory: Path, name: str, version: str) -> Path:
    exe = directory / name
    exe.write_text(f"#!/bin/sh\necho '{version}'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


@pytest.mark.parametrize("kind, version, shown", [("claude", "2.1.197 (Claude Code)", "2.1.197"),
                                                   ("gemini", "0.61.0", "0.61.0")])
async def test_available(kind: str, version: str, shown: str, tmp_path: Path) -> None:
    exe = fake_cli(tmp_path, kind, version)
    home = tmp_path / "home"
    home.mkdir()
    bare = {"PATH": str(tmp_path), "HOME": str(home)}
    keyed = {**bare, ("ANTHROPIC_API_KEY" if kind == "claude" else "GEMINI_API_KEY"): "k-123456"}

    avail = await make_adapter(spec(kind), keyed).available()
    assert avail.ok and avail.version == shown and str(exe) in avail.message, avail

    if sys.platform != "darwin":
        avail = await make_adapter(spec(kind), bare).available()
        assert not avail.ok and avail.error_kind == ErrorKind.auth
        assert ("claude login" if kind == "claude" else "GEMINI_API_KEY") in avail.message
    creds = home / (".claude/.credentials.json" if kind == "claude" else ".gemini/oauth_creds.json")
    creds.parent.mkdir()
    creds.write_text("{}")
    assert (await make_adapter(spec(kind), bare).available()).ok

    missing = await make_adapter(spec(kind), {**keyed, "PATH": str(tmp_path / "none")}).available()
    assert not missing.ok and missing.error_kind == ErrorKind.not_installed and "command =" in missing.message


def test_kinds_registered() -> None:
    assert {"claude", "gemini", "auto-claude", "ollama", "command"} <= set(KINDS)
    for kind in ("claude", "gemini", "auto-claude", "ollama"):
        assert make_adapter(spec(kind), ENVIRON).kind == kind


def test_claude_falls_back_to_the_last_api_retry_status() -> None:
    parser = make_adapter(spec("claude"), ENVIRON).parser(job_for(Path("/w")))
    parser.feed("stdout", json.dumps({"type": "system", "subtype": "api_retry", "attempt": 2, "max_retries": 2,
                                      "error_status": 529, "error": "overloaded_error"}))
    parser.feed("stdout", json.dumps({"type": "result", "subtype": "success", "is_error": True,
                                      "api_error_status": None, "result": "API Error: something odd",
                                      "session_id": "s-1", "total_cost_usd": 0, "usage": {}}))
    outcome = parser.finish(1)
    assert outcome.error.kind == ErrorKind.rate_limit and outcome.session_id == "s-1"


def test_no_result_line_with_exit_zero_is_invalid_output() -> None:
    for kind in ("claude", "gemini"):
        parser = make_adapter(spec(kind), ENVIRON).parser(job_for(Path("/w")))
        parser.feed("stdout", "some banner that is not JSON")
        assert parser.finish(0).error.kind == ErrorKind.invalid_output
