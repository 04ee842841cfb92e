"""The warm pool: ready worktrees with the repo's setup done, taken clean, never reused, refilled,
and never orphaned (shutdown, a crashed server's restart, gc). Real repos, engines and processes;
waits are for a state, never timed assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from engine import cleanup
from engine.config import parse_config
from engine.engine import Engine

from conftest import FAKES, fake, git, pid_running

OBSERVER = [sys.executable, str(FAKES / "observer.py")]
AHEAD = "from the warm pool"
WATCHED = "watched since it was verified clean: unchanged"


def observer() -> dict:
    return {"kind": "command", "argv": [*OBSERVER, "0"]}


def commit_repo_file(repo: Path, text: str) -> None:
    (repo / ".cli-council.toml").write_text(text)
    (repo / ".gitignore").write_text("node_modules/\n")
    git(repo, "add", ".cli-council.toml", ".gitignore")
    git(repo, "commit", "-qm", "council setup")


def pool_engine(council_home: Path, agents: dict, size: int = 2, max_files: int = 50_000) -> Engine:
    cfg = parse_config({"agents": agents, "engine": {"kill_grace_s": 1},
                        "pool": {"size": size, "max_files": max_files}})
    return Engine(cfg, home=council_home, environ=dict(os.environ))


async def until(predicate, what: str, timeout: float = 60) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.05)


async def run(engine: Engine, repo: Path, agent: str = "obs"):
    task = await engine.submit(str(repo), "look", agents=[agent])
    return await engine.wait(task.task_id, 60)


def seen(repo: Path, branch: str) -> dict:
    return json.loads(git(repo, "show", f"{branch}:seen.json"))


async def notes(engine: Engine, task_id: str) -> list[str]:
    return [line.text for line in (await engine.logs(task_id, limit=5000)).lines]


def pool_entries(council_home: Path) -> list[Path]:
    pool = council_home / "worktrees" / "pool"
    return sorted(e for owner in pool.iterdir() for e in owner.iterdir()) if pool.is_dir() else []


def registered(repo: Path) -> list[str]:
    return [line.split(" ", 1)[1] for line in git(repo, "worktree", "list", "--porcelain").splitlines()
            if line.startswith("worktree ")]


async def test_an_attempt_starts_in_a_ready_worktree_and_the_pool_refills(council_home, repo, tmp_path):
    runs = tmp_path / "setup-runs"
    commit_repo_file(repo, f'[worktree]\nsetup = "pwd >> {runs}; mkdir -p node_modules; echo built > node_modules/dep.js;'
                           ' echo setup says hi"\n')
    async with pool_engine(council_home, {"obs": observer()}) as engine:
        cold = await run(engine, repo)
        top = cold.repo
        assert not any(AHEAD in n for n in await notes(engine, cold.task_id)), "the first attempt found no pool"
        await until(lambda: engine.pool.ready(top) == 2, "the pool filled")
        assert len(runs.read_text().splitlines()) == 3  # the cold attempt's setup, and one per pool entry
        entries = pool_entries(council_home)
        assert len(entries) == 2 and all(str(e) in registered(repo) for e in entries)

        warm = await run(engine, repo)
        a = warm.attempt("obs")
        assert a.state == "succeeded", a.error
        assert Path(a.worktree) == council_home / "worktrees" / warm.task_id / "obs"
        assert a.branch == f"council/{warm.task_id}/obs" and git(repo, "rev-parse", f"{a.branch}~1") == warm.base
        assert seen(repo, a.branch)["files"]["node_modules/dep.js"]["text"] == "built\n"
        log = await notes(engine, warm.task_id)
        assert any(AHEAD in n for n in log) and "setup says hi" in log, "the setup's output is shown all the same"
        assert any(WATCHED in n for n in log) or not sys.platform.startswith("linux"), \
            "nothing touched the entry: its take ran no status"
        assert a.worktree not in runs.read_text().splitlines(), "no setup ran in the taken worktree"
        assert sum(str(e) == a.worktree for e in pool_entries(council_home)) == 0
        # git knows the taken worktree where it now is, on its branch (a prune drops one whose place it lost)
        git(repo, "worktree", "prune")
        listed = git(repo, "worktree", "list", "--porcelain").split("\n\n")
        assert any(w.startswith(f"worktree {a.worktree}\n") and w.endswith(f"branch refs/heads/{a.branch}")
                   for w in listed), listed

        await until(lambda: engine.pool.ready(top) == 2 and not engine.pool.filling(top), "the pool refilled")
        assert len(runs.read_text().splitlines()) == 4
    # shutdown leaves no pool worktree behind, on disk or in git
    assert pool_entries(council_home) == [] and not (council_home / "worktrees" / "pool").exists()
    assert not any("/pool/" in w for w in registered(repo))


async def test_no_pool_for_a_repo_over_max_files(council_home, repo):
    async with pool_engine(council_home, {"obs": observer()}, max_files=3) as engine:
        top = (await run(engine, repo)).repo  # README.md, app.py: under the cap
        await until(lambda: engine.pool.ready(top) == 2, "the pool filled")
    for i in range(3):
        (repo / f"f{i}.txt").write_text("x\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "more files")
    async with pool_engine(council_home, {"obs": observer()}, max_files=3) as engine:
        await run(engine, repo)
        await until(lambda: not engine.pool.filling(top), "the refill gave up")
        assert engine.pool.ready(top) == 0 and pool_entries(council_home) == []


async def test_an_agent_never_sees_another_tasks_files_and_entries_are_used_once(council_home, repo):
    writer = fake("--write", "secret.txt=task one's work", "--write", "node_modules/leftover=ignored junk")
    (repo / "src" / "pkg").mkdir(parents=True)
    (repo / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    git(repo, "add", "src")
    git(repo, "commit", "-qm", "a package")
    async with pool_engine(council_home, {"obs": observer(), "writer": writer}, size=1) as engine:
        top = (await run(engine, repo)).repo
        await until(lambda: engine.pool.ready(top) == 1, "the pool filled")
        one = await run(engine, repo, "writer")
        assert any(AHEAD in n for n in await notes(engine, one.task_id))
        assert (Path(one.attempt("writer").worktree) / "node_modules" / "leftover").exists()
        await until(lambda: engine.pool.ready(top) == 1, "the pool refilled")
        two = await run(engine, repo)
        assert any(AHEAD in n for n in await notes(engine, two.task_id))
        files = seen(repo, two.attempt("obs").branch)["files"]
        assert "secret.txt" not in files and "node_modules/leftover" not in files, files
        # two different worktrees, each with its own git metadata: the used one did not come back
        gitdirs = {(Path(t.attempt(n).worktree) / ".git").read_text() for t, n in ((one, "writer"), (two, "obs"))}
        assert len(gitdirs) == 2

        # an entry someone wrote into while it waited is not used: the attempt gets a fresh worktree
        # (a directory below the top: the entry's index caches what each directory held)
        await until(lambda: engine.pool.ready(top) == 1, "the pool refilled")
        [entry] = pool_entries(council_home)
        (entry / "src" / "pkg" / "stray.py").write_text("not from the base\n")
        three = await run(engine, repo)
        assert not any(AHEAD in n for n in await notes(engine, three.task_id))
        assert "src/pkg/stray.py" not in seen(repo, three.attempt("obs").branch)["files"]
        assert not entry.exists() and str(entry) not in registered(repo)


def _rewrite(entry: Path) -> None:
    (entry / "src" / "pkg" / "mod.py").write_text("x = 2  # not the base's\n")


def _new_dir(entry: Path) -> None:
    (entry / "src" / "pkg" / "new").mkdir()
    (entry / "src" / "pkg" / "new" / "stray.py").write_text("stray\n")


DISTURBANCES = {
    "rewrite": _rewrite,
    "chmod": lambda entry: (entry / "src" / "pkg" / "mod.py").chmod(0o755),
    "delete": lambda entry: (entry / "src" / "pkg" / "mod.py").unlink(),
    "new dir": _new_dir,
    "index": lambda entry: git(entry, "rm", "-q", "--cached", "src/pkg/mod.py"),
    "touch": lambda entry: os.utime(entry / "src" / "pkg" / "mod.py", ns=(10**18, 10**18)),
}


@pytest.mark.parametrize("how", DISTURBANCES)
async def test_a_take_trusts_no_entry_touched_since_it_was_verified(council_home, repo, how):
    """Whatever happens to a ready entry (a file rewritten, its mode changed, one deleted, a new
    directory below the top, the entry's index changed, a file only touched) ends its watch: the take
    runs `git status` again, which refuses the entry unless it is still clean (the touch)."""
    (repo / "src" / "pkg").mkdir(parents=True)
    (repo / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    git(repo, "add", "src")
    git(repo, "commit", "-qm", "a package")
    async with pool_engine(council_home, {"obs": observer()}, size=1) as engine:
        top = (await run(engine, repo)).repo
        await until(lambda: engine.pool.ready(top) == 1 and not engine.pool.filling(top), "the pool filled")
        [entry] = pool_entries(council_home)
        DISTURBANCES[how](entry)
        task = await run(engine, repo)
        log, a = await notes(engine, task.task_id), task.attempt("obs")
        assert a.state == "succeeded", a.error
        assert not any(WATCHED in n for n in log)
        assert any(AHEAD in n for n in log) == (how == "touch"), log
        assert seen(repo, a.branch)["files"]["src/pkg/mod.py"]["text"] == "x = 1\n"
        assert git(repo, "ls-tree", "--name-only", "-r", a.branch, "src") == "src/pkg/mod.py"
        assert git(repo, "ls-tree", a.branch, "src/pkg/mod.py").startswith("100644 ")


async def test_an_entry_a_take_cannot_move_as_git_does_is_removed(council_home, repo, caplog):
    """git refuses to move a locked worktree, and so does a take; an entry whose `.git` names its git
    dir by a relative path (newer git's worktree.useRelativePaths) would be wrong once moved, and one
    whose `.git` holds bytes that name nothing cannot be moved at all. Either way, at the pool's base
    or at a newer one (where the take moves the entry before git looks at it), the attempt gets a fresh
    worktree and the entry goes."""
    why = {"lock": "locked exists", "relative": "by a relative path", "bytes": "is not a worktree's .git file"}
    async with pool_engine(council_home, {"obs": observer()}, size=1) as engine:
        top = (await run(engine, repo)).repo
        for spoil in why:
            for newer_base in (False, True):
                await until(lambda: engine.pool.ready(top) == 1 and not engine.pool.filling(top), "the pool filled")
                [entry] = pool_entries(council_home)
                dot = entry / ".git"
                if spoil == "lock":
                    git(repo, "worktree", "lock", str(entry))
                elif spoil == "relative":
                    dot.write_text(f"gitdir: {os.path.relpath(dot.read_text()[8:].strip(), entry)}\n")
                    assert git(entry, "rev-parse", "HEAD")  # git itself reads it
                else:
                    dot.write_bytes(b"\xff\xfe gitdir")
                if newer_base:
                    (repo / f"{spoil}.txt").write_text("newer\n")
                    git(repo, "add", ".")
                    git(repo, "commit", "-qm", f"newer than the pool's entry ({spoil})")
                caplog.clear()
                task = await run(engine, repo)
                case = (spoil, newer_base)
                assert task.attempt("obs").state == "succeeded", (case, task.attempt("obs").error)
                assert not any(AHEAD in n for n in await notes(engine, task.task_id)), case
                assert not entry.exists() and str(entry) not in registered(repo), case
                if newer_base or spoil != "bytes":  # at the pool's base, git's own status refuses it first
                    assert why[spoil] in caplog.text, case


async def test_entries_made_with_another_setup_are_not_used(council_home, repo):
    commit_repo_file(repo, '[worktree]\nsetup = "mkdir -p node_modules; echo v1 > node_modules/v"\n')
    async with pool_engine(council_home, {"obs": observer()}) as engine:
        top = (await run(engine, repo)).repo
        await until(lambda: engine.pool.ready(top) == 2, "the pool filled")
        commit_repo_file(repo, '[worktree]\nsetup = "mkdir -p node_modules; echo v2 > node_modules/v"\n')
        task = await run(engine, repo)
        assert seen(repo, task.attempt("obs").branch)["files"]["node_modules/v"]["text"] == "v2\n"
        assert not any(AHEAD in n for n in await notes(engine, task.task_id))
        # the refill drops the old entries and makes new ones with the new setup
        await until(lambda: engine.pool.ready(top) == 2 and not engine.pool.filling(top), "the pool refilled")
        task = await run(engine, repo)
        assert any(AHEAD in n for n in await notes(engine, task.task_id))
        assert seen(repo, task.attempt("obs").branch)["files"]["node_modules/v"]["text"] == "v2\n"


async def test_an_entry_made_at_an_older_base_is_moved_touching_only_the_files_that_differ(council_home, repo, tmp_path):
    async with pool_engine(council_home, {"obs": observer()}) as engine:
        top = (await run(engine, repo)).repo
        await until(lambda: engine.pool.ready(top) == 2, "the pool filled")
        made = {p: os.stat(p / "README.md").st_mtime_ns for p in pool_entries(council_home)}
        (repo / "app.py").write_text("def add(a, b):\n    return a + b\n")
        git(repo, "commit", "-qam", "fix add")
        task = await run(engine, repo)
        assert any(AHEAD in n for n in await notes(engine, task.task_id))
        files = seen(repo, task.attempt("obs").branch)["files"]
        assert files["app.py"]["text"].endswith("a + b\n"), "the entry was moved to the task's base"
        assert files["README.md"]["mtime_ns"] in made.values(), "an unchanged file was not rewritten"


async def test_a_ready_entry_has_no_racily_clean_file(council_home, repo):
    """git re-reads, at every status, a file whose mtime is not older than the index to the second: an
    entry's index is refreshed in a later second than its checkout, so the take's check only stats files."""
    async with pool_engine(council_home, {"obs": observer()}) as engine:
        top = (await run(engine, repo)).repo
        await until(lambda: engine.pool.ready(top) == 2 and not engine.pool.filling(top), "the pool filled")
        for entry in pool_entries(council_home):
            gitdir = Path((entry / ".git").read_text().split(":", 1)[1].strip())
            index_s = int(os.stat(gitdir / "index").st_mtime)
            files = [entry / f for f in git(entry, "ls-files", "-z").split("\0") if f]
            assert files and all(int(os.stat(f).st_mtime) < index_s for f in files), entry


async def test_an_entry_whose_setup_ran_is_not_carried_to_another_commit(council_home, repo):
    """What a setup made (node_modules from a lockfile) may depend on any file: a new base gets a
    fresh worktree and setup, and the refill replaces the stale entries."""
    commit_repo_file(repo, '[worktree]\nsetup = "mkdir -p node_modules; cat app.py > node_modules/built"\n')
    async with pool_engine(council_home, {"obs": observer()}) as engine:
        top = (await run(engine, repo)).repo
        await until(lambda: engine.pool.ready(top) == 2, "the pool filled")
        (repo / "app.py").write_text("def add(a, b):\n    return a + b\n")
        git(repo, "commit", "-qam", "fix add")
        task = await run(engine, repo)
        assert not any(AHEAD in n for n in await notes(engine, task.task_id))
        built = seen(repo, task.attempt("obs").branch)["files"]["node_modules/built"]["text"]
        assert built.endswith("a + b\n"), "the setup ran at the task's base"
        await until(lambda: engine.pool.ready(top) == 2 and not engine.pool.filling(top), "the pool refilled")
        task = await run(engine, repo)
        assert any(AHEAD in n for n in await notes(engine, task.task_id))
        assert seen(repo, task.attempt("obs").branch)["files"]["node_modules/built"]["text"].endswith("a + b\n")


CRASHING_SERVER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import anyio
    from engine.config import parse_config
    from engine.engine import Engine

    repo, home, hang = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

    async def main():
        cfg = parse_config({"agents": {"obs": {"kind": "command", "argv": %r}}, "pool": {"size": 2}})
        async with Engine(cfg, home=home) as engine:
            task = await engine.wait((await engine.submit(repo, "look", agents=["obs"])).task_id, 60)
            while engine.pool.ready(task.repo) < 2:
                await anyio.sleep(0.05)
            hang.write_text("")  # from now on the setup hangs: the refill after the next take is stuck in it
            await engine.wait((await engine.submit(repo, "look", agents=["obs"])).task_id, 60)
            while len(Path(str(hang) + ".pids").read_text().split()) < 4:
                await anyio.sleep(0.05)
            print("dying", flush=True)
            os._exit(9)  # like a killed server: no cleanup at all

    anyio.run(main)
""") % [*OBSERVER, "0"]


def crash_a_server(repo: Path, home: Path, hang: Path) -> list[int]:
    """Run a council process that fills a pool and dies mid-refill; the pids of the setups it left."""
    done = subprocess.run([sys.executable, "-c", CRASHING_SERVER, str(repo), str(home), str(hang)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "dying" in done.stdout, done.stderr
    return [int(p) for p in Path(str(hang) + ".pids").read_text().split()]


async def test_a_restart_and_gc_remove_a_dead_servers_pool_and_stop_its_setups(council_home, repo, tmp_path):
    hang = tmp_path / "hang"
    commit_repo_file(repo, f'[worktree]\nsetup = "echo $$ >> {hang}.pids; if [ -e {hang} ]; then sleep 300; fi"\n')
    for reaper in ("gc", "restart"):
        hang.unlink(missing_ok=True)
        Path(f"{hang}.pids").unlink(missing_ok=True)
        pids = crash_a_server(repo, council_home, hang)
        stuck = pids[-1]
        assert pid_running(stuck), "the refill's setup outlived its server"
        entries = pool_entries(council_home)
        assert len(entries) == 2 and all(str(e) in registered(repo) for e in entries)  # one ready, one mid-setup
        if reaper == "gc":
            report = await cleanup.gc(council_home / "worktrees", [], age_s=10**6)
            assert {str(e) for e in entries} <= {r.split(":")[0] for r in report.removed}
        else:
            async with pool_engine(council_home, {"obs": observer()}, size=0):
                pass
        assert pool_entries(council_home) == [] and not any("/pool/" in w for w in registered(repo))
        await until(lambda: not pid_running(stuck), "the orphaned setup was stopped", timeout=20)


async def test_shutdown_stops_a_refill_mid_setup_and_leaves_nothing(council_home, repo, tmp_path):
    hang, pids = tmp_path / "hang", tmp_path / "pids"
    commit_repo_file(repo, f'[worktree]\nsetup = "echo $$ >> {pids}; if [ -e {hang} ]; then sleep 300; fi"\n')
    async with pool_engine(council_home, {"obs": observer()}) as engine:
        top = (await run(engine, repo)).repo
        await until(lambda: engine.pool.ready(top) == 2, "the pool filled")
        hang.write_text("")
        await run(engine, repo)
        await until(lambda: len(pids.read_text().split()) == 4, "the refill's setup started")
        stuck = int(pids.read_text().split()[-1])
        assert pid_running(stuck)
    assert not pid_running(stuck)
    assert pool_entries(council_home) == [] and not any("/pool/" in w for w in registered(repo))


async def test_a_fan_out_wider_than_the_pool_takes_what_is_ready_and_makes_the_rest(council_home, repo):
    agents = {f"obs{i}": observer() for i in range(4)}
    async with pool_engine(council_home, agents) as engine:
        top = (await run(engine, repo, "obs0")).repo
        await until(lambda: engine.pool.ready(top) == 2, "the pool filled")
        task = await engine.wait((await engine.submit(str(repo), "look", agents=list(agents))).task_id, 60)
        assert all(a.state == "succeeded" for a in task.attempts), [a.error for a in task.attempts]
        log = (await engine.logs(task.task_id, limit=5000)).lines
        assert len({line.agent for line in log if AHEAD in line.text}) == 2, "two ready, two made fresh"
        assert len({a.worktree for a in task.attempts}) == 4


async def test_a_setup_that_fails_in_the_pool_is_not_tried_again_at_the_same_commit(council_home, repo, tmp_path):
    runs = tmp_path / "runs"
    commit_repo_file(repo, f'[worktree]\nsetup = "echo run >> {runs}; exit 1"\n')
    async with pool_engine(council_home, {"obs": observer()}) as engine:
        first = await run(engine, repo)
        assert first.attempt("obs").error.kind == "setup_failed"
        await until(lambda: not engine.pool.filling(first.repo), "the refill gave up")
        assert len(runs.read_text().split()) == 2  # the attempt's own, and the pool's one try
        second = await run(engine, repo)
        assert second.attempt("obs").error.kind == "setup_failed"
        await until(lambda: not engine.pool.filling(first.repo), "the refill gave up")
        assert len(runs.read_text().split()) == 3 and engine.pool.ready(first.repo) == 0


async def test_a_take_whose_branch_cannot_be_made_removes_the_moved_entry_and_deletes_no_ref(council_home, repo):
    """A dangling symbolic ref named `council` (it resolves to nothing, so submit does not refuse the
    repo) stops git making council/<task>/<agent>. The take moves the entry and makes the branch at
    once: the moved entry is removed from where it went, and the user's ref stays."""
    async with pool_engine(council_home, {"obs": observer()}, size=1) as engine:
        first = await run(engine, repo)
        await engine.discard(first.task_id)  # its branch council/<task>/obs would stop `council`
        await until(lambda: engine.pool.ready(first.repo) == 1, "the pool filled")
        [entry] = pool_entries(council_home)
        git(repo, "symbolic-ref", "refs/heads/council", "refs/heads/nowhere")
        task = await run(engine, repo)
        assert task.attempt("obs").state == "failed"  # a fresh worktree cannot make the branch either
        assert not entry.exists()
        assert not [w for w in registered(repo) if task.task_id in w], registered(repo)
        assert git(repo, "symbolic-ref", "refs/heads/council") == "refs/heads/nowhere"


# Says it started (a file named after it in argv[1]), then waits for its release (the same in argv[2]).
WAITER = ("import os, sys, time\nopen(os.path.join(sys.argv[1], sys.argv[3]), 'w').close()\n"
          "while not os.path.exists(os.path.join(sys.argv[2], sys.argv[3])):\n    time.sleep(0.02)\n"
          "open('done.txt', 'w').write('done')\n")


async def test_the_refill_waits_until_every_agent_of_the_stage_has_started(council_home, repo, tmp_path):
    """A refill's checkout beside the agents' starts slows them down: with one slot, the second agent
    starts only after the first ends, and the pool does not fill before then."""
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()
    release.mkdir()
    agents = {name: {"kind": "command", "argv": [sys.executable, "-c", WAITER, str(started), str(release), name]}
              for name in ("one", "two")}
    cfg = parse_config({"agents": agents, "engine": {"kill_grace_s": 1, "max_parallel": 1},
                        "pool": {"size": 1, "max_files": 50_000}})
    async with Engine(cfg, home=council_home, environ=dict(os.environ)) as engine:
        task = await engine.submit(str(repo), "wait", agents=["one", "two"])
        await until(lambda: any(started.iterdir()), "the first agent started")
        assert not engine.pool.filling(task.repo) and engine.pool.ready(task.repo) == 0
        for name in agents:
            (release / name).touch()
        done = await engine.wait(task.task_id, 60)
        assert [a.state for a in done.attempts] == ["succeeded", "succeeded"], [a.error for a in done.attempts]
        await until(lambda: engine.pool.ready(task.repo) == 1, "the pool filled once both had started")
