"""/metrics over a real `serve --transport http` on 127.0.0.1, parsed with prometheus_client's own parser:
figures include tasks finished before the server started, the bearer token guards it when set, a
foreign Host is refused, and `cli-council stats --json` prints the same figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families

from engine.models import Attempt, AttemptState, Task, TaskState
from engine.runner import proc_start_time
from engine.store import Store
from tests.conftest import fake
from tests.test_mcp_http import ROOT, TOKEN, http_server


def stored_task(task_id: str, state: TaskState, *attempts: Attempt) -> Task:
    return Task(task_id=task_id, repo="/nowhere", base="0" * 40, prompt="p", timeout_s=60, state=state,
                attempts=list(attempts))


async def history(council_home, make_engine, repo) -> None:
    """What was done before the server starts: one real task with a fake agent, and stored records with
    the figures a fake agent does not report (cost, tokens, retries, an escalation, a long run)."""
    async with make_engine({"fake": fake("--lines", "3", "--write", "hello.txt=hi")}) as engine:
        task = await engine.submit(str(repo), "say hi", agents=["fake"])
        assert (await engine.wait(task.task_id, 60)).state == "succeeded"
    store = Store(council_home / "council.db")
    await store.save_task(stored_task(
        "aaaaaaaaaaa1", TaskState.failed,
        Attempt(agent="claude", state=AttemptState.failed, cost_usd=0.25, tokens_in=1000, tokens_out=200,
                retries=2, duration_s=45.0),
        Attempt(agent="gemini", state=AttemptState.succeeded, stage=1, cost_usd=0.5, tokens_in=3000,
                tokens_out=700, duration_s=700.0)))
    await store.save_task(stored_task(
        "aaaaaaaaaaa2", TaskState.running,
        Attempt(agent="claude", state=AttemptState.running, worktree="/tmp/wt", cost_usd=0.125)),
        owner=(os.getpid(), proc_start_time(os.getpid())))  # hosted by a live process: the server leaves it be
    await store.close()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_count_what_was_done_before_the_server_started(council_home, make_engine, repo):
    await history(council_home, make_engine, repo)
    with http_server(TOKEN) as (url, _):
        base = url.removesuffix("/mcp")
        assert httpx.get(f"{base}/metrics", timeout=10).status_code == 401
        assert httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        refused = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}", "Host": "evil.example"},
                            timeout=10)
        assert refused.status_code == 421
        r = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    got = samples(r.text)

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert value("council_tasks_total", state="succeeded") == 1
    assert value("council_tasks_total", state="failed") == 1
    assert value("council_tasks_total", state="running") == 1
    assert value("council_tasks_total", state="merged") == 0
    assert value("council_attempts_total", agent="fake", state="succeeded") == 1
    assert value("council_attempts_total", agent="claude", state="failed") == 1
    assert value("council_attempts_total", agent="claude", state="running") == 1
    assert value("council_cost_usd_total", agent="claude") == 0.375
    assert value("council_tokens_total", agent="gemini", direction="in") == 3000
    assert value("council_tokens_total", agent="gemini", direction="out") == 700
    assert value("council_retries_total", agent="claude") == 2
    assert value("council_escalations_total") == 1
    assert value("council_worktrees_in_use") == 1
    assert value("council_log_lines_total") >= 5  # the fake's 3 lines, what it printed first, the council's notes
    assert value("council_attempt_duration_seconds_count", agent="gemini") == 1
    assert value("council_attempt_duration_seconds_sum", agent="gemini") == 700
    assert value("council_attempt_duration_seconds_bucket", agent="gemini", le="600.0") == 0
    assert value("council_attempt_duration_seconds_bucket", agent="gemini", le="1200.0") == 1
    assert value("council_attempt_duration_seconds_bucket", agent="claude", le="60.0") == 1
    assert value("council_attempt_duration_seconds_count", agent="fake") == 1

    # `stats --json` reads the same store without a server and says the same.
    out = subprocess.run([sys.executable, "-m", "server.cli", "stats", "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert {s: float(n) for s, n in stats["tasks"].items()} == {
        labels[0][1]: v for (name, labels), v in got.items() if name == "council_tasks_total"}
    assert {(a, s): float(n) for a, by in stats["attempts"].items() for s, n in by.items()} == {
        (dict(labels)["agent"], dict(labels)["state"]): v
        for (name, labels), v in got.items() if name == "council_attempts_total"}
    assert stats["cost_usd"] == {"fake": 0.0, "claude": 0.375, "gemini": 0.5}
    assert stats["log_lines"] == value("council_log_lines_total")
    assert (stats["escalations"], stats["worktrees_in_use"], stats["retries"]["claude"]) == (1, 1, 2)
    assert stats["attempt_duration_seconds"]["gemini"]["buckets"]["1200.0"] == 1
    table = subprocess.run([sys.executable, "-m", "server.cli", "stats"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert table.returncode == 0 and "1 succeeded" in table.stdout and "claude" in table.stdout, table.stdout


def test_metrics_need_no_token_when_none_is_set_on_loopback():
    with http_server(None) as (url, _):
        r = httpx.get(url.removesuffix("/mcp") + "/metrics", timeout=10)
    assert r.status_code == 200
    assert samples(r.text)[("council_log_lines_total", ())] == 0
