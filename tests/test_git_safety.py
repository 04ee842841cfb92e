"""The server's own git in a repo an agent could write to: no hook or fsmonitor program ever runs,
and the programs that do run (content filters) never see the server's secrets."""

from __future__ import annotations

import os
import stat
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from engine.cleanup import gc, remove_attempt
from engine.config import ConfigError, parse_config
from engine.engine import Engine
from engine.merge import merge_branch
from engine.models import Attempt, AttemptState, Task, TaskState, now
from engine.worktrees import Worktrees

from conftest import fake, git

HOOKS = ("post-checkout", "post-merge", "reference-transaction", "pre-commit", "prepare-commit-msg",
         "commit-msg", "post-commit", "pre-merge-commit", "post-rewrite", "post-index-change", "pre-auto-gc")
SECRETS = {"ANTHROPIC_API_KEY": "sk-test-anthropic-0123456789", "AWS_SECRET_ACCESS_KEY": "aws-test-secret-4242",
           "GITHUB_TOKEN": "ghp_test_token_777", "CLI_COUNCIL_TOKEN": "council-test-token-31337",
           "SSH_AUTH_SOCK": "/tmp/test-agent-socket-5150",
           # config injected through the environment is not passed on either (it can carry credentials)
           "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
           "GIT_CONFIG_VALUE_0": "Authorization: Bearer env-config-secret-999"}


def script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def arm(repo: Path, marker: Path) -> None:
    """What an agent could leave in the repo: hooks in the common git dir, core.hooksPath and
    core.fsmonitor in its config, each program writing to `marker` when it runs."""
    for name in HOOKS:
        for hooks in (repo / ".git" / "hooks", repo.parent / "agent-hooks"):
            script(hooks / name, f'echo "hook $0" >> {marker}; env >> {marker}')
    script(repo.parent / "fsmonitor", f'echo "fsmonitor" >> {marker}; exit 1')
    git(repo, "config", "core.hooksPath", str(repo.parent / "agent-hooks"))
    git(repo, "config", "core.fsmonitor", str(repo.parent / "fsmonitor"))


async def test_no_hook_or_fsmonitor_runs_in_any_git_the_server_runs(repo, tmp_path):
    marker = tmp_path / "ran.txt"
    git(repo, "branch", "feature")
    base = git(repo, "rev-parse", "main")
    arm(repo, marker)
    root = tmp_path / "council" / "worktrees"
    trees = Worktrees(root)

    wt, branch = await trees.add(str(repo), "t1", "claude", base)  # post-checkout
    (wt / "app.py").write_text("def add(a, b):\n    return a + b\n")
    (wt / "new.txt").write_text("new\n")
    await trees.reset(wt, base)  # reference-transaction, post-checkout?
    (wt / "app.py").write_text("def add(a, b):\n    return a + b\n")
    assert await trees.commit_all(wt, "council t1: claude")  # pre-commit, commit-msg, post-commit...
    wt2, branch2 = await trees.add(str(repo), "t1", "gemini", base)
    (wt2 / "g.txt").write_text("gemini\n")
    assert await trees.commit_all(wt2, "council t1: gemini")
    into_main = await merge_branch(repo, branch=branch, base=base, into="main", message="m", task_id="t1")
    into_feature = await merge_branch(repo, branch=branch2, base=base, into="feature", strategy="merge",
                                      message="m", task_id="t1")
    assert into_main.merged and into_feature.merged  # ff-only in a checkout; a ref transaction
    assert git(repo, "log", "-1", "--format=%an <%ae>", branch2) == "cli-council <cli-council@localhost>"
    await remove_attempt(repo, root=root, worktree=wt, branch=branch, into="main", base=base)
    t = Task(task_id="t1", repo=str(repo), base=base, into="main", prompt="p", timeout_s=60,
             state=TaskState.merged, finished_at=now() - timedelta(days=2), created_at=now() - timedelta(days=2),
             attempts=[Attempt(agent="gemini", state=AttemptState.succeeded, branch=branch2, worktree=str(wt2))])
    report = await gc(root, [t], age_s=3600)
    assert str(wt2) in report.removed and branch2 in report.removed

    assert not marker.exists(), marker.read_text()[:2000]
    # The trap is live: a plain git in the same repo runs the agent's hooks.
    (repo / "x.txt").write_text("x\n")
    git(repo, "add", "x.txt")
    git(repo, "commit", "-qm", "user commit")
    assert "hook " in marker.read_text() and "fsmonitor" in marker.read_text()


async def test_programs_git_runs_get_the_allow_listed_environment(repo, tmp_path, monkeypatch):
    """Filters (git-lfs and the like) must still run for a correct checkout; they see only the
    environment agents see."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    dump = tmp_path / "env.txt"
    (repo / ".gitattributes").write_text("*.txt filter=dump\n")
    (repo / "data.txt").write_text("data\n")
    git(repo, "config", "filter.dump.clean", f"sh -c 'env >> {dump}; cat'")
    git(repo, "config", "filter.dump.smudge", f"sh -c 'env >> {dump}; cat'")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "filtered files")
    dump.unlink()
    base = git(repo, "rev-parse", "main")
    trees = Worktrees(tmp_path / "council" / "worktrees")

    seen = []
    wt, branch = await trees.add(str(repo), "t1", "claude", base)  # smudge on checkout
    seen.append(dump.read_text())
    dump.unlink()
    (wt / "data.txt").write_text("agent's data\n")
    await trees.commit_all(wt, "council t1: claude")  # clean on add
    seen.append(dump.read_text())
    dump.unlink()
    assert (await merge_branch(repo, branch=branch, base=base, into="main", message="m", task_id="t1")).merged
    seen.append(dump.read_text())  # smudge when merge --ff-only updates the checkout

    for env in seen:
        assert os.environ["PATH"] in env and f"HOME={os.environ['HOME']}" in env
        for name, value in SECRETS.items():
            assert f"{name}=" not in env, f"{name} reached a program git ran"
            assert len(value) < 4 or value not in env, f"the value of {name} reached a program git ran"
    assert (repo / "data.txt").read_text() == "agent's data\n"


def test_the_environment_of_a_plain_git_would_carry_them(repo, tmp_path, monkeypatch):
    """The control for the test above: without the allow-list the same filter sees the secrets."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRETS["ANTHROPIC_API_KEY"])
    dump = tmp_path / "env.txt"
    (repo / ".gitattributes").write_text("*.txt filter=dump\n")
    git(repo, "config", "filter.dump.clean", f"sh -c 'env >> {dump}; cat'")
    (repo / "data.txt").write_text("data\n")
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    assert SECRETS["ANTHROPIC_API_KEY"] in dump.read_text()


@pytest.mark.parametrize("name", ["GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"])
async def test_git_location_variables_of_the_server_do_not_redirect_its_git(repo, tmp_path, monkeypatch, name):
    """A server started from inside a git hook inherits GIT_DIR and friends; its git must still
    work on the repo and worktree it was asked about."""
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q")
    where = {"GIT_DIR": other / ".git", "GIT_WORK_TREE": other, "GIT_INDEX_FILE": tmp_path / "stray-index"}
    monkeypatch.setenv(name, str(where[name]))
    trees = Worktrees(tmp_path / "council" / "worktrees")
    wt, branch = await trees.add(str(repo), "t1", "claude", "main")
    (wt / "app.py").write_text("fixed\n")
    assert await trees.commit_all(wt, "council t1: claude")
    monkeypatch.delenv(name)
    assert git(repo, "show", f"{branch}:app.py") == "fixed"
    assert git(repo, "diff", "--name-only", "main", branch) == "app.py"
    assert not (tmp_path / "stray-index").exists()


@pytest.mark.parametrize("run_hooks", [False, True])
async def test_run_hooks_lets_only_the_merge_in_the_users_checkout_run_the_users_hooks(repo, tmp_path, monkeypatch,
                                                                                      run_hooks):
    """Off by default; on, the user's post-merge hook runs (with the allow-listed environment) and
    every other git of the same merge still runs none: the backup ref is written without hooks."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRETS["ANTHROPIC_API_KEY"])
    marker = tmp_path / "hooks.txt"
    script(repo / ".git" / "hooks" / "post-merge", f'echo "post-merge $1" >> {marker}; env > {tmp_path}/env.txt')
    script(repo / ".git" / "hooks" / "reference-transaction",
           f'while read old new ref; do echo "$1 $ref" >> {marker}; done')
    script(repo / ".git" / "hooks" / "post-checkout", f'echo "post-checkout" >> {marker}')
    base = git(repo, "rev-parse", "main")
    trees = Worktrees(tmp_path / "council" / "worktrees")
    wt, branch = await trees.add(str(repo), "t1", "claude", base)
    (wt / "app.py").write_text("def add(a, b):\n    return a + b\n")
    assert await trees.commit_all(wt, "council t1: claude")

    res = await merge_branch(repo, branch=branch, base=base, into="main", message="m", task_id="t1",
                             agent="claude", run_hooks=run_hooks)

    assert res.merged and res.backup_ref == "refs/council/backup/t1"
    if not run_hooks:
        assert not marker.exists(), marker.read_text()
        return
    ran = marker.read_text().splitlines()
    assert "post-merge 0" in ran and "committed refs/heads/main" in ran, ran
    assert not [line for line in ran if "refs/council/" in line or line == "post-checkout"], ran
    env = (tmp_path / "env.txt").read_text()
    assert "ANTHROPIC_API_KEY" not in env and f"HOME={os.environ['HOME']}" in env


async def test_merge_run_hooks_from_the_config_reaches_the_merge(repo, tmp_path):
    marker = tmp_path / "post-merge.txt"
    script(repo / ".git" / "hooks" / "post-merge", f'echo "post-merge $1" >> {marker}')
    agents = {"writer": fake("--write", "app.py=def add(a, b):\n    return a + b")}
    for run_hooks in (False, True):
        cfg = parse_config({"agents": agents, "engine": {"kill_grace_s": 1}, "merge": {"run_hooks": run_hooks}})
        async with Engine(cfg, home=tmp_path / f"council-{run_hooks}", environ=dict(os.environ)) as engine:
            task = await engine.submit(str(repo), f"Fix add {run_hooks}", agents=["writer"])
            await engine.wait(task.task_id, 60)
            assert (await engine.merge(task.task_id)).merged
        assert marker.exists() == run_hooks
        git(repo, "reset", "-q", "--hard", f"refs/council/backup/{task.task_id}")  # the same fix again next time
    assert marker.read_text() == "post-merge 0\n"
    assert git(repo, "log", "-1", "--format=%(trailers:key=Council-Agent,valueonly)", "HEAD@{1}") == "writer"


def test_the_merge_section_is_checked_like_the_others():
    assert parse_config({}).merge.run_hooks is False
    for table, problem in (({"run_hook": True}, "[merge] run_hook is not a key of [merge]; did you mean run_hooks?"),
                           ({"run_hooks": "yes"}, '[merge] run_hooks = "yes" should be a valid boolean'),
                           ({"run_hooks": 1}, "[merge] run_hooks = 1 should be a valid boolean")):
        with pytest.raises(ConfigError) as e:
            parse_config({"merge": table})
        assert problem in str(e.value)
