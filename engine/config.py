"""The TOML config and where state lives. Read on demand, never into module globals at import."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import platformdirs
from pydantic import BaseModel, Field, ValidationError

from adapters.base import TIERS, AgentSpec

APP = "cli-council"
BUILTIN_KINDS = ("claude", "gemini", "auto-claude", "ollama")
AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # it becomes a path part and a branch name part


class ConfigError(ValueError):
    pass


class EngineSettings(BaseModel):
    max_parallel: int = Field(8, ge=1)
    default_timeout_s: float = Field(1800, gt=0)
    kill_grace_s: float = Field(5, ge=0)
    retries: int = Field(2, ge=0, description="extra tries after a transient failure")
    retry_base_s: float = Field(2.0, ge=0)
    retry_max_s: float = Field(60.0, ge=0)
    check_timeout_s: float = Field(900, gt=0)
    gc_age_s: float = Field(7 * 86400, ge=0, description="gc reclaims worktrees of tasks finished this long ago")
    log_max_bytes: int = Field(20_000_000, ge=1024, description="log bytes stored per attempt; the rest is cut")
    log_max_lines: int = Field(200_000, ge=10, description="log lines stored per attempt; the rest is cut")


class Routing(BaseModel):
    cheap: list[str] = Field(default_factory=lambda: ["ollama"])
    standard: list[str] = Field(default_factory=lambda: ["claude", "gemini"])
    complex: list[str] = Field(default_factory=lambda: ["auto-claude", "claude", "gemini"])
    classify_with_model: bool = False


class ServerSettings(BaseModel):
    allowed_roots: list[str] = Field(default_factory=list, description=(
        "repos must lie under one of these directories; empty allows any (required for a non-loopback bind)"))


class Config(BaseModel):
    engine: EngineSettings = Field(default_factory=EngineSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    agents: dict[str, AgentSpec] = Field(default_factory=dict)
    routing: Routing = Field(default_factory=Routing)

    def agent(self, name: str) -> AgentSpec:
        try:
            return self.agents[name]
        except KeyError:
            raise ConfigError(f"unknown agent {name!r}; configured agents: {', '.join(sorted(self.agents))}") from None


def home_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("CLI_COUNCIL_HOME") or platformdirs.user_data_dir(APP)).expanduser()


def config_path(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("CLI_COUNCIL_CONFIG") or Path(platformdirs.user_config_dir(APP)) / "config.toml").expanduser()


def parse_config(data: dict) -> Config:
    """Fill every built-in agent with defaults, give every table a name and a kind, validate."""
    agents_raw = dict(data.get("agents") or {})
    for name in BUILTIN_KINDS:
        agents_raw.setdefault(name, {})
    agents = {}
    for name, table in agents_raw.items():
        if not AGENT_NAME.fullmatch(name) or ".." in name or name.endswith((".", ".lock")):
            raise ConfigError(f"agent name {name!r} cannot name a branch and a directory; "
                              "use letters, digits, '.', '_' and '-'")
        if not isinstance(table, dict):
            raise ConfigError(f"[agents.{name}] must be a table")
        table = dict(table)
        table.setdefault("kind", name)
        if isinstance(table.get("command"), str):
            table["command"] = [table["command"]]
        agents[name] = {**table, "name": name}
    try:
        return Config.model_validate({**data, "agents": agents})
    except ValidationError as e:
        raise ConfigError(f"invalid config: {e}") from None


def load_config(path: Path | None = None) -> Config:
    path = path or config_path()
    if not path.exists():
        return parse_config({})
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    return parse_config(data)
