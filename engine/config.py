"""The TOML config and where state lives. Read on demand, never into module globals at import.

A config is checked whole when it is loaded, and every broken rule is reported at once, one line
each, naming the file and the key:
- only the sections and keys of the models below exist; an `[agents.NAME]` table takes AgentSpec's
  common fields plus the keys its kind's adapter declares (`Adapter.config_keys`); a near miss
  gets "did you mean ...?"
- `kind` is a known adapter kind (an agent named after a built-in kind gets that kind);
- every value has its declared type, strictly: "4" is not a number and true is not 1;
- no number is inf or nan, and no string holds a NUL byte (values end up in argv and env);
- routing lists and agent `tiers` name agents and tiers that exist.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import time
import tomllib
import warnings
from pathlib import Path

import platformdirs
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from adapters import KINDS
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


class MergeSettings(BaseModel):
    run_hooks: bool = Field(False, description=(
        "the merge in the user's checkout (git merge --ff-only) runs the repo's hooks, e.g. post-merge; "
        "off by default, as an agent can write hooks into the repo it works on"))


class PoolSettings(BaseModel):
    size: int = Field(2, ge=0, le=32, description=(
        "ready worktrees kept per repo, made ahead at its HEAD with the repo's setup run; 0 turns the pool off"))
    max_files: int = Field(50_000, ge=0, description="no pool for repos with more tracked files than this")


SCHEDULER = re.compile(r"(tcp|tls|ws|wss)://[^\s/]+:\d+/?")


class RunnerSettings(BaseModel):
    kind: Literal["local", "dask"] = Field("local", description=(
        "where attempts run: this machine, or the workers of a Dask distributed scheduler"))
    scheduler: str | None = Field(None, description='the Dask scheduler\'s address, e.g. "tcp://host:8786"')

    @field_validator("scheduler")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not SCHEDULER.fullmatch(value):
            raise ValueError('must be a scheduler address such as "tcp://host:8786"')
        return value

    @model_validator(mode="after")
    def _dask_needs_scheduler(self) -> "RunnerSettings":
        if self.kind == "dask" and not self.scheduler:
            raise ValueError('kind = "dask" needs scheduler = "tcp://host:8786" (where `dask scheduler` listens)')
        return self


def copy_path_problem(path: str) -> str | None:
    """Why `path` cannot be a `[worktree] copy` entry, or None: it must name a file or directory inside the
    repo, relative to its top, never in .git."""
    parts = path.replace("\\", "/").split("/")
    if not path or path.startswith("/") or path.startswith("~"):
        return "must be a path relative to the repo's top, e.g. \".env\""
    if ".." in parts:
        return "must not leave the repo (no '..')"
    if any(part.lower() == ".git" for part in parts):
        return "must not be inside .git"
    if all(part in ("", ".") for part in parts):
        return "must name a file or directory, not the repo itself"
    return None


with warnings.catch_warnings():  # `copy` is the key users write; it shadows BaseModel's deprecated copy()
    warnings.filterwarnings("ignore", r'Field name "copy"', UserWarning)

    class WorktreeOverride(BaseModel):
        """The keys of a repo's `.cli-council.toml` [worktree] table; here each one set replaces the repo's."""

        model_config = ConfigDict(extra="forbid")

        setup: str | None = Field(None, description='shell command run in each new worktree before the agent; "" = none')
        copy: list[str] | None = Field(None, description="untracked files copied from the user's checkout")
        ports: int | None = Field(None, ge=0, le=64, description="free ports reserved per attempt (COUNCIL_PORT, PORT)")
        setup_timeout_s: float | None = Field(None, gt=0)

        @field_validator("copy")
        @classmethod
        def _copy_paths(cls, value: list[str] | None) -> list[str] | None:
            for item in value or []:
                if why := copy_path_problem(item):
                    raise ValueError(f"{item!r} {why}")
            return value


class WorktreeSettings(WorktreeOverride):
    """The user's overrides of every repo's `.cli-council.toml`, and per repo (`repos`, keyed by path)."""

    repos: dict[str, WorktreeOverride] = Field(default_factory=dict, description=(
        "per repo (its path, ~ allowed): the same keys, winning over both the repo's file and the keys above"))


class ReviewSettings(BaseModel):
    enabled: bool = Field(False, description="every task's candidates are cross-reviewed before the pick")
    reviewers: list[str] | None = Field(None, description="agents that review (never their own attempt); "
                                                          "default: every enabled agent")
    timeout_s: float = Field(600, gt=0, description="a review that takes longer is killed and recorded as failed")


SECTIONS: dict[str, type[BaseModel]] = {"engine": EngineSettings, "server": ServerSettings, "routing": Routing,
                                        "merge": MergeSettings, "pool": PoolSettings, "worktree": WorktreeSettings,
                                        "review": ReviewSettings, "runner": RunnerSettings}
AGENT_KEYS = tuple(k for k in AgentSpec.model_fields if k != "name")  # every kind's keys; `name` is the table's


class Config(BaseModel):
    engine: EngineSettings = Field(default_factory=EngineSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    agents: dict[str, AgentSpec] = Field(default_factory=dict)
    routing: Routing = Field(default_factory=Routing)
    merge: MergeSettings = Field(default_factory=MergeSettings)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    worktree: WorktreeSettings = Field(default_factory=WorktreeSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)

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


def parse_config(data: dict, source: str | None = None) -> Config:
    """Check `data` (a parsed TOML document) against the rules above and build the Config.

    Every built-in kind gets an agent of that name with its defaults. `source` names the file in
    messages. Raises ConfigError listing every problem."""
    problems = Problems(source)
    _check_values(problems, data, ())
    sections = _known_sections(problems, data)
    raw_agents = dict(data.get("agents") if isinstance(data.get("agents"), dict) else {})
    for kind in BUILTIN_KINDS:
        raw_agents.setdefault(kind, {})
    agents = {name: _agent_table(problems, name, table) for name, table in raw_agents.items()}
    config = None
    try:
        config = Config.model_validate({**sections, "agents": agents}, strict=True)
    except ValidationError as e:
        for err in e.errors():
            problems.add(err["loc"], f"{_where(err['loc'])} = {_show(err['input'])} {_reason(err)}")
    _check_names(problems, sections.get("routing", {}), agents)
    reviewers = sections.get("review", {}).get("reviewers")
    for i, name in enumerate(reviewers if isinstance(reviewers, list) else []):
        if isinstance(name, str) and name not in agents:
            problems.add(("review", "reviewers", i), f"[review] reviewers names agent {_show(name)}, which is not "
                                                     f"configured; {_suggest(name, agents, 'agents')}")
    problems.raise_any()
    return config


class Problems:
    """What is wrong with one config, at most one message per key, raised as one ConfigError."""

    def __init__(self, source: str | None):
        self.prefix = f"config {source}: " if source else "config: "
        self.messages: dict[tuple, str] = {}

    def add(self, loc: tuple, message: str) -> None:
        """Keep the first problem found in a key (a value inside a table or list counts as in it)."""
        if not any(loc[:len(seen)] == seen or seen[:len(loc)] == loc for seen in self.messages):
            self.messages[loc] = message

    def raise_any(self) -> None:
        if self.messages:
            raise ConfigError("\n".join(self.prefix + m for m in self.messages.values()))


def _check_values(problems: Problems, value, loc: tuple) -> None:
    """No NUL byte in any string (or key) and no inf/nan anywhere: neither is ever meant."""
    if isinstance(value, str) and "\0" in value:
        problems.add(loc, f"{_where(loc)} = {_show(value)} holds a NUL byte")
    elif isinstance(value, float) and not math.isfinite(value):
        problems.add(loc, f"{_where(loc)} = {_show(value)} is not a finite number")
    elif isinstance(value, dict):
        for k, v in value.items():
            if "\0" in k:
                problems.add((*loc, k), f"{_where(loc)}: key {_show(k)} holds a NUL byte")
            else:
                _check_values(problems, v, (*loc, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_values(problems, v, (*loc, i))


def _known_sections(problems: Problems, data: dict) -> dict[str, dict]:
    """[engine], [server], [routing] and [merge] with only their own keys; the rest reported. ([agents] is apart.)"""
    sections = {}
    for key, value in data.items():
        if key not in (*SECTIONS, "agents"):
            problems.add((key,), _unknown_section(key, value))
        elif not isinstance(value, dict):
            problems.add((key,), f"[{key}] must be a table")
        elif key in SECTIONS:
            fields = SECTIONS[key].model_fields
            for name in (k for k in value if k not in fields):
                problems.add((key, name), f"[{key}] {name} is not a key of [{key}]; {_suggest(name, fields, 'keys')}")
            sections[key] = {k: v for k, v in value.items() if k in fields}
    return sections


def _agent_table(problems: Problems, name: str, table) -> dict:
    """One `[agents.NAME]` table, ready for AgentSpec: the name, a kind, and only the keys its kind reads
    (the kind's own keys checked against the adapter's declared types)."""
    where = f"[agents.{name}]"
    if not AGENT_NAME.fullmatch(name) or ".." in name or name.endswith((".", ".lock")):
        problems.add(("agents", name), f"agent name {name!r} cannot name a branch and a directory; "
                                        "use letters, digits, '.', '_' and '-'")
    if not isinstance(table, dict):
        problems.add(("agents", name), f"{where} must be a table")
        return {"name": name, "kind": name}
    kind = table.get("kind", name)
    adapter = KINDS.get(kind) if isinstance(kind, str) else None
    if adapter is None:
        if "kind" not in table:
            problems.add(("agents", name, "kind"), f"{where} has no kind; set kind = \"command\" for any CLI, "
                                                   f"or one of: {', '.join(sorted(KINDS))}")
        else:
            close = difflib.get_close_matches(str(kind), KINDS, n=1)
            problems.add(("agents", name, "kind"), f"{where} kind = {_show(kind)} is unknown; "
                         + (f"did you mean {close[0]}? " if close else "")
                         + f"known kinds: {', '.join(sorted(KINDS))}")
        return {"name": name, "kind": str(kind)}  # its other keys cannot be judged without a kind

    spec = {"name": name, "kind": kind}
    for key, value in table.items():
        loc = ("agents", name, key)
        if key == "kind":
            continue
        if key == "command" and isinstance(value, str):
            value = [value]
        if key in AGENT_KEYS:
            spec[key] = value
        elif key in adapter.config_keys:
            try:
                spec[key] = TypeAdapter(adapter.config_keys[key]).validate_python(value, strict=True)
            except ValidationError as e:
                err = e.errors()[0]
                problems.add((*loc, *err["loc"]), f"{where} {_path((key, *err['loc']))} = {_show(err['input'])} {_reason(err)}")
        else:
            known = (*AGENT_KEYS, *adapter.config_keys)
            problems.add(loc, f"{where} {key} is not a key of kind {_show(kind)}; {_suggest(key, known, 'keys')}")
    return spec


def _check_names(problems: Problems, routing: dict, agents: dict) -> None:
    """Routing lists name configured agents; agent `tiers` name real tiers."""
    for tier in TIERS:
        names = routing.get(tier)
        for i, name in enumerate(names if isinstance(names, list) else []):
            if isinstance(name, str) and name not in agents:
                problems.add(("routing", tier, i), f"[routing] {tier} names agent {_show(name)}, which is not "
                                                   f"configured; {_suggest(name, agents, 'agents')}")
    for name, spec in agents.items():
        tiers = spec.get("tiers")
        for i, tier in enumerate(tiers if isinstance(tiers, list) else []):
            if isinstance(tier, str) and tier not in TIERS:
                problems.add(("agents", name, "tiers", i), f"[agents.{name}] tiers names {_show(tier)}, "
                                                           f"which is not a tier; {_suggest(tier, TIERS, 'tiers')}")


def _unknown_section(key: str, value) -> str:
    """A top-level name that is no section: often a key written above its table's header."""
    homes = [s for s, model in SECTIONS.items() if key in model.model_fields]
    if homes and not isinstance(value, dict):
        return f"{key} = {_show(value)} is outside any section; did you mean [{homes[0]}] {key}?"
    return f"[{key}] is not a section; {_suggest(key, (*SECTIONS, 'agents'), 'sections')}"


def _suggest(word: str, known, what: str) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    names = ", ".join(sorted(known))
    return f"did you mean {close[0]}? ({what}: {names})" if close else f"{what}: {names}"


def _where(loc: tuple) -> str:
    """("agents", "x", "env", "K") -> "[agents.x] env.K"; ("routing", "cheap", 0) -> "[routing] cheap[0]"."""
    if not loc:
        return "config"
    section, rest = (f"[agents.{loc[1]}]", loc[2:]) if loc[0] == "agents" and len(loc) > 1 else (f"[{loc[0]}]", loc[1:])
    return f"{section} {_path(rest)}" if rest else section


def _path(keys: tuple) -> str:
    """("env", "K") -> "env.K"; ("cheap", 0) -> "cheap[0]"."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in keys).lstrip(".")


def _show(value, limit: int = 60) -> str:
    """A value as TOML would spell it, cut short."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float) and not math.isfinite(value):
        text = str(value)
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reason(err: dict) -> str:
    """pydantic's "Input should be a valid integer" -> "should be a valid integer"."""
    msg = err["msg"]
    if err.get("type") == "value_error":  # our own validators' words
        return f"is refused: {err['ctx']['error']}"
    return msg[len("Input "):] if msg.startswith("Input should") else f"is wrong: {msg[:1].lower()}{msg[1:]}"


def load_config(path: Path | None = None) -> Config:
    path = path or config_path()
    if not path.exists():
        return parse_config({}, str(path))
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    return parse_config(data, str(path))


class LiveConfig:
    """The config of a long-running server: follows edits of the file, keeps the last good one.

    `get()` is cheap enough for every request: at most every `min_interval_s` it stats the file and
    re-reads it only when its mtime, size or inode changed. A broken edit keeps the previous Config
    and sets `problem` (the ConfigError text) until the file is good again; no file means defaults.
    A broken file at construction raises ConfigError: that is a startup error.
    """

    def __init__(self, path: Path | None = None, *, min_interval_s: float = 0.5):
        self.path = path or config_path()
        self.min_interval_s = min_interval_s
        self.problem: str | None = None
        self._stamp = self._stat()  # before reading, so an edit made during the read is seen next time
        self._config = load_config(self.path)
        self._looked = time.monotonic()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def get(self) -> Config:
        now = time.monotonic()
        if now - self._looked < self.min_interval_s:
            return self._config
        self._looked = now
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._config, self.problem = load_config(self.path), None
            except ConfigError as e:
                self.problem = str(e)
        return self._config
