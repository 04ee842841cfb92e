"""Cross-review: other council members judge each candidate under an anonymous label, read-only, and
the verdict goes check first, then the median review score. Real repos, real processes: the members
are tests/fakes/reviewer.py (writes as an author, answers a review prompt with what it is told) and
the claude/gemini stand-ins (tests/fakes/recording.py replaying tests/fakes/review)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import anyio
import pytest
from mcp import Client

from engine import review as review_mod
from engine.config import parse_config
from engine.engine import Engine
from engine.inputs import CouncilError
from engine.models import ACTIVE_TASK, TaskState
from server.app import build_server
from tests.conftest import FAKES, git
from tests.test_cli import cli, wait_for, write_config

REVIEWER = str(FAKES / "reviewer.py")
FIX = "app.py=def add(a, b):\n    return a + b"


def member(*args: str) -> dict:
    """A command agent running the reviewer fake (prompt last)."""
    return {"kind": "command", "argv": [sys.executable, REVIEWER, *args, "{prompt}"]}


def said(score, verdict: str = "approve", **more) -> str:
    return json.dumps({"score": score, "verdict": verdict, "issues": [], "summary": "looked", **more})


def engine_for(home, agents: dict, **review) -> Engine:
    cfg = parse_config({"agents": agents, "engine": {"kill_grace_s": 1}, "pool": {"size": 0}, "review": review})
    return Engine(cfg, home=home, environ=dict(os.environ))


async def finished(engine: Engine, repo, agents: list[str], prompt: str = "make add() add", **kw):
    task = await engine.submit(str(repo), prompt, agents=agents, **kw)
    task = await engine.wait(task.task_id, 60)
    assert task.state not in ACTIVE_TASK
    return task


def tips(repo, task_id: str = "") -> dict[str, str]:
    """Every branch's tip; with task_id, that task's branches and main only (another task's may come meanwhile)."""
    out = git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads/")
    found = dict(line.split() for line in out.splitlines())
    return {k: v for k, v in found.items() if not task_id or task_id in k or k == "refs/heads/main"}


def prompts(directory) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))] if directory.exists() else []


async def test_median_review_score_decides_over_a_smaller_diff(council_home, repo):
    # alpha's diff is larger; each candidate gets three reviews whose mean ties (6 and 6) but whose median does not
    agents = {
        "alpha": member("--write", FIX + "\n# one\n# two", "--say", said(5)),
        "beta": member("--write", FIX, "--say", said(7)),
        "r1": member("--when", "# one=" + said(9), "--say", said(3, "request_changes")),
        "r2": member("--when", "# one=" + said(2, "request_changes"), "--say", said(10)),
    }
    async with engine_for(council_home, agents) as engine:
        task = await finished(engine, repo, ["alpha", "beta"], review=True)
    alpha, beta = task.attempt("alpha"), task.attempt("beta")
    assert [(r.reviewer, r.score, r.verdict) for r in alpha.reviews] == [
        ("beta", 7, "approve"), ("r1", 9, "approve"), ("r2", 2, "request_changes")]
    assert [(r.reviewer, r.score) for r in beta.reviews] == [("alpha", 5), ("r1", 3), ("r2", 10)]
    assert (alpha.review_score, beta.review_score) == (7, 5)
    assert alpha.insertions > beta.insertions and alpha.agreement == beta.agreement
    assert task.state == TaskState.succeeded and task.best == "alpha", task.best_reason
    assert task.best_reason == ("alpha over beta: higher review score (median 7 of 3 review(s) vs "
                                "median 5 of 3 review(s))")
    assert all(r.error is None and r.summary == "looked" for a in (alpha, beta) for r in a.reviews)


async def test_a_passed_check_beats_a_better_review(council_home, repo):
    agents = {
        "alpha": member("--write", FIX, "--say", said(1, "request_changes")),
        "beta": member("--write", FIX + "\n# beta's", "--write", "ok.txt=1", "--say", said(9)),
        "r1": member("--when", "ok.txt=" + said(1, "request_changes"), "--say", said(9)),
    }
    async with engine_for(council_home, agents) as engine:
        task = await finished(engine, repo, ["alpha", "beta"], check="test -f ok.txt", review=True)
    alpha, beta = task.attempt("alpha"), task.attempt("beta")
    assert alpha.review_score > beta.review_score and not alpha.check.passed and beta.check.passed
    assert task.best == "beta" and task.best_reason == "beta over alpha: its check passed (`test -f ok.txt`)"


@pytest.mark.parametrize("answer, why", [
    ("looks fine to me, ship it", "no usable verdict: the answer holds no JSON verdict"),
    (said(11), "score 11 is not between 0 and 10"),
    ('{"score": 1e309, "verdict": "approve"}', "score inf is not between 0 and 10"),
    ('{"score": NaN, "verdict": "approve"}', "score nan is not between 0 and 10"),
    ('{"score": 1' + "0" * 400 + ', "verdict": "approve"}', "0000… is not between 0 and 10"),
    (said("7"), 'score "7" is not a number'),
    (said(True), "score true is not a number"),
    (said(8, "lgtm"), 'verdict "lgtm" is not one of approve, request_changes'),
    ('{"score": 8}', "verdict null is not one of"),
    ("[" * 100_000, "no usable verdict"),
], ids=["not-json", "score-11", "score-1e309", "score-nan", "score-400-digits", "score-string", "score-bool", "verdict-lgtm",
        "verdict-missing", "deep-nesting"])
async def test_a_malformed_verdict_is_a_failed_review_and_the_verdict_still_comes(council_home, repo, answer, why):
    agents = {"alpha": member("--write", FIX), "critic": member("--say", answer)}
    async with engine_for(council_home, agents) as engine:
        task = await finished(engine, repo, ["alpha"], review=True)
    (got,) = task.attempt("alpha").reviews
    assert got.reviewer == "critic" and got.score is None and got.verdict is None
    assert why in got.error, got.error
    assert task.attempt("alpha").review_score is None
    assert task.state == TaskState.succeeded and task.best == "alpha"


async def test_huge_output_is_bounded_and_its_last_verdict_still_read(council_home, repo):
    agents = {"alpha": member("--write", FIX),
              "noisy": member("--junk", "3000000", "--say", said(6)),
              "flood": member("--junk", "3000000", "--say", "x" * 200)}
    async with engine_for(council_home, agents) as engine:
        task = await finished(engine, repo, ["alpha"], review=True)
    reviews = {r.reviewer: r for r in task.attempt("alpha").reviews}
    assert reviews["noisy"].score == 6 and reviews["noisy"].error is None
    assert reviews["flood"].error.startswith("no usable verdict")
    assert task.attempt("alpha").review_score == 6 and task.best == "alpha"


async def test_a_long_prompt_and_a_huge_diff_reach_the_reviewer_cut_to_fit_one_argument(council_home, repo, tmp_path):
    seen = tmp_path / "seen"
    writer = "open('big.txt', 'w').write('line of text\\n' * 20_000)"
    agents = {"alpha": {"kind": "command", "argv": [sys.executable, "-c", writer]},
              "critic": member("--record", str(seen), "--say", said(7))}
    async with engine_for(council_home, agents) as engine:
        task = await finished(engine, repo, ["alpha"], prompt="\U0001F600" * 25_000, review=True)
    (got,) = task.attempt("alpha").reviews
    assert got.score == 7, got.error
    (shown,) = [p["prompt"] for p in prompts(seen) if p["prompt"].startswith("You review one candidate")]
    assert "[...cut]" in shown and "(The diff was cut here; judge what is shown.)" in shown
    assert len(shown.encode()) < 128 * 1024 - 4096


async def test_a_reviewer_that_times_out_is_recorded_and_blocks_nothing(council_home, repo):
    agents = {"alpha": member("--write", FIX), "slow": member("--sleep", "60", "--say", said(1)),
              "quick": member("--say", said(8))}
    async with engine_for(council_home, agents, timeout_s=1) as engine:
        task = await finished(engine, repo, ["alpha"], review=True)
        lines = [ln.text for ln in (await engine.logs(task.task_id, agent="review:slow", limit=100)).lines]
    reviews = {r.reviewer: r for r in task.attempt("alpha").reviews}
    assert reviews["slow"].error == "no verdict within 1s; its process group was killed"
    assert reviews["quick"].score == 8 and task.attempt("alpha").review_score == 8
    assert task.state == TaskState.succeeded and task.best == "alpha"
    assert any("failed: no verdict within 1s" in t for t in lines)


async def test_authors_never_review_themselves_and_the_prompt_names_no_agent(council_home, repo, tmp_path):
    rec = {n: tmp_path / "seen" / n for n in ("alpha", "beta", "gamma")}
    agents = {
        "alpha": member("--write", "notes/alpha.txt=MARK-ONE by alpha on council/x/alpha", "--record", str(rec["alpha"]),
                        "--say", said(6)),
        "beta": member("--write", "notes/beta.txt=MARK-TWO, Beta wrote it", "--record", str(rec["beta"]),
                       "--say", said(6)),
        "gamma": member("--record", str(rec["gamma"]), "--say", said(6)),
    }
    prompt = "alpha, beta or gamma: write a note"
    async with engine_for(council_home, agents) as engine:
        task = await finished(engine, repo, ["alpha", "beta", "gamma"], prompt=prompt, review=True)
    alpha, beta = task.attempt("alpha"), task.attempt("beta")
    assert {r.reviewer for r in alpha.reviews} == {"beta", "gamma"}
    assert {r.reviewer for r in beta.reviews} == {"alpha", "gamma"}
    reviews = {n: [p for p in prompts(d) if p["prompt"].startswith("You review one candidate")] for n, d in rec.items()}
    assert [len(reviews[n]) for n in ("alpha", "beta", "gamma")] == [1, 1, 2]
    assert "MARK-TWO" in reviews["alpha"][0]["prompt"] and "MARK-ONE" not in reviews["alpha"][0]["prompt"]
    assert "MARK-ONE" in reviews["beta"][0]["prompt"] and "MARK-TWO" not in reviews["beta"][0]["prompt"]
    worktrees = [a.worktree for a in task.attempts if a.worktree]
    for name, seen in ((n, p) for n, ps in reviews.items() for p in ps):
        text = seen["prompt"]
        for leak in ("alpha", "beta", "gamma", "council/", *worktrees, str(council_home)):
            assert leak.lower() not in text.lower(), (leak, text)
        assert "Candidate A" in text or "Candidate B" in text
        assert "write a note" in text and "<agent>" in text  # the task is shown, its names scrubbed
        # a private directory (removed after), named for the reviewer and the label, not for the author
        assert seen["cwd"].startswith(str(council_home / "tmp" / task.task_id)) and not os.path.exists(seen["cwd"])
        assert seen["cwd"].rsplit("/review-", 1)[1] in (f"{name}-A", f"{name}-B")


async def test_every_reviewer_asking_for_changes_turns_a_candidate_down_without_a_check(council_home, repo):
    agents = {
        "alpha": member("--write", FIX, "--say", said(3, "request_changes")),  # reviews beta
        "beta": member("--write", FIX + "\n# b", "--say", said(8, "request_changes")),  # reviews alpha
        "r1": member("--when", "# b=" + said(9, "request_changes"), "--say", said(2)),
    }
    async with engine_for(council_home, agents) as engine:
        task = await finished(engine, repo, ["alpha", "beta"], review=True)
        lone = await finished(engine, repo, ["beta"], review=True)
        checked = await finished(engine, repo, ["beta"], review=True, check="true")
    # beta scores higher (median 6 vs 5), yet every review of it says request_changes and no check speaks for it
    assert task.attempt("beta").review_score > task.attempt("alpha").review_score
    assert task.best == "alpha" and task.best_reason == (
        "alpha over beta: every reviewer asked for changes to it and no check passed; median 5 of 2 review(s)")
    assert lone.best is None and lone.state == TaskState.failed
    assert lone.best_reason == "every reviewer asked for changes to beta and no check passed for it; none is picked"
    assert checked.best == "beta" and checked.state == TaskState.succeeded  # a passed check outweighs opinion


async def test_a_reviewer_cannot_move_any_branch(council_home, repo, tmp_path):
    # a reviewer that commits in every council worktree it can find and deletes every council branch
    evil = ("import subprocess, sys\n"
            "repo = sys.argv[1]\n"
            "out = subprocess.run(['git', '-C', repo, 'worktree', 'list', '--porcelain'], capture_output=True, text=True).stdout\n"
            "for line in out.splitlines():\n"
            "    if line.startswith('worktree ') and 'worktrees' in line:\n"
            "        w = line[9:]\n"
            "        open(w + '/evil.txt', 'w').write('x')\n"
            "        subprocess.run(['git', '-C', w, 'add', '-A'])\n"
            "        subprocess.run(['git', '-C', w, 'commit', '-qm', 'evil'])\n"
            "refs = subprocess.run(['git', '-C', repo, 'for-each-ref', '--format=%(refname)', 'refs/heads/council/'],\n"
            "                      capture_output=True, text=True).stdout.split()\n"
            "for ref in refs[:1]:\n"
            "    subprocess.run(['git', '-C', repo, 'update-ref', '-d', ref])\n")
    script = tmp_path / "evil.py"
    script.write_text(evil)
    agents = {"alpha": member("--write", FIX, "--say", said(5)),
              "beta": member("--write", FIX + "\n# b", "--say", said(5)),
              "vandal": member("--exec", json.dumps([sys.executable, str(script), str(repo)]), "--say", said(9))}
    async with engine_for(council_home, agents) as engine:
        task = await finished(engine, repo, ["alpha", "beta"])
        before = tips(repo)
        assert task.attempt("alpha").reviews == []  # review is opt-in
        await engine.review(task.task_id, reviewers=["vandal"])
        task = await engine.wait(task.task_id, 60)
    assert tips(repo) == before
    assert {r.reviewer for a in task.attempts for r in a.reviews} == {"vandal"}
    assert any("a reviewer moved council/" in w for w in task.warnings), task.warnings


async def test_claude_and_gemini_review_in_their_read_only_modes(council_home, repo, tmp_path):
    log = tmp_path / "runs.jsonl"

    def standin(kind: str) -> dict:
        return {"kind": kind, "command": [sys.executable, str(FAKES / "recording.py")],
                "env": {"RECORD_LOG": str(log), "FAKE_FIXTURE": f"{kind}-review",
                        "FAKE_FIXTURE_DIR": str(FAKES / "review"), "ANTHROPIC_API_KEY": "sk-ant-test-0000000000",
                        "GEMINI_API_KEY": "gm-test-0000000000"}}

    agents = {"author": member("--write", FIX), "claude": standin("claude"), "gemini": standin("gemini")}
    async with engine_for(council_home, agents) as engine:
        task = await finished(engine, repo, ["author"], review=True, prompt="make add() add, as claude would")
        await engine.review(task.task_id, reviewers=["claude"])
        again = await engine.wait(task.task_id, 60)
    a = task.attempt("author")
    assert [(r.reviewer, r.score, r.verdict, r.issues, r.cost_usd) for r in a.reviews] == [
        ("claude", 8.5, "approve", ["no test for negative numbers"], 0.0123),
        ("gemini", 4, "request_changes", ["misses the edge case"], 0.0029)]  # its tokens at gemini's prices
    assert a.review_score == 6.25 and task.total_cost_usd == 0.0152 and task.best == "author"
    # Reviewed again: the new reviews replace the old, whose cost was paid and stays in the total.
    assert [r.reviewer for r in again.attempt("author").reviews] == ["claude"]
    assert again.total_cost_usd == 0.0275 and again.replaced_reviews_cost_usd == 0.0152
    argvs = [json.loads(line)["argv"] for line in log.read_text().splitlines()]
    claude = next(v for v in argvs if "--permission-mode" in v)
    gemini = next(v for v in argvs if "--approval-mode" in v)
    assert claude[claude.index("--permission-mode") + 1] == "plan"
    assert gemini[gemini.index("--approval-mode") + 1] == "default"
    for argv in (claude, gemini):
        prompt = argv[argv.index("-p") + 1]
        assert prompt.startswith("You review one candidate") and "claude" not in prompt.lower()
        assert not {"acceptEdits", "bypassPermissions", "--dangerously-skip-permissions", "yolo", "auto_edit"} & set(argv)


async def test_review_task_over_mcp_and_its_refusals_change_nothing(council_home, repo):
    agents = {"alpha": member("--write", FIX, "--say", said(9)), "beta": member("--write", FIX + "\n# b", "--say", said(4)),
              "stuck": member("--write", "x.txt=1", "--sleep", "600"), "off": {**member(), "enabled": False}}
    cfg = parse_config({"agents": agents, "engine": {"kill_grace_s": 1}, "pool": {"size": 0}})
    server = build_server(config=cfg, home=council_home)
    async with Client(server) as client:
        r = await client.call_tool("submit_task", {"repo": str(repo), "prompt": "fix add", "agents": ["alpha", "beta"]})
        task_id = r.structured_content["task_id"]
        done = (await client.call_tool("get_status", {"task_id": task_id, "wait_s": 60})).structured_content
        assert done["state"] == "succeeded" and done["best"] == "alpha"  # the smaller diff, before any review
        running = (await client.call_tool("submit_task", {"repo": str(repo), "prompt": "p", "agents": ["stuck"],
                                                          "review": True})).structured_content["task_id"]
        before = (tips(repo, task_id), (await client.call_tool("get_status", {"task_id": task_id})).structured_content)
        for args, says in [({"task_id": "no-such-task"}, "no task"), ({"task_id": running}, "still running"),
                           ({"task_id": task_id, "reviewers": ["nobody"]}, "nobody"),
                           ({"task_id": task_id, "reviewers": ["off"]}, "disabled"),
                           ({"task_id": task_id, "reviewers": []}, "reviewers")]:
            r = await client.call_tool("review_task", args)
            assert r.is_error and says in r.content[0].text, (args, r.content)
        after = (tips(repo, task_id), (await client.call_tool("get_status", {"task_id": task_id})).structured_content)
        assert after == before
        r = await client.call_tool("review_task", {"task_id": task_id, "reviewers": ["alpha", "beta"]})
        assert not r.is_error and r.structured_content["state"] == "running", r.content
        again = await client.call_tool("review_task", {"task_id": task_id})
        assert again.is_error and "running" in again.content[0].text
        done = (await client.call_tool("get_status", {"task_id": task_id, "wait_s": 60})).structured_content
        await client.call_tool("cancel_task", {"task_id": running})
    assert done["state"] == "succeeded" and done["best"] == "beta", done["best_reason"]
    assert [(r["reviewer"], r["score"]) for r in done["attempts"][0]["reviews"]] == [("beta", 4)]
    assert [(r["reviewer"], r["score"]) for r in done["attempts"][1]["reviews"]] == [("alpha", 9)]
    assert done["best_reason"].startswith("beta over alpha: higher review score")


async def test_cancelling_a_review_keeps_the_task_and_its_branches(council_home, repo):
    agents = {"alpha": member("--write", FIX), "slow": member("--sleep", "60", "--say", said(1))}
    async with engine_for(council_home, agents) as engine:
        task = await finished(engine, repo, ["alpha"])
        before = tips(repo)
        await engine.review(task.task_id)
        with pytest.raises(CouncilError, match="running"):
            await engine.merge(task.task_id)
        with anyio.fail_after(30):
            while not (await engine.logs(task.task_id, agent="review:slow", limit=100)).lines:
                await anyio.sleep(0.1)
        await engine.cancel(task.task_id)
        task = await engine.wait(task.task_id, 30)
    assert task.state == TaskState.succeeded and task.best == "alpha" and tips(repo) == before
    assert task.attempt("alpha").review_score is None


def test_labels_and_scrubbing():
    assert [review_mod.label(i) for i in (0, 25, 26, 27)] == ["A", "Z", "AA", "AB"]
    scrub = review_mod.scrubber(["claude", "gemini"], ["/home/u/wt"])
    assert scrub("Claude wrote /home/u/wt/x on refs/heads/council/abc/gemini; claudette stays") == (
        "<agent> wrote <checkout>/x on <branch>; claudette stays")


def test_cli_run_review_and_review_a_task_again(repo, tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    write_config(config, {"alpha": member("--write", FIX, "--say", said(9)),
                          "beta": member("--write", FIX + "\n# b", "--say", said(4))})
    monkeypatch.setenv("CLI_COUNCIL_CONFIG", str(config))
    ran = json.loads(cli("run", "--repo", str(repo), "--agents", "alpha,beta", "--review", "--json", "fix add").stdout)
    assert ran["best"] == "beta" and ran["best_reason"].startswith("beta over alpha: higher review score")
    plain = json.loads(cli("run", "--repo", str(repo), "--agents", "alpha,beta", "--json", "fix add").stdout)
    assert plain["best"] == "alpha" and all(a["reviews"] == [] for a in plain["attempts"])  # off by default
    again = cli("review", plain["task_id"], "--reviewers", "alpha", "--json")
    reviewed = json.loads(again.stdout)
    assert reviewed["state"] == "succeeded" and reviewed["best"] == "beta", reviewed["best_reason"]
    assert [[r["reviewer"] for r in a["reviews"]] for a in reviewed["attempts"]] == [[], ["alpha"]]
    refused = cli("review", "no-such-task", check_code=2)
    assert "no task" in refused.stderr and "Traceback" not in refused.stderr


def test_a_review_whose_host_was_killed_leaves_the_task_finished_on_its_evidence(repo, tmp_path, monkeypatch):
    """The attempts had ended: a host killed mid-review must not strand the task as interrupted (which
    could no longer be reviewed or merged). The next process gives it back its finished state."""
    config, started = tmp_path / "config.toml", tmp_path / "started"
    write_config(config, {"author": member("--write", FIX),
                          "slow": member("--exec", json.dumps([sys.executable, "-c", f"open({str(started)!r}, 'w')"]),
                                         "--say", said(9), "--sleep", "0"),
                          "stuck": member("--sleep", "60", "--say", said(1))})
    monkeypatch.setenv("CLI_COUNCIL_CONFIG", str(config))
    ran = json.loads(cli("run", "--repo", str(repo), "--agents", "author", "--json", "fix add").stdout)
    assert ran["state"] == "succeeded"
    review = subprocess.Popen([sys.executable, "-m", "server.cli", "review", ran["task_id"], "--reviewers", "slow,stuck",
                               "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_for(started.exists)
        os.kill(review.pid, signal.SIGKILL)  # the host dies without any cleanup
        review.wait(10)
    finally:
        review.kill()
    task = json.loads(cli("status", ran["task_id"], "--json").stdout)  # a new process recovers it
    assert task["state"] == "succeeded" and task["best"] == "author", task
    merged = json.loads(cli("merge", ran["task_id"], "--json").stdout)
    assert merged["merged"], merged
