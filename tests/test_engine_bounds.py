"""Whatever an agent prints, what the engine stores and returns stays bounded: per-attempt log caps
with a line saying where output was cut, log pages cut by bytes, and gc pruning a task's logs with it."""

from __future__ import annotations

import sys

from engine.models import TaskState

from conftest import fake, git


def printer(code: str) -> dict:
    return {"kind": "command", "argv": [sys.executable, "-c", code]}


async def all_lines(engine, task_id, agent=None):
    lines, cursor = [], 0
    while True:
        chunk = await engine.logs(task_id, agent=agent, cursor=cursor, limit=5000)
        lines += chunk.lines
        cursor = chunk.next_cursor
        if chunk.done:
            return lines


async def test_a_flood_is_cut_at_the_cap_and_says_so(make_engine, repo):
    agents = {"flood": printer("for i in range(5000): print('line', i)\nopen('f.txt', 'w').write('f')"),
              "calm": fake("--lines", "50", "--write", "c.txt=c")}
    async with make_engine(agents, log_max_lines=1000) as engine:
        task = await engine.wait((await engine.submit(str(repo), "x", agents=["flood", "calm"])).task_id, 60)
        flood = await all_lines(engine, task.task_id, "flood")
        calm = await all_lines(engine, task.task_id, "calm")
    assert task.state == TaskState.succeeded
    output = [ln for ln in flood if ln.stream == "stdout"]
    assert len(output) == 1000 and output[0].text == "line 0" and output[-1].text == "line 999"
    cut = [ln.text for ln in flood if ln.text.startswith("output cut")]
    assert len(cut) == 1 and "1000 lines" in cut[0], cut
    assert any("lines of output over the log cap were not stored" in ln.text for ln in flood)
    assert sum(ln.stream == "stdout" for ln in calm) == 52  # "got", 50 lines, "done": the other agent is whole
    assert not any(ln.text.startswith("output cut") for ln in calm)


async def test_log_pages_are_cut_by_bytes(make_engine, repo):
    agents = {"wide": printer("for i in range(20): print(str(i % 10) * 200_000)\nopen('w.txt', 'w').write('w')")}
    async with make_engine(agents) as engine:
        task = await engine.wait((await engine.submit(str(repo), "x", agents=["wide"])).task_id, 60)
        first = await engine.logs(task.task_id, limit=5000)
        lines = await all_lines(engine, task.task_id)
    assert sum(len(ln.text) for ln in first.lines) <= 1_000_000 + 200_000 and not first.done
    assert sum(ln.stream == "stdout" and len(ln.text) == 200_000 for ln in lines) == 20


async def test_gc_prunes_a_finished_tasks_record_and_logs_once_nothing_of_it_is_left(make_engine, repo):
    agents = {"w": fake("--lines", "20", "--write", "w.txt=w"), "u": fake("--write", "u.txt=u")}
    async with make_engine(agents) as engine:
        merged = await engine.wait((await engine.submit(str(repo), "m", agents=["w"])).task_id, 60)
        assert (await engine.merge(merged.task_id)).merged
        unmerged = await engine.wait((await engine.submit(str(repo), "u", agents=["u"])).task_id, 60)
        report = await engine.gc(older_than_s=0)
        assert f"task {merged.task_id}: record and logs (nothing of it is left in git or on disk)" in report.removed
        assert await engine.store.last_seq(merged.task_id) == 0
        ids = [t.task_id for t in (await engine.list()).tasks]
        # The unmerged task's branch holds work, so its record stays to explain it.
        assert merged.task_id not in ids and unmerged.task_id in ids
        assert git(repo, "for-each-ref", f"refs/heads/council/{unmerged.task_id}/")
