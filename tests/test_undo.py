"""undo_merge: the target branch goes back to its tip from before the task's merge, losing nothing."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from engine.inputs import CouncilError
from engine.models import TaskState

from conftest import git


def python_agent() -> dict:
    """A command agent that runs its prompt as Python in the worktree."""
    return {"kind": "command", "argv": [sys.executable, "-c", "import sys; exec(sys.argv[1])", "{prompt}"]}


def write(path: str, text: str) -> str:
    return f"open({path!r}, 'w').write({text!r})"


async def finished(engine, repo, prompt: str) -> str:
    task = await engine.wait((await engine.submit(str(repo), prompt, agents=["py"])).task_id, 60)
    assert task.state == TaskState.succeeded, task
    return task.task_id


def refs(repo) -> str:
    return git(repo, "for-each-ref", "--format=%(refname) %(objectname)")


async def test_undo_puts_the_checked_out_branch_back_and_the_task_can_merge_again(make_engine, repo):
    async with make_engine({"py": python_agent()}) as engine:
        task_id = await finished(engine, repo, write("new.txt", "agent"))
        before = git(repo, "rev-parse", "main")
        merged = await engine.merge(task_id)
        assert merged.merged and (repo / "new.txt").exists()
        undone = await engine.undo_merge(task_id)
        assert undone.commit == before and git(repo, "rev-parse", "main") == before, undone.message
        assert not (repo / "new.txt").exists() and git(repo, "status", "--porcelain") == ""
        assert undone.backup_ref == f"refs/council/undone/{task_id}"
        assert git(repo, "rev-parse", undone.backup_ref) == merged.commit  # the undone merge is kept
        assert undone.backup_ref in undone.message
        task = await engine.get(task_id)
        assert task.state == TaskState.succeeded and task.merge_commit is None
        with pytest.raises(CouncilError, match="not merged"):
            await engine.undo_merge(task_id)
        again = await engine.merge(task_id)  # the merge's cleanup removed the branch: undo made it again
        assert again.merged and (repo / "new.txt").read_text() == "agent", again.message
        assert git(repo, "rev-parse", "main^") == before
        second = await engine.undo_merge(task_id)
        assert second.backup_ref == f"refs/council/undone/{task_id}-2"
        assert git(repo, "rev-parse", second.backup_ref) == again.commit


async def test_undo_of_a_branch_not_checked_out_moves_only_the_branch(make_engine, repo):
    git(repo, "branch", "side")
    async with make_engine({"py": python_agent()}) as engine:
        task_id = await finished(engine, repo, write("s.txt", "s"))
        side = git(repo, "rev-parse", "side")
        merged = await engine.merge(task_id, into="side", cleanup=False)
        assert merged.merged and git(repo, "rev-parse", "side") == merged.commit
        undone = await engine.undo_merge(task_id)
    assert undone.commit == side and git(repo, "rev-parse", "side") == side, undone.message
    assert "only the branch moved" in undone.message and not (repo / "s.txt").exists()
    assert git(repo, "rev-parse", f"refs/council/undone/{task_id}") == merged.commit


async def test_undo_refuses_when_the_branch_moved_and_names_the_commits(make_engine, repo):
    async with make_engine({"py": python_agent()}) as engine:
        task_id = await finished(engine, repo, write("new.txt", "agent"))
        assert (await engine.merge(task_id)).merged
        (repo / "mine.txt").write_text("mine\n")
        git(repo, "add", "mine.txt")
        git(repo, "commit", "-qm", "my own work after the merge")
        mine = git(repo, "rev-parse", "--short", "HEAD")
        before, stored = refs(repo), (await engine.store.get_task(task_id)).model_dump_json()
        undone = await engine.undo_merge(task_id)
        assert not undone.commit and "1 commit(s) came after it" in undone.message
        assert f"{mine} my own work after the merge" in undone.message
        assert refs(repo) == before and (await engine.store.get_task(task_id)).model_dump_json() == stored
        assert (await engine.get(task_id)).state == TaskState.merged


async def test_undo_refuses_a_dirty_checkout_and_changes_nothing(make_engine, repo):
    async with make_engine({"py": python_agent()}) as engine:
        task_id = await finished(engine, repo, write("new.txt", "agent"))
        assert (await engine.merge(task_id)).merged
        (repo / "README.md").write_text("# edited, not committed\n")
        before = refs(repo)
        undone = await engine.undo_merge(task_id)
        assert not undone.commit and "uncommitted changes (README.md)" in undone.message
        assert refs(repo) == before and (repo / "README.md").read_text() == "# edited, not committed\n"
        assert (repo / "new.txt").exists() and (await engine.get(task_id)).state == TaskState.merged
        git(repo, "checkout", "README.md")
        assert (await engine.undo_merge(task_id)).commit  # clean again: the undo goes through


def reachable(repo) -> set[str]:
    """Every commit some ref (branches, tags, the council's backup and undone refs) reaches."""
    return set(git(repo, "rev-list", "--all").split())


async def test_merge_undo_sequences_never_lose_a_commit(make_engine, repo):
    """Seeded random merges, undos, user commits and strategy changes: every commit ever seen on
    main (or made by a merge) stays in the object store and reachable from some ref; main's tip is
    always what the model of the steps says, and the checkout always matches it."""
    rng = random.Random(2)
    async with make_engine({"py": python_agent()}) as engine:
        tasks = [await finished(engine, repo, write(f"agent{n}.txt", f"agent {n}")) for n in range(3)]
        seen: set[str] = set(git(repo, "rev-list", "main").split())  # the user's history (attempt branches
        # are the council's own: a merge's cleanup deletes them once their changes landed)
        merged_from: dict[str, str] = {}  # task: main's tip before its merge
        merge_commit: dict[str, str] = {}
        tip = git(repo, "rev-parse", "main")
        done: dict[str, int] = {"merged": 0, "undone": 0, "refused": 0, "committed": 0}
        for step in range(30):
            op = rng.choice(["merge"] * 3 + ["undo"] * 3 + ["commit"])
            t = rng.choice(tasks)
            if op == "merge" and t not in merged_from:
                result = await engine.merge(t, strategy=rng.choice(["squash", "merge", "rebase"]),
                                            cleanup=rng.random() < 0.5)
                if result.merged:
                    merged_from[t], merge_commit[t], tip = tip, result.commit, result.commit
                    seen.add(result.commit)
                    done["merged"] += 1
            elif op == "undo" and t in merged_from:
                result = await engine.undo_merge(t)
                if tip == merge_commit[t]:
                    assert result.commit == merged_from.pop(t), (step, result.message)
                    tip = result.commit
                    done["undone"] += 1
                else:
                    assert not result.commit and "came after it" in result.message, (step, result.message)
                    done["refused"] += 1
            elif op == "commit":
                path = repo / rng.choice(["user.txt", "agent0.txt", "notes/x.txt"])
                path.parent.mkdir(exist_ok=True)
                path.write_text(f"user step {step}\n")
                git(repo, "add", "-A")
                git(repo, "commit", "-qm", f"user step {step}")
                tip = git(repo, "rev-parse", "HEAD")
                done["committed"] += 1
            seen |= set(git(repo, "rev-list", "main").split())
            assert git(repo, "rev-parse", "main") == tip, step
            assert git(repo, "status", "--porcelain", "--untracked-files=no") == "", step
            everywhere = reachable(repo)
            for commit in seen:
                assert subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=repo).returncode == 0
                assert commit in everywhere, (step, commit)
    assert min(done.values()) >= 2, done  # the seed exercises every kind of step
