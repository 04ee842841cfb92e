"""Comparison: the files each attempt touched and how much its change agrees with the others', on
real branches; agreement decides the verdict after the check and the reviews, and says so."""

from __future__ import annotations

from engine import compare
from tests.conftest import fake

FIX = "app.py=def add(a, b):\n    return a + b"


async def run_task(engine, repo, **kw):
    task = await engine.submit(str(repo), "make add() add", **kw)
    return await engine.wait(task.task_id, 60)


def test_parse_patch_reads_files_and_changed_lines():
    patch = ("diff --git a/app.py b/app.py\nindex 1..2 100644\n--- a/app.py\n+++ b/app.py\n@@ -1,2 +1,2 @@\n"
             " def add(a, b):\n-    return a - b\n+    return a + b\n"
             "diff --git a/old.txt b/old.txt\ndeleted file mode 100644\n--- a/old.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n"
             "-gone\n"
             "diff --git a/with b/space.txt b/with b/space.txt\nnew file mode 100644\n--- /dev/null\n"
             "+++ b/with b/space.txt\n@@ -0,0 +1 @@\n+--- not a header\n")
    files, lines = compare.parse_patch(patch)
    assert files == {"app.py", "old.txt", "with b/space.txt"}
    assert lines == {("app.py", "-", "return a - b"), ("app.py", "+", "return a + b"), ("old.txt", "-", "gone"),
                     ("with b/space.txt", "+", "--- not a header")}


def test_same_line_rewritten_differently_is_not_the_same_change():
    base = ("diff --git a/a.py b/a.py\n--- a/a.py\n+++ b/a.py\n@@ -1 +1 @@\n-x = 1\n+x = {}\n")
    one, two, again = (compare.parse_patch(base.format(v)) for v in (2, 3, 2))
    assert compare.pair_agreement(one, again) == 1.0
    assert compare.pair_agreement(one, two) < compare.AGREES  # the same file, another result
    other = compare.parse_patch("diff --git a/b.py b/b.py\n--- a/b.py\n+++ b/b.py\n@@ -1 +1 @@\n-y\n+z\n")
    assert compare.pair_agreement(one, other) == 0.0
    found = compare.agreements({"one": one, "two": two, "again": again})
    assert found["one"][1] == ["again"] and found["two"][1] == []
    assert found["one"][0] > found["two"][0]
    assert compare.agreements({"alone": one}) == {"alone": (None, [])}


async def test_agreement_beats_a_smaller_diff_and_is_named_in_the_reason(make_engine, repo):
    # alpha and beta tie on everything but their speed: beta is made the slower, so the runner-up the
    # reason names is alpha, not whichever happened to finish first
    agents = {"alpha": fake("--write", FIX + "\n# a"), "beta": fake("--sleep", "1", "--write", FIX + "\n# b"),
              "gamma": fake("--write", FIX), "delta": fake("--write", "notes.txt=x")}
    async with make_engine(agents) as engine:
        task = await run_task(engine, repo, agents=list(agents))
    alpha, beta, gamma, delta = (task.attempt(n) for n in agents)
    assert [a.files_touched for a in (alpha, gamma, delta)] == [["app.py"], ["app.py"], ["notes.txt"]]
    # gamma's fix is what alpha and beta each also wrote; alpha and beta each added a line of their own
    assert gamma.agrees_with == ["alpha", "beta"] and alpha.agrees_with == ["gamma"] and delta.agrees_with == []
    assert gamma.agreement > alpha.agreement == beta.agreement > delta.agreement == 0.0
    assert delta.insertions + delta.deletions < gamma.insertions + gamma.deletions  # the smallest diff loses
    assert task.best == "gamma", task.best_reason
    assert task.best_reason.startswith(f"gamma over alpha: its change agrees more with the other attempts "
                                       f"({gamma.agreement:.2f}; same change as alpha, beta) vs {alpha.agreement:.2f}")


async def test_agreement_is_recorded_without_deciding_when_it_ties(make_engine, repo):
    agents = {"small": fake("--write", "a.txt=one"), "large": fake("--write", "b.txt=one\ntwo\nthree")}
    async with make_engine(agents) as engine:
        task = await run_task(engine, repo, agents=list(agents))
    assert task.attempt("small").agreement == task.attempt("large").agreement == 0.0
    assert task.best == "small" and "smaller diff (1 vs 3 lines)" in task.best_reason, task.best_reason


async def test_a_lone_attempt_has_no_agreement(make_engine, repo):
    async with make_engine({"solo": fake("--write", FIX)}) as engine:
        task = await run_task(engine, repo, agents=["solo"])
    solo = task.attempt("solo")
    assert solo.files_touched == ["app.py"] and solo.agreement is None and solo.agrees_with == []


async def test_files_touched_are_listed_for_every_attempt_with_changes_as_its_work_is_committed(make_engine, repo):
    """Listed from the count made with the commit, not from the comparison: a lone candidate's
    verdict reads no patch, and an attempt that is no candidate (it timed out) still shows what it
    touched."""
    slow = "open('notes.txt', 'w').write('x'); import time; time.sleep(60)"
    agents = {"good": fake("--write", FIX), "slow": {"kind": "command", "argv": ["python3", "-c", slow]}}
    async with make_engine(agents) as engine:
        task = await run_task(engine, repo, agents=list(agents), timeout_s=3)
    good, slow = task.attempt("good"), task.attempt("slow")
    assert slow.state == "timed_out" and slow.files_touched == ["notes.txt"]
    assert good.files_touched == ["app.py"] and good.agreement is None and good.agrees_with == []
    assert task.best == "good"
