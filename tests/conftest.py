"""Shared test fixtures: real git repos in tmp dirs, an isolated HOME and CLI_COUNCIL_HOME per test,
and engines configured with fake `command` agents."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import parse_config
from engine.engine import Engine

FAKES = Path(__file__).parent / "fakes"
FAKE_AGENT = str(FAKES / "agent.py")


def git(cwd, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def fake(*args: str) -> dict:
    """A `command` agent table running tests/fakes/agent.py with these arguments (prompt last)."""
    return {"kind": "command", "argv": [sys.executable, FAKE_AGENT, *args, "{prompt}"]}


def stop_server(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM a server subprocess (it stops its attempts and exits), KILL it if it does not within grace_s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pid_running(pid: int) -> bool:
    """Alive and not a zombie waiting for a slow init to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    home = tmp_path / "userhome"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CLI_COUNCIL_HOME", str(tmp_path / "council"))
    monkeypatch.setenv("CLI_COUNCIL_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
    (home / ".gitconfig").write_text("[user]\n\tname = Test User\n\temail = test@example.com\n"
                                     "[init]\n\tdefaultBranch = main\n")
    yield


@pytest.fixture
def repo(tmp_path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("# demo\n")
    (path / "app.py").write_text("def add(a, b):\n    return a - b\n")
    git(path, "add", ".")
    git(path, "commit", "-qm", "initial")
    return path


@pytest.fixture
def council_home(tmp_path) -> Path:
    return tmp_path / "council"


@pytest.fixture
def make_engine(council_home):
    """make_engine({"name": table, ...}, **engine_settings) -> an Engine to `async with`."""
    def make(agents: dict, **engine_settings) -> Engine:
        cfg = parse_config({"agents": agents, "engine": {"kill_grace_s": 1, **engine_settings}})
        return Engine(cfg, home=council_home, environ=dict(os.environ))
    return make
