"""Real coordinators and honest nodes for the coordinator tests (not a test module).

A run of the tiny model on the arithmetic task; :class:`HonestNode` is the product's swarm
participant: it registers over gRPC, downloads the policy snapshot, samples its assigned prompts
with the real trainer and the run's keyed noise, and signs real proofs.
"""

from __future__ import annotations

from pathlib import Path

from grpo_swarm.coordinator.config import load_run_config
from grpo_swarm.coordinator.core import Coordinator
from grpo_swarm.coordinator.service import ServerLimits, start_server
from grpo_swarm.node.swarm.participant import Participant
from grpo_swarm.protocol.client import CoordinatorClient
from grpo_swarm.protocol.identity import Identity

RUN_TOML = """\
[run]
id = "coord-test"
seed = 7
[model]
name = "tiny"
dtype = "float32"
[data]
dataset = "arithmetic:4"
size = 64
[[rewards]]
name = "arithmetic_accuracy"
[[rewards]]
name = "overlong_penalty"
weight = 0.5
args = {{max_completion_length = 4, soft_cache_length = 2}}
[grpo]
group_size = 4
max_completion_length = 4
[optim]
lr = 1e-3
[swarm]
prompts_per_round = 2
samples_per_round = {samples_per_round}
max_staleness = {max_staleness}
spot_check_rate = {spot_check_rate}
round_timeout_s = {round_timeout_s}
min_peers = {min_peers}
close_when_all_submitted = {close_when_all_submitted}
heartbeat_interval_s = {heartbeat_interval_s}
"""


def flat(groups):
    """One list of the proofs of several groups (what SubmitProofs takes)."""
    return [p for g in groups for p in g]


def write_run_toml(path: Path, *, samples_per_round: int = 64, max_staleness: int = 1, spot_check_rate: float = 0.5,
                   round_timeout_s: float = 3600.0, min_peers: int = 1, close_when_all_submitted: bool = False,
                   heartbeat_interval_s: float = 10.0) -> Path:
    """A run whose rounds start with a single node (``min_peers`` 1) and close only full or timed out
    (these tests submit a round's work in pieces, from nodes that come and go) unless told otherwise."""
    path.write_text(RUN_TOML.format(samples_per_round=samples_per_round, max_staleness=max_staleness,
                                    spot_check_rate=spot_check_rate, round_timeout_s=round_timeout_s,
                                    min_peers=min_peers, close_when_all_submitted=str(close_when_all_submitted).lower(),
                                    heartbeat_interval_s=heartbeat_interval_s))
    return path


class Served:
    """An in-process coordinator on a loopback port. One a test left running is stopped after it
    (tests/conftest.py), not left serving through the later tests of this process (which fork DHTs
    and averagers)."""

    running: list[Served] = []

    def __init__(self, tmp: Path, limits: ServerLimits = ServerLimits(), chunk_size: int | None = None,
                 keep_snapshots: int = 3, **run):
        self.cfg = load_run_config(write_run_toml(tmp / "run.toml", **run))
        self.data_dir = tmp / "coord"
        kw = {"keep_snapshots": keep_snapshots} if chunk_size is None else {"chunk_size": chunk_size}
        self.coordinator = Coordinator(self.cfg, self.data_dir, **kw)
        self.server, self.port, self.service = start_server(self.coordinator, limits=limits)
        self.address = f"127.0.0.1:{self.port}"
        Served.running.append(self)

    def client(self, identity: Identity | None = None) -> CoordinatorClient:
        return CoordinatorClient(self.address, identity or Identity.generate(), timeout_s=30)

    def stop(self) -> None:
        if self in Served.running:
            Served.running.remove(self)
        self.server.stop(0).wait()
        self.coordinator.close()


class HonestNode(Participant):
    """The product's swarm participant (node/swarm/participant.py), one thread, with a test's shortcut."""

    def __init__(self, address: str, workdir: Path, identity: Identity | None = None):
        client = CoordinatorClient(address, identity or Identity.generate(), timeout_s=30)
        super().__init__(client, workdir, overrides=["run.threads=1"], software="grpo-swarm tests")

    def round_proofs(self, seed: int = 0):
        """(heartbeat, one proof list per assigned group) for the current round."""
        hb = self.heartbeat(completions_per_s=12.5, tokens_per_s=50.0)
        return hb, self.sample(hb).groups
