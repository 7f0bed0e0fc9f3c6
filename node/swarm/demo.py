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

from .prefork import ENTRY_POINTS, ForkedProcess, spawn

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

    def reward_windows(self, window: int = 10) -> list[tuple[int, int, float]]:
        """(first version, last version, mean reward) of consecutive runs of ``window`` versions of the
        curve: one round's reward is too noisy to compare (a few dozen completions)."""
        curve = self.reward_curve()
        return [(chunk[0][0], chunk[-1][0], sum(r for _, r in chunk) / len(chunk))
                for chunk in (curve[i: i + window] for i in range(0, len(curve), window))]


def demo_config_text() -> str:
    return resources.files("grpo_swarm.node").joinpath("configs", DEMO_CONFIG).read_text()


def _bin(name: str) -> list[str]:
    """A console script of this installation (the same Python)."""
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", ENTRY_POINTS[name].partition(":")[0]]


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float, what: str) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        time.sleep(0.1)
    raise TimeoutError(f"{what} was not ready within {timeout_s:.0f} s")


class LocalSwarm:
    """A coordinator and ``grpo-node join`` processes on loopback, in ``out_dir`` (what ``grpo-node
    demo`` runs; tests drive it to kill and restart nodes). Each process runs in its own session, so
    that stopping a node reaches its hivemind helpers and p2pd too. Use it as a context manager::

        with LocalSwarm(out, nodes=3) as swarm:
            swarm.start_coordinator()
            for i in range(3):
                swarm.start_node(i, rounds=10)
            ...
            swarm.kill_node(2)  # SIGKILL: node 2's whole process group
    """

    def __init__(self, out_dir: str | Path, *, nodes: int = 3, config_text: str | None = None,
                 env: dict | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in (self.out / "coordinator", self.out / "port"):  # a previous run there is replaced
            if stale.is_dir():
                import shutil

                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
        text = config_text or demo_config_text()
        # the round closes as soon as every node's groups are in: N nodes x prompts x G
        text = text.replace("samples_per_round = 384", f"samples_per_round = {nodes * 8 * 16}")
        text = text.replace("min_peers = 2 ", f"min_peers = {min(nodes, 2)} ")  # (a swarm of one: no wait)
        (self.out / "run.toml").write_text(text)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        self.logs = self.out / "logs"
        self.logs.mkdir(exist_ok=True)
        self.coordinator: subprocess.Popen | ForkedProcess | None = None
        self.address: str | None = None
        self.nodes: dict[int, subprocess.Popen | ForkedProcess] = {}
        for i in range(nodes):
            stale = self.workdir(i) / "swarm.jsonl"
            if stale.exists():
                stale.unlink()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def workdir(self, i: int) -> Path:
        return self.out / f"node{i}"

    def start_coordinator(self, timeout_s: float = 120.0, port: int = 0) -> str:
        """Start ``grpo-coordinator serve`` (on ``port``; 0: a free one); its ``HOST:PORT`` once it
        serves. Started again after :meth:`stop_coordinator` on the same port, it resumes the run from
        its directory, and the nodes ride the gap out."""
        (self.out / "port").unlink(missing_ok=True)  # written again once this process serves
        mode = "w" if self.coordinator is None else "a"  # a restart's output follows the first's
        self.coordinator = spawn(
            [*_bin("grpo-coordinator"), "serve", "-c", str(self.out / "run.toml"), "-d",
             str(self.out / "coordinator"), "--port", str(port), "--port-file", str(self.out / "port")],
            stdout=self.logs / "coordinator.log", append=mode == "a", env=self.env)
        port = _wait_for(self.out / "port", self.coordinator, timeout_s, "the coordinator")
        self.address = f"127.0.0.1:{port}"
        return self.address

    def stop_coordinator(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the coordinator (it stops serving and closes its log), SIGKILL after ``timeout_s``."""
        if self.coordinator is None or self.coordinator.poll() is not None:
            return
        self.coordinator.send_signal(signal.SIGTERM)
        try:
            self.coordinator.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _killpg(self.coordinator.pid, signal.SIGKILL)
            self.coordinator.wait(timeout=30)

    def join_args(self, i: int, rounds: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
        """``grpo-node join``'s arguments for node ``i`` (its key and work directory are out/node<i>)."""
        workdir = self.workdir(i)
        return ["join", "--coordinator", str(self.address), "--identity", str(workdir / "node.key"),
                "--workdir", str(workdir), *(["--rounds", str(rounds)] if rounds is not None else []),
                "--host-maddr", "/ip4/127.0.0.1/tcp/0", "--quiet", "--set", "run.threads=1", *extra]

    def start_node(self, i: int, *, rounds: int | None = None, extra: tuple[str, ...] = (),
                   program: list[str] | None = None) -> subprocess.Popen | ForkedProcess:
        """Start node ``i`` (again, after a kill: same key and work directory; its log is appended to).
        ``program`` replaces the ``grpo-node`` command (it gets the same ``join ...`` arguments)."""
        if self.address is None:
            raise RuntimeError("start the coordinator first")
        old = self.nodes.get(i)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"node {i} is still running")
        # forked from the prefork launcher (torch and transformers imported already) where it can be
        self.nodes[i] = proc = spawn([*(program or _bin("grpo-node")), *self.join_args(i, rounds, extra)],
                                     stdout=self.logs / f"node{i}.log", append=True, env=self.env)
        return proc

    def signal_node(self, i: int, sig: int) -> None:
        """``sig`` to node ``i`` and everything it started (its DHT and averager processes, p2pd):
        SIGSTOP / SIGCONT put the whole node to sleep and wake it, as a suspended laptop."""
        _killpg(self.nodes[i].pid, sig)

    def kill_node(self, i: int) -> None:
        """SIGKILL node ``i`` with everything it started (its DHT and averager processes, p2pd), as a crash:
        its goodbye watcher, in a session of its own, lives on to say its goodbye (:meth:`cut_power`: not)."""
        self.signal_node(i, signal.SIGKILL)
        self.nodes[i].wait(timeout=30)

    def cut_power(self, i: int) -> None:
        """SIGKILL node ``i``, everything it started and its goodbye watcher (.goodbye_watcher, in a
        session of its own): a power cut or a lost machine, after which nobody says goodbye for it."""
        import psutil

        try:
            children = psutil.Process(self.nodes[i].pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for child in children:
            try:
                if "goodbye_watcher" in " ".join(child.cmdline()):
                    child.kill()
            except psutil.NoSuchProcess:
                pass
        self.kill_node(i)

    def records(self, i: int) -> list[dict]:
        """Node ``i``'s ``swarm.jsonl`` records so far (a line being written is left out)."""
        path = self.workdir(i) / "swarm.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().split("\n")[:-1]:  # complete lines only
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # torn by a kill mid-write
                continue
        return out

    def stop_nodes(self, grace_s: float = 5.0) -> None:
        """Ctrl-C to every running node's main process (it leaves the swarm cleanly, unless this process
        was started with SIGINT ignored, which its children inherit), then, after ``grace_s``, SIGKILL
        to every node's process group: what is left of it, or of an exited node (p2pd, helpers)."""
        running = [p for p in self.nodes.values() if p.poll() is None]
        if grace_s > 0:
            for p in running:
                p.send_signal(signal.SIGINT)
            deadline = time.monotonic() + grace_s
            for p in running:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for p in self.nodes.values():
            _killpg(p.pid, signal.SIGKILL)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def stop(self) -> None:
        self.stop_nodes()
        self.stop_coordinator()

    def audit(self, result: DemoResult | None = None, *, report: bool = True) -> DemoResult:
        """``grpo-audit verify`` of the coordinator's log (and ``report`` of it): into ``result``."""
        result = result or DemoResult(self.out)
        _audit(result, self.out, report=report)
        return result


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # the group is gone
        pass


def run_demo(out_dir: str | Path, *, nodes: int = 3, rounds: int = 30, config_text: str | None = None,
             timeout_s: float = 600.0, echo=print, node_args: tuple[str, ...] = (), report: bool = True) -> DemoResult:
    """Run the swarm demo in ``out_dir`` (created; a previous run there is replaced). ``report=False``
    leaves out the report's figures (the audit still runs)."""
    swarm = LocalSwarm(out_dir, nodes=nodes, config_text=config_text)
    out = swarm.out
    result = DemoResult(out)
    with swarm:
        address = swarm.start_coordinator()
        echo(f"coordinator serving on {address}; starting {nodes} nodes for {rounds} rounds")
        procs = [swarm.start_node(i, rounds=rounds, extra=node_args) for i in range(nodes)]
        _follow(out, procs, nodes, timeout_s, echo)
        result.node_exit_codes = [p.wait(timeout=30) for p in procs]
    for i in range(nodes):
        result.rounds[f"node{i}"] = swarm.records(i)
    _audit(result, out, report=report)
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
            lines = path.read_text().split("\n")[:-1]  # complete lines only
            for line in lines[seen:]:
                r = json.loads(line)
                reward = "-" if r["reward_mean"] is None else f"{r['reward_mean']:.3f}"
                echo(f"round {r['round']:3d}  v{r['version']:<3d} reward {reward}  peers {r['peers']}  "
                     f"{'averaged' if r['averaged'] else 'no step'}  {r['seconds']:.1f}s  {r['note']}")
            seen = len(lines)
        time.sleep(0.5)


def _audit(result: DemoResult, out: Path, *, report: bool = True) -> None:
    from grpo_swarm.protocol.audit import audit
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
    if report:
        from grpo_swarm.protocol.report import write_report

        result.report = {k: str(v) for k, v in write_report(audited, out / "report").items()}
