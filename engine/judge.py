"""Picking the best attempt on evidence: check passed > agent succeeded > has changes > lower
cost > smaller diff > faster. The reason names the criterion that decided."""

from __future__ import annotations

from .models import Attempt, AttemptState, ErrorKind

NOT_CANDIDATES = {AttemptState.cancelled, AttemptState.skipped, AttemptState.interrupted,
                  AttemptState.timed_out, AttemptState.queued, AttemptState.running}


def agent_succeeded(a: Attempt) -> bool:
    """The agent itself did its job, whatever the check then said."""
    return a.exit_code == 0 and (a.error is None or a.error.kind == ErrorKind.check_failed)


CRITERIA = [  # (name, key: larger is better, how to say it)
    ("check", lambda a: {True: 2, None: 1, False: 0}[a.check.passed if a.check else None],
     lambda a: "its check passed" if a.check and a.check.passed else "no check failed"),
    ("success", lambda a: agent_succeeded(a), lambda a: "the agent succeeded"),
    ("changes", lambda a: a.files_changed > 0, lambda a: "it made changes"),
    ("cost", lambda a: -(a.cost_usd or 0.0), lambda a: f"it cost less (${a.cost_usd or 0:.4f})"),
    ("diff", lambda a: -(a.insertions + a.deletions), lambda a: f"smaller diff ({a.insertions + a.deletions} lines)"),
    ("speed", lambda a: -(a.duration_s or 0.0), lambda a: f"faster ({a.duration_s or 0:.1f}s)"),
]


def key(a: Attempt) -> tuple:
    return tuple(k(a) for _, k, _ in CRITERIA)


def pick_best(attempts: list[Attempt]) -> tuple[str | None, str]:
    """The best attempt that left changes, and why it beat the runner-up."""
    candidates = sorted((a for a in attempts if a.state not in NOT_CANDIDATES and a.files_changed > 0),
                        key=key, reverse=True)
    if not candidates:
        return None, "no attempt finished with changes"
    best = candidates[0]
    if len(candidates) == 1:
        return best.agent, f"{best.agent} is the only attempt with changes"
    second = candidates[1]
    for _, k, say in CRITERIA:
        if k(best) != k(second):
            return best.agent, f"{best.agent} over {second.agent}: {say(best)}"
    return best.agent, f"{best.agent} and {second.agent} tie on every criterion; {best.agent} came first"
