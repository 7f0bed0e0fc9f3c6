"""Real coordinators and honest nodes for the coordinator tests (not a test module).

A run of the tiny model on the arithmetic task; :class:`HonestNode` registers over gRPC, downloads
the policy snapshot, samples its assigned prompts with the real trainer and signs real proofs.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from grpo_swarm.coordinator.config import load_run_config
from grpo_swarm.coordinator.core import Coordinator
from grpo_swarm.coordinator.service import ServerLimits, start_server
from grpo_swarm.node import proving
from grpo_swarm.node.models import load_model
from grpo_swarm.node.noise import group_keys
from grpo_swarm.node.rewards import build_reward_functions
from grpo_swarm.node.swarm_config import run_examples, train_config_from_run
from grpo_swarm.node.trainer import GRPOTrainer
from grpo_swarm.protocol.client import CoordinatorClient
from grpo_swarm.protocol.identity import Identity
from grpo_swarm.protocol.rpc import hardware_summary

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
"""


def write_run_toml(path: Path, *, samples_per_round: int = 64, max_staleness: int = 1, spot_check_rate: float = 0.5,
                   round_timeout_s: float = 3600.0) -> Path:
    path.write_text(RUN_TOML.format(samples_per_round=samples_per_round, max_staleness=max_staleness,
                                    spot_check_rate=spot_check_rate, round_timeout_s=round_timeout_s))
    return path


class Served:
    """An in-process coordinator on a loopback port."""

    def __init__(self, tmp: Path, limits: ServerLimits = ServerLimits(), chunk_size: int | None = None,
                 keep_snapshots: int = 3, **run):
        self.cfg = load_run_config(write_run_toml(tmp / "run.toml", **run))
        self.data_dir = tmp / "coord"
        kw = {"keep_snapshots": keep_snapshots} if chunk_size is None else {"chunk_size": chunk_size}
        self.coordinator = Coordinator(self.cfg, self.data_dir, **kw)
        self.server, self.port, self.service = start_server(self.coordinator, limits=limits)
        self.address = f"127.0.0.1:{self.port}"

    def client(self, identity: Identity | None = None) -> CoordinatorClient:
        return CoordinatorClient(self.address, identity or Identity.generate(), timeout_s=30)

    def stop(self) -> None:
        self.server.stop(0).wait()
        self.coordinator.close()


class HonestNode:
    def __init__(self, address: str, workdir: Path, identity: Identity | None = None):
        self.identity = identity or Identity.generate()
        self.client = CoordinatorClient(address, self.identity, timeout_s=30)
        self.workdir = workdir
        self.reply = self.client.register(hardware=hardware_summary(software="grpo-swarm tests"))
        self.run = json.loads(self.reply.run_config_json)
        self.spec = json.loads(self.reply.run_spec_json)
        self.train_cfg = train_config_from_run(self.run, ["run.threads=1"])
        loaded = load_model(self.run["model"]["name"])
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.trainer = GRPOTrainer(self.model, self.tokenizer, self.train_cfg,
                                   build_reward_functions([r.model_dump() for r in self.train_cfg.rewards]))
        self.examples = run_examples(self.run)
        self.sequence = 0
        self.snapshot = None
        self.sync()

    def sync(self) -> None:
        """Download and load the current snapshot."""
        manifest = self.client.manifest()
        path = self.workdir / f"{self.identity.node_id}-v{manifest.snapshot.version}.safetensors"
        self.client.download_snapshot(path, manifest=manifest)
        self.model.load_state_dict(load_file(str(path)))
        self.snapshot = manifest.snapshot
        self.trainer.version = manifest.snapshot.version

    def round_proofs(self, seed: int = 0):
        """(heartbeat, one proof list per assigned group) for the current round."""
        hb = self.client.heartbeat(self.snapshot.version, completions_per_s=12.5, tokens_per_s=50.0)
        examples = [self.examples[i] for i in hb.prompt_indices]
        # the run's keyed noise: these completions are the only ones the verifier accepts
        keys = group_keys(int(self.spec["run_seed"]), self.identity.node_id, hb.current_round, hb.prompt_indices,
                          self.train_cfg.grpo.group_size)
        texts, rollouts = self.trainer.rollout(examples, seed=seed, noise_keys=keys)
        batch = self.trainer.score(examples, texts, rollouts)
        proofs = proving.proofs_from_batch(
            batch, examples, texts, self.identity, run_id=self.reply.run_id, snapshot_sha256=self.snapshot.sha256,
            round_index=hb.current_round, first_sequence=self.sequence, policy_version=self.snapshot.version,
            reward_spec_id=proving.spec_id_of(self.train_cfg.rewards))
        self.sequence += len(proofs)
        g = self.train_cfg.grpo.group_size
        return hb, [proofs[i:i + g] for i in range(0, len(proofs), g)]
