"""Generated repos for the benchmark: made once per run with `git fast-import` (seconds even for
20,000 files), then cloned fresh for every sample so no sample inherits another's worktrees."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_repo(path: Path, files: int, env: dict[str, str]) -> Path:
    """A repo at `path` with one commit on main holding `files` small Python files in nested dirs."""
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True, env=env)
    chunks = []
    for i in range(files):
        body = f"# module {i}\n" + "value = %d\n" % i * (8 + i % 24)
        data = body.encode()
        chunks.append(b"blob\nmark :%d\ndata %d\n%s\n" % (i + 1, len(data), data))
    msg = b"generated"
    chunks.append(b"commit refs/heads/main\ncommitter Bench <bench@example.com> 1700000000 +0000\n"
                  b"data %d\n%s\n" % (len(msg), msg))
    for i in range(files):
        chunks.append(b"M 100644 :%d %s\n" % (i + 1, file_path(i).encode()))
    chunks.append(b"\n")
    subprocess.run(["git", "fast-import", "--quiet"], cwd=path, input=b"".join(chunks), check=True, env=env)
    subprocess.run(["git", "reset", "-q", "--hard", "main"], cwd=path, check=True, env=env)
    return path


def file_path(i: int) -> str:
    return f"src/pkg{i % 40}/sub{i % 7}/mod{i}.py"


def fresh_clone(src: Path, dst: Path, env: dict[str, str]) -> Path:
    """A new clone (objects hardlinked, as a local clone does): a repo with no worktrees yet."""
    subprocess.run(["git", "clone", "-q", str(src), str(dst)], check=True, env=env)
    return dst
