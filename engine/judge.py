"""Picking the best attempt on evidence: check passed (execution beats opinion) > review score
(median of the cross-reviews) > agreement with the other attempts > agent succeeded > has changes
> lower cost > smaller diff > faster. The reason names the evidence that decided, in one sentence
that can be checked against the task's record.

Without a check, an attempt that every reviewer asked to change (at least one review) is not
picked: nothing but opinion speaks for it, and the opinion is against it."""

from __future__ import annotations

from .models import Attempt, AttemptState, ErrorKind

NOT_CANDIDATES = {AttemptState.cancelled, AttemptState.skipped, AttemptState.interrupted,
                  AttemptState.timed_out, AttemptState.queued, AttemptState.running}


def agent_succeeded(a: Attempt) -> bool:
    """The agent itself did its job, whatever the check then said."""
    return a.exit_code == 0 and (a.error is None or a.error.kind == ErrorKind.check_failed)


def verdicts(a: Attempt) -> list[str]:
    return [r.verdict for r in a.reviews if r.error is None and r.verdict]


def rejected(a: Attempt) -> bool:
    """No check speaks for it and every review that answered asked for changes."""
    said = verdicts(a)
    return a.check is None and bool(said) and all(v == "request_changes" for v in said)


def _reviewed(a: Attempt) -> str:
    if a.review_score is None:
        return "no successful review"
    return f"median {a.review_score:g} of {len(verdicts(a))} review(s)"


def _agreed(a: Attempt) -> str:
    same = f"; same change as {', '.join(a.agrees_with)}" if a.agrees_with else ""
    return f"its change agrees more with the other attempts ({a.agreement or 0:.2f}{same})"


CRITERIA = [  # (name, key: larger is better, how to say it of the winner against the runner-up)
    ("check", lambda a: {True: 2, None: 1, False: 0}[a.check.passed if a.check else None],
     lambda a, b: f"its check passed (`{a.check.command}`)" if a.check and a.check.passed
     else f"{b.agent}'s check `{b.check.command}` failed ({b.check.outcome()})" if b.check else "no check failed"),
    ("review", lambda a: -1.0 if a.review_score is None else a.review_score,
     lambda a, b: f"higher review score ({_reviewed(a)} vs {_reviewed(b)})"),
    ("agreement", lambda a: a.agreement or 0.0,
     lambda a, b: f"{_agreed(a)} vs {b.agreement or 0:.2f}"),
    ("success", lambda a: agent_succeeded(a), lambda a, b: "the agent succeeded"),
    ("changes", lambda a: a.files_changed > 0, lambda a, b: "it made changes"),
    ("cost", lambda a: -(a.cost_usd or 0.0),
     lambda a, b: f"it cost less (${a.cost_usd or 0:.4f} vs ${b.cost_usd or 0:.4f})"),
    ("diff", lambda a: -(a.insertions + a.deletions),
     lambda a, b: f"smaller diff ({a.insertions + a.deletions} vs {b.insertions + b.deletions} lines)"),
    ("speed", lambda a: -(a.duration_s or 0.0),
     lambda a, b: f"faster ({a.duration_s or 0:.1f}s vs {b.duration_s or 0:.1f}s)"),
]


def key(a: Attempt) -> tuple:
    return tuple(k(a) for _, k, _ in CRITERIA)


def pick_best(attempts: list[Attempt]) -> tuple[str | None, str]:
    """The best attempt that left changes, and why it beat the runner-up."""
    changed = [a for a in attempts if a.state not in NOT_CANDIDATES and a.files_changed > 0]
    turned_down = [a for a in changed if rejected(a)]
    candidates = sorted((a for a in changed if not rejected(a)), key=key, reverse=True)
    if not candidates:
        if turned_down:
            return None, ("every reviewer asked for changes to " + ", ".join(a.agent for a in turned_down)
                          + " and no check passed for it; none is picked")
        return None, "no attempt finished with changes"
    best = candidates[0]
    also = (f" ({', '.join(a.agent for a in turned_down)}: every reviewer asked for changes)"
            if turned_down else "")
    if len(candidates) == 1:
        reviewed = f"; {_reviewed(best)}" if best.reviews else ""
        if turned_down:
            return best.agent, (f"{best.agent} over {', '.join(a.agent for a in turned_down)}: every reviewer asked "
                                f"for changes to {'it' if len(turned_down) == 1 else 'them'} and no check passed"
                                f"{reviewed}")
        return best.agent, f"{best.agent} is the only attempt with changes{reviewed}"
    second = candidates[1]
    for _, k, say in CRITERIA:
        if k(best) != k(second):
            return best.agent, f"{best.agent} over {second.agent}: {say(best, second)}{also}"
    return best.agent, f"{best.agent} and {second.agent} tie on every criterion; {best.agent} came first{also}"
