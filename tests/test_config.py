"""Config: no file works, the shipped example parses, bad tables say what is wrong."""

from pathlib import Path

import pytest

from adapters import make_adapter
from engine.config import ConfigError, config_path, home_dir, load_config, parse_config

EXAMPLE = Path(__file__).parents[1] / "examples" / "council.toml"


def test_no_config_file_gives_every_builtin_agent(tmp_path):
    cfg = load_config(tmp_path / "absent.toml")
    assert {"claude", "gemini", "auto-claude", "ollama"} <= set(cfg.agents)
    assert cfg.agents["auto-claude"].kind == "auto-claude"
    assert cfg.engine.max_parallel == 8 and cfg.routing.cheap == ["ollama"]


def test_the_shipped_example_parses_and_every_agent_has_an_adapter():
    cfg = load_config(EXAMPLE)
    assert cfg.agents["claude-local"].kind == "claude"
    assert cfg.agents["codex"].argv[-1] == "{prompt}"
    for spec in cfg.agents.values():
        make_adapter(spec)


def test_paths_follow_the_environment(tmp_path):
    env = {"CLI_COUNCIL_HOME": str(tmp_path / "h"), "CLI_COUNCIL_CONFIG": str(tmp_path / "c.toml")}
    assert home_dir(env) == tmp_path / "h" and config_path(env) == tmp_path / "c.toml"


@pytest.mark.parametrize("text, words", [
    ("[engine]\nmax_parallel = 0\n", "max_parallel"),
    ("[agents]\nclaude = 3\n", "must be a table"),
    ("[engine\n", "cannot read config"),
])
def test_bad_config_says_what_is_wrong(tmp_path, text, words):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(path)


@pytest.mark.parametrize("name", ["../escape", "a/b", "with space", "-flag", "x..y", "x.lock", ""])
def test_agent_names_that_cannot_be_a_path_or_branch_are_refused(name):
    with pytest.raises(ConfigError, match="agent name"):
        parse_config({"agents": {name: {"kind": "command", "argv": ["true"]}}})


def test_unknown_kind_is_refused():
    spec = parse_config({"agents": {"x": {"kind": "telepathy"}}}).agents["x"]
    with pytest.raises(ValueError, match="unknown kind 'telepathy'"):
        make_adapter(spec)
