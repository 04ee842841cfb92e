"""Cross-review: each candidate's change is judged by other council members before the verdict.

A candidate is shown under an anonymous label ("candidate A"): its diff against the base, the
task's prompt and the check's result, with every agent name, council branch and worktree path
scrubbed out. It is never reviewed by its own author, and reviewers from another vendor come
first (a model is kinder to its own kind). Each reviewer runs read-only (its adapter's
`review_invocation`: claude in plan mode, gemini in its default approval mode, the local model
over plain chat, a command agent with the review as its prompt) in an empty private directory,
not in a worktree; and every candidate branch's tip is checked after the reviews and put back if
a reviewer moved it.

Reviews go through the engine's one runner under the same per-agent and global caps as attempts,
log as "review:<reviewer>", count toward the task's cost and budget, and a reviewer that fails,
times out or answers something that is not a verdict is recorded as such and blocks nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import string
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import anyio

from adapters import make_adapter
from adapters.base import Adapter, Availability, Invocation, Job

from . import diffs
from .compare import candidates
from .config import Config
from .gitcmd import GitError, git, resolve_commit
from .models import Attempt, Review, Task
from .runner import LineSink, RunResult, SpawnError

PER_CANDIDATE = 3  # reviewers per candidate: the median of three steadies a judge's swings
MAX_DIFF_BYTES = 60_000  # of the candidate's patch in the prompt (the prompt travels as one argv element)
MAX_PROMPT_BYTES = 16_000  # of the task's prompt in the review prompt (with the diff, well under 128 KiB)
MAX_ANSWER_CHARS = 64_000  # of a reviewer's output kept to find its verdict in
MAX_TRIES = 500  # '{' positions tried when looking for the verdict object
VERDICTS = ("approve", "request_changes")
VENDORS = {"claude": "anthropic", "auto-claude": "anthropic", "gemini": "google", "ollama": "local"}

INSTRUCTIONS = """You review one candidate change made by a coding agent for the task below. You only read and
judge: do not edit, create or delete any file, and do not run commands that change anything.

Judge whether the change does what the task asks, correctly and completely, without breaking
anything else or adding what was not asked for.

Answer with exactly one JSON object and nothing after it:
{"score": <number from 0 to 10; 10 = correct, complete and clean>, "verdict": "approve" or "request_changes",
 "issues": ["<each concrete problem, one short sentence each>"], "summary": "<one sentence>"}"""


@dataclass
class Seat:
    """What reviewing needs from the engine: its config, the one runner, the log, the caps."""

    config: Callable[[], Config]
    environ: dict[str, str]
    spawn: Callable[[Task, str, str, Invocation, float, LineSink], Awaitable[RunResult]]
    log: Callable[[Task, str, str, str], Awaitable[None]]  # task, agent, stream, text
    slots: Callable[[str], AbstractAsyncContextManager]  # the agent's cap, then the global one
    available: Callable[[str, Adapter], Awaitable[Availability]]
    keep_secret: Callable[[Task, list[str]], None]
    redact: Callable[[Task, str], str]  # a reviewer's words are stored and shown: no secret in them
    secrets: list[str]  # the engine's own, redacted from what a reviewer is shown
    tmp: Path  # private directories for reviewers live under here


def vendor(config: Config, name: str) -> str:
    spec = config.agent(name)
    return VENDORS.get(spec.kind, f"{spec.kind}:{name}")


def label(i: int) -> str:
    letters = string.ascii_uppercase
    return letters[i] if i < len(letters) else f"{letters[i // 26 - 1]}{letters[i % 26]}"


def scrubber(names: list[str], hide: list[str]) -> Callable[[str], str]:
    """A function that replaces agent names, council branches and the given paths in a text."""
    names = sorted({n for n in names if n}, key=len, reverse=True)
    name_re = re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(map(re.escape, names)) + r")(?![A-Za-z0-9])",
                         re.I) if names else None
    branch_re = re.compile(r"(?:refs/heads/)?council/[A-Za-z0-9._/-]+")
    hide = sorted({h for h in hide if h}, key=len, reverse=True)

    def scrub(text: str) -> str:
        for path in hide:
            text = text.replace(path, "<checkout>")
        text = branch_re.sub("<branch>", text)
        return name_re.sub("<agent>", text) if name_re else text

    return scrub


def check_line(a: Attempt, task: Task) -> str:
    if not task.check:
        return "Check: none was given for this task."
    if a.check is None:
        return "Check: it was not run for this candidate."
    said = "passed" if a.check.passed else f"failed ({a.check.outcome()})"
    return f"Check: `{task.check}` {said}."


def review_prompt(task: Task, a: Attempt, name: str, patch: str, truncated: bool,
                  scrub: Callable[[str], str]) -> str:
    data = task.prompt.encode()
    prompt = task.prompt if len(data) <= MAX_PROMPT_BYTES else (
        data[:MAX_PROMPT_BYTES].decode(errors="ignore") + "\n[...cut]")
    cut = "\n(The diff was cut here; judge what is shown.)" if truncated else ""
    return (f"{INSTRUCTIONS}\n\nThe task:\n<<<\n{scrub(prompt)}\n>>>\n\n{scrub(check_line(a, task))}\n\n"
            f"Candidate {name}'s change, as a unified diff against the commit the task started from:\n"
            f"```diff\n{scrub(patch)}\n```{cut}\n")


def parse_verdict(text: str) -> tuple[dict | None, str | None]:
    """The first valid verdict object in a reviewer's answer (fenced or bare), or why there is none."""
    decoder = json.JSONDecoder()
    first_problem = None
    start, tries = text.find("{"), 0
    while start >= 0 and tries < MAX_TRIES:
        tries += 1
        try:
            obj, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict) and ("score" in obj or "verdict" in obj):
            verdict, problem = _valid(obj)
            if verdict is not None:
                return verdict, None
            first_problem = first_problem or problem
        start = text.find("{", start + 1)
    return None, first_problem or "the answer holds no JSON verdict object ({\"score\": ..., \"verdict\": ...})"


def _read_answer(summary: str, tail: str) -> tuple[dict | None, str | None]:
    """The verdict in the agent's final message, else in the last of its output (worker thread: the
    search is bounded but not free)."""
    verdict, problem = parse_verdict(summary[-MAX_ANSWER_CHARS:]) if summary else (None, None)
    if verdict is None:
        verdict, problem2 = parse_verdict(tail)
        problem = problem or problem2
    return verdict, problem


def _valid(obj: dict) -> tuple[dict | None, str | None]:
    score, verdict = obj.get("score"), obj.get("verdict")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return None, f"score {_show(score)} is not a number"
    if not 0 <= score <= 10:  # NaN compares false, inf and a 400-digit int (no float holds it) are beyond
        return None, f"score {_show(score)} is not between 0 and 10"
    if verdict not in VERDICTS:
        return None, f"verdict {_show(verdict)} is not one of {', '.join(VERDICTS)}"
    issues = obj.get("issues", [])
    if not isinstance(issues, list):
        issues = [issues]
    summary = obj.get("summary")
    return {"score": round(float(score), 2), "verdict": verdict,
            "issues": [str(i)[:500] for i in issues[:20] if i is not None],
            "summary": str(summary)[:2000] if summary is not None else None}, None


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def score_of(reviews: list[Review]) -> float | None:
    scores = [r.score for r in reviews if r.error is None and r.score is not None]
    return round(statistics.median(scores), 2) if scores else None


async def review(seat: Seat, task: Task, reviewers: list[str] | None = None) -> None:
    """Review every candidate of a finished task; records reviews and review_score on each."""
    config = seat.config()
    found = candidates(task)
    if not found:
        return
    pool = reviewers or config.review.reviewers or [n for n, s in config.agents.items() if s.enabled]
    ready: list[str] = []
    for name in dict.fromkeys(pool):
        adapter = make_adapter(config.agent(name), seat.environ)
        if not adapter.can_review:
            await _note(seat, task, f"{name} does not review: it has no read-only mode")
            continue
        avail = await _probe(seat, name, adapter)
        if avail.ok:
            ready.append(name)
        elif reviewers or config.review.reviewers:  # asked for by name: say why it is missing
            await _note(seat, task, f"{name} cannot review here: {avail.message}")
    tips = {a.agent: await resolve_commit(task.repo, f"refs/heads/{a.branch}") for a in found}
    names = sorted({*config.agents, *(a.agent for a in task.attempts)})
    scrub = scrubber(names, [str(Path(a.worktree)) for a in task.attempts if a.worktree] + [str(seat.tmp)])
    plan: list[tuple[Attempt, str, str, str]] = []  # candidate, label, reviewer, prompt
    for i, a in enumerate(found):
        task.drop_reviews(a)
        mine = vendor(config, a.agent)
        chosen = sorted((r for r in ready if r != a.agent), key=lambda r: vendor(config, r) == mine)[:PER_CANDIDATE]
        if not chosen or tips[a.agent] is None:
            why = "no other agent can review it" if tips[a.agent] else f"its branch {a.branch} is gone"
            await _note(seat, task, f"candidate {label(i)} ({a.agent}) is not reviewed: {why}")
            continue
        try:
            patch, cut = await diffs.patch(task.repo, task.base, tips[a.agent], MAX_DIFF_BYTES, seat.secrets)
        except (GitError, OSError) as e:
            await _note(seat, task, f"candidate {label(i)} ({a.agent}) is not reviewed: its diff: {e}")
            continue
        prompt = review_prompt(task, a, label(i), patch, cut, scrub)
        plan += [(a, label(i), r, prompt) for r in chosen]
        await _note(seat, task, f"candidate {label(i)} is {a.agent}'s attempt; reviewers: {', '.join(chosen)}")
    spent = [0.0]

    async def one(a: Attempt, name: str, reviewer: str, prompt: str) -> None:
        try:
            got = await _review_one(seat, task, name, reviewer, prompt, spent)
        except Exception as e:  # failures are results: one review's, never the task's
            got = Review(reviewer=reviewer, error=f"the review crashed: {type(e).__name__}: {e}")
        got.summary = seat.redact(task, got.summary) if got.summary else got.summary
        got.error = seat.redact(task, got.error) if got.error else got.error
        got.issues = [seat.redact(task, i) for i in got.issues]
        a.reviews.append(got)
        if got.cost_usd:
            spent[0] += got.cost_usd
        said = (f"{got.verdict}, score {got.score:g}" if got.error is None else f"failed: {got.error}")
        await seat.log(task, f"review:{reviewer}", "council", f"candidate {name}: {said}")

    try:
        async with anyio.create_task_group() as tg:
            for a, name, reviewer, prompt in plan:
                tg.start_soon(one, a, name, reviewer, prompt)
    finally:  # also when cancelled: what was said counts, and every branch is back where it was
        with anyio.CancelScope(shield=True):
            order = {r: i for i, r in enumerate(ready)}
            for a in found:
                a.reviews.sort(key=lambda r: order.get(r.reviewer, len(order)))
                a.review_score = score_of(a.reviews)
            task.total_cost_usd = task.spent()
            await _restore_tips(seat, task, found, tips)


async def _probe(seat: Seat, name: str, adapter: Adapter) -> Availability:
    try:
        return await seat.available(name, adapter)
    except Exception as e:  # a probe failing drops one reviewer
        return Availability(False, f"could not check {name}: {e!r}")


async def _note(seat: Seat, task: Task, text: str) -> None:
    await seat.log(task, "council", "council", text)


async def _review_one(seat: Seat, task: Task, name: str, reviewer: str, prompt: str, spent: list[float]) -> Review:
    config = seat.config()
    adapter = make_adapter(config.agent(reviewer), seat.environ)
    agent = f"review:{reviewer}"
    async with seat.slots(reviewer):
        left = None if task.budget_usd is None else task.budget_usd - task.total_cost_usd - spent[0]
        if left is not None and left <= 0:
            return Review(reviewer=reviewer, error=f"not run: the task's budget ${task.budget_usd:g} is spent")
        work = seat.tmp / task.task_id / f"review-{reviewer}-{name}"
        await anyio.to_thread.run_sync(lambda: work.mkdir(parents=True, exist_ok=True))
        try:
            timeout = config.review.timeout_s
            job = Job(prompt=prompt, worktree=work, timeout_s=timeout, budget_usd=left)
            try:
                inv = adapter.review_invocation(job)
            except (ValueError, OSError) as e:
                return Review(reviewer=reviewer, error=f"cannot build its command line: {e}")
            inv.env.setdefault("TMPDIR", str(work))
            seat.keep_secret(task, inv.secrets)
            parser = adapter.parser(job)
            tail: deque[str] = deque()
            size = [0]

            async def on_line(stream: str, text: str) -> None:
                try:
                    parser.feed(stream, text)
                except Exception:  # the answer is judged at the end; a line the parser chokes on is still logged
                    pass
                if stream == "stdout":
                    tail.append(text)
                    size[0] += len(text) + 1
                    while size[0] > MAX_ANSWER_CHARS and len(tail) > 1:
                        size[0] -= len(tail.popleft()) + 1
                await seat.log(task, agent, stream, text)

            await seat.log(task, agent, "council", f"reviewing candidate {name}")
            t0 = time.monotonic()
            try:
                result = await seat.spawn(task, agent, f"review-{name}", inv, timeout, on_line)
            except SpawnError as e:
                return Review(reviewer=reviewer, error=f"could not start: {e}")
            if result.timed_out:
                return Review(reviewer=reviewer, error=f"no verdict within {timeout:g}s; its process group was killed")
            try:
                outcome = parser.finish(result.exit_code)
            except Exception as e:  # a parser bug fails one review
                return Review(reviewer=reviewer, error=f"cannot read its output: {e!r}")
            cost = outcome.cost_usd
            if not outcome.ok:
                why = outcome.error.message if outcome.error else f"exit code {result.exit_code}"
                return Review(reviewer=reviewer, cost_usd=cost, error=f"it failed: {why}")
            answer = outcome.summary or ""
            verdict, problem = await anyio.to_thread.run_sync(_read_answer, answer, "\n".join(tail))
            if verdict is None:
                return Review(reviewer=reviewer, cost_usd=cost, error=f"no usable verdict: {problem}")
            await seat.log(task, agent, "council", f"answered in {time.monotonic() - t0:.1f}s")
            return Review(reviewer=reviewer, cost_usd=cost, **verdict)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, work, True)


async def _restore_tips(seat: Seat, task: Task, found: list[Attempt], tips: dict[str, str | None]) -> None:
    """Reviewers never get a checkout, but a command can reach any path: put back a branch one moved."""
    for a in found:
        before = tips.get(a.agent)
        if before is None:
            continue
        now = await resolve_commit(task.repo, f"refs/heads/{a.branch}")
        if now != before:
            await git(task.repo, "update-ref", f"refs/heads/{a.branch}", before)
            warning = f"a reviewer moved {a.branch} during the review; it was put back at {before[:12]}"
            task.warnings.append(warning)
            await _note(seat, task, warning)
