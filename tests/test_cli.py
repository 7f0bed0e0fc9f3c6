"""``grpo-node train`` as a user runs it: a subprocess, exit codes, files written, clear errors."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path


BIN = Path(sys.executable).parent / "grpo-node"


def run(*args, timeout=240):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_train_demo_writes_metrics_and_weights(tmp_path):
    out = tmp_path / "run"
    proc = run("train", "--steps", "3", "-o", str(out), "--set", "grpo.prompts_per_step=4", "-q")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in rows)
    assert (out / "final" / "model.safetensors").is_file()
    assert json.loads((out / "final" / "trainer.json").read_text())["version"] == 3
    assert "reward" in proc.stderr


def test_config_error_names_the_field(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[grpo]\ngroup_size = 1\nloss_type = "ppo"\n')
    proc = run("train", "--config", str(cfg))
    assert proc.returncode == 2
    assert "grpo.group_size" in proc.stderr and "grpo.loss_type" in proc.stderr


def test_unknown_key_and_missing_config_file(tmp_path):
    proc = run("train", "--set", "grpo.grup_size=4")
    assert proc.returncode == 2 and "grpo.grup_size" in proc.stderr
    proc = run("train", "--config", str(tmp_path / "nope.toml"))
    assert proc.returncode == 2 and "nope.toml" in proc.stderr


def test_malformed_dataset_row_is_named(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": 5}\n')
    proc = run("train", "--dataset", str(data), "--steps", "1", "-o", str(tmp_path / "o"), "-q")
    assert proc.returncode == 1
    assert "rows.jsonl:2" in proc.stderr


def test_missing_model_is_named(tmp_path):
    proc = run("train", "--model", str(tmp_path / "missing"), "--steps", "1", "-o", str(tmp_path / "o"), "-q")
    assert proc.returncode == 1
    assert "missing" in proc.stderr and "does not exist" in proc.stderr


def test_join_refuses_what_it_cannot_do_before_contacting_anyone(tmp_path):
    """Bad join options fail at once with exit 2 and name the option (no coordinator is running): one
    as a user runs it (a process), the rest through the same command in this process (each process
    spends seconds importing torch and hivemind)."""
    from typer.testing import CliRunner

    from grpo_swarm.node.cli import app

    cases = [(["--backend", "vllm", "--device", "cpu"], "--backend vllm needs a GPU"),
             (["--backend", "trt"], "--backend must be one of transformers, vllm, auto"),
             (["--part-size", "100"], "--part-size must be between 65536 and 16777216 bytes, got 100"),
             (["--audit-fraction", "0"], "--audit-fraction: the audit fraction must be a number in"),
             (["--host-maddr", "/ip4/0.0.0.0/udp/0/quic-v1"], "--host-maddr '/ip4/0.0.0.0/udp/0/quic-v1' uses a UDP "
                                                              "transport"),
             (["--initial-peer", "/ip4/10.0.0.1/udp/1/quic-v1/p2p/12D3KooWRndVhVZPCiQwHBBBdg769GyrPUW13zxwqQyf9r3ANaba"],
              "cuts averaging streams over QUIC")]
    if importlib.util.find_spec("vllm") is None:  # here: vllm is let through only when it imports
        cases.append((["--backend", "vllm"], "pip install 'grpo-swarm[vllm]'"))
    proc = run("join", "--coordinator", "127.0.0.1:1", "--workdir", str(tmp_path / "p"), "--compression", "4bit")
    assert proc.returncode == 2 and "--compression must be one of none, fp16, 8bit" in proc.stdout + proc.stderr, proc
    for i, (args, expected) in enumerate(cases):
        res = CliRunner().invoke(app, ["join", "--coordinator", "127.0.0.1:1", "--workdir", str(tmp_path / str(i)),
                                       *args])
        out = " ".join(res.output.split())  # (rich wraps long lines at the runner's width)
        assert res.exit_code == 2 and expected in out, (args, res.exit_code, res.output[-2000:])
