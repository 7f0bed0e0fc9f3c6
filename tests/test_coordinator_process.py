"""``grpo-coordinator serve`` as a subprocess: real nodes talk to it over loopback; ``status``;
SIGTERM; and kill -9 in the middle of a stream of submissions, then a restart on the same data
directory: every acknowledged submission is in the log, ``grpo-audit verify`` passes, and the run
goes on where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from grpo_swarm.protocol.client import CoordinatorError
from grpo_swarm.protocol.log import ProtocolLog
from grpo_swarm.protocol.retry import RetryPolicy

from coordinator_world import HonestNode, write_run_toml

BIN = Path(sys.executable).parent


class ServeProcess:
    def __init__(self, tmp: Path, config: Path, data_dir: Path, tag: str = "0"):
        self.port_file = tmp / f"port-{tag}"
        self.stderr_path = tmp / f"serve-{tag}.log"
        self.proc = subprocess.Popen(
            [str(BIN / "grpo-coordinator"), "serve", "--config", str(config), "--data-dir", str(data_dir),
             "--port", "0", "--port-file", str(self.port_file), "--rate", "0"],
            stdout=subprocess.DEVNULL, stderr=open(self.stderr_path, "w"), env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.time() + 120
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                raise AssertionError(f"serve did not start: {self.stderr()}")
            time.sleep(0.1)
        self.address = f"127.0.0.1:{int(self.port_file.read_text())}"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_serve_status_and_sigterm(tmp_path):
    config = write_run_toml(tmp_path / "run.toml", samples_per_round=64)
    data = tmp_path / "coord"
    serve = ServeProcess(tmp_path, config, data)
    try:
        node = HonestNode(serve.address, tmp_path)
        _, groups = node.round_proofs()
        reply = node.client.submit_proofs([p for g in groups for p in g])
        assert reply.ticket.accepted_samples == 8
        node.client.submit_proofs(groups[0])  # replayed: rejected
        out = cli("grpo-coordinator", "status", "--data-dir", str(data), "--json")
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert status["run"]["run_id"] == "coord-test" and status["accepted_samples"] == 8
        (row,) = status["nodes"]
        assert row["node_id"] == node.identity.node_id and row["version"] == 0 and row["lag"] == 0
        assert row["rejected"] == {"REPLAYED_SEQUENCE": 4}
        assert row["completions_per_s"] == 12.5 and row["accelerator"] == "cpu"
        table = cli("grpo-coordinator", "status", "--data-dir", str(data))
        assert table.returncode == 0 and node.identity.node_id[:16] in table.stdout
        assert "REPLAYED_SEQUENCE 4" in table.stdout
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(30) == 0
        assert "stopped" in serve.stderr()
    finally:
        serve.stop()
    # the same data directory with other run settings: refused, naming what differs
    other = write_run_toml(tmp_path / "other.toml", samples_per_round=64, max_staleness=3)
    out = cli("grpo-coordinator", "serve", "--config", str(other), "--data-dir", str(data), "--port", "0")
    assert out.returncode == 1 and "max_staleness" in out.stderr
    missing = cli("grpo-coordinator", "status", "--data-dir", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "no protocol log" in missing.stderr


def test_kill_9_during_submissions_loses_no_acknowledged_entry(tmp_path):
    config = write_run_toml(tmp_path / "run.toml", samples_per_round=1000, spot_check_rate=0.5)
    data = tmp_path / "coord"
    serve = ServeProcess(tmp_path, config, data, "a")
    coordinator_key = None
    try:
        nodes = [HonestNode(serve.address, tmp_path) for _ in range(6)]
        for n in nodes:  # submissions after the kill must fail now, not ride it out
            n.client.retry = RetryPolicy(retries=0)
        coordinator_key = nodes[0].reply.coordinator_public_key
        pending = [(n, g) for n in nodes for g in n.round_proofs()[1]]  # 12 groups of 4 real proofs
        acked: list[str] = []
        failed: list[tuple] = []

        def submit_all():
            for n, g in pending:
                try:
                    reply = n.client.submit_proofs(g)
                except CoordinatorError:
                    failed.append((n, g))
                    continue
                assert reply.verdicts[0].accepted, reply.verdicts[0].detail
                acked.append(g[0].group_id)

        t = threading.Thread(target=submit_all)
        t.start()
        while len(acked) < 4 and t.is_alive():
            time.sleep(0.002)
        os.kill(serve.proc.pid, signal.SIGKILL)
        t.join(120)
        assert not t.is_alive() and 4 <= len(acked) < len(pending) and failed
    finally:
        serve.stop()

    with ProtocolLog(data / "protocol.sqlite", create=False, readonly=True) as log:
        logged = {e.payload["group_id"] for e in log.entries(kind="proofs_accepted")}
    assert set(acked) <= logged

    restarted = ServeProcess(tmp_path, config, data, "b")
    try:
        assert "version 0, round 0, 6 nodes" in restarted.stderr()
        for n, _ in failed:
            n.client.close()
            n.client = type(n.client)(restarted.address, n.identity, coordinator_key=coordinator_key)
        # what was not acknowledged is either already logged (committed just before the kill) or
        # accepted now; nothing is lost, nothing counted twice
        for n, g in failed:
            verdict = n.client.submit_proofs(g).verdicts[0]
            gid = g[0].group_id
            assert verdict.accepted != (gid in logged), (gid, verdict.code, verdict.detail)
        status = json.loads(cli("grpo-coordinator", "status", "--data-dir", str(data), "--json").stdout)
        assert status["accepted_samples"] == 4 * len(pending)
    finally:
        restarted.proc.send_signal(signal.SIGTERM)
        restarted.proc.wait(30)
        restarted.stop()

    out = cli("grpo-audit", "verify", str(data / "protocol.sqlite"), "--signer", coordinator_key.hex(),
              "--model", "tiny", "--snapshots", str(data / "snapshots"), "--allow-plugin-rewards", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)
    assert summary["ok"] and summary["replayed"]["accepted_groups"] == len(pending)


@pytest.mark.parametrize("content", ["", "[run]\nid = 'x'\n"])
def test_serve_refuses_a_bad_config(tmp_path, content):
    bad = tmp_path / "bad.toml"
    bad.write_text(content)
    out = cli("grpo-coordinator", "serve", "--config", str(bad), "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 2 and "config error" in out.stderr
