"""What the fake Auto-Claude's two programs share, after the real one's source (v2.7.5, apps/backend).

The fake behaves like the real one wherever the council depends on it:
- auth as core/auth.py: CLAUDE_CODE_OAUTH_TOKEN, ANTHROPIC_AUTH_TOKEN, then CLAUDE_CONFIG_DIR's
  credentials file (only when CLAUDE_CONFIG_DIR is set), never ANTHROPIC_API_KEY; apps/backend/.env
  is loaded first (python-dotenv: it does not override the environment);
- the project's `.auto-claude/` as init.py: made on first use, and then (or while
  `.auto-claude/.gitignore_checked` is missing) its entries appended to .gitignore and committed;
- bookkeeping files at the project root (.claude_settings.json, .auto-claude-security.json,
  .auto-claude-status).

Words in the task choose a failure: SPEC-FAIL, SPEC-401, BUILD-401, BUILD-CRASH, UNFINISHED,
QA-REJECT, QA-NOSIGNOFF. With FAKE_AC_LOG set, every program start and every agent session is
appended to that file as one JSON line, so tests can count them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BACKEND = Path(__file__).resolve().parent
GITIGNORE_ENTRIES = [".auto-claude/", ".auto-claude-security.json", ".auto-claude-status", ".claude_settings.json",
                     ".worktrees/", ".security-key", "logs/security/"]
NOT_LOGGED_IN = "Not logged in · Please run /login"


def record(event: str, **data) -> None:
    if "FAKE_AC_LOG" not in os.environ:
        return
    stdin = "" if sys.stdin is None or sys.stdin.isatty() or event == "session" else sys.stdin.read()
    with open(os.environ["FAKE_AC_LOG"], "a") as f:
        f.write(json.dumps({"event": event, "argv": sys.argv[1:], "cwd": os.getcwd(), "stdin": stdin,
                            "env": dict(os.environ), **data}) + "\n")


def load_dotenv() -> None:
    env_file = BACKEND / ".env"
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() and not line.lstrip().startswith("#"):
                os.environ.setdefault(key.strip(), value.strip())


def get_auth_token() -> str | None:
    for var in ("CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN"):
        if os.environ.get(var):
            return os.environ[var]
    config_dir = os.environ.get("CLAUDE_CONFIG_DIR")
    if config_dir:
        for name in (".credentials.json", "credentials.json"):
            try:
                data = json.loads((Path(config_dir).expanduser() / name).read_text())
            except (OSError, ValueError):
                continue
            token = (data.get("claudeAiOauth") or data.get("oauthAccount") or {}).get("accessToken")
            if token and token.startswith(("sk-ant-oat01-", "enc:")):
                return token
    return None  # the keychain / Secret Service is never there for the fake


def init_auto_claude_dir(project_dir: Path) -> Path:
    """init.py: make .auto-claude/ and, on first use, add its entries to .gitignore and commit that."""
    auto_claude_dir = project_dir / ".auto-claude"
    created = not auto_claude_dir.exists()
    auto_claude_dir.mkdir(parents=True, exist_ok=True)
    marker = auto_claude_dir / ".gitignore_checked"
    if created or not marker.exists():
        gitignore = project_dir / ".gitignore"
        content = gitignore.read_text() if gitignore.exists() else ""
        lines = [line.strip().rstrip("/") for line in content.splitlines()]
        missing = [e for e in GITIGNORE_ENTRIES if e.rstrip("/") not in lines]
        if missing:
            if content and not content.endswith("\n"):
                content += "\n"
            content += "\n# Auto Claude generated files\n" + "".join(e + "\n" for e in missing)
            gitignore.write_text(content)
            git(project_dir, "add", ".gitignore")
            git(project_dir, "commit", ".gitignore", "-m", "chore: add auto-claude entries to .gitignore")
        if not created:
            marker.touch()
    return auto_claude_dir


def git(cwd: Path, *args: str) -> bool:
    env = {**os.environ, "LC_ALL": "C"}
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, env=env).returncode == 0


def write_bookkeeping(project_dir: Path, *names: str) -> None:
    """core/client.py writes .claude_settings.json for every agent session, the project analyzer
    .auto-claude-security.json, ui/status.py .auto-claude-status: all at the project root."""
    for name in names:
        (project_dir / name).write_text(json.dumps({"written_by": "fake auto-claude", "file": name}) + "\n")


def box(lines: list[str], title: str = "") -> str:
    """ui/boxes.py with ENABLE_FANCY_UI=false: separators and indented lines."""
    sep = "=" * 70
    return "\n".join([sep, *([f"  {title}", sep] if title else []), *(f"  {line}" for line in lines), sep])
