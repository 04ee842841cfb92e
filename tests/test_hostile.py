"""The hostile-input corpus (issue 8): every tool, resource, command and raw transport fed input a
careless or hostile client could send. Each case asserts a clear refusal (a tool error that says
what is wrong, exit 2 with `error:`, a JSON-RPC error reply, a 4xx), that the server still answers,
and that the repo (refs, index, working tree, .git/config, hooks) and the state dir are byte-for-byte
unchanged. One server and one repo serve a whole group; a case that kills the server gets it
restarted for the next one, so no case depends on the order they run in.

The "beside" tests at the end run each trigger that once ended the whole engine next to an
unrelated task that must still succeed.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from engine.config import ConfigError, parse_config
from server.app import build_server
from tests.conftest import FAKE_AGENT, fake
from tests.hostile.servers import (ACTIVE, INITIALIZE, ROOT, HttpProcess, InMemory, StdioProcess,
                                   env_for, settle, tool_text)
from tests.hostile.snapshot import assert_unchanged, snapshot

PY = sys.executable
GITCONFIG = "[user]\n\tname = Test User\n\temail = test@example.com\n[init]\n\tdefaultBranch = main\n"
DROP = object()  # an argument the case leaves out


# The world a group of cases runs in: a state dir, a config, a repo inside the allowed root, and
# the odd directories the repo argument is tried with.

@dataclass
class World:
    root: Path
    userhome: Path = field(init=False)
    home: Path = field(init=False)
    config: Path = field(init=False)
    allowed: Path = field(init=False)
    repo: Path = field(init=False)

    def __post_init__(self):
        self.userhome = self.root / "userhome"
        self.home = self.root / "council"
        self.config = self.root / "config.toml"
        self.allowed = self.root / "allowed"
        self.repo = self.allowed / "repo"
        self.userhome.mkdir(parents=True)
        (self.userhome / ".gitconfig").write_text(GITCONFIG)
        make_repo(self, self.repo)
        self.git(self.repo, "branch", "feature")
        make_repo(self, self.root / "outside" / "repo")
        (self.allowed / "plain").mkdir()
        (self.allowed / "file.txt").write_text("not a dir\n")
        self.git(self.allowed, "init", "-q", "--bare", "bare.git")

    def fresh_home(self) -> None:
        """A new empty state dir: the last resort when a case left the old one unusable (a poisoned
        store), so that the cases after it are still judged on their own."""
        n = len(list(self.root.glob("council*")))
        self.home = self.root / f"council-{n}"

    @property
    def env(self) -> dict[str, str]:
        return env_for(self.home, self.config, self.userhome)

    def git(self, cwd: Path, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, env=self.env, check=True, capture_output=True,
                              text=True).stdout.strip()

    def subs(self) -> dict[str, str]:
        return {"<repo>": str(self.repo), "<outside>": str(self.root / "outside" / "repo"),
                "<plain>": str(self.allowed / "plain"), "<file>": str(self.allowed / "file.txt"),
                "<bare>": str(self.allowed / "bare.git"), "<missing>": str(self.allowed / "no-such-dir")}


def make_repo(world: World, path: Path) -> None:
    path.mkdir(parents=True)
    world.git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("# demo\n")
    (path / "app.py").write_text("def add(a, b):\n    return a - b\n")
    (path / "untracked.txt").write_text("the user's uncommitted note\n")
    world.git(path, "add", "README.md", "app.py")
    world.git(path, "commit", "-qm", "initial")


def resolve(obj, subs: dict[str, str]):
    """Fill the <placeholders> of a case with this world's paths and task ids."""
    if isinstance(obj, str):
        for k, v in subs.items():
            obj = obj.replace(k, v)
        return obj
    if isinstance(obj, list):
        return [resolve(x, subs) for x in obj]
    if isinstance(obj, dict):
        return {k: resolve(v, subs) for k, v in obj.items() if v is not DROP}
    return obj


def assert_clear(text: str, says: tuple[str, ...] = ()) -> None:
    """A refusal a person (or a model) can act on: no traceback, no 'internal error', names the culprit."""
    assert text.strip(), "the refusal says nothing"
    assert "Traceback" not in text, text[:2000]
    assert "internal error" not in text.lower(), text[:2000]
    for word in says:  # "a|b": either
        assert any(w.lower() in text.lower() for w in word.split("|")), \
            f"the refusal does not mention {word!r}: {text[:600]}"


# Group 1: the MCP tools and resources, through the SDK's in-memory client.

AGENTS = {
    "fake": fake("--write", "hello.txt=hi"),
    "stuck": fake("--sleep", "600"),
    # a new file each time, so a task still has changes after a wrongly accepted case merged the last one
    "fresh": {"kind": "command", "argv": [PY, "-c", "import uuid; open(uuid.uuid4().hex + '.txt', 'w').write('x')"]},
    "off": {**fake(), "enabled": False},
    "gem": {"kind": "gemini", "command": [PY, "-c", "print('gemini 0.0.0')"], "env": {"GEMINI_API_KEY": "fake-key"}},
}


class McpWorld(World):
    """The in-memory server plus the tasks some cases need: two finished ones and a running one."""

    def start(self) -> None:
        # No warm pool: its refills run on their own schedule (after each attempt) and would land in
        # the snapshots that prove a refused call changed nothing; tests/test_pool.py covers it.
        cfg = parse_config({"engine": {"kill_grace_s": 1}, "agents": AGENTS, "pool": {"size": 0},
                            "server": {"allowed_roots": [str(self.allowed)]}})
        self.mem = InMemory(cfg, self.home)
        self._done: list[str] = []
        self._running: str | None = None

    def submit(self, agent: str) -> str:
        r = self.mem.call("submit_task", {"repo": str(self.repo), "prompt": "say hi", "agents": [agent]})
        assert not r.is_error, tool_text(r)
        return r.structured_content["task_id"]

    def done(self, i: int) -> str:
        """A succeeded, unmerged task (a fresh one if a wrongly accepted case merged the last)."""
        while len(self._done) <= i:
            self._done.append("")
        state = self.task_state(self._done[i]) if self._done[i] else None
        if state != "succeeded":
            self._done[i] = self.submit("fresh")
            task = self.mem.wait_done(self._done[i])
            assert task["state"] == "succeeded", (task["best_reason"], [a["error"] for a in task["attempts"]])
        return self._done[i]

    def running(self) -> str:
        if self._running and self.task_state(self._running) in ACTIVE:
            return self._running
        self._running = self.submit("stuck")
        deadline = time.monotonic() + 30
        while True:  # until the agent has said all it will say before its long sleep
            r = self.mem.call("stream_logs", {"task_id": self._running, "agent": "stuck", "limit": 100})
            if any(ln["text"] == "working" for ln in r.structured_content["lines"]):
                return self._running
            assert time.monotonic() < deadline, "the stuck agent never started"
            time.sleep(0.1)

    def ensure_alive(self) -> None:
        self.mem.ensure_alive()
        if not self.mem.alive():
            self.mem.stop()
            self.fresh_home()
            self.mem.home = self.home
            self.mem.orphans = set()
            self.mem.start()
            self._done, self._running = [], None

    def task_state(self, task_id: str) -> str | None:
        r = self.mem.call("get_status", {"task_id": task_id})
        return None if r.is_error else r.structured_content["state"]

    def case_subs(self, args) -> dict[str, str]:
        text = json.dumps(args, default=str)
        subs = self.subs()
        if "<done>" in text:
            subs["<done>"] = self.done(0)
        if "<other>" in text:
            subs["<other>"] = self.done(1)
        if "<running>" in text:
            subs["<running>"] = self.running()
        return subs


@pytest.fixture(scope="module")
def mcp_world(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        world = McpWorld(tmp_path_factory.mktemp("hostile-mcp"))
        for k in ("HOME", "CLI_COUNCIL_HOME", "CLI_COUNCIL_CONFIG", "GIT_CONFIG_GLOBAL"):
            mp.setenv(k, world.env[k])
        world.start()
        yield world
        world.mem.stop()


def submit(case_id: str, says: str | tuple[str, ...], **args):
    base = {"repo": "<repo>", "prompt": "do it", "agents": ["fake"]}
    return pytest.param("submit_task", {**base, **args}, (says,) if isinstance(says, str) else says, id=case_id)


def tool(name: str, case_id: str, says: str | tuple[str, ...], **args):
    return pytest.param(name, args, (says,) if isinstance(says, str) else says, id=case_id)


BIG_ID = "t" * 10_000
# gemini puts the council's context and the check into the prompt's argv element: 119,000 bytes of prompt
# plus this framing is over Linux's 128 KiB limit for one argument
LONG_CHECK = "pytest -q" + " t.py" * 3000
BAD_IDS = [("unknown", "no-such-task"), ("dotdot", "../x"), ("nul", "ab\x00cd"), ("10kb", BIG_ID), ("empty", "")]

TOOL_CASES = [
    # NUL bytes: each ends up in an argv or a path
    submit("submit-nul-prompt", "prompt", prompt="do\x00it"),
    submit("submit-nul-check", "check", check="pytest\x00-q"),
    submit("submit-nul-base", "base", base="main\x00"),
    submit("submit-nul-repo", "repo", repo="<repo>\x00"),
    submit("submit-nul-agent", "agent", agents=["fa\x00ke"]),
    # the prompt
    submit("submit-empty-prompt", "prompt", prompt=""),
    submit("submit-whitespace-prompt", "prompt", prompt=" \n\t "),
    submit("submit-prompt-130kb", "prompt", prompt="x" * 130_000),
    submit("submit-prompt-119kb-plus-15kb-check-for-gemini", "check", prompt="x" * 119_000, agents=["gem"], check=LONG_CHECK),
    submit("submit-prompt-int", "prompt", prompt=42),
    submit("submit-prompt-list", "prompt", prompt=["do", "it"]),
    submit("submit-prompt-missing", "prompt", prompt=DROP),
    # the check
    submit("submit-check-1mb", "check", check="x" * 1_000_000),
    submit("submit-check-empty", "check", check=""),
    submit("submit-check-unbalanced-quote", "check", check="pytest 'tests"),
    submit("submit-check-list", "check", check=["pytest", "-q"]),
    # the repo
    submit("submit-repo-relative", "repo", repo="relative/path"),
    submit("submit-repo-missing", "repo", repo="<missing>"),
    submit("submit-repo-is-a-file", "repo", repo="<file>"),
    submit("submit-repo-outside-allowed-roots", "repo", repo="<outside>"),
    submit("submit-repo-not-git", "repo", repo="<plain>"),
    submit("submit-repo-bare", "repo", repo="<bare>"),
    submit("submit-repo-empty", "repo", repo=""),
    submit("submit-repo-10kb", "repo", repo="/" + "d" * 10_000),
    submit("submit-repo-list", "repo", repo=["<repo>"]),
    submit("submit-repo-int", "repo", repo=7),
    submit("submit-repo-missing-arg", "repo", repo=DROP),
    # the base ref: options, ranges, ancestors that do not exist
    submit("submit-base-unknown", "base", base="no-such-ref"),
    submit("submit-base-dash-help", "base", base="--help"),
    submit("submit-base-dash-x", "base", base="-x"),
    submit("submit-base-main~99", "base", base="main~99"),
    submit("submit-base-range", "base", base="main..feature"),
    submit("submit-base-empty", "base", base=""),
    submit("submit-base-int", "base", base=5),
    # agents
    submit("submit-agents-empty", "agent", agents=[]),
    submit("submit-agents-unknown", "agent", agents=["nobody"]),
    submit("submit-agents-disabled", "agent", agents=["off"]),
    submit("submit-agents-10000-names", "agent", agents=[f"a{i}" for i in range(10_000)]),
    submit("submit-agents-10000-duplicates", "agent", agents=["fake"] * 10_000),
    submit("submit-agents-slash", "agent", agents=["a/b"]),
    submit("submit-agents-dotdot", "agent", agents=["../fake"]),
    submit("submit-agents-dict", "agent", agents={"fake": 1}),
    submit("submit-agents-string", "agent", agents="fake"),
    submit("submit-agents-int-element", "agent", agents=[1]),
    # tier
    submit("submit-tier-nope", "tier", tier="nope"),
    submit("submit-tier-int", "tier", tier=3),
    # timeout_s: the non-finite ones once poisoned the store for every client
    submit("submit-timeout-0", "timeout_s", timeout_s=0),
    submit("submit-timeout-negative", "timeout_s", timeout_s=-1),
    submit("submit-timeout-1e309-string", "timeout_s", timeout_s="1e309"),
    submit("submit-timeout-inf-string", "timeout_s", timeout_s="inf"),
    submit("submit-timeout-Infinity-string", "timeout_s", timeout_s="Infinity"),
    submit("submit-timeout-minus-inf-string", "timeout_s", timeout_s="-inf"),
    submit("submit-timeout-nan-string", "timeout_s", timeout_s="nan"),
    submit("submit-timeout-word", "timeout_s", timeout_s="ten"),
    submit("submit-timeout-bool", "timeout_s", timeout_s=True),
    submit("submit-timeout-huge-int", "timeout_s", timeout_s=10**30),
    submit("submit-timeout-beyond-float", "timeout_s", timeout_s=10**400),
    submit("submit-timeout-list", "timeout_s", timeout_s=[60]),
    # budget_usd
    submit("submit-budget-negative", "budget_usd", budget_usd=-1),
    submit("submit-budget-inf-string", "budget_usd", budget_usd="inf"),
    submit("submit-budget-nan-string", "budget_usd", budget_usd="nan"),
    submit("submit-budget-string", "budget_usd", budget_usd="cheap"),
    # review: a strict boolean
    submit("submit-review-yes-string", "review", review="yes"),
    submit("submit-review-int", "review", review=1),
    submit("submit-review-list", "review", review=[True]),
    # arguments the tool does not have are reported, not ignored
    submit("submit-unknown-argument", "priority", priority="high"),
    submit("submit-typo-timeout", "timeout", timeout=60),
    submit("submit-typo-agent", "agent", agent="fake"),

    # get_status
    *[tool("get_status", f"status-id-{name}", "task", task_id=v) for name, v in BAD_IDS],
    tool("get_status", "status-id-int", "task_id", task_id=42),
    tool("get_status", "status-id-missing", "task_id"),
    tool("get_status", "status-wait-negative", "wait_s", task_id="<done>", wait_s=-1),
    tool("get_status", "status-wait-inf-string", "wait_s", task_id="<done>", wait_s="inf"),
    tool("get_status", "status-wait-1e309-string", "wait_s", task_id="<done>", wait_s="1e309"),
    tool("get_status", "status-wait-nan-string", "wait_s", task_id="<done>", wait_s="nan"),
    tool("get_status", "status-wait-word", "wait_s", task_id="<done>", wait_s="soon"),
    tool("get_status", "status-unknown-argument", "verbose", task_id="<done>", verbose=True),

    # stream_logs
    *[tool("stream_logs", f"logs-id-{name}", "task", task_id=v) for name, v in BAD_IDS],
    tool("stream_logs", "logs-wait-negative", "wait_s", task_id="<done>", wait_s=-1),
    tool("stream_logs", "logs-wait-inf-string", "wait_s", task_id="<done>", wait_s="inf"),
    tool("stream_logs", "logs-wait-nan-string", "wait_s", task_id="<done>", wait_s="nan"),
    tool("stream_logs", "logs-wait-word", "wait_s", task_id="<done>", wait_s="soon"),
    tool("stream_logs", "logs-cursor-negative", "cursor", task_id="<done>", cursor=-1),
    tool("stream_logs", "logs-cursor-2**70", "cursor", task_id="<done>", cursor=2**70),
    tool("stream_logs", "logs-cursor-string", "cursor", task_id="<done>", cursor="x"),
    tool("stream_logs", "logs-limit-0", "limit", task_id="<done>", limit=0),
    tool("stream_logs", "logs-limit-negative", "limit", task_id="<done>", limit=-5),
    tool("stream_logs", "logs-limit-10**9", "limit", task_id="<done>", limit=10**9),
    tool("stream_logs", "logs-agent-nul", "agent", task_id="<done>", agent="fa\x00ke"),
    tool("stream_logs", "logs-unknown-argument", "follow", task_id="<done>", follow=True),

    # cancel_task
    *[tool("cancel_task", f"cancel-id-{name}", "task", task_id=v) for name, v in BAD_IDS],
    tool("cancel_task", "cancel-id-list", "task_id", task_id=["<done>"]),
    tool("cancel_task", "cancel-unknown-argument", "force", task_id="<done>", force=True),

    # merge_result: refusals must not write a backup ref or touch the checkout
    *[tool("merge_result", f"merge-id-{name}", "task", task_id=v) for name, v in BAD_IDS],
    tool("merge_result", "merge-strategy-nope", "strategy", task_id="<done>", strategy="nope"),
    tool("merge_result", "merge-into-main~1", "into", task_id="<done>", into="main~1"),
    tool("merge_result", "merge-into-other-tasks-branch", "into", task_id="<done>", into="council/<other>/fresh"),
    tool("merge_result", "merge-into-own-council-branch", "into", task_id="<done>", into="council/<done>/fresh"),
    tool("merge_result", "merge-into-dash-f", "into", task_id="<done>", into="-f"),
    tool("merge_result", "merge-into-empty", "into", task_id="<done>", into=""),
    tool("merge_result", "merge-into-nul", "into", task_id="<done>", into="ma\x00in"),
    tool("merge_result", "merge-into-missing-branch", "into", task_id="<done>", into="no-such-branch"),
    tool("merge_result", "merge-into-HEAD", "into", task_id="<done>", into="HEAD"),
    tool("merge_result", "merge-agent-unknown", "nobody", task_id="<done>", agent="nobody"),
    tool("merge_result", "merge-agent-nul", "agent|attempt", task_id="<done>", agent="fa\x00ke"),
    tool("merge_result", "merge-still-running", "running", task_id="<running>"),
    tool("merge_result", "merge-dry-run-word", "dry_run", task_id="<done>", dry_run="maybe"),
    tool("merge_result", "merge-dry-run-yes-string", "dry_run", task_id="<done>", dry_run="yes"),
    tool("merge_result", "merge-dry-run-int", "dry_run", task_id="<done>", dry_run=2),
    tool("merge_result", "merge-cleanup-word", "cleanup", task_id="<done>", cleanup="no"),
    tool("merge_result", "merge-unknown-argument", "force", task_id="<done>", force=True),

    # continue_task: a refused follow-up starts nothing and leaves the attempt as it was
    *[tool("continue_task", f"continue-id-{name}", "task", task_id=v, agent="fresh", prompt="more")
      for name, v in BAD_IDS],
    tool("continue_task", "continue-agent-unknown", "nobody", task_id="<done>", agent="nobody", prompt="more"),
    tool("continue_task", "continue-agent-nul", "agent", task_id="<done>", agent="fr\x00esh", prompt="more"),
    tool("continue_task", "continue-agent-missing", "agent", task_id="<done>", prompt="more"),
    tool("continue_task", "continue-prompt-empty", "prompt", task_id="<done>", agent="fresh", prompt=" \n"),
    tool("continue_task", "continue-prompt-nul", "prompt", task_id="<done>", agent="fresh", prompt="mo\x00re"),
    tool("continue_task", "continue-prompt-int", "prompt", task_id="<done>", agent="fresh", prompt=42),
    tool("continue_task", "continue-prompt-130kb", "prompt", task_id="<done>", agent="fresh", prompt="x" * 130_000),
    tool("continue_task", "continue-timeout-0", "timeout_s", task_id="<done>", agent="fresh", prompt="m", timeout_s=0),
    tool("continue_task", "continue-timeout-inf-string", "timeout_s", task_id="<done>", agent="fresh", prompt="m",
         timeout_s="inf"),
    tool("continue_task", "continue-check-nul", "check", task_id="<done>", agent="fresh", prompt="m", check="a\x00b"),
    tool("continue_task", "continue-check-unbalanced", "check", task_id="<done>", agent="fresh", prompt="m",
         check="echo 'open"),
    tool("continue_task", "continue-still-running", "running", task_id="<running>", agent="stuck", prompt="more"),
    tool("continue_task", "continue-unknown-argument", "force", task_id="<done>", agent="fresh", prompt="m", force=True),

    # review_task: a refused review runs no reviewer and leaves the task as it was
    *[tool("review_task", f"review-id-{name}", "task", task_id=v) for name, v in BAD_IDS],
    tool("review_task", "review-reviewer-unknown", "nobody", task_id="<done>", reviewers=["nobody"]),
    tool("review_task", "review-reviewer-disabled", "off", task_id="<done>", reviewers=["off"]),
    tool("review_task", "review-reviewer-nul", "agent", task_id="<done>", reviewers=["fr\x00esh"]),
    tool("review_task", "review-reviewer-dotdot", "agent", task_id="<done>", reviewers=["../fake"]),
    tool("review_task", "review-reviewers-empty", "reviewers", task_id="<done>", reviewers=[]),
    tool("review_task", "review-reviewers-string", "reviewers", task_id="<done>", reviewers="fake"),
    tool("review_task", "review-reviewers-10000-names", "reviewers", task_id="<done>",
         reviewers=[f"a{i}" for i in range(10_000)]),
    tool("review_task", "review-still-running", "running", task_id="<running>"),
    tool("review_task", "review-unknown-argument", "force", task_id="<done>", force=True),

    # undo_merge
    *[tool("undo_merge", f"undo-id-{name}", "task", task_id=v) for name, v in BAD_IDS],
    tool("undo_merge", "undo-not-merged", "not merged", task_id="<done>"),
    tool("undo_merge", "undo-still-running", "running", task_id="<running>"),
    tool("undo_merge", "undo-unknown-argument", "force", task_id="<done>", force=True),

    # list_tasks
    tool("list_tasks", "list-limit-0", "limit", limit=0),
    tool("list_tasks", "list-limit-negative", "limit", limit=-1),
    tool("list_tasks", "list-limit-10**12", "limit", limit=10**12),
    tool("list_tasks", "list-limit-string", "limit", limit="x"),
    tool("list_tasks", "list-repo-relative", "repo", repo="relative/path"),
    tool("list_tasks", "list-repo-nul", "repo", repo="<repo>\x00"),
    tool("list_tasks", "list-repo-int", "repo", repo=42),
    tool("list_tasks", "list-unknown-argument", "state", state="running"),
]


@pytest.fixture
def mcp_case(mcp_world):
    """The MCP world, and after the case: whatever a wrongly accepted call started has ended (or crashed
    the server, which is then restarted), so it cannot land in the next case."""
    yield mcp_world
    try:
        mcp_world.mem.quiesce({mcp_world._running} if mcp_world._running else set())
    except BaseException:
        pass
    mcp_world.ensure_alive()


@pytest.mark.parametrize("name, args, says", TOOL_CASES)
def test_tool_refuses_and_changes_nothing(mcp_case, name, args, says):
    mcp_world = mcp_case
    mcp_world.ensure_alive()
    mem = mcp_world.mem
    args = resolve(args, mcp_world.case_subs(args))
    keep = {mcp_world._running} if mcp_world._running else set()
    mem.quiesce(keep)
    before = snapshot(mcp_world.home, mcp_world.repo)
    r = mem.call(name, args)
    text = tool_text(r)
    assert r.is_error, f"accepted: {text[:500]}"
    assert_clear(text, says)
    assert mem.alive(), "the server stopped answering"
    assert_unchanged(before, snapshot(mcp_world.home, mcp_world.repo))


RESOURCE_CASES = [
    pytest.param("council://tasks/no-such-task", id="resource-unknown-task"),
    pytest.param("council://tasks/no-such-task/logs", id="resource-unknown-task-logs"),
    pytest.param("council://tasks/../../etc/passwd", id="resource-dotdot-passwd"),
    pytest.param("council://tasks/%2e%2e%2f%2e%2e%2fetc%2fpasswd", id="resource-encoded-dotdot"),
    pytest.param("council://tasks/" + "t" * 100_000, id="resource-huge-uri"),
    pytest.param("council://tasks/<done>/attempts/fake/../../../../etc/passwd", id="resource-attempt-dotdot"),
    pytest.param("file:///etc/passwd", id="resource-file-scheme"),
    pytest.param("council://tasks/", id="resource-empty-id"),
]


@pytest.mark.parametrize("uri", RESOURCE_CASES)
def test_resource_refuses_and_changes_nothing(mcp_case, uri):
    mcp_world = mcp_case
    mcp_world.ensure_alive()
    mem = mcp_world.mem
    uri = resolve(uri, mcp_world.case_subs(uri))
    mem.quiesce({mcp_world._running} if mcp_world._running else set())
    before = snapshot(mcp_world.home, mcp_world.repo)
    with pytest.raises(MCPError) as refused:
        got = mem.read(uri)
        assert "root:" not in str(got), "a resource read a file outside the council"
    assert_clear(str(refused.value))
    assert len(str(refused.value)) < 2000, "the refusal echoes the whole hostile input back"
    assert mem.alive(), "the server stopped answering"
    assert_unchanged(before, snapshot(mcp_world.home, mcp_world.repo))


# Group 2: the command line, as a subprocess.

CLI_CONFIG = f"""
[engine]
kill_grace_s = 1

[agents.fake]
kind = "command"
argv = [{json.dumps(PY)}, {json.dumps(FAKE_AGENT)}, "--write", "hello.txt=hi", "{{prompt}}"]
"""


class CliWorld(World):
    def start(self) -> None:
        self.config.write_text(CLI_CONFIG)
        self.done = ""

    def ensure_usable(self) -> None:
        """A state dir `status` can read, holding one finished task."""
        out = self.cli("status", "--json")
        if out.returncode != 0:
            self.fresh_home()
            self.done = ""
        elif any(t["task_id"] == self.done and t["state"] == "succeeded" for t in json.loads(out.stdout)["tasks"]):
            return
        out = self.cli("run", "--repo", str(self.repo), "--agents", "fake", "--json", "say hi")
        assert out.returncode == 0, out.stderr
        self.done = json.loads(out.stdout)["task_id"]

    def cli(self, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """`python -m server.cli ARGS`; arguments holding a NUL byte (which no exec can carry) go
        through server.cli.main(argv) in a fresh interpreter instead."""
        if any("\x00" in a for a in args):
            cmd = [PY, "-c", "import json, sys; from server.cli import main; sys.exit(main(json.loads(sys.argv[1])))",
                   json.dumps(list(args))]
        else:
            cmd = [PY, "-m", "server.cli", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env or self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def ensure_server(self):
        """The group's server, answering, on a usable state dir."""
        try:  # a task a wrongly accepted earlier case started has ended (or crashed the server)
            settle(self.server.tasks)
        except Exception:
            pass
        self.server.ensure_alive()
        if not self.server.alive():
            self.server.stop()
            self.fresh_home()
            self.server.env = {**self.server.env, **self.env}
            self.server.start()
        return self.server


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory):
    world = CliWorld(tmp_path_factory.mktemp("hostile-cli"))
    world.start()
    return world


def assert_exit_2(out: subprocess.CompletedProcess, says: tuple[str, ...] = ()) -> None:
    assert out.returncode == 2, f"exit {out.returncode}\nstdout: {out.stdout[-800:]}\nstderr: {out.stderr[-1500:]}"
    assert out.stderr.startswith("error:"), out.stderr[-1500:]
    assert_clear(out.stderr, says)


def cli(case_id: str, *args: str, says: tuple[str, ...] = ()):
    return pytest.param(list(args), says, id=case_id)


RUN = ("run", "--repo", "<repo>", "--agents", "fake")
CLI_CASES = [
    cli("run-timeout-inf", *RUN, "--timeout", "inf", "hi", says=("timeout",)),
    cli("run-timeout-nan", *RUN, "--timeout", "nan", "hi", says=("timeout",)),
    cli("run-timeout-1e309", *RUN, "--timeout", "1e309", "hi", says=("timeout",)),
    cli("run-timeout-0", *RUN, "--timeout", "0", "hi", says=("timeout",)),
    cli("run-timeout-negative", *RUN, "--timeout=-5", "hi", says=("timeout",)),
    cli("run-timeout-word", *RUN, "--timeout", "soon", "hi", says=("timeout",)),
    cli("run-budget-negative", *RUN, "--budget=-1", "hi", says=("budget",)),
    cli("run-budget-nan", *RUN, "--budget", "nan", "hi", says=("budget",)),
    cli("run-repo-nul", "run", "--repo", "<repo>\x00", "--agents", "fake", "hi", says=("repo",)),
    cli("run-repo-relative", "run", "--repo", "relative/path", "--agents", "fake", "hi", says=("repo",)),
    cli("run-repo-missing", "run", "--repo", "<missing>", "--agents", "fake", "hi", says=("repo",)),
    cli("run-repo-not-git", "run", "--repo", "<plain>", "--agents", "fake", "hi", says=("repo",)),
    cli("run-check-nul", *RUN, "--check", "pytest\x00-q", "hi", says=("check",)),
    cli("run-base-dash-x", *RUN, "--base=-x", "hi", says=("base",)),
    cli("run-base-nul", *RUN, "--base", "main\x00", "hi", says=("base",)),
    cli("run-base-unknown", *RUN, "--base", "no-such-ref", "hi", says=("base",)),
    cli("run-agents-unknown", "run", "--repo", "<repo>", "--agents", "nobody", "hi", says=("agent",)),
    cli("run-agents-empty", "run", "--repo", "<repo>", "--agents", ",", "hi", says=("agent",)),
    cli("run-agents-dotdot", "run", "--repo", "<repo>", "--agents", "../fake", "hi", says=("agent",)),
    cli("run-prompt-empty", *RUN, "", says=("prompt",)),
    cli("run-prompt-nul", *RUN, "do\x00it", says=("prompt",)),
    cli("run-prompt-130kb", *RUN, "x" * 130_000, says=("prompt",)),
    cli("run-tier-nope", *RUN, "--tier", "nope", "hi", says=("tier",)),
    cli("status-unknown-id", "status", "no-such-task", says=("task",)),
    cli("status-dotdot-id", "status", "../x", says=("task",)),
    cli("status-10kb-id", "status", BIG_ID, says=("task",)),
    cli("status-nul-id", "status", "ab\x00cd", says=("task",)),
    cli("status-limit-0", "status", "--limit", "0", says=("limit",)),
    cli("status-limit-negative", "status", "--limit=-1", says=("limit",)),
    cli("status-limit-word", "status", "--limit", "x", says=("limit",)),
    cli("logs-unknown-id", "logs", "no-such-task", says=("task",)),
    cli("logs-dotdot-id", "logs", "../x", says=("task",)),
    cli("merge-unknown-id", "merge", "no-such-task", says=("task",)),
    cli("merge-into-main~1", "merge", "<done>", "--into", "main~1", says=("into",)),
    cli("merge-into-dash-f", "merge", "<done>", "--into=-f", says=("into",)),
    cli("merge-into-council-branch", "merge", "<done>", "--into", "council/<done>/fake", says=("into",)),
    cli("merge-into-missing-branch", "merge", "<done>", "--into", "no-such-branch", says=("into",)),
    cli("merge-into-nul", "merge", "<done>", "--into", "ma\x00in", says=("into",)),
    cli("merge-strategy-nope", "merge", "<done>", "--strategy", "nope", says=("strategy",)),
    cli("merge-agent-unknown", "merge", "<done>", "--agent", "nobody", says=("nobody",)),
    cli("cancel-unknown-id", "cancel", "no-such-task", says=("task",)),
    cli("cancel-dotdot-id", "cancel", "../x", says=("task",)),
    cli("gc-older-than-negative", "gc", "--older-than=-1", says=("older",)),
    cli("gc-older-than-inf", "gc", "--older-than", "inf", says=("older",)),
    cli("gc-older-than-nan", "gc", "--older-than", "nan", says=("older",)),
    cli("gc-older-than-word", "gc", "--older-than", "week", says=("older",)),
    cli("unknown-subcommand", "frobnicate"),
    cli("run-unknown-option", *RUN, "--priority", "high", "hi", says=("priority",)),
]


def status_still_works(world: CliWorld) -> None:
    out = world.cli("status", "--json")
    assert out.returncode == 0, f"`status` broke after the case: {out.stderr[-1500:]}"
    assert "tasks" in json.loads(out.stdout)


@pytest.mark.parametrize("args, says", CLI_CASES)
def test_command_line_refuses_and_changes_nothing(cli_world, args, says):
    cli_world.ensure_usable()
    args = resolve(args, {**cli_world.subs(), "<done>": cli_world.done})
    before = snapshot(cli_world.home, cli_world.repo)
    out = cli_world.cli(*args)
    assert_exit_2(out, says)
    status_still_works(cli_world)
    assert_unchanged(before, snapshot(cli_world.home, cli_world.repo))


BROKEN_CONFIGS = {
    "unknown-kind": ('[agents.z]\nkind = "nope"\n', ("z", "nope")),
    "max-parallel-string": ('[engine]\nmax_parallel = "x"\n', ("max_parallel",)),
    "typo-key": ("[engine]\nmax_paralel = 4\n", ("max_paralel",)),
    "invalid-toml": ("[engine\nmax_parallel = 4\n", ()),
}


@pytest.mark.parametrize("command", [["run", "--repo", "<repo>", "hi"], ["status"], ["doctor"], ["serve"]],
                         ids=lambda c: c[0])
@pytest.mark.parametrize("config", list(BROKEN_CONFIGS))
def test_broken_config_is_exit_2_naming_the_file(cli_world, config, command):
    cli_world.ensure_usable()
    text, says = BROKEN_CONFIGS[config]
    path = cli_world.root / f"broken-{config}.toml"
    path.write_text(text)
    env = {**cli_world.env, "CLI_COUNCIL_CONFIG": str(path)}
    before = snapshot(cli_world.home, cli_world.repo)
    out = cli_world.cli(*resolve(command, cli_world.subs()), env=env, timeout=30)
    assert_exit_2(out, (str(path), *says))
    status_still_works(cli_world)
    assert_unchanged(before, snapshot(cli_world.home, cli_world.repo))


# Group 3: raw bytes on a stdio server.

@pytest.fixture(scope="module")
def stdio_world(tmp_path_factory):
    world = CliWorld(tmp_path_factory.mktemp("hostile-stdio"))
    world.start()
    world.server = StdioProcess(world.env)
    yield world
    world.server.stop()


@pytest.fixture
def stdio_case(stdio_world):
    yield stdio_world
    stdio_world.ensure_server()


def rpc(msg_id, method: str, **params) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}).encode()


def call_raw(msg_id: int, name: str, arguments: str) -> bytes:
    """A tools/call whose arguments are raw JSON text (for 1e309, NaN and Infinity literals)."""
    return (f'{{"jsonrpc":"2.0","id":{msg_id},"method":"tools/call","params":{{"name":"{name}",'
            f'"arguments":{arguments}}}}}').encode()


SUBMIT_RAW = '{{"repo":"<repo>","prompt":"do it","agents":["fake"],{}}}'
# expect: a JSON-RPC error code and the ids it may carry, or "refused" (an error reply or a tool error)
STDIO_CASES = [
    pytest.param(b"{bad", (-32700, (None,)), id="stdio-invalid-json"),
    pytest.param(b"[]", (-32600, (None,)), id="stdio-empty-array"),
    pytest.param(b"42", (-32600, (None,)), id="stdio-number"),
    pytest.param(b'"x"', (-32600, (None,)), id="stdio-string"),
    pytest.param(b"null", (-32600, (None,)), id="stdio-null"),
    pytest.param(b"true", (-32600, (None,)), id="stdio-true"),
    pytest.param(b'{"id":5,"method":"ping"}', (-32600, (5, None)), id="stdio-no-jsonrpc-member"),
    pytest.param(b'{"jsonrpc":"1.0","id":6,"method":"ping"}', (-32600, (6, None)), id="stdio-jsonrpc-1.0"),
    pytest.param(b'{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}', (-32600, (None,)), id="stdio-object-id"),
    pytest.param(b'{"jsonrpc":"2.0","id":7}', (-32600, (7, None)), id="stdio-no-method"),
    pytest.param(rpc(8, "no/such/method"), (-32601, (8,)), id="stdio-unknown-method"),
    pytest.param(b'[{"jsonrpc":"2.0","id":9,"method":"ping"}]', (-32600, (9, None)), id="stdio-batch"),
    pytest.param(call_raw(10, "list_tasks", '{"repo":"\\ud800"}'), ("refused", (10, None)),
                 id="stdio-lone-surrogate-argument"),
    pytest.param(b'{"jsonrpc":"2.0","id":11,"method":"\\udfff"}', ("refused", (11, None)),
                 id="stdio-lone-surrogate-method"),
    pytest.param(b"\xff\xfe\xfd not utf-8", (-32700, (None,)), id="stdio-invalid-utf8"),
    pytest.param(b'{"jsonrpc":"2.0","id":12,"method":"ping"\xc3\x28}', (-32700, (None, 12)),
                 id="stdio-invalid-utf8-in-object"),
    pytest.param(b"[" * 100_000, (-32700, (None,)), id="stdio-deep-nesting"),
    pytest.param(call_raw(13, "submit_task", SUBMIT_RAW.replace('"do it"', '"' + "x" * 2_000_000 + '"').format('"tier":"cheap"')),
                 ("refused", (13, None)), id="stdio-2mb-line"),
    pytest.param(b"x" * 2_000_000, (-32700, (None,)), id="stdio-2mb-garbage"),
    pytest.param(b'{"jsonrpc":"2.0","id":14,"method":"tools/call","params":{}}', ("refused", (14,)),
                 id="stdio-tools-call-without-name"),
    pytest.param(call_raw(15, "no_such_tool", "{}"), ("refused", (15,)), id="stdio-unknown-tool"),
    pytest.param(call_raw(16, "submit_task", SUBMIT_RAW.format('"timeout_s":1e309')), ("refused", (16,)),
                 id="stdio-submit-timeout-1e309-literal"),
    pytest.param(call_raw(17, "submit_task", SUBMIT_RAW.format('"timeout_s":Infinity')), ("refused", (17, None)),
                 id="stdio-submit-timeout-Infinity-literal"),
    pytest.param(call_raw(18, "submit_task", SUBMIT_RAW.format('"timeout_s":NaN')), ("refused", (18, None)),
                 id="stdio-submit-timeout-NaN-literal"),
    pytest.param(call_raw(19, "submit_task", SUBMIT_RAW.format('"budget_usd":1e309')), ("refused", (19,)),
                 id="stdio-submit-budget-1e309-literal"),
    pytest.param(call_raw(20, "get_status", '{"task_id":"x","wait_s":1e309}'), ("refused", (20,)),
                 id="stdio-status-wait-1e309-literal"),
]


def assert_refused_reply(reply: dict, expect) -> None:
    code, _ = expect
    if code == "refused":
        if "error" in reply:
            assert_clear(reply["error"].get("message", ""))
        else:
            assert reply["result"].get("isError") is True, f"accepted: {str(reply)[:500]}"
            assert_clear("\n".join(c.get("text", "") for c in reply["result"]["content"]))
        return
    assert "error" in reply, f"not an error reply: {str(reply)[:500]}"
    assert reply["error"]["code"] == code, reply
    assert_clear(reply["error"].get("message", ""))


@pytest.mark.parametrize("raw, expect", STDIO_CASES)
def test_stdio_replies_with_an_error_and_keeps_serving(stdio_case, raw, expect):
    stdio_world = stdio_case
    server = stdio_world.ensure_server()
    raw = resolve(raw.decode("latin-1"), stdio_world.subs()).encode("latin-1")
    before = snapshot(stdio_world.home, stdio_world.repo)
    server.send(raw)
    ids = expect[1]
    try:  # an error reply is immediate; 5 s is slack for a loaded machine
        reply = server.reply(tuple(ids), within=5)
    except TimeoutError:
        raise AssertionError(f"no reply to the hostile message (server exit code {server.proc.poll()})") from None
    assert_refused_reply(reply, expect)
    assert server.alive(), f"the next valid request got no answer: {server.stderr()[-1500:]}"
    assert_unchanged(before, snapshot(stdio_world.home, stdio_world.repo))


# Group 4: raw HTTP against `serve --transport http`.

TOKEN = "hostile-corpus-token"


@pytest.fixture(scope="module")
def http_world(tmp_path_factory):
    world = CliWorld(tmp_path_factory.mktemp("hostile-http"))
    world.start()
    knobs = {"CLI_COUNCIL_HTTP_HEADER_TIMEOUT_S": "1", "CLI_COUNCIL_HTTP_BODY_TIMEOUT_S": "1"}
    world.server = HttpProcess({**world.env, **knobs}, TOKEN)
    yield world
    world.server.stop()


@pytest.fixture
def http_case(http_world):
    yield http_world
    http_world.ensure_server()


def _post(server: HttpProcess, headers: dict | None = None, **kw) -> httpx.Response:
    kw.setdefault("json", INITIALIZE)
    return httpx.post(server.url, headers=server.headers if headers is None else headers, timeout=30, **kw)


def _without(h: dict, key: str) -> dict:
    return {k: v for k, v in h.items() if k != key}


def _raw_exchange(server: HttpProcess, head: bytes, body: bytes, within: float = 15) -> bytes:
    """Send a request that never finishes; what the server says before it closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=within) as s:
        s.sendall(head + body)
        got, deadline = b"", time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                return got or b"<closed>"
            got += chunk
        raise AssertionError(f"the server kept a stalled connection open for {within} s (got {got[:200]!r})")


def slow_headers(server: HttpProcess) -> int:
    head = f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {TOKEN}\r\n".encode()
    got = _raw_exchange(server, head, b"")  # the blank line that ends the headers never comes
    return int(got.split()[1]) if got.startswith(b"HTTP/") else 408


def slow_body(server: HttpProcess) -> int:
    head = (f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n"
            f"Content-Length: 100000\r\n\r\n").encode()
    got = _raw_exchange(server, head, b'{"jsonrpc":')  # 99,989 bytes short, forever
    return int(got.split()[1]) if got.startswith(b"HTTP/") else 408


HTTP_CASES = [
    pytest.param(lambda s: _post(s, _without(s.headers, "Authorization")).status_code, 401, id="http-no-token"),
    pytest.param(lambda s: _post(s, {**s.headers, "Authorization": "Bearer wrong"}).status_code, 401,
                 id="http-wrong-token"),
    pytest.param(lambda s: _post(s, {**s.headers, "Authorization": "Basic " + TOKEN}).status_code, 401,
                 id="http-basic-not-bearer"),
    pytest.param(lambda s: _post(s, {**s.headers, "Host": "evil.example"}).status_code, 421, id="http-foreign-host"),
    pytest.param(lambda s: _post(s, {**s.headers, "Origin": "http://evil.example"}).status_code, 403,
                 id="http-foreign-origin"),
    pytest.param(lambda s: _post(s, json=None, content=b"{bad").status_code, 400, id="http-invalid-json"),
    pytest.param(lambda s: _post(s, json=None, content=b"[]").status_code, 400, id="http-empty-array"),
    pytest.param(lambda s: _post(s, json=None, content=b"42").status_code, 400, id="http-number-body"),
    pytest.param(lambda s: _post(s, json=None, content=b"\xff\xfe").status_code, 400, id="http-invalid-utf8"),
    pytest.param(lambda s: _post(s, json=None, content=b"[" * 100_000).status_code, 400, id="http-deep-nesting"),
    pytest.param(lambda s: _post(s, json=None, content=b'{"jsonrpc":"2.0","id":1,"method":"' + b"x" * 10_000_000
                                 + b'"}').status_code, 413, id="http-10mb-body"),
    pytest.param(lambda s: _post(s, {**s.headers, "Content-Type": "text/plain"}).status_code, "4xx",
                 id="http-wrong-content-type"),
    pytest.param(lambda s: _post(s, {**s.headers, "Accept": "text/html"}).status_code, 406, id="http-wrong-accept"),
    pytest.param(lambda s: httpx.get(s.url, headers=s.headers, timeout=30).status_code, "4xx",
                 id="http-get-without-session"),
    pytest.param(lambda s: httpx.delete(s.url, headers=s.headers, timeout=30).status_code, "4xx",
                 id="http-delete-without-session"),
    pytest.param(lambda s: _post(s, {**s.headers, "mcp-session-id": "no-such-session"},
                                 json={"jsonrpc": "2.0", "id": 1, "method": "ping"}).status_code, 404,
                 id="http-unknown-session"),
    pytest.param(lambda s: httpx.put(s.url, headers=s.headers, timeout=30).status_code, 405, id="http-put"),
    pytest.param(lambda s: _post(s, {**s.headers, "X-Padding": "a" * 1_000_000}).status_code, "4xx",
                 id="http-1mb-header"),
    pytest.param(slow_headers, "4xx", id="http-slow-header-sender-cut-off"),
    pytest.param(slow_body, "4xx", id="http-slow-body-sender-cut-off"),
]


@pytest.mark.parametrize("send, status", HTTP_CASES)
def test_http_refuses_with_4xx_and_keeps_serving(http_case, send, status):
    http_world = http_case
    server = http_world.ensure_server()
    before = snapshot(http_world.home, http_world.repo)
    got = send(server)
    if status == "4xx":
        assert 400 <= got < 500, got
    else:
        assert got == status
    assert server.alive(), f"the server stopped answering: {server.stderr()[-1500:]}"
    assert_unchanged(before, snapshot(http_world.home, http_world.repo))


HTTP_TOOL_CASES = [
    pytest.param("submit_task", SUBMIT_RAW.format('"timeout_s":1e309'), id="http-submit-timeout-1e309-literal"),
    pytest.param("submit_task", SUBMIT_RAW.format('"timeout_s":"Infinity"'), id="http-submit-timeout-Infinity"),
    pytest.param("submit_task", SUBMIT_RAW.format('"check":"x\\u0000y"'), id="http-submit-nul-check"),
    pytest.param("list_tasks", '{"limit":1e309}', id="http-list-limit-1e309-literal"),
]


@pytest.mark.parametrize("name, arguments", HTTP_TOOL_CASES)
def test_http_tool_call_refuses_and_changes_nothing(http_case, name, arguments):
    http_world = http_case
    server = http_world.ensure_server()
    headers = server.session()
    before = snapshot(http_world.home, http_world.repo)
    r = httpx.post(server.url, content=resolve(call_raw(1, name, arguments).decode(), http_world.subs()).encode(),
                   headers=headers, timeout=30)
    assert 200 <= r.status_code < 500, r.status_code
    data = [json.loads(ln[5:]) for ln in r.text.splitlines() if ln.startswith("data:")] or [r.json()]
    assert_refused_reply(data[0], ("refused", (1,)))
    assert server.alive(), f"the server stopped answering: {server.stderr()[-1500:]}"
    assert_unchanged(before, snapshot(http_world.home, http_world.repo))


# Beside: each trigger that once ended the whole engine, next to a task that must still succeed.

BESIDE_AGENTS = {
    "good": fake("--sleep", "2", "--write", "good.txt=ok"),
    "quick": fake("--write", "quick.txt=ok"),
    "sleeper": fake("--sleep", "30", "--write", "late.txt=x"),
    "writer": {"kind": "command", "argv": [PY, "-c", "import os; open('runtests', 'w').write('echo ran; exit 3\\n'); "
                                                       "os.chmod('runtests', 0o755)"]},
    "gem": AGENTS["gem"],
}


async def _call(client: Client, name: str, args: dict) -> dict | None:
    """The tool's structured result, or None when it was refused (which must be a clear refusal)."""
    r = await client.call_tool(name, args)
    if r.is_error:
        assert_clear(tool_text(r))
        return None
    return r.structured_content


async def _finished(client: Client, task_id: str) -> dict:
    with anyio.fail_after(90):
        while True:
            task = await _call(client, "get_status", {"task_id": task_id, "wait_s": 5})
            if task["state"] not in ACTIVE:
                return task


async def _submit(client: Client, repo: Path, agent: str, **args) -> dict | None:
    return await _call(client, "submit_task", {"repo": str(repo), "prompt": "work", "agents": [agent], **args})


async def nul_prompt(client, repo):
    return await _call(client, "submit_task", {"repo": str(repo), "prompt": "a\x00b", "agents": ["quick"]})


async def nul_check(client, repo):
    return await _submit(client, repo, "quick", check="pytest\x00-q")


async def nul_base(client, repo):
    return await _submit(client, repo, "quick", base="main\x00")


async def nul_into(client, repo):
    done = await _finished(client, (await _submit(client, repo, "quick"))["task_id"])
    await _call(client, "merge_result", {"task_id": done["task_id"], "into": "ma\x00in"})
    return None


async def check_300_chars(client, repo):
    return await _submit(client, repo, "quick", check="x" * 300)


async def check_without_shebang(client, repo):
    return await _submit(client, repo, "writer", check="./runtests")


async def gemini_119000_byte_prompt(client, repo):
    return await _call(client, "submit_task", {"repo": str(repo), "prompt": "x" * 119_000, "agents": ["gem"],
                                               "check": LONG_CHECK})


async def worktree_deleted_while_running(client, repo):
    task = await _submit(client, repo, "sleeper")
    with anyio.fail_after(30):
        while True:
            now = await _call(client, "get_status", {"task_id": task["task_id"]})
            worktree = now["attempts"][0]["worktree"]
            if now["attempts"][0]["state"] == "running" and worktree and Path(worktree).is_dir():
                break
            await anyio.sleep(0.1)
    await anyio.sleep(0.5)
    shutil.rmtree(worktree)
    return task


async def unknown_kind_agent(client, repo):
    return await _submit(client, repo, "z")


TRIGGERS = [nul_prompt, nul_check, nul_base, nul_into, check_300_chars, check_without_shebang,
            gemini_119000_byte_prompt, worktree_deleted_while_running, unknown_kind_agent]


@pytest.mark.parametrize("trigger", TRIGGERS, ids=lambda t: t.__name__.replace("_", "-"))
async def test_trigger_beside_a_task_that_still_succeeds(repo, council_home, trigger):
    agents = dict(BESIDE_AGENTS)
    if trigger is unknown_kind_agent:
        agents["z"] = {"kind": "nope"}
        try:
            cfg = parse_config({"engine": {"kill_grace_s": 1}, "agents": agents})
        except ConfigError as e:  # refused when the config is loaded: nothing can crash later
            assert "z" in str(e) and "nope" in str(e)
            return
    else:
        cfg = parse_config({"engine": {"kill_grace_s": 1}, "agents": agents})
    with anyio.fail_after(120):
        async with Client(build_server(cfg, council_home)) as client:
            good = await _submit(client, repo, "good")
            hostile = await trigger(client, repo)
            assert (await _finished(client, good["task_id"]))["state"] == "succeeded", "the bystander task failed"
            if hostile is not None:
                task = await _finished(client, hostile["task_id"])
                assert task["state"] == "failed", task["state"]
                errors = [a["error"] for a in task["attempts"] if a["error"]] + (
                    [{"message": task["best_reason"]}] if task.get("best_reason") else [])
                assert errors and all(e["message"] for e in errors), task
                for e in errors:
                    assert_clear(e["message"])
            listed = await _call(client, "list_tasks", {})
            assert listed is not None and good["task_id"] in [t["task_id"] for t in listed["tasks"]]
