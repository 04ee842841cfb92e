"""LiveConfig: a long-running server follows edits of its config file and keeps the last good
config while an edit is broken. Real files; every edit moves the file's mtime on explicitly, so the
tests do not depend on the filesystem's timestamp granularity."""

import json
import os
from pathlib import Path

import anyio
import pytest

from engine.config import ConfigError, LiveConfig

GOOD = "[engine]\nmax_parallel = 3\n"
BROKEN = '[engine]\nmax_parallel = "four"\n'


def edit(path: Path, text: str) -> None:
    """Rewrite the file in place (same inode) with a later mtime."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_an_edit_is_seen_a_broken_edit_keeps_the_last_good_config_until_fixed(tmp_path):
    path = tmp_path / "config.toml"
    edit(path, GOOD)
    live = LiveConfig(path, min_interval_s=0)
    assert live.get().engine.max_parallel == 3 and live.problem is None

    edit(path, "[engine]\nmax_parallel = 5\n")
    assert live.get().engine.max_parallel == 5 and live.problem is None

    edit(path, BROKEN)
    assert live.get().engine.max_parallel == 5
    assert live.problem == f'config {path}: [engine] max_parallel = "four" should be a valid integer'
    assert live.get().engine.max_parallel == 5 and live.problem  # stays until the file changes

    edit(path, "[engine\n")  # not even TOML
    assert live.get().engine.max_parallel == 5 and live.problem.startswith(f"cannot read config {path}")

    edit(path, "[engine]\nmax_parallel = 7\n")
    assert live.get().engine.max_parallel == 7 and live.problem is None


def test_a_missing_file_means_defaults_and_a_new_file_is_picked_up(tmp_path):
    path = tmp_path / "config.toml"
    live = LiveConfig(path, min_interval_s=0)
    assert live.get().engine.max_parallel == 8 and "claude" in live.get().agents
    edit(path, GOOD)
    assert live.get().engine.max_parallel == 3
    path.unlink()
    assert live.get().engine.max_parallel == 8 and live.problem is None


def test_a_replaced_file_is_seen_by_its_new_inode(tmp_path):
    """Editors save by writing a new file and renaming it over the old one."""
    path, new = tmp_path / "config.toml", tmp_path / "config.toml.new"
    edit(path, GOOD)
    live = LiveConfig(path, min_interval_s=0)
    new.write_text(GOOD.replace("3", "4"))
    os.utime(new, ns=(path.stat().st_mtime_ns,) * 2)  # same mtime and size: only the inode differs
    new.replace(path)
    assert live.get().engine.max_parallel == 4


def test_it_rereads_only_when_the_files_stat_changed(tmp_path):
    path = tmp_path / "config.toml"
    edit(path, GOOD)
    live = LiveConfig(path, min_interval_s=0)
    stamp = path.stat().st_mtime_ns
    path.write_text(GOOD.replace("3", "6"))  # same size, same inode, mtime put back: looks unchanged
    os.utime(path, ns=(stamp, stamp))
    assert live.get().engine.max_parallel == 3
    edit(path, GOOD.replace("3", "6"))
    assert live.get().engine.max_parallel == 6


def test_it_looks_at_most_every_interval(tmp_path):
    path = tmp_path / "config.toml"
    edit(path, GOOD)
    live = LiveConfig(path, min_interval_s=3600)
    edit(path, "[engine]\nmax_parallel = 5\n")
    assert live.get().engine.max_parallel == 3
    assert LiveConfig(path).get().engine.max_parallel == 5


def test_a_broken_file_at_startup_is_raised(tmp_path):
    path = tmp_path / "config.toml"
    edit(path, BROKEN)
    with pytest.raises(ConfigError, match=f"config {path}: \\[engine\\] max_parallel"):
        LiveConfig(path)


async def test_a_running_engine_follows_config_edits_and_keeps_the_last_good_one(tmp_path, repo, council_home):
    from engine.engine import CouncilError, Engine
    from tests.conftest import fake

    path = tmp_path / "config.toml"  # what CLI_COUNCIL_CONFIG names in every test
    agent = fake("--write", "n.txt=new")
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in agent.items())
    async with Engine(home=council_home) as engine:
        with pytest.raises(CouncilError, match="unknown agent 'newbie'"):
            await engine.submit(str(repo), "x", agents=["newbie"])
        path.write_text(f"[agents.newbie]\n{table}\n")
        await anyio.sleep(0.6)
        task = await engine.wait((await engine.submit(str(repo), "x", agents=["newbie"])).task_id, 30)
        assert task.state == "succeeded"
        path.write_text(f"[agents.newbie]\n{table}\nmodle = 'typo'\n")
        await anyio.sleep(0.6)
        task = await engine.wait((await engine.submit(str(repo), "y", agents=["newbie"])).task_id, 30)
        assert task.state == "succeeded"  # the last good config still runs the agent
        assert "did you mean model" in engine.config_problem
        notes = [ln.text for ln in (await engine.logs(task.task_id, limit=100)).lines]
        assert any("broken edit" in n and "modle" in n for n in notes), notes


async def test_a_server_beyond_loopback_refuses_work_when_an_edit_drops_allowed_roots(tmp_path, repo, council_home):
    """The bind needed allowed_roots at start; a later edit that empties them must not open every repo."""
    from engine.engine import CouncilError, Engine
    from tests.conftest import fake

    path = tmp_path / "config.toml"
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fake("--write", "n.txt=new").items())
    path.write_text(f"[server]\nallowed_roots = [{json.dumps(str(repo.parent))}]\n\n[agents.w]\n{table}\n")
    async with Engine(home=council_home, require_roots=True) as engine:
        task = await engine.wait((await engine.submit(str(repo), "x", agents=["w"])).task_id, 30)
        assert task.state == "succeeded"
        path.write_text(f"[agents.w]\n{table}\n")  # a valid config, without the roots
        await anyio.sleep(0.6)
        with pytest.raises(CouncilError, match="allowed_roots"):
            await engine.submit(str(repo), "y", agents=["w"])
        assert len((await engine.list()).tasks) == 1
