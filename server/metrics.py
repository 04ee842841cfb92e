"""The council's figures: `/metrics` in Prometheus text format and `cli-council stats`.

Computed from the store at each scrape (Store.figures reads the attempts of every task, in worker threads), not
counted in memory, so they include tasks finished before this process started and tasks other
processes ran. They are what the store holds: `gc` removing old tasks lowers them (a scraper sees a
counter reset). prometheus_client writes the exposition format and escapes label values.
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from collections.abc import Callable

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.engine import Engine
from engine.models import AttemptState, TaskState
from engine.store import Store

ATTEMPT_STATES = [s.value for s in AttemptState]
DURATION_BUCKETS_S = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


class Histogram(BaseModel):
    buckets: dict[str, int] = Field(description="attempts that took at most this many seconds (le), cumulative; "
                                                "+Inf counts them all")
    count: int = 0
    sum: float = 0.0


class Stats(BaseModel):
    """Every figure /metrics serves, as `cli-council stats --json` prints them."""

    tasks: dict[str, int] = Field(description="stored tasks by state")
    attempts: dict[str, dict[str, int]] = Field(description="attempts by agent, then state")
    attempt_duration_seconds: dict[str, Histogram] = Field(description="finished attempts' durations by agent")
    cost_usd: dict[str, float] = Field(description="what each agent reported spending (over retries too)")
    tokens: dict[str, dict[str, int]] = Field(description="tokens by agent, then direction (in, out)")
    retries: dict[str, int] = Field(description="retries after transient errors, by agent")
    log_lines: int = Field(description="log lines stored (lines over an attempt's cap are not stored)")
    worktrees_in_use: int = Field(description="worktrees held by running attempts")
    escalations: int = Field(description="tasks that escalated to a second stage of agents")


async def stats(store: Store) -> Stats:
    raw = await store.figures()
    return await anyio.to_thread.run_sync(_aggregate, raw)


def _aggregate(raw: dict) -> Stats:
    """The figures from Store.figures' rows (in a worker thread: 1,000 tasks take tens of ms)."""
    tasks = {s.value: 0 for s in TaskState} | {state: n for state, n in raw["tasks"]}
    attempts: dict[str, dict[str, int]] = {}
    cost: dict[str, float] = defaultdict(float)
    tokens: dict[str, dict[str, int]] = {}
    retries: dict[str, int] = defaultdict(int)
    durations: dict[str, list[float]] = defaultdict(list)
    escalations = worktrees = 0
    for task_state, listed in raw["attempts"]:
        try:
            rows = [a for a in json.loads(listed or "[]") if isinstance(a, dict) and isinstance(a.get("agent"), str)]
        except ValueError:
            continue
        escalations += any(_number(a.get("stage")) > 0 for a in rows)
        for a in rows:
            agent, state = a["agent"], str(a.get("state"))
            if agent not in attempts:
                attempts[agent] = dict.fromkeys(ATTEMPT_STATES, 0)
            attempts[agent][state] = attempts[agent].get(state, 0) + 1
            cost[agent] += _number(a.get("cost_usd"))
            pair = tokens.setdefault(agent, {"in": 0, "out": 0})
            pair["in"] += int(_number(a.get("tokens_in")))
            pair["out"] += int(_number(a.get("tokens_out")))
            retries[agent] += int(_number(a.get("retries")))
            worktrees += bool(a.get("worktree")) and state == "running" and task_state in ("queued", "running")
            if isinstance(seconds := a.get("duration_s"), (int, float)):
                durations[agent].append(seconds)
    return Stats(tasks=tasks, attempts=attempts, attempt_duration_seconds={a: _histogram(d) for a, d in durations.items()},
                 cost_usd={a: round(c, 6) for a, c in cost.items()}, tokens=tokens,
                 retries={a: retries[a] for a in attempts}, log_lines=raw["log_lines"], worktrees_in_use=worktrees,
                 escalations=escalations)


def _histogram(seconds: list[float]) -> Histogram:
    seconds.sort()
    buckets = {_le(bound): bisect.bisect_right(seconds, bound) for bound in DURATION_BUCKETS_S}
    return Histogram(buckets=buckets | {"+Inf": len(seconds)}, count=len(seconds), sum=sum(seconds))


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _le(bound: float) -> str:
    return floatToGoString(bound)


def families(s: Stats) -> list[Metric]:
    tasks = CounterMetricFamily("council_tasks", "Stored tasks by state.", labels=["state"])
    for state, n in s.tasks.items():
        tasks.add_metric([state], n)
    attempts = CounterMetricFamily("council_attempts", "Attempts by agent and state.", labels=["agent", "state"])
    for agent, by_state in s.attempts.items():
        for state, n in by_state.items():
            attempts.add_metric([agent, state], n)
    durations = HistogramMetricFamily("council_attempt_duration_seconds", "How long finished attempts ran.",
                                      labels=["agent"])
    for agent, h in s.attempt_duration_seconds.items():
        durations.add_metric([agent], buckets=list(h.buckets.items()), sum_value=h.sum)
    cost = CounterMetricFamily("council_cost_usd", "What agents reported spending, in USD.", labels=["agent"])
    for agent, usd in s.cost_usd.items():
        cost.add_metric([agent], usd)
    tokens = CounterMetricFamily("council_tokens", "Tokens agents reported, by direction.",
                                 labels=["agent", "direction"])
    for agent, pair in s.tokens.items():
        for direction, n in pair.items():
            tokens.add_metric([agent, direction], n)
    retries = CounterMetricFamily("council_retries", "Retries after transient agent errors.", labels=["agent"])
    for agent, n in s.retries.items():
        retries.add_metric([agent], n)
    return [tasks, attempts, durations, cost, tokens, retries,
            CounterMetricFamily("council_log_lines", "Log lines stored.", value=s.log_lines),
            GaugeMetricFamily("council_worktrees_in_use", "Worktrees held by running attempts.",
                              value=s.worktrees_in_use),
            CounterMetricFamily("council_escalations", "Tasks that escalated to a second stage.",
                                value=s.escalations)]


class _Snapshot:
    """A collector that hands out figures computed before the scrape (collect() must not do I/O here)."""

    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        return self.metrics


def exposition(s: Stats) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families(s)))
    return generate_latest(registry)


def route(get_engine: Callable[[], Engine]) -> Route:
    """GET /metrics, read-only; behind the same bearer token as /mcp when one is set."""

    async def endpoint(_request: Request) -> Response:
        return Response(exposition(await stats(get_engine().store)), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", endpoint, methods=["GET"])


def table(s: Stats) -> str:
    """`cli-council stats` for a person: the same figures as /metrics."""
    lines = ["tasks: " + (", ".join(f"{n} {state}" for state, n in s.tasks.items() if n) or "none"),
             f"log lines {s.log_lines}, worktrees in use {s.worktrees_in_use}, escalations {s.escalations}"]
    if s.attempts:
        lines.append(f"{'agent':<14} {'attempts':>8} {'ok':>5} {'failed':>6} {'cost $':>10} {'tokens in':>10} "
                     f"{'tokens out':>10} {'retries':>7} {'mean s':>8}")
    for agent, by_state in sorted(s.attempts.items()):
        h = s.attempt_duration_seconds.get(agent)
        mean = f"{h.sum / h.count:.1f}" if h and h.count else "-"
        failed = sum(n for state, n in by_state.items() if state in ("failed", "timed_out"))
        lines.append(f"{agent:<14} {sum(by_state.values()):>8} {by_state.get('succeeded', 0):>5} {failed:>6} "
                     f"{s.cost_usd.get(agent, 0):>10.4f} {s.tokens[agent]['in']:>10} {s.tokens[agent]['out']:>10} "
                     f"{s.retries.get(agent, 0):>7} {mean:>8}")
    return "\n".join(lines)
