"""One module per agent CLI: build its command line, parse its output. Nothing else."""

from __future__ import annotations

from .auto_claude import AutoClaudeAdapter
from .base import Adapter, AgentSpec
from .claude import ClaudeAdapter
from .command import CommandAdapter
from .gemini import GeminiAdapter
from .ollama import OllamaAdapter

KINDS: dict[str, type[Adapter]] = {
    cls.kind: cls for cls in (CommandAdapter, ClaudeAdapter, GeminiAdapter, AutoClaudeAdapter, OllamaAdapter)
}


def make_adapter(spec: AgentSpec, environ: dict[str, str] | None = None) -> Adapter:
    try:
        cls = KINDS[spec.kind]
    except KeyError:
        raise ValueError(f"agent {spec.name!r} has unknown kind {spec.kind!r}; "
                         f"known kinds: {', '.join(sorted(KINDS))}") from None
    return cls(spec, environ)
