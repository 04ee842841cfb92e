"""Config: no file works, the shipped example loads cleanly, and a broken file is refused whole,
each problem on its own line naming the file and the key (through load_config and through
`cli-council doctor` / `serve` as a user runs them)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adapters import KINDS, make_adapter
from engine.config import AGENT_KEYS, SECTIONS, ConfigError, config_path, home_dir, load_config, parse_config

EXAMPLE = Path(__file__).parents[1] / "examples" / "council.toml"
KNOWN_KINDS = "known kinds: auto-claude, claude, command, gemini, ollama"


def load_text(tmp_path: Path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path, load_config(path)


def refusal(tmp_path: Path, text: str) -> tuple[Path, list[str]]:
    """The lines of the ConfigError that loading `text` from a file raises."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return path, str(e.value).splitlines()


def test_no_config_file_gives_every_builtin_agent(tmp_path):
    cfg = load_config(tmp_path / "absent.toml")
    assert {"claude", "gemini", "auto-claude", "ollama"} <= set(cfg.agents)
    assert cfg.agents["auto-claude"].kind == "auto-claude"
    assert cfg.engine.max_parallel == 8 and cfg.routing.cheap == ["ollama"]


def test_the_shipped_example_loads_cleanly_and_every_agent_has_an_adapter():
    cfg = load_config(EXAMPLE)
    assert cfg.agents["claude-local"].kind == "claude"
    assert cfg.agents["codex"].argv[-1] == "{prompt}"
    assert cfg.agents["gemini"].extra("price_in_per_mtok") == 1.25
    assert cfg.agents["auto-claude"].extra("home") == "~/src/Auto-Claude"
    for spec in cfg.agents.values():
        make_adapter(spec)


def test_what_a_user_may_write_still_loads(tmp_path):
    _, cfg = load_text(tmp_path, """
[engine]
default_timeout_s = 60          # an integer where a float is expected
[agents.claude]
command = "claude"              # a string where an argv list is expected
local = true
[agents.ollama]
mode = "claude"
num_ctx = 8192
[agents.gemini]
prices = { "gemini-2.5-flash" = [0, 2.5] }
[agents.mine]
kind = "command"
argv = ["tool", "{prompt}"]
env = { "TOOL_TOKEN" = "t" }
tiers = ["cheap"]
enabled = false
[routing]
cheap = ["mine"]
""")
    assert cfg.engine.default_timeout_s == 60.0 and cfg.agents["claude"].command == ["claude"]
    assert cfg.agents["gemini"].extra("prices") == {"gemini-2.5-flash": [0.0, 2.5]}
    assert cfg.agents["ollama"].extra("num_ctx") == 8192 and cfg.routing.cheap == ["mine"]


def test_paths_follow_the_environment(tmp_path):
    env = {"CLI_COUNCIL_HOME": str(tmp_path / "h"), "CLI_COUNCIL_CONFIG": str(tmp_path / "c.toml")}
    assert home_dir(env) == tmp_path / "h" and config_path(env) == tmp_path / "c.toml"


# Each broken rule: the file's text, then what the one problem line must say after "config PATH: ".
REFUSALS = [
    ('[agents.z]\nkind = "nope"\n', f'[agents.z] kind = "nope" is unknown; {KNOWN_KINDS}'),
    ('[agents.z]\nkind = "comand"\n', f'[agents.z] kind = "comand" is unknown; did you mean command? {KNOWN_KINDS}'),
    ("[agents.z]\nkind = 3\n", f"[agents.z] kind = 3 is unknown; {KNOWN_KINDS}"),
    ('[agents.mine]\nargv = ["tool"]\n', '[agents.mine] has no kind; set kind = "command"'),
    ('[agents.claude]\nmodle = "x"\n', "[agents.claude] modle is not a key of kind \"claude\"; did you mean model?"),
    ('[agents.gemini]\nhome = "/x"\n', '[agents.gemini] home is not a key of kind "gemini"; keys: argv, command'),
    ('[engine]\nretrys = 3\n', "[engine] retrys is not a key of [engine]; did you mean retries?"),
    ("[server]\nallowed_root = []\n", "[server] allowed_root is not a key of [server]; did you mean allowed_roots?"),
    ("[routing]\ncheep = []\n", "[routing] cheep is not a key of [routing]; did you mean cheap?"),
    ("[engnie]\nmax_parallel = 2\n", "[engnie] is not a section; did you mean engine?"),
    ("max_parallel = 2\n", "max_parallel = 2 is outside any section; did you mean [engine] max_parallel?"),
    ("engine = 3\n", "[engine] must be a table"),
    ("[agents]\nclaude = 3\n", "[agents.claude] must be a table"),
    ('[engine]\nmax_parallel = "4"\n', '[engine] max_parallel = "4" should be a valid integer'),
    ("[engine]\nretries = true\n", "[engine] retries = true should be a valid integer"),
    ("[engine]\nmax_parallel = 0\n", "[engine] max_parallel = 0 should be greater than or equal to 1"),
    ('[engine]\ndefault_timeout_s = "1800"\n', '[engine] default_timeout_s = "1800" should be a valid number'),
    ("[engine]\ndefault_timeout_s = inf\n", "[engine] default_timeout_s = inf is not a finite number"),
    ("[engine]\nretry_base_s = -inf\n", "[engine] retry_base_s = -inf is not a finite number"),
    ("[engine]\nkill_grace_s = nan\n", "[engine] kill_grace_s = nan is not a finite number"),
    ('[agents.gemini]\nprices = { m = [1.0, inf] }\n', "[agents.gemini] prices.m[1] = inf is not a finite number"),
    ('[agents.x]\nkind = "command"\nargv = ["tool", "a\\u0000b"]\n', '[agents.x] argv[1] = "a\\u0000b" holds a NUL byte'),
    ('[agents.claude]\nenv = { A = "x\\u0000" }\n', '[agents.claude] env.A = "x\\u0000" holds a NUL byte'),
    ('[agents.claude]\nenv = { "A\\u0000B" = "x" }\n', '[agents.claude] env: key "A\\u0000B" holds a NUL byte'),
    ('[agents.claude]\nenv = { A = 1 }\n', "[agents.claude] env.A = 1 should be a valid string"),
    ("[agents.claude]\ncommand = 3\n", "[agents.claude] command = 3 should be a valid list"),
    ("[agents.claude]\nmax_parallel = 0\n", "[agents.claude] max_parallel = 0 should be greater than or equal to 1"),
    ('[agents.claude]\nlocal = "yes"\n', '[agents.claude] local = "yes" should be a valid boolean'),
    ('[agents.gemini]\nprice_in_per_mtok = "1.25"\n', '[agents.gemini] price_in_per_mtok = "1.25" should be a valid number'),
    ("[agents.gemini]\nprice_out_per_mtok = -1\n", "[agents.gemini] price_out_per_mtok = -1 should be greater than or equal to 0"),
    ("[agents.gemini]\nprices = { m = [1.0] }\n", "[agents.gemini] prices.m = [1.0] is wrong: list should have at least 2 items"),
    ('[agents.ollama]\nmode = "cloud"\n', "[agents.ollama] mode = \"cloud\" should be 'chat' or 'claude'"),
    ("[agents.ollama]\nnum_ctx = 0\n", "[agents.ollama] num_ctx = 0 should be greater than 0"),
    ('[agents.auto-claude]\ncomplexity = "huge"\n', "[agents.auto-claude] complexity = \"huge\" should be 'simple'"),
    ('[agents.lint]\nkind = "command"\ntiers = ["cheep"]\n', '[agents.lint] tiers names "cheep", which is not a tier; did you mean cheap?'),
    ('[server]\nallowed_roots = "/srv"\n', '[server] allowed_roots = "/srv" should be a valid list'),
    ('[routing]\ncheap = ["olama"]\n', '[routing] cheap names agent "olama", which is not configured; did you mean ollama?'),
    ('[routing]\ncomplex = ["claude", "nobody"]\n', '[routing] complex names agent "nobody", which is not configured; agents: '),
    ('[routing]\nstandard = "claude"\n', '[routing] standard = "claude" should be a valid list'),
]


@pytest.mark.parametrize("text, says", REFUSALS, ids=[says.split(" ")[0] + " " + says.split(" ")[1] for _, says in REFUSALS])
def test_each_broken_rule_is_refused_naming_the_file_and_the_key(tmp_path, text, says):
    path, lines = refusal(tmp_path, text)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"config {path}: {says}"), lines[0]


def test_every_problem_is_reported_at_once_one_per_line(tmp_path):
    path, lines = refusal(tmp_path, """
[engine]
max_parallel = "4"
default_timeout_s = inf
[agents.claude]
modle = "x"
[agents.z]
kind = "nope"
[routing]
cheap = ["olama"]
""")
    assert [line.split(": ", 1)[0] for line in lines] == [f"config {path}"] * 5
    assert sorted(line.split(": ", 1)[1].split(" ", 2)[1] for line in lines) == [
        "cheap", "default_timeout_s", "kind", "max_parallel", "modle"]


@pytest.mark.parametrize("data, says", [
    ({"engine": {"max_parallel": "4"}}, 'config: [engine] max_parallel = "4" should be a valid integer'),
    ({"agents": {"x": {"kind": "command", "argv": ["a\0"]}}}, 'config: [agents.x] argv[0] = "a\\u0000" holds a NUL byte'),
])
def test_parse_config_without_a_file_still_validates(data, says):
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert str(e.value) == says
    with pytest.raises(ConfigError, match="^config memory: "):
        parse_config(data, "memory")


def test_an_unreadable_file_is_a_config_error(tmp_path):
    path = tmp_path / "config.toml"
    for raw in (b"[engine\n", b"[engine]\nmax_parallel = 4 # \xff\n"):
        path.write_bytes(raw)
        with pytest.raises(ConfigError, match=f"cannot read config {path}"):
            load_config(path)


@pytest.mark.parametrize("name", ["../escape", "a/b", "with space", "-flag", "x..y", "x.lock", ""])
def test_agent_names_that_cannot_be_a_path_or_branch_are_refused(name):
    with pytest.raises(ConfigError, match="agent name"):
        parse_config({"agents": {name: {"kind": "command", "argv": ["true"]}}})


# The command line: a broken config is `error:` and exit 2, never a traceback.

def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args", [["doctor"], ["doctor", "--json"], ["serve"], ["serve", "--transport", "http", "--port", "0"],
                                  ["status"]])
def test_a_broken_config_is_an_error_line_and_exit_2(tmp_path, args):
    config = tmp_path / "config.toml"  # CLI_COUNCIL_CONFIG (conftest)
    config.write_text('[agents.z]\nkind = "nope"\n[engine]\nmax_parallel = "4"\n')
    proc = cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f'error: config {config}: [agents.z] kind = "nope" is unknown; {KNOWN_KINDS}',
        f'config {config}: [engine] max_parallel = "4" should be a valid integer']


def test_doctor_reports_an_agent_whose_probe_raises_and_goes_on(tmp_path):
    # expanduser() of an unknown user raises RuntimeError inside the auto-claude adapter's probe.
    (tmp_path / "config.toml").write_text(f"""
[agents.broken]
kind = "auto-claude"
home = "~no-such-user-cli-council/Auto-Claude"
[agents.fine]
kind = "command"
argv = [{json.dumps(sys.executable)}, "-c", "pass", "{{prompt}}"]
""")
    proc = cli("doctor", "--json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    rows = {r["agent"]: r for r in json.loads(proc.stdout)["agents"]}
    assert rows["broken"]["ok"] is False
    assert rows["broken"]["message"] == "probing it failed: RuntimeError: Could not determine home directory."
    assert rows["fine"]["ok"] is True and {"claude", "gemini", "ollama"} <= set(rows)
    text = cli("doctor")
    assert "probing it failed" in text.stdout and "Traceback" not in text.stderr


def test_the_example_documents_every_key(tmp_path):
    """Each key the config accepts is set or shown commented out in examples/council.toml, and the
    example still loads with every commented-out key switched on."""
    keys = {k for model in SECTIONS.values() for k in model.model_fields} | set(AGENT_KEYS)
    keys |= {k for adapter in KINDS.values() for k in adapter.config_keys}
    text = EXAMPLE.read_text()
    assert sorted(k for k in keys if not re.search(rf"^#? *{re.escape(k)} *=", text, re.M)) == []
    switched_on = re.sub(r"^# ?([a-z_]+ *=)", r"\1", text, flags=re.M)
    assert switched_on.count("\n#") < text.count("\n#")
    _, cfg = load_text(tmp_path, switched_on)
    assert cfg.agents["ollama"].extra("mode") == "chat" and cfg.server.allowed_roots == ["~/src"]
