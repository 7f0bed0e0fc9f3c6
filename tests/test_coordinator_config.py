"""Coordinator run config: the shipped template, field-naming errors, and ``grpo-coordinator`` init/check-config."""

from __future__ import annotations

import copy
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from grpo_swarm.coordinator.config import ConfigError, RunConfig, load_run_config, parse_run_config, template_text

BIN = Path(sys.executable).parent / "grpo-coordinator"


def _template() -> dict:
    return tomllib.loads(template_text())


def _set(data: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_run_config(data, "run.toml")
    return str(info.value)


def test_template_parses_and_maps_to_protocol(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(template_text())
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.run.id == "gsm8k-smollm2-001"
    assert [r.name for r in cfg.rewards] == ["gsm8k_accuracy", "format_reward"]
    assert cfg.grpo.group_size == 8 and cfg.grpo.loss_type == "dapo" and cfg.grpo.eps_high == 0.28
    assert cfg.swarm.max_staleness == 1 and cfg.swarm.spot_check_rate == 0.05

    spec = cfg.run_spec(dataset_size=7473)
    assert spec.run_id == cfg.run.id and spec.group_size == 8 and spec.prompts_per_round == 8
    assert spec.max_staleness == 1 and spec.policy.spot_check_rate == 0.05
    assert spec.policy.reward_names == ("gsm8k_accuracy", "format_reward")
    assert spec.policy.reward_weights == (1.0, 0.1)
    assert spec.policy.max_completion_tokens == 256
    assert spec.node["dataset"] == {"spec": "gsm8k", "split": "train", "seed": 0, "size": 7473}
    # the payload round-trips the way RunRecorder logs it
    from grpo_swarm.protocol.run_spec import RunSpec

    assert RunSpec.from_payload(spec.to_payload()).to_payload() == spec.to_payload()


def test_run_spec_feeds_a_run_recorder(tmp_path):
    from grpo_swarm.protocol.recorder import RunRecorder
    from grpo_swarm.protocol.identity import Identity
    from grpo_swarm.protocol.log import ProtocolLog

    cfg = parse_run_config(_set(_template(), "data.size", 100))
    spec = cfg.run_spec(dataset_size=7473)
    assert spec.dataset_size == 100
    log = ProtocolLog(tmp_path / "log.sqlite")
    try:
        rec = RunRecorder(log, Identity.from_seed(b"\x01" * 32), spec)
        node = Identity.from_seed(b"\x02" * 32)
        assert rec.register(node.public_key_bytes) == node.node_id
    finally:
        log.close()


@pytest.mark.parametrize(
    "field, value",
    [
        ("grpo.group_size", 1),
        ("grpo.loss_type", "ppo"),
        ("grpo.epsilon", -0.1),
        ("grpo.epsilon_high", -1),
        ("grpo.delta", 0.5),
        ("grpo.beta", -1.0),
        ("grpo.temperature", 0),
        ("grpo.max_completion_length", 0),
        ("optim.lr", 0),
        ("swarm.max_staleness", -1),
        ("swarm.spot_check_rate", 1.5),
        ("swarm.samples_per_round", 0),
        ("swarm.prompts_per_round", 0),
        ("swarm.min_peers", 0),
        ("swarm.averaging_timeout_s", 0),
        ("swarm.matchmaking_timeout_s", float("inf")),
        ("swarm.straggler_wait", -0.5),
        ("swarm.sender_timeout_s", 0),
        ("swarm.sender_timeout_s", float("nan")),
        ("swarm.straggler_wait", float("nan")),
        ("run.seed", -1),
        ("run.seed", 2**64),
        ("run.id", "has space"),
        ("run.id", ""),
        ("model.name", ""),
        ("model.dtype", "int8"),
        ("data.size", 0),
        ("rewards.0.weight", "heavy"),
        ("swarm.bogus_key", 1),
        ("grpo.bogus_key", 1),
    ],
)
def test_invalid_field_is_named(field, value):
    msg = _error(_set(_template(), field, value))
    assert msg.startswith("run.toml: ")
    assert f"{field}:" in msg, msg


@pytest.mark.parametrize(
    "change, field",
    [
        (("swarm.samples_per_round", 100), "swarm.samples_per_round"),  # not a multiple of G=8
        (("grpo.scale_rewards", "batch"), "grpo.scale_rewards"),
        (("grpo.prompts_per_step", 4), "grpo.prompts_per_step"),
        (("grpo.delta", 1.2), "grpo.delta"),  # must exceed 1 + ε_high
        (("rewards.1.name", "gsm8k_accuracy"), "rewards.1.name"),  # duplicate
        (("data.size", 4), "swarm.prompts_per_round"),
        (("swarm.sender_timeout_s", 60.0), "swarm.sender_timeout_s"),  # a reducer's 120 s = the all-reduce's
    ],
)
def test_cross_field_errors_are_named(change, field):
    msg = _error(_set(_template(), *change))
    assert f"run.toml: {field}:" in msg, msg


@pytest.mark.parametrize("section", ["run", "model", "rewards"])
def test_required_sections(section):
    data = _template()
    del data[section]
    assert f"run.toml: {section}: Field required" in _error(data)


def test_empty_rewards_and_top_level_extra():
    assert "rewards:" in _error(_set(_template(), "rewards", []))
    assert "surprise:" in _error(_set(_template(), "surprise", 1))


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nid=1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_run_config(bad)


# -- the console script ------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_cli_init_and_check_config(tmp_path):
    assert BIN.exists(), f"{BIN} missing: pip install -e . --no-deps"
    r = _cli("init", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    written = tmp_path / "run.toml"
    assert written.read_text() == template_text()

    r = _cli("init", cwd=tmp_path)
    assert r.returncode == 1 and "refusing to overwrite" in r.stderr
    written.write_text("# edited\n")
    r = _cli("init", str(written), "--force", cwd=tmp_path)
    assert r.returncode == 0 and written.read_text() == template_text()

    nested = tmp_path / "a" / "b" / "swarm.toml"
    assert _cli("init", str(nested), cwd=tmp_path).returncode == 0 and nested.is_file()

    r = _cli("check-config", "run.toml", cwd=tmp_path)  # resolves the reward functions (imports torch)
    assert r.returncode == 0, r.stderr
    assert "gsm8k-smollm2-001" in r.stdout and "G=8" in r.stdout and "η=1" in r.stdout
    assert "run.toml: OK" in r.stdout


def test_cli_check_config_errors(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(template_text().replace("group_size = 8", "group_size = 1")
                    .replace("max_staleness = 1", "max_staleness = -3"))
    r = _cli("check-config", str(path), "--no-resolve-rewards", cwd=tmp_path)
    assert r.returncode == 2
    assert "grpo.group_size" in r.stderr and "swarm.max_staleness" in r.stderr

    r = _cli("check-config", str(tmp_path / "nope.toml"), "--no-resolve-rewards", cwd=tmp_path)
    assert r.returncode == 2 and "not found" in r.stderr

    path.write_text(template_text().replace('name = "format_reward"', 'name = "format_rewrd"'))
    assert _cli("check-config", str(path), "--no-resolve-rewards", cwd=tmp_path).returncode == 0
    r = _cli("check-config", str(path), cwd=tmp_path)
    assert r.returncode == 2 and "rewards.1.name" in r.stderr and "format_rewrd" in r.stderr


def test_the_nodes_take_the_runs_averaging_timeouts():
    """What ``grpo-node join`` hands its averager: the run's timeouts, the reducer's twice the sender's."""
    from grpo_swarm.node.swarm.join import averaging_timeouts

    cfg = parse_run_config(_set(_set(_template(), "swarm.sender_timeout_s", 7.5), "swarm.averaging_timeout_s", 40.0))
    swarm = cfg.model_dump()["swarm"]
    assert averaging_timeouts(swarm) == dict(matchmaking_timeout=30.0, allreduce_timeout=40.0, sender_timeout=7.5,
                                             reducer_timeout=15.0)
    assert averaging_timeouts(parse_run_config(_template()).model_dump()["swarm"])["sender_timeout"] == 5.0
