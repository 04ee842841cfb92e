"""Which agents run, in which stages. A task names its agents, or a tier picks a routing list;
`cheap` runs the local model first and escalates to `standard` when that fails."""

from __future__ import annotations

import re

from .config import Config

COMPLEX_WORDS = re.compile(r"\b(architect\w*|redesign|refactor\w*|migrat\w+|across|multiple files|end-to-end|"
                           r"concurren\w+|security|performance|rewrite|framework|new feature|implement)\b", re.I)
CHEAP_WORDS = re.compile(r"\b(typo|rename|comment|docstring|readme|format\w*|lint|spelling|bump|"
                         r"small|simple|one-line|trivial|fix the test name)\b", re.I)


def classify(prompt: str) -> tuple[str, str]:
    """A transparent heuristic: (tier, why). Long or structural asks are complex, small chores cheap."""
    words = len(prompt.split())
    hits = sorted({m.group(0).lower() for m in COMPLEX_WORDS.finditer(prompt)})
    if words > 150 or len(hits) >= 2:
        return "complex", f"{words} words; mentions {', '.join(hits) or 'nothing structural'}"
    cheap = sorted({m.group(0).lower() for m in CHEAP_WORDS.finditer(prompt)})
    if cheap and not hits and words <= 60:
        return "cheap", f"small chore ({', '.join(cheap)})"
    return "standard", f"{words} words" + (f"; mentions {', '.join(hits)}" if hits else "")


def confirm(tier: str, model_tier: str | None) -> str:
    """The tier once the local model has had its say. The heuristic decides cheap or standard; the
    model may only raise a task to complex. A small model answers "standard" to nearly everything,
    and letting that overrule "cheap" meant the local model never ran; a wrong "complex" costs
    money but never loses a task that needs the bigger agents."""
    return "complex" if model_tier == "complex" else tier


def stages(config: Config, tier: str, agents: list[str] | None) -> list[list[str]]:
    """The agents of each stage. Explicit agents form one stage and override routing."""
    if agents:
        return [list(dict.fromkeys(agents))]
    r = config.routing
    if tier == "cheap":
        first = list(dict.fromkeys(r.cheap))
        return [first, [a for a in dict.fromkeys(r.standard) if a not in first]]
    return [list(dict.fromkeys(getattr(r, tier)))]
