"""Git as an async subprocess: nothing blocks the event loop, and errors carry git's own words.

Every git the server runs goes through here, and runs on the server's behalf in a repo an agent
could write to: an agent can drop a script into `<git-common-dir>/hooks` or set `core.hooksPath`
or `core.fsmonitor` in the repo's config, and the server's next `worktree add`, `status` or
`merge` would run it. So hooks and the fsmonitor program are switched off on the command line
(which beats every config file), and git gets the same allow-listed environment as agents, never
the server's API keys and tokens. Programs the user configures for content (clean/smudge filters
such as git-lfs, merge drivers) still run, as they must for a correct checkout, with that same
environment: nothing an agent could not already do itself. The one exception is opt-in: with
`[merge] run_hooks = true` the merge in the user's own checkout runs the user's hooks (`hooks=True`).

Commits the council makes for itself (attempt branches, throwaway merge helpers) carry the council's
identity; commits that land on a branch of the user's carry the user's (`user_identity`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import anyio

from adapters.base import allowed_env

# Said to every git the server runs; `-c` reaches the git processes git itself starts too.
NO_FSMONITOR = ("-c", "core.fsmonitor=false")
NO_HOOKS = ("-c", "core.hooksPath=/dev/null", *NO_FSMONITOR)
# A fixed identity for the commits the council makes itself.
COUNCIL_IDENTITY = ("-c", "user.name=cli-council", "-c", "user.email=cli-council@localhost",
                    "-c", "commit.gpgsign=false")
COUNCIL_ENV = {f"GIT_{role}_{part}": value for role in ("AUTHOR", "COMMITTER")
               for part, value in (("NAME", "cli-council"), ("EMAIL", "cli-council@localhost"))}
# Where git and its config files are (tests and relocated installs set these). Left out on purpose:
# GIT_CONFIG_COUNT/KEY_n/VALUE_n and GIT_CONFIG_PARAMETERS (config injected through the environment
# may carry credentials, e.g. http.extraHeader), GIT_DIR/GIT_WORK_TREE/GIT_INDEX_FILE (would point
# every command at another repo), SSH_AUTH_SOCK/GIT_SSH_COMMAND/GIT_ASKPASS (the server's git never
# talks to a remote: it adds worktrees, commits, merges locally and moves refs).
_GIT_PASS = ("GIT_EXEC_PATH", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM", "GIT_CONFIG_NOSYSTEM",
             "GIT_CEILING_DIRECTORIES")
_GIT_FIXED = {"GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
_IDENT = re.compile(r"(.+) <(.*)> \d+ [+-]\d{4}")
_OID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_NICE = ("nice", "-n", "19") if shutil.which("nice") else ()


def is_object_id(text: str) -> bool:
    """Whether `text` is a full object id (SHA-1 or SHA-256), as git writes one."""
    return bool(_OID.fullmatch(text))


def git_env(environ: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a git the server runs: agents' allow-list, git's own locations, fixed settings."""
    source = dict(os.environ if environ is None else environ)
    own = {k: v for k, v in source.items() if k in _GIT_PASS}
    return {**allowed_env(source), **own, **_GIT_FIXED, **extra}


class GitError(RuntimeError):
    def __init__(self, args: list[str], code: int, stderr: str):
        self.args_ = args
        self.code = code
        self.stderr = stderr.strip()
        super().__init__(f"git {' '.join(args)} failed ({code}): {self.stderr}")


async def _run(cwd: str | Path, args: tuple[str, ...], input: bytes | None = None,
               env: dict[str, str] | None = None, hooks: bool = False, idle: bool = False):
    return await anyio.run_process([*(_NICE if idle else ()), "git", *(NO_FSMONITOR if hooks else NO_HOOKS), *args],
                                   cwd=str(cwd), input=input, check=False, env=git_env(**(env or {})))


async def git(cwd: str | Path, *args: str, check: bool = True, input: bytes | None = None,
              env: dict[str, str] | None = None, hooks: bool = False, idle: bool = False) -> str:
    """Run git in `cwd` and return stdout (stripped of the final newline). `env` adds variables;
    `hooks=True` lets this one command run the repo's hooks (only ever on the user's say-so);
    `idle=True` runs it at the lowest CPU priority (`nice`), behind the agents it should not delay."""
    result = await _run(cwd, args, input, env, hooks, idle)
    if check and result.returncode != 0:
        raise GitError(list(args), result.returncode, result.stderr.decode(errors="replace"))
    return result.stdout.decode(errors="replace").rstrip("\n")


async def git_ok(cwd: str | Path, *args: str) -> bool:
    """True when git exits 0 (for questions like `rev-parse --verify`)."""
    return (await _run(cwd, args)).returncode == 0


async def user_identity(cwd: str | Path) -> dict[str, str] | None:
    """The author and committer the user's own `git commit` in `cwd` would record (user.*, author.*,
    committer.* from the repo's, global and system config), as GIT_AUTHOR_* / GIT_COMMITTER_*
    variables; None when none is configured. git's guess from the host (root@host.(none)) is never
    taken, and the server's own GIT_AUTHOR_* variables never reach git (allow-listed environment)."""
    roles = ("AUTHOR", "COMMITTER")
    answers = await concurrently(*(lambda role=role: git(cwd, "-c", "user.useConfigOnly=true", "var",
                                                         f"GIT_{role}_IDENT", check=False) for role in roles))
    env = {}
    for role, answer in zip(roles, answers):
        ident = _IDENT.fullmatch(answer)
        if not ident:
            return None
        env[f"GIT_{role}_NAME"], env[f"GIT_{role}_EMAIL"] = ident.groups()
    return env


async def resolve_commit(cwd: str | Path, rev: str) -> str | None:
    """The commit `rev` names, or None. A rev starting with '-' is never read as an option."""
    sha = await git(cwd, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}", check=False)
    return sha or None


async def resolve_many(cwd: str | Path, *revs: str) -> list[str | None]:
    """The object each rev names (`x^{commit}`, `x^{tree}` peel as in rev-parse), or None, from one
    git process instead of one per rev: they sit on the path of every merge. A rev is read whole from
    its own line, never as an option; one holding a newline or NUL names nothing."""
    ok = [r for r in revs if r and "\n" not in r and "\0" not in r]
    found: dict[str, str | None] = {}
    if ok:
        out = await git(cwd, "cat-file", "--batch-check=%(objectname)", input="".join(f"{r}\n" for r in ok).encode())
        for rev, line in zip(ok, out.split("\n")):
            found[rev] = line if _OID.fullmatch(line) else None
    return [found.get(r) for r in revs]


async def commits_and_trees(cwd: str | Path, *revs: str) -> list[tuple[str, str] | None]:
    """The commit each rev names and that commit's tree, or None, from one git process: the tree is
    read from the commit object itself, so a ref that moves meanwhile can't pair one commit with
    another's tree. Revs are read as in resolve_many."""
    ok = [r for r in revs if r and "\n" not in r and "\0" not in r]
    found: dict[str, tuple[str, str] | None] = {}
    if ok:
        out = (await _run(cwd, ("cat-file", "--batch"), "".join(f"{r}^{{commit}}\n" for r in ok).encode())).stdout
        at = 0
        for rev in ok:
            end = out.index(b"\n", at)
            header = out[at:end].split()
            at = end + 1
            if len(header) == 3 and header[1] == b"commit" and _OID.fullmatch(header[0].decode()):
                body = out[at:at + int(header[2])]
                at += int(header[2]) + 1
                tree = body.split(b"\n", 1)[0].removeprefix(b"tree ").decode()
                found[rev] = (header[0].decode(), tree) if _OID.fullmatch(tree) else None
            else:
                found[rev] = None  # "<rev> missing" (or ambiguous): a line with no object after it
    return [found.get(r) for r in revs]


async def concurrently(*calls: Callable[[], Awaitable]) -> list:
    """Each call's result, in order, the calls run at once (independent git questions: each is a
    process start, so waiting for one before asking the next only adds their latencies). A failing
    call's exception is raised as itself (the first in call order), once all have ended."""
    results: list = [None] * len(calls)
    errors: list[tuple[int, Exception]] = []

    async def one(i: int) -> None:
        try:
            results[i] = await calls[i]()
        except Exception as e:
            errors.append((i, e))

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(one, i)
    if errors:
        raise min(errors, key=lambda pair: pair[0])[1]
    return results


async def changes(cwd: str | Path, a: str, b: str) -> list[tuple[str, str, int | None, int | None]]:
    """(status letter, path, insertions, deletions) of every file changed between two commits (or, with
    a="--cached", between commit b and the index), from one diff; a binary file's counts are None. No
    textconv program runs (an agent can configure one) and paths are from the top."""
    out = await git(cwd, "diff", "--raw", "--numstat", "-z", "--no-renames", "--no-relative", "--no-textconv", a, b)
    fields = out.split("\0")
    status, i = [], 0
    while i + 1 < len(fields) and fields[i].startswith(":"):  # the raw records: ":<modes> <oids> <status>", path
        status.append(fields[i].rsplit(" ", 1)[-1])
        i += 2
    counts = [rec.split("\t", 2) for rec in fields[i:] if rec]  # then the numstat ones, in the same order
    return [(letter, path, int(added) if added.isdigit() else None, int(deleted) if deleted.isdigit() else None)
            for letter, (added, deleted, path) in zip(status, counts)]


async def numstat(cwd: str | Path, a: str, b: str) -> list[tuple[str, int | None, int | None]]:
    """(path, insertions, deletions) of every file changed, as in `changes`."""
    return [(path, ins, dels) for _, path, ins, dels in await changes(cwd, a, b)]


async def diff_stat(cwd: str | Path, a: str, b: str) -> tuple[list[str], int, int]:
    """Files changed, insertions, deletions between two commits (binary files count as changed)."""
    return summed(await changes(cwd, a, b))


def summed(found: list[tuple[str, str, int | None, int | None]]) -> tuple[list[str], int, int]:
    """`changes` as files changed, insertions, deletions."""
    return [path for _, path, _, _ in found], sum(i or 0 for *_, i, _ in found), sum(d or 0 for *_, d in found)
