"""Which agents this machine can run: the one probe behind `cli-council doctor`, `cli-council agents`
and the `list_agents` tool, so the three never disagree.

Probes run at once (each may start a CLI's `--version` or ask an Ollama server, with their own time
limits); a probe that raises is that agent's problem, reported on its row, never the others'.
"""

from __future__ import annotations

from collections.abc import Mapping

import anyio

from adapters import make_adapter
from adapters.base import TIERS, AgentSpec, Availability, redact, secret_values

from .config import Config
from .models import AgentInfo, AgentList


async def probe(spec: AgentSpec, environ: Mapping[str, str]) -> Availability:
    """The agent's availability; an adapter that raises while probing gives a row saying so."""
    try:
        return await make_adapter(spec, dict(environ)).available()
    except Exception as e:  # one broken agent must not hide the others
        return Availability(False, f"probing it failed: {e.__class__.__name__}: {e}")


def _model(spec: AgentSpec, environ: Mapping[str, str]) -> str | None:
    """The configured model, or the adapter's own default where it has one (ollama's)."""
    try:
        model = getattr(make_adapter(spec, dict(environ)), "model", None)
    except Exception:  # probe() reports what is wrong with this agent
        model = None
    return model if isinstance(model, str) else spec.model


async def describe(config: Config, environ: Mapping[str, str]) -> AgentList:
    """Every configured agent, in config order, with what its probe found. Our own secrets (API keys,
    tokens) never appear in a message, whoever reads it."""
    specs = list(config.agents.values())
    found: list[Availability | None] = [None] * len(specs)

    async def one(i: int) -> None:
        found[i] = await probe(specs[i], environ)

    async with anyio.create_task_group() as tg:
        for i in range(len(specs)):
            tg.start_soon(one, i)
    secrets = secret_values(dict(environ), min_len=8)
    return AgentList(agents=[
        AgentInfo(name=spec.name, kind=spec.kind, available=avail.ok, enabled=spec.enabled,
                  message=redact(avail.message, secrets), version=avail.version, model=_model(spec, environ),
                  tiers=[t for t in TIERS if spec.name in getattr(config.routing, t)],
                  max_parallel=spec.max_parallel or config.engine.max_parallel, details=avail.details)
        for spec, avail in zip(specs, found)])
