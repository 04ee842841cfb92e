"""The records the engine keeps and every surface returns (MCP tools, `--json`, the store).

One set of pydantic models so the CLI's `--json` and the MCP tools' structured results are the
same document by construction.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum

from typing import Any

from pydantic import BaseModel, Field

from adapters.base import ErrorInfo, ErrorKind

__all__ = [
    "AttemptState", "TaskState", "ErrorInfo", "ErrorKind", "CheckResult", "Attempt", "Task",
    "TaskSummary", "AttemptSummary", "TaskList", "LogLine", "LogChunk", "MergeResult", "GcReport", "AgentInfo",
    "AgentList", "DiffFile", "Diff", "now", "ACTIVE_TASK", "FINISHED_ATTEMPT", "Review",
    "Round",
]


def now() -> datetime:
    return datetime.now(timezone.utc)


class TaskState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    merged = "merged"
    interrupted = "interrupted"


class AttemptState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    timed_out = "timed_out"
    cancelled = "cancelled"
    skipped = "skipped"
    interrupted = "interrupted"


ACTIVE_TASK = frozenset({TaskState.queued, TaskState.running})
FINISHED_ATTEMPT = frozenset(set(AttemptState) - {AttemptState.queued, AttemptState.running})


class CheckResult(BaseModel):
    command: str
    passed: bool
    exit_code: int | None = None
    error: str | None = Field(None, description="why the check gave no exit code (could not start, timed out)")

    def outcome(self) -> str:
        """How it ended, for messages: the reason it could not run, or its exit code."""
        return self.error or f"exit {self.exit_code}"


class Review(BaseModel):
    """One council member's verdict on another's attempt (cross-review), or why it gave none."""

    reviewer: str
    score: float | None = Field(None, description="0-10; None when the review failed")
    verdict: str | None = Field(None, description="approve or request_changes; None when the review failed")
    issues: list[str] = Field(default_factory=list)
    summary: str | None = None
    cost_usd: float | None = None
    error: str | None = Field(None, description="why this review gave no verdict (timeout, malformed answer...)")


class Round(BaseModel):
    """One prompt an attempt was given (continue_task adds rounds) and the agent's answer to it."""

    prompt: str
    check: str | None = Field(None, description="the check the round ran")
    timeout_s: float | None = Field(None, description="the round's own timeout; None: the task's")
    summary: str | None = Field(None, description="the agent's final message for this round")
    started_at: datetime = Field(default_factory=now)


class Attempt(BaseModel):
    agent: str
    state: AttemptState = AttemptState.queued
    stage: int = Field(0, description="0 for the first routing stage, 1 for an escalation")
    branch: str | None = None
    worktree: str | None = None
    exit_code: int | None = None
    error: ErrorInfo | None = None
    cost_usd: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    session_id: str | None = None
    files_changed: int = 0
    insertions: int = 0
    deletions: int = 0
    check: CheckResult | None = None
    retries: int = 0
    summary: str | None = None
    duration_s: float | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # the verdict's evidence: comparison (always) and cross-review (opt-in)
    files_touched: list[str] = Field(default_factory=list, description="paths it changed (at most 200 listed)")
    agreement: float | None = Field(None, description="0-1: how much its change matches the other candidates' "
                                                      "(same files, same changed lines); None without another")
    agrees_with: list[str] = Field(default_factory=list, description="candidates that reached much the same change")
    reviews: list[Review] = Field(default_factory=list)
    review_score: float | None = Field(None, description="median score of its successful reviews")
    rounds: int = Field(1, description="how many prompts the attempt has had (continue_task adds one)")
    history: list[Round] = Field(default_factory=list, description="every round once there is a second; "
                                                                   "empty while the task's prompt is the only one")


class Task(BaseModel):
    task_id: str
    repo: str
    base: str = Field(description="the commit the attempts started from")
    into: str | None = Field(None, description="the branch checked out at submission")
    prompt: str
    tier: str | None = None
    tier_reason: str | None = Field(None, description="given, explicit agents, or how the prompt was classified")
    agents: list[str] = Field(default_factory=list, description="the agents asked for, by stage")
    check: str | None = None
    timeout_s: float
    budget_usd: float | None = None
    state: TaskState = TaskState.queued
    created_at: datetime = Field(default_factory=now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    best: str | None = None
    best_reason: str | None = None
    total_cost_usd: float = 0.0
    replaced_reviews_cost_usd: float = Field(0.0, description="what reviews since replaced (a new review, a new "
                                                               "round) cost: paid, so still in total_cost_usd")
    merge_commit: str | None = None
    merge_into: str | None = Field(None, description="the branch the merge moved (undo_merge moves it back)")
    merge_backup_ref: str | None = Field(None, description="the ref holding that branch's tip before the merge")
    discarded_at: datetime | None = Field(None, description="discard_task removed its worktrees and branches; "
                                                            "what it kept is in its log")
    error: ErrorInfo | None = Field(None, description="what broke the task itself (its attempts record their own)")
    warnings: list[str] = Field(default_factory=list, description="what the caller should know, e.g. a dirty checkout")
    attempts: list[Attempt] = Field(default_factory=list)

    def spent(self) -> float:
        """What the attempts and all their reviews cost (total_cost_usd)."""
        return round(self.replaced_reviews_cost_usd + sum(
            (a.cost_usd or 0.0) + sum(r.cost_usd or 0.0 for r in a.reviews) for a in self.attempts), 6)

    def drop_reviews(self, attempt: "Attempt") -> None:
        """The attempt's reviews no longer judge it (it is reviewed again, or changed); their cost stays."""
        self.replaced_reviews_cost_usd = round(
            self.replaced_reviews_cost_usd + sum(r.cost_usd or 0.0 for r in attempt.reviews), 6)
        attempt.reviews, attempt.review_score = [], None

    def attempt(self, agent: str) -> Attempt:
        for a in self.attempts:
            if a.agent == agent:
                return a
        raise KeyError(agent)


class AttemptSummary(BaseModel):
    agent: str
    state: AttemptState


class TaskSummary(BaseModel):
    """A task in a list: enough to pick one, small enough for a model's context (get_status has the rest)."""

    task_id: str
    repo: str
    title: str = Field(description="the prompt's first line, at most 100 characters")
    state: TaskState
    tier: str | None = None
    best: str | None = None
    total_cost_usd: float = 0.0
    created_at: datetime
    finished_at: datetime | None = None
    attempts: list[AttemptSummary] = Field(default_factory=list)

    @classmethod
    def of(cls, task: Task) -> "TaskSummary":
        return cls(task_id=task.task_id, repo=task.repo, title=(task.prompt.strip().splitlines() or [""])[0][:100],
                   state=task.state, tier=task.tier, best=task.best, total_cost_usd=task.total_cost_usd,
                   created_at=task.created_at, finished_at=task.finished_at,
                   attempts=[AttemptSummary(agent=a.agent, state=a.state) for a in task.attempts])


class TaskList(BaseModel):
    tasks: list[TaskSummary]


class LogLine(BaseModel):
    seq: int
    agent: str
    stream: str = Field(description="stdout, stderr, check or council (the engine's own notes)")
    text: str
    ts: datetime


class LogChunk(BaseModel):
    task_id: str
    lines: list[LogLine]
    next_cursor: int = Field(description="pass back as cursor to get the lines after these")
    done: bool = Field(description="the task has finished and every line has been returned")


class MergeResult(BaseModel):
    merged: bool
    task_id: str
    agent: str | None = None
    strategy: str
    into: str | None = None
    commit: str | None = None
    source_commit: str | None = Field(None, description="the attempt's commit that was (or would be) merged")
    files: list[str] = Field(default_factory=list)
    insertions: int = 0
    deletions: int = 0
    conflicts: list[str] = Field(default_factory=list)
    backup_ref: str | None = None
    removed: list[str] = Field(default_factory=list)
    dry_run: bool = False
    message: str


class GcReport(BaseModel):
    removed: list[str] = Field(default_factory=list)
    kept: list[str] = Field(default_factory=list, description="what was left, and why")


class AgentInfo(BaseModel):
    name: str = Field(description="what submit_task's `agents` takes")
    kind: str = Field(description="the adapter: claude, gemini, auto-claude, ollama or command")
    available: bool = Field(description="its probe found it installed and signed in on this machine")
    enabled: bool = Field(description="the config lets tasks use it ([agents.NAME] enabled)")
    message: str = Field(description="what the probe found, or what to do to make it usable")
    version: str | None = None
    model: str | None = Field(None, description="the model it is set to use; None: the CLI's own default")
    tiers: list[str] = Field(default_factory=list, description="the tiers whose [routing] list runs it")
    max_parallel: int = Field(description="how many of its attempts run at once (its cap, or the engine's)")
    details: dict[str, Any] = Field(default_factory=dict, description="what the probe looked at (paths, models)")


class AgentList(BaseModel):
    agents: list[AgentInfo]


class DiffFile(BaseModel):
    path: str
    insertions: int = 0
    deletions: int = 0
    binary: bool = False


class Diff(BaseModel):
    task_id: str
    agent: str
    base: str = Field(description="the commit the attempt started from")
    branch: str = Field(description="the attempt's branch; the patch is `git diff base..branch`")
    files: list[DiffFile] = Field(default_factory=list, description="every file the attempt changed")
    patch: str = Field(description="the unified diff, cut at max_bytes")
    truncated: bool = Field(False, description="the patch was cut at max_bytes; files still lists every file")
