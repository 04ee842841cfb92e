"""A byte-level picture of a repo and a state dir, to prove that a refused call changed nothing.

The repo: every ref (for-each-ref, HEAD, packed-refs), the bytes of .git/index and .git/config,
every file under .git/hooks, and the working tree's files (tracked or not) by content hash.
The state dir (CLI_COUNCIL_HOME): the rows of council.db's tasks/logs/procs tables, read through a
read-only connection, and the files under worktrees/.
"""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
from pathlib import Path

TABLES = ("tasks", "logs", "procs")


def _files(root: Path, skip: str | None = None) -> dict[str, str]:
    out = {}
    if not root.is_dir():
        return out
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if skip and (rel == skip or rel.startswith(skip + "/")):
            continue
        if p.is_symlink():
            out[rel] = "link:" + str(p.readlink())
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout


def _bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def repo_state(repo: Path) -> dict:
    gitdir = repo / ".git"
    return {
        "refs": _git(repo, "for-each-ref", "--format=%(refname) %(objectname)"),
        "HEAD": _bytes(gitdir / "HEAD"),
        "packed-refs": _bytes(gitdir / "packed-refs"),
        "index": hashlib.sha256(_bytes(gitdir / "index") or b"").hexdigest(),
        "config": _bytes(gitdir / "config"),
        "hooks": _files(gitdir / "hooks"),
        "tree": _files(repo, skip=".git"),
    }


def home_state(home: Path) -> dict:
    db = home / "council.db"
    rows: dict[str, list] = {t: [] for t in TABLES}
    if db.exists():
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            for t in TABLES:
                try:
                    rows[t] = sorted(map(repr, conn.execute(f"SELECT * FROM {t}").fetchall()))
                except sqlite3.OperationalError:  # table not created yet
                    pass
        finally:
            conn.close()
    worktrees = home / "worktrees"
    return {"db": rows, "worktrees": sorted(p.relative_to(worktrees).as_posix() for p in worktrees.rglob("*"))
            if worktrees.is_dir() else []}


def snapshot(home: Path, *repos: Path) -> dict:
    return {"home": home_state(home), **{str(r): repo_state(r) for r in repos}}


def changes(before: dict, after: dict, path: str = "") -> list[str]:
    """What differs, as short readable paths (for an assertion message)."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for k in sorted(set(before) | set(after), key=str):
            out += changes(before.get(k), after.get(k), f"{path}/{k}")
        return out
    if isinstance(before, list) and isinstance(after, list):
        added = [x for x in after if x not in before][:3]
        gone = [x for x in before if x not in after][:3]
        return [f"{path}: +{str(added)[:300]} -{str(gone)[:300]}"] if (added or gone or before != after) else []
    return [] if before == after else [f"{path}: {str(before)[:120]!r} -> {str(after)[:120]!r}"]


def assert_unchanged(before: dict, after: dict) -> None:
    diff = changes(before, after)
    assert not diff, "a refused call changed state:\n  " + "\n  ".join(diff[:12])
