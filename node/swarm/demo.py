"""``grpo-node demo``: a whole swarm on this machine — a coordinator and N nodes on loopback, each
in its own process, training the embedded tiny-model run — then the audit of its log.

What it shows: nodes that find each other through the coordinator, sample with proofs, average
verified gradients and publish one policy; at the end ``grpo-audit verify`` replays the log and
``grpo-audit report`` writes the reward curve and per-node contributions (PNG, CSV).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

DEMO_CONFIG = "swarm-demo.toml"


@dataclass
class DemoResult:
    out_dir: Path
    rounds: dict[str, list[dict]] = field(default_factory=dict)  # node -> its swarm.jsonl records
    audit_ok: bool = False
    audit_problem: str | None = None
    report: dict = field(default_factory=dict)  # file name -> path
    node_exit_codes: list[int] = field(default_factory=list)

    def reward_curve(self) -> list[tuple[int, float]]:
        """(version, mean reward of the rounds sampled at it), over all nodes."""
        by_version: dict[int, list[float]] = {}
        for records in self.rounds.values():
            for r in records:
                if r.get("reward_mean") is not None:
                    by_version.setdefault(r["version"], []).append(r["reward_mean"])
        return [(v, sum(x) / len(x)) for v, x in sorted(by_version.items())]


def demo_config_text() -> str:
    return resources.files("grpo_swarm.node").joinpath("configs", DEMO_CONFIG).read_text()


def _bin(name: str) -> list[str]:
    """A console script of this installation (the same Python)."""
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    module = {"grpo-coordinator": "grpo_swarm.coordinator.cli", "grpo-node": "grpo_swarm.node.cli"}[name]
    return [sys.executable, "-m", module]


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float, what: str) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        time.sleep(0.1)
    raise TimeoutError(f"{what} was not ready within {timeout_s:.0f} s")


def run_demo(out_dir: str | Path, *, nodes: int = 3, rounds: int = 30, config_text: str | None = None,
             timeout_s: float = 600.0, echo=print, node_args: tuple[str, ...] = ()) -> DemoResult:
    """Run the swarm demo in ``out_dir`` (created; a previous run there is replaced)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / "coordinator", out / "port"):
        if stale.is_dir():
            import shutil

            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    text = config_text or demo_config_text()
    # the round closes as soon as every node's groups are in: N nodes x prompts x G
    text = text.replace("samples_per_round = 384", f"samples_per_round = {nodes * 8 * 16}")
    (out / "run.toml").write_text(text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    coord = subprocess.Popen(
        [*_bin("grpo-coordinator"), "serve", "-c", str(out / "run.toml"), "-d", str(out / "coordinator"),
         "--port", "0", "--port-file", str(out / "port")],
        stdout=open(logs / "coordinator.log", "w"), stderr=subprocess.STDOUT, env=env)
    procs: list[subprocess.Popen] = []
    result = DemoResult(out)
    try:
        port = _wait_for(out / "port", coord, 120, "the coordinator")
        echo(f"coordinator serving on 127.0.0.1:{port}; starting {nodes} nodes for {rounds} rounds")
        for i in range(nodes):
            workdir = out / f"node{i}"
            if (workdir / "swarm.jsonl").exists():
                (workdir / "swarm.jsonl").unlink()
            procs.append(subprocess.Popen(
                [*_bin("grpo-node"), "join", "--coordinator", f"127.0.0.1:{port}",
                 "--identity", str(workdir / "node.key"), "--workdir", str(workdir), "--rounds", str(rounds),
                 "--host-maddr", "/ip4/127.0.0.1/tcp/0", "--quiet", "--set", "run.threads=1", *node_args],
                stdout=open(logs / f"node{i}.log", "w"), stderr=subprocess.STDOUT, env=env))
        _follow(out, procs, nodes, timeout_s, echo)
        result.node_exit_codes = [p.wait(timeout=30) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        coord.send_signal(signal.SIGTERM)
        try:
            coord.wait(timeout=30)
        except subprocess.TimeoutExpired:
            coord.kill()
    for i in range(nodes):
        path = out / f"node{i}" / "swarm.jsonl"
        result.rounds[f"node{i}"] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    _audit(result, out)
    return result


def _follow(out: Path, procs, nodes: int, timeout_s: float, echo) -> None:
    """Print node 0's rounds as they finish until every node exits (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    path = out / "node0" / "swarm.jsonl"
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo's nodes did not finish within {timeout_s:.0f} s (logs in {out / 'logs'})")
        if path.exists():
            lines = path.read_text().splitlines()
            for line in lines[seen:]:
                r = json.loads(line)
                reward = "-" if r["reward_mean"] is None else f"{r['reward_mean']:.3f}"
                echo(f"round {r['round']:3d}  v{r['version']:<3d} reward {reward}  peers {r['peers']}  "
                     f"{'averaged' if r['averaged'] else 'no step'}  {r['seconds']:.1f}s  {r['note']}")
            seen = len(lines)
        time.sleep(0.5)


def _audit(result: DemoResult, out: Path) -> None:
    from grpo_swarm.protocol.audit import audit
    from grpo_swarm.protocol.report import write_report
    from grpo_swarm.protocol.run_spec import load_hooks

    log_path = out / "coordinator" / "protocol.sqlite"
    if not log_path.exists():
        result.audit_problem = "the coordinator wrote no log"
        return
    from grpo_swarm.protocol.log import read_log

    first = next(iter(read_log(log_path)))
    hooks = load_hooks(first.payload, model="tiny", snapshots=str(out / "coordinator" / "snapshots"))
    audited = audit(log_path, hooks)
    result.audit_ok = audited.ok
    result.audit_problem = None if audited.ok else str(audited.problem)
    result.report = {k: str(v) for k, v in write_report(audited, out / "report").items()}
