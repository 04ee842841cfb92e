"""list_agents / get_diff / discard_task and their command lines (`agents`, `diff`, `discard`), on real
repos with fake command agents, through the in-memory MCP client and as user processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from engine.config import parse_config
from engine.models import AgentList, Diff, GcReport, Task
from server.app import build_server
from tests.conftest import fake, git

AGENTS = {
    "fake": {**fake("--write", "hello.txt=hi", "--write", "app.py=def add(a, b):\n    return a + b"),
             "max_parallel": 2, "model": "fake-model-1"},
    "other": fake("--write", "other.txt=other"),
    "idle": fake(),  # finishes without changing anything
    "stuck": fake("--sleep", "60"),
    "off": {**fake(), "enabled": False},
    "missing": {"kind": "command", "argv": ["/nonexistent/agent-cli", "{prompt}"]},
    # expanduser() of an unknown user raises inside the auto-claude adapter's probe
    "broken": {"kind": "auto-claude", "home": "~no-such-user-cli-council/Auto-Claude"},
    "claude": {"command": ["/nonexistent/claude"]},
    "gemini": {"command": ["/nonexistent/gemini"]},
    "ollama": {"base_url": "http://127.0.0.1:9"},  # nothing listens on port 9
}
ROUTING = {"cheap": ["other"], "standard": ["fake", "other"], "complex": ["fake"]}


@pytest.fixture
def server(council_home):
    cfg = parse_config({"engine": {"kill_grace_s": 1, "max_parallel": 6}, "agents": AGENTS, "routing": ROUTING})
    return build_server(config=cfg, home=council_home)


async def call(client: Client, tool: str, **args) -> dict:
    r = await client.call_tool(tool, args)
    assert not r.is_error, r.content
    return r.structured_content


async def refused(client: Client, tool: str, **args) -> str:
    r = await client.call_tool(tool, args)
    assert r.is_error and r.structured_content is None, r
    return r.content[0].text


async def run_task(client: Client, repo: Path, agents: list[str], prompt: str = "change things") -> Task:
    task = Task.model_validate(await call(client, "submit_task", repo=str(repo), prompt=prompt, agents=agents))
    with anyio.fail_after(60):
        while task.state in ("queued", "running"):
            task = Task.model_validate(await call(client, "get_status", task_id=task.task_id, wait_s=5))
    return task


def branches(repo: Path) -> dict[str, str]:
    out = git(repo, "for-each-ref", "--format=%(refname:strip=2) %(objectname)", "refs/heads/")
    return dict(line.split(" ", 1) for line in out.splitlines())


def cli(*args: str, code: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def write_config(agents: dict, routing: dict | None = None) -> None:
    lines = ["[engine]", "kill_grace_s = 1"]
    if routing:
        lines += ["[routing]"] + [f"{k} = {json.dumps(v)}" for k, v in routing.items()]
    for name, table in agents.items():
        lines.append(f'[agents."{name}"]')
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    Path(os.environ["CLI_COUNCIL_CONFIG"]).write_text("\n".join(lines) + "\n")


# list_agents / `cli-council agents`

async def test_list_agents_says_what_each_agent_is_and_why_one_cannot_run(server):
    async with Client(server) as client:
        listed = AgentList.model_validate(await call(client, "list_agents"))
    rows = {a.name: a for a in listed.agents}
    assert list(rows)[:len(AGENTS)] == list(AGENTS) and set(rows) >= {"auto-claude"}
    fake_row = rows["fake"]
    assert (fake_row.kind, fake_row.available, fake_row.enabled) == ("command", True, True)
    assert (fake_row.model, fake_row.max_parallel, fake_row.tiers) == ("fake-model-1", 2, ["standard", "complex"])
    assert sys.executable in fake_row.message
    assert rows["other"].tiers == ["cheap", "standard"] and rows["other"].max_parallel == 6, "the engine's cap"
    assert rows["off"].available and not rows["off"].enabled
    assert not rows["missing"].available and "/nonexistent/agent-cli" in rows["missing"].message
    assert not rows["broken"].available
    assert rows["broken"].message == "probing it failed: RuntimeError: Could not determine home directory."
    assert not rows["claude"].available and "command =" in rows["claude"].message
    assert not rows["ollama"].available and rows["ollama"].model, "ollama's default model is named"
    assert rows["idle"].model is None and rows["idle"].tiers == []


def test_agents_command_is_the_tool_and_doctor_agrees(tmp_path):
    write_config({name: AGENTS[name] for name in ("fake", "off", "missing", "broken", "claude", "gemini", "ollama")},
                 ROUTING | {"cheap": ["fake"], "standard": ["fake"]})
    listed = AgentList.model_validate_json(cli("agents", "--json").stdout)
    rows = {a.name: a for a in listed.agents}
    assert rows["fake"].available and rows["fake"].tiers == ["cheap", "standard", "complex"]
    assert rows["broken"].message.startswith("probing it failed: RuntimeError")
    doctor = {r["agent"]: r for r in json.loads(cli("doctor", "--json").stdout)["agents"]}
    assert {n: (r["ok"], r["enabled"], r["message"]) for n, r in doctor.items()} == {
        a.name: (a.available, a.enabled, a.message) for a in listed.agents}
    text = cli("agents").stdout.splitlines()
    fake_line = next(line for line in text if line.startswith("fake "))
    assert "yes" in fake_line and "model fake-model-1" in fake_line and "tiers cheap, standard, complex" in fake_line
    assert "2 at once" in fake_line
    off_line = next(line for line in text if line.startswith("off "))
    assert " no " in off_line and "(disabled)" in off_line
    assert not any(w in line for line in text for w in ("None", "['", "[]")), "no Python reprs for humans"


# get_diff / council://tasks/{id}/attempts/{agent}/diff / `cli-council diff`

async def test_get_diff_is_the_attempts_branch_against_its_base(server, repo):
    async with Client(server) as client:
        task = await run_task(client, repo, ["fake", "other"])
        assert task.state == "succeeded"
        best = Diff.model_validate(await call(client, "get_diff", task_id=task.task_id))
        assert best.agent == task.best and best.base == task.base
        diff = Diff.model_validate(await call(client, "get_diff", task_id=task.task_id, agent="fake"))
        attempt = task.attempt("fake")
        assert diff.branch == attempt.branch and not diff.truncated
        assert {f.path: (f.insertions, f.deletions) for f in diff.files} == {"app.py": (1, 1), "hello.txt": (1, 0)}
        assert diff.patch == git(repo, "diff", task.base, attempt.branch) + "\n"
        assert "+++ b/hello.txt" in diff.patch and "+    return a + b" in diff.patch

        res = (await client.read_resource(f"council://tasks/{task.task_id}/attempts/fake/diff")).contents[0]
        assert res.mime_type == "text/x-diff" and res.text == diff.patch
        other = (await client.read_resource(f"council://tasks/{task.task_id}/attempts/other/diff")).contents[0].text
        assert "+++ b/other.txt" in other and "hello.txt" not in other

        cut = Diff.model_validate(await call(client, "get_diff", task_id=task.task_id, agent="fake", max_bytes=120))
        assert cut.truncated and cut.files == diff.files
        assert 0 < len(cut.patch.encode()) <= 120 and diff.patch.startswith(cut.patch) and cut.patch.endswith("\n")
        one = Diff.model_validate(await call(client, "get_diff", task_id=task.task_id, agent="fake", max_bytes=1))
        assert one.truncated and len(one.patch.encode()) <= 1
        whole = Diff.model_validate(await call(client, "get_diff", task_id=task.task_id, agent="fake",
                                               max_bytes=len(diff.patch.encode())))
        assert not whole.truncated and whole.patch == diff.patch
    assert git(repo, "status", "--porcelain") == "" and not (repo / "hello.txt").exists()


async def test_get_diff_refusals(server, repo):
    async with Client(server) as client:
        assert "no task '0123456789ab'" in await refused(client, "get_diff", task_id="0123456789ab")
        task = await run_task(client, repo, ["fake", "idle"])
        says = await refused(client, "get_diff", task_id=task.task_id, agent="nobody")
        assert "has no attempt by 'nobody'" in says and "fake, idle" in says
        assert "idle's attempt (failed) left no changes" in await refused(
            client, "get_diff", task_id=task.task_id, agent="idle")
        for bad in (0, 10_000_001, 1.5, "100", True):
            await refused(client, "get_diff", task_id=task.task_id, max_bytes=bad)
        assert "NUL" in await refused(client, "get_diff", task_id=task.task_id, agent="fa\0ke")
        await refused(client, "get_diff", task_id=task.task_id, agnet="fake")  # strict: no misspelt argument dropped
        await refused(client, "list_agents", verbose=True)
        await refused(client, "discard_task", task_id=task.task_id, force=True)
        with pytest.raises(MCPError, match="no attempt by 'nobody'"):
            await client.read_resource(f"council://tasks/{task.task_id}/attempts/nobody/diff")
        with pytest.raises(MCPError, match="no task"):
            await client.read_resource("council://tasks/0123456789ab/attempts/fake/diff")

        idle = await run_task(client, repo, ["idle"])
        assert "no best attempt to show" in await refused(client, "get_diff", task_id=idle.task_id)

        stuck = Task.model_validate(await call(client, "submit_task", repo=str(repo), prompt="wait", agents=["stuck"]))
        says = await refused(client, "get_diff", task_id=stuck.task_id, agent="stuck")
        assert "still" in says and "wait for the task" in says
        await call(client, "cancel_task", task_id=stuck.task_id)

        merged = await call(client, "merge_result", task_id=task.task_id, agent="fake")
        assert merged["merged"], merged
        says = await refused(client, "get_diff", task_id=task.task_id, agent="fake")
        assert f"merged as {merged['commit']}" in says


async def test_get_diff_ignores_diff_programs_and_colours_in_the_repos_config(server, repo, tmp_path):
    """An agent can write the repo's config; the server's git must not run what it names."""
    marker = tmp_path / "ran"
    tool = tmp_path / "tool.sh"
    tool.write_text(f"#!/bin/sh\ntouch {marker}\necho replaced\n")
    tool.chmod(0o755)
    (repo / ".gitattributes").write_text("*.txt diff=shout\n")
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-qm", "attributes")
    for key, value in (("diff.external", str(tool)), ("diff.shout.textconv", str(tool)), ("color.diff", "always"),
                       ("diff.noprefix", "true"), ("diff.mnemonicPrefix", "true")):
        git(repo, "config", key, value)
    async with Client(server) as client:
        task = await run_task(client, repo, ["other"])
        diff = Diff.model_validate(await call(client, "get_diff", task_id=task.task_id))
    assert not marker.exists(), "a diff program from the repo's config ran"
    assert "+++ b/other.txt\n" in diff.patch and "+other\n" in diff.patch and "\x1b[" not in diff.patch


async def test_get_diff_redacts_the_servers_own_secrets(council_home, repo, monkeypatch):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret)
    cfg = parse_config({"engine": {"kill_grace_s": 1}, "agents": {"leaky": fake("--write", f"key.txt=key {secret}")}})
    async with Client(build_server(config=cfg, home=council_home)) as client:
        task = await run_task(client, repo, ["leaky"])
        diff = Diff.model_validate(await call(client, "get_diff", task_id=task.task_id))
    assert secret not in diff.patch and "+key ***" in diff.patch


def test_diff_command_prints_a_patch_that_applies(repo):
    write_config({"fake": AGENTS["fake"], "idle": AGENTS["idle"]})
    task = json.loads(cli("run", "--repo", str(repo), "--agents", "fake,idle", "--json", "change").stdout)
    shown = cli("diff", task["task_id"])
    assert "fake's attempt" in shown.stderr and "2 files, +2/-1" in shown.stderr
    subprocess.run(["git", "apply", "--check"], cwd=repo, input=shown.stdout, text=True, check=True)
    as_json = Diff.model_validate_json(cli("diff", task["task_id"], "--agent", "fake", "--json").stdout)
    assert as_json.patch == shown.stdout and not as_json.truncated
    cut = cli("diff", task["task_id"], "--max-bytes", "100")
    assert "cut at 100 bytes" in cut.stderr and len(cut.stdout.encode()) <= 100
    assert cli("diff", task["task_id"], "--agent", "idle", code=2).stderr.startswith(
        "error: idle's attempt (failed) left no changes")
    assert "has no attempt by 'ghost'" in cli("diff", task["task_id"], "--agent", "ghost", code=2).stderr
    assert cli("diff", "0123456789ab", code=2).stderr.startswith("error: no task")
    assert "max_bytes must be" in cli("diff", task["task_id"], "--max-bytes", "0", code=2).stderr


# discard_task / `cli-council discard`

async def test_discard_removes_the_tasks_worktrees_and_branches_and_nothing_of_the_users(server, repo):
    async with Client(server) as client:
        task = await run_task(client, repo, ["fake", "other"])
        git(repo, "branch", "feature")
        git(repo, "branch", f"council/{task.task_id}-notes")  # the user's, though it looks like ours
        git(repo, "branch", f"council/{task.task_id[:-1]}0/fake")  # another task's (unknown here)
        before = branches(repo)
        ours = {a.branch for a in task.attempts}
        worktrees = [Path(a.worktree) for a in task.attempts]
        assert all(w.is_dir() for w in worktrees) and ours <= set(before)

        report = GcReport.model_validate(await call(client, "discard_task", task_id=task.task_id))
        assert set(report.removed) >= ours | {str(w) for w in worktrees} | {f"task {task.task_id}: record and logs"}
        assert report.kept == []
        assert not any(w.exists() for w in worktrees)
        assert branches(repo) == {k: v for k, v in before.items() if k not in ours}, "only the task's branches went"
        listed = git(repo, "worktree", "list", "--porcelain").splitlines()
        assert len([w for w in listed if w.startswith("worktree ") and "/worktrees/pool/" not in w]) == 1
        assert "no task" in await refused(client, "get_status", task_id=task.task_id)
        assert "no task" in await refused(client, "discard_task", task_id=task.task_id)
    assert git(repo, "status", "--porcelain") == ""


async def test_discard_refuses_a_running_task_and_works_once_it_is_cancelled(server, repo):
    async with Client(server) as client:
        assert "no task '0123456789ab'" in await refused(client, "discard_task", task_id="0123456789ab")
        assert "task ids are 12 hex digits" in await refused(client, "discard_task", task_id="../../etc")
        task = Task.model_validate(await call(client, "submit_task", repo=str(repo), prompt="wait", agents=["stuck"]))
        with anyio.fail_after(20):
            while not (t := await call(client, "get_status", task_id=task.task_id))["attempts"][0]["worktree"]:
                await anyio.sleep(0.1)
        worktree = Path(t["attempts"][0]["worktree"])
        says = await refused(client, "discard_task", task_id=task.task_id)
        assert "is still running; cancel it first" in says
        assert worktree.is_dir() and f"council/{task.task_id}/stuck" in branches(repo)
        await call(client, "cancel_task", task_id=task.task_id)
        report = GcReport.model_validate(await call(client, "discard_task", task_id=task.task_id))
        assert f"council/{task.task_id}/stuck" in report.removed and not worktree.exists()


async def test_discard_keeps_uncommitted_work_until_dealt_with(server, repo):
    """Work the council never saw stays; the record stays too, marked, until nothing of the task is left:
    discarding again finishes the job, and gc drops the record of a discarded task without waiting a week."""
    async with Client(server) as client:
        tasks = [await run_task(client, repo, ["fake", "other"]) for _ in range(2)]
        for task in tasks:
            kept = Path(task.attempt("other").worktree)
            (kept / "notes.txt").write_text("someone's work in the kept worktree\n")
            report = GcReport.model_validate(await call(client, "discard_task", task_id=task.task_id))
            assert not Path(task.attempt("fake").worktree).exists() and task.attempt("fake").branch in report.removed
            assert kept.is_dir() and (kept / "notes.txt").exists()
            assert any("uncommitted changes (notes.txt)" in k for k in report.kept)
            assert any("discard it again" in k for k in report.kept)
            assert task.attempt("other").branch in branches(repo)
            after = Task.model_validate(await call(client, "get_status", task_id=task.task_id))
            assert after.discarded_at is not None
            logs = await call(client, "stream_logs", task_id=task.task_id, limit=5000)
            assert any("discarded; kept:" in ln["text"] and "notes.txt" in ln["text"] for ln in logs["lines"])

        first, second = tasks
        (Path(first.attempt("other").worktree) / "notes.txt").unlink()
        report = GcReport.model_validate(await call(client, "discard_task", task_id=first.task_id))
        assert first.attempt("other").branch in report.removed and f"task {first.task_id}: record and logs" in report.removed
        assert "no task" in await refused(client, "get_status", task_id=first.task_id)

    other = second.attempt("other")  # dealt with by hand, as the kept lines say how
    git(repo, "worktree", "remove", "--force", other.worktree)
    git(repo, "branch", "-D", other.branch)
    removed = GcReport.model_validate_json(cli("gc", "--json").stdout).removed  # default age: a week
    assert f"task {second.task_id}: record and logs (nothing of it is left in git or on disk)" in removed
    assert not any(b.startswith("council/") for b in branches(repo))


def test_discard_command(repo):
    write_config({"fake": AGENTS["fake"]})
    task = json.loads(cli("run", "--repo", str(repo), "--agents", "fake", "--json", "change").stdout)
    branch = task["attempts"][0]["branch"]
    shown = cli("discard", task["task_id"]).stdout.splitlines()
    assert f"removed {branch}" in shown and f"removed task {task['task_id']}: record and logs" in shown
    assert branch not in branches(repo) and "main" in branches(repo)
    assert cli("discard", task["task_id"], code=2).stderr.startswith("error: no task")
    again = json.loads(cli("run", "--repo", str(repo), "--agents", "fake", "--json", "change").stdout)
    report = GcReport.model_validate_json(cli("discard", again["task_id"], "--json").stdout)
    assert again["attempts"][0]["branch"] in report.removed and report.kept == []


async def test_git_head_stops_git_once_it_has_enough(repo):
    """Endless output (an alias running `yes`) comes back cut, instead of filling memory forever."""
    from engine.diffs import git_head

    with anyio.fail_after(30):
        head, more = await git_head(repo, "-c", "alias.flood=!yes council", "flood", max_bytes=100_000)
    assert more and head == b"council\n" * 12_500
    head, more = await git_head(repo, "log", "--format=%s", max_bytes=100)
    assert (head, more) == (b"initial\n", False)


async def test_discard_never_deletes_a_branch_its_record_does_not_own(make_engine, repo):
    """A record naming a branch outside council/<task_id>/ (damaged, or written by hand) is not obeyed."""
    async with make_engine({"fake": AGENTS["fake"]}) as engine:
        task = await engine.submit(str(repo), "change", agents=["fake"])
        task = await engine.wait(task.task_id, 60)
    ours = task.attempts[0].branch
    git(repo, "branch", "feature")
    task.attempts[0].branch = "feature"
    async with make_engine({"fake": AGENTS["fake"]}) as engine:  # nothing hosted: it reads the record
        await engine.store.save_task(task)
        report = await engine.discard(task.task_id)
    assert "feature: not a council branch of task" in " ".join(report.kept)
    assert "feature" in branches(repo) and ours not in branches(repo), "its own branch is still found and removed"


async def test_discard_when_the_repo_is_gone_reports_it_and_keeps_the_record(make_engine, repo):
    import shutil

    async with make_engine({"fake": AGENTS["fake"]}) as engine:
        task = await engine.submit(str(repo), "change", agents=["fake"])
        task = await engine.wait(task.task_id, 60)
    shutil.rmtree(repo)
    async with make_engine({"fake": AGENTS["fake"]}) as engine:
        report = await engine.discard(task.task_id)
        assert report.removed == [] and f"its repo {repo} is gone" in report.kept[0]
        assert (await engine.get(task.task_id)).discarded_at is not None
        with pytest.raises(ValueError, match="repo .* is gone"):
            await engine.diff(task.task_id)
