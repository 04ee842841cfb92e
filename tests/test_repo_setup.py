"""The repo's worktree setup (.cli-council.toml): the setup command, copied files and ports, through a
real Engine, real git repos and real processes (the pool is off here: every worktree is fresh)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import anyio
import pytest

from engine.config import ConfigError, parse_config
from engine.engine import Engine
from engine.inputs import CouncilError
from engine.repoconfig import parse_repo_file

from conftest import FAKES, git, pid_running

OBSERVER = [sys.executable, str(FAKES / "observer.py")]


def observer(sleep: float = 0) -> dict:
    return {"kind": "command", "argv": [*OBSERVER, str(sleep)]}


def commit_repo_file(repo: Path, text: str, gitignore: str = "node_modules/\n") -> None:
    (repo / ".cli-council.toml").write_text(text)
    (repo / ".gitignore").write_text(gitignore)
    git(repo, "add", ".cli-council.toml", ".gitignore")
    git(repo, "commit", "-qm", "council setup")


def engine_for(council_home: Path, agents: dict, **sections) -> Engine:
    cfg = parse_config({"agents": agents, "engine": {"kill_grace_s": 1}, "pool": {"size": 0}, **sections})
    return Engine(cfg, home=council_home, environ=dict(os.environ))


def seen(repo: Path, branch: str) -> dict:
    return json.loads(git(repo, "show", f"{branch}:seen.json"))


async def log_text(engine: Engine, task_id: str) -> list[tuple[str, str, str]]:
    chunk = await engine.logs(task_id, limit=5000)
    return [(line.agent, line.stream, line.text) for line in chunk.lines]


async def test_setup_runs_before_the_agent_logs_its_output_and_is_never_committed(council_home, repo):
    commit_repo_file(repo, '[worktree]\nsetup = "mkdir -p node_modules && echo dep > node_modules/dep.js'
                           ' && echo generated > generated.txt && echo setting up && echo cache=$npm_config_cache"\n')
    async with engine_for(council_home, {"obs": observer()}) as engine:
        task = await engine.wait((await engine.submit(str(repo), "look", agents=["obs"])).task_id, 60)
        attempt = task.attempt("obs")
        assert attempt.state == "succeeded", attempt.error
        files = seen(repo, attempt.branch)["files"]
        assert files["node_modules/dep.js"]["text"] == "dep\n" and files["generated.txt"]["text"] == "generated\n"
        # the setup's output is in the log, as stream "setup", before the agent ran
        lines = await log_text(engine, task.task_id)
        setup_lines = [text for _, stream, text in lines if stream == "setup"]
        assert "setting up" in setup_lines
        assert f"cache={council_home / 'cache' / 'npm'}" in setup_lines, "the npm cache is shared, outside worktrees"
        first_agent = next(i for i, (_, stream, _) in enumerate(lines) if stream == "stdout")
        assert lines.index(("obs", "setup", "setting up")) < first_agent
        # neither the ignored node_modules nor the un-ignored generated.txt is part of the result
        assert git(repo, "diff", "--name-only", task.base, attempt.branch) == "seen.json"
        assert attempt.files_changed == 1
        # and cleanup after a merge does not keep the worktree for "uncommitted" setup output
        result = await engine.merge(task.task_id)
        assert result.merged and attempt.worktree in result.removed, result
        assert not Path(attempt.worktree).exists()


async def test_a_failing_setup_fails_the_attempt_as_setup_failed_and_nothing_else(council_home, repo, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    (other / "f.txt").write_text("x\n")
    git(other, "add", ".")
    git(other, "commit", "-qm", "i")
    commit_repo_file(repo, '[worktree]\nsetup = "echo resolving; echo npm ERR! missing lockfile >&2; exit 3"\n')
    async with engine_for(council_home, {"obs": observer(), "obs2": observer()}) as engine:
        bad = await engine.submit(str(repo), "look", agents=["obs", "obs2"])
        good = await engine.submit(str(other), "look", agents=["obs"])
        bad, good = await engine.wait(bad.task_id, 60), await engine.wait(good.task_id, 60)
        assert bad.state == "failed" and good.state == "succeeded"
        for a in bad.attempts:
            assert a.state == "failed" and a.error.kind == "setup_failed"
            assert "exit 3" in a.error.message and "npm ERR! missing lockfile" in a.error.message
            assert a.files_changed == 0
        assert ("obs", "setup", "npm ERR! missing lockfile") in await log_text(engine, bad.task_id)
        assert not any(stream == "stdout" for _, stream, _ in await log_text(engine, bad.task_id)), "no agent ran"
        report = await engine.discard(bad.task_id)  # what the failed setup left is no work to keep
        assert report.kept == [], report


async def test_a_setup_over_its_timeout_is_killed_and_fails_the_attempt(council_home, repo):
    commit_repo_file(repo, '[worktree]\nsetup = "sleep 30"\nsetup_timeout_s = 0.5\n')
    async with engine_for(council_home, {"obs": observer()}) as engine:
        t0 = time.monotonic()
        task = await engine.wait((await engine.submit(str(repo), "look", agents=["obs"])).task_id, 60)
        assert time.monotonic() - t0 < 25
        a = task.attempt("obs")
        assert a.error.kind == "setup_failed" and "longer than 0.5s" in a.error.message


async def test_cancelling_during_setup_kills_the_setups_process_group(council_home, repo, tmp_path):
    pids = tmp_path / "pids"
    commit_repo_file(repo, f'[worktree]\nsetup = "echo $$ > {pids}.sh; sleep 300 & echo $! > {pids}.child; wait"\n')
    async with engine_for(council_home, {"obs": observer()}) as engine:
        task = await engine.submit(str(repo), "look", agents=["obs"])
        with anyio.fail_after(30):
            while not Path(f"{pids}.child").exists() or not Path(f"{pids}.child").read_text().strip():
                await anyio.sleep(0.05)
        shell, child = (int(Path(f"{pids}.{n}").read_text()) for n in ("sh", "child"))
        assert pid_running(shell) and pid_running(child)
        task = await engine.cancel(task.task_id)
        assert task.state == "cancelled" and task.attempt("obs").state == "cancelled"
        with anyio.fail_after(10):
            while pid_running(shell) or pid_running(child):
                await anyio.sleep(0.05)


async def test_copy_brings_untracked_files_and_refuses_what_leaves_the_repo(council_home, repo, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("outside secret\n")
    (repo / "linkdir").symlink_to(outside)  # tracked: a worktree has it too, pointing out
    git(repo, "add", "linkdir")
    commit_repo_file(repo, '[worktree]\ncopy = [".env", "config/local.json", "leak", "escape", "linkdir/x",'
                           ' "app.py", "missing.txt", "conf", "gitcfg"]\n', gitignore="node_modules/\n.env\n")
    (repo / ".env").write_text("TOKEN=dev\n")
    (repo / "config").mkdir()
    (repo / "config" / "local.json").write_text('{"db": "local"}\n')
    (repo / "leak").symlink_to("/etc/hostname")
    (repo / "escape").symlink_to(outside / "secret")
    (repo / "gitcfg").symlink_to(repo / ".git" / "config")
    (repo / "linkdir").unlink()  # in the checkout a real directory now; at the base still the symlink
    (repo / "linkdir").mkdir()
    (repo / "linkdir" / "x").write_text("would land outside\n")
    (repo / "app.py").write_text("changed in the checkout\n")  # tracked: never overwritten
    (repo / "conf").mkdir()
    (repo / "conf" / "a.ini").write_text("a\n")
    (repo / "conf" / "out").symlink_to(outside)
    async with engine_for(council_home, {"obs": observer()}) as engine:
        task = await engine.wait((await engine.submit(str(repo), "look", agents=["obs"])).task_id, 60)
        a = task.attempt("obs")
        assert a.state == "succeeded", a.error
        files = seen(repo, a.branch)["files"]
        assert files[".env"]["text"] == "TOKEN=dev\n" and files["config/local.json"]["text"] == '{"db": "local"}\n'
        assert files["conf/a.ini"]["text"] == "a\n"
        assert not {"leak", "escape", "conf/out", "gitcfg"} & set(files)
        assert files["app.py"]["text"].startswith("def add"), "a tracked file is never overwritten"
        assert not (outside / "x").exists(), "nothing was written through the tracked symlink"
        notes = [text for _, stream, text in await log_text(engine, task.task_id) if stream == "council"]
        for path, why in (("leak", "leads out of the repo"), ("escape", "leads out of the repo"),
                          ("gitcfg", "into .git"), ("conf/out", "leads out"), ("linkdir/x", "out of the worktree"),
                          ("app.py", "tracked file"), ("missing.txt", "skipped")):
            assert any(f"copy: {path}" in n and why in n for n in notes), (path, notes)
        # copies are not part of the result, ignored (.env) or not (config/local.json)
        assert git(repo, "diff", "--name-only", task.base, a.branch) == "seen.json"


@pytest.mark.parametrize("text, says", [
    ('[worktree]\ncopy = ["../up"]\n', "[worktree] copy = [\"../up\"] is refused: '../up' must not leave the repo"),
    ('[worktree]\ncopy = [".git/config"]\n', "must not be inside .git"),
    ('[worktree]\ncopy = ["/etc/passwd"]\n', "must be a path relative"),
    ('[worktree]\nports = "1"\n', '[worktree] ports = "1" should be a valid integer'),
    ('[worktree]\nports = 1000\n', "[worktree] ports = 1000 should be less than or equal to 64"),
    ('[worktree]\nsetpu = "x"\n', "[worktree] setpu is not a key of [worktree]; did you mean setup?"),
    ('[worktree]\nsetup = "a\\u0000b"\n', "holds a NUL byte"),
    ('[worktree]\nsetup_timeout_s = inf\n', "is not a finite number"),
    ('[pool]\nsize = 1\n', "[pool] is not a section of .cli-council.toml"),
    ('[worktree\n', "not valid TOML"),
])
def test_a_broken_repo_file_is_refused_naming_the_file_and_the_key(text, says):
    with pytest.raises(ConfigError) as e:
        parse_repo_file(text, "/r/.cli-council.toml at commit abc")
    assert str(e.value).startswith("config /r/.cli-council.toml at commit abc: ") and says in str(e.value)


async def test_a_broken_repo_file_refuses_the_submission_and_the_user_config_overrides_it(council_home, repo):
    commit_repo_file(repo, '[worktree]\nports = -1\n')
    async with engine_for(council_home, {"obs": observer()}) as engine:
        with pytest.raises(CouncilError) as e:
            await engine.submit(str(repo), "look", agents=["obs"])
        assert ".cli-council.toml at commit" in str(e.value) and "[worktree] ports = -1" in str(e.value)
    commit_repo_file(repo, '[worktree]\nsetup = "echo from-repo > made.txt"\nports = 1\n')
    overrides = {"worktree": {"ports": 0, "repos": {str(repo): {"setup": "echo from-user > made.txt"}}}}
    async with engine_for(council_home, {"obs": observer()}, **overrides) as engine:
        task = await engine.wait((await engine.submit(str(repo), "look", agents=["obs"])).task_id, 60)
        found = seen(repo, task.attempt("obs").branch)
        assert found["files"]["made.txt"]["text"] == "from-user\n" and found["env"] == {}
    with pytest.raises(ConfigError) as e:
        parse_config({"worktree": {"repos": {"~/x": {"copy": ["a/../../b"]}}}}, "u.toml")
    assert "config u.toml: [worktree] repos.~/x.copy" in str(e.value)


async def test_ports_are_unique_across_running_attempts_and_reach_agent_and_check(council_home, repo):
    commit_repo_file(repo, "[worktree]\nports = 2\n")
    agents = {f"obs{i}": observer(sleep=1.0) for i in range(4)}
    check = "echo check-ports=$COUNCIL_PORT,$PORT,$COUNCIL_PORT_1,$COUNCIL_PORT_2"
    async with engine_for(council_home, agents) as engine:
        first = await engine.submit(str(repo), "look", agents=list(agents)[:2], check=check)
        second = await engine.submit(str(repo), "look", agents=list(agents)[2:], check=check)
        tasks = [await engine.wait(first.task_id, 60), await engine.wait(second.task_id, 60)]
        used = []
        for task in tasks:
            checks = {agent: text.split("=", 1)[1] for agent, stream, text in await log_text(engine, task.task_id)
                      if stream == "check" and text.startswith("check-ports=")}
            for a in task.attempts:
                assert a.state == "succeeded", a.error
                env = seen(repo, a.branch)["env"]
                ports = [env["COUNCIL_PORT_1"], env["COUNCIL_PORT_2"]]
                assert env["COUNCIL_PORT"] == env["PORT"] == ports[0]
                assert checks[a.agent] == f"{ports[0]},{ports[0]},{ports[0]},{ports[1]}", "the check gets them too"
                used += ports
        assert len(used) == 8 and len(set(used)) == 8, used
        assert not any((council_home / "ports").iterdir()), "leases end with their attempts"


def test_port_claims_hold_across_processes_and_die_with_their_owner(tmp_path):
    from engine.ports import Ports

    low = 24000
    a, b = Ports(tmp_path / "ports", low, low + 5), Ports(tmp_path / "ports", low, low + 5)
    taken = a.lease(3) + b.lease(3)  # as two council processes sharing CLI_COUNCIL_HOME would
    assert sorted(taken) == list(range(low, low + 6))
    with pytest.raises(OSError, match="no 1 free ports"):
        a.lease(1)
    a.release(taken[:1])
    assert b.lease(1) == taken[:1]
    # a claim left by a process that is gone is taken over
    (tmp_path / "ports" / str(low + 6)).write_text("999999999 12345")
    assert Ports(tmp_path / "ports", low + 6, low + 6).lease(1) == [low + 6]


async def test_a_retried_agent_keeps_the_setups_output(council_home, repo, tmp_path):
    commit_repo_file(repo, '[worktree]\nsetup = "echo made > generated.txt; echo made > we*ird"\n')
    flaky = {"kind": "claude", "command": [sys.executable, str(FAKES / "flaky.py")],
             "env": {"ANTHROPIC_API_KEY": "sk-test-1234567890", "FLAKY_COUNTER": str(tmp_path / "count"),
                     "FLAKY_FAILS": "1", "FAKE_WRITE": "hello.txt"}}
    cfg = parse_config({"agents": {"claude": flaky}, "pool": {"size": 0},
                        "engine": {"kill_grace_s": 1, "retries": 1, "retry_base_s": 0.01}})
    async with Engine(cfg, home=council_home, environ=dict(os.environ)) as engine:
        task = await engine.wait((await engine.submit(str(repo), "x", agents=["claude"])).task_id, 60)
    a = task.attempt("claude")
    assert a.state == "succeeded" and a.retries == 1, a.error
    assert (Path(a.worktree) / "generated.txt").exists() and (Path(a.worktree) / "we*ird").exists()
    assert git(repo, "diff", "--name-only", task.base, a.branch) == "hello.txt"
