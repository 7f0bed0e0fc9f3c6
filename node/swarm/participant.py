"""The coordinator side of a swarm peer (no hivemind here): register, hold the policy snapshot,
take each round's assignment, sample it with the run's keyed noise, prove and submit the groups,
keep the accepted ones for the gradient, report the parameter hash of a new version, upload it.

:class:`Participant` is what ``grpo-node join`` runs around the averaging round; tests drive it
directly against a real coordinator. Sequence numbers start from the wall clock in microseconds,
so a restarted node continues above what the coordinator last accepted from its key.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from safetensors.torch import load_file

from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.client import CoordinatorClient
from grpo_swarm.protocol.rpc import hardware_summary
from grpo_swarm.protocol.upload_call import DEFAULT_STALL_S, UploadCall

from .. import proving
from ..hardware import fit_groups_per_microbatch, probe
from ..data import PromptExample
from ..models import load_model
from ..noise import group_keys
from ..rewards import build_reward_functions
from ..swarm_config import run_examples, train_config_from_run
from ..trainer import GRPOTrainer, ScoredBatch
from .patience import download_patiently, register_patiently
from .training_state import load_training_state, training_state, version_file

log = logging.getLogger(__name__)


def _device(overrides: Sequence[str]) -> str:
    """The device ``--device`` / ``--set model.device=...`` asked for (auto by default)."""
    for o in overrides:
        key, _, value = o.partition("=")
        if key.strip() == "model.device":
            return value.strip().strip("'\"") or "auto"
    return "auto"


@dataclass
class RoundWork:
    """One round's sampled, scored and proven groups, and what the coordinator said of them."""

    round_index: int
    version: int
    examples: list[PromptExample]
    scored: ScoredBatch
    groups: list[list[pb.RewardProof]]  # signed proofs, one list per group, in the examples' order
    accepted: list[int] = field(default_factory=list)  # indices of accepted groups
    verdicts: list[pb.GroupVerdict] = field(default_factory=list)
    ticket: pb.AdmissionTicket | None = None

    @property
    def accepted_samples(self) -> int:
        return sum(len(self.groups[i]) for i in self.accepted)


class Participant:
    """One node's dealings with the coordinator, with its model, trainer and dataset."""

    def __init__(self, client: CoordinatorClient, workdir: str | Path, *, overrides: Sequence[str] = (),
                 software: str = "grpo-swarm"):
        self.client, self.identity = client, client.identity
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hardware = probe(_device(overrides))
        gpu = self.hardware.device.startswith("cuda")
        self.reply = register_patiently(client, hardware_summary(
            accelerator=self.hardware.name if gpu else "", accelerator_memory_bytes=self.hardware.total_bytes if gpu else 0,
            software=software))
        self.run_id, self.node_id = self.reply.run_id, self.reply.node_id
        self.run = json.loads(self.reply.run_config_json)
        self.spec = json.loads(self.reply.run_spec_json)
        self.run_seed = int(self.spec["run_seed"])
        self.train_cfg = train_config_from_run(self.run, overrides)
        loaded = load_model(self.train_cfg.model.name)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.trainer = GRPOTrainer(self.model, self.tokenizer, self.train_cfg,
                                   build_reward_functions([r.model_dump() for r in self.train_cfg.rewards]))
        if not any(o.split("=", 1)[0].strip() == "optim.groups_per_microbatch" for o in overrides):
            self._fit_microbatch()
        self.examples = run_examples(self.run)
        self.spec_id = proving.spec_id_of(self.train_cfg.rewards)
        self.sequence = time.time_ns() // 1000
        self.snapshot: pb.PolicySnapshotRef | None = None
        self.sync()

    def _fit_microbatch(self) -> None:
        """Size the training micro-batch to this machine's free memory (it changes memory use only,
        never the gradient); ``--set optim.groups_per_microbatch=N`` overrides it."""
        cfg, t = self.train_cfg, self.trainer
        dtype_bytes = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
        free = probe(self.hardware.device).free_bytes
        # the weights (and the reference's) are loaded already: fit counts them among the fixed costs
        loaded = sum(p.numel() * p.element_size() for m in (self.model, t.ref_model) if m is not None
                     for p in m.parameters())
        try:
            cfg.optim.groups_per_microbatch = fit_groups_per_microbatch(
                self.model, t.ref_model, free_bytes=free + loaded,
                group_size=cfg.grpo.group_size,
                tokens_per_sequence=cfg.data.max_prompt_length + cfg.grpo.max_completion_length,
                max_groups=int(self.run["swarm"].get("prompts_per_round", 8)), dtype_bytes=dtype_bytes)
        except MemoryError as e:
            log.warning("%s; training one group per micro-batch", e)
            cfg.optim.groups_per_microbatch = 1
        log.info("%s: %.1f GiB free, %d group(s) per micro-batch", self.hardware.name, free / 2**30,
                 cfg.optim.groups_per_microbatch)

    # -- the policy
    def sync(self, version: int | None = None) -> pb.PolicySnapshotRef:
        """Download (resuming) and load snapshot ``version`` (default: the current one)."""
        manifest = self.client.manifest(version)
        path = self.workdir / f"{self.node_id}-v{manifest.snapshot.version}.safetensors"
        if not path.is_file():
            download_patiently(self.client, path, manifest)
        t = self.trainer
        load_training_state(self.model, t.optimizer, t.trainable, load_file(str(path)), t.scheduler)
        for old in self.workdir.glob(f"{self.node_id}-v*.safetensors"):  # one version kept: no disk growth
            if old != path:
                old.unlink(missing_ok=True)
        self.snapshot = manifest.snapshot
        self.trainer.version = manifest.snapshot.version
        return self.snapshot

    def heartbeat(self, computed: pb.PolicySnapshotRef | None = None, **throughput) -> pb.HeartbeatResponse:
        return self.client.heartbeat(self.snapshot.version, computed=computed, **throughput)

    # -- a round's work
    def sample(self, hb: pb.HeartbeatResponse) -> RoundWork:
        """Sample, score and prove the groups assigned in ``hb`` with the version the round is bound
        to (loaded first if the node holds another one)."""
        if not hb.may_sample:
            if hb.live_nodes < hb.min_peers:
                raise RuntimeError(f"the coordinator starts no round before {hb.min_peers} nodes are live "
                                   f"(swarm.min_peers); {hb.live_nodes} are: wait for peers")
            raise RuntimeError(f"the coordinator does not let node {self.node_id} sample now "
                               f"(staleness {pb.Staleness.Name(hb.staleness)}): sync the snapshot first")
        if hb.sample_version != self.snapshot.version:
            self.sync(hb.sample_version)
        examples = [self.examples[i] for i in hb.prompt_indices]
        g = self.train_cfg.grpo.group_size
        keys = group_keys(self.run_seed, self.node_id, hb.current_round, hb.prompt_indices, g)
        texts, rollouts = self.trainer.rollout(examples, seed=0, noise_keys=keys)
        scored = self.trainer.score(examples, texts, rollouts)
        proofs = proving.proofs_from_batch(
            scored, examples, texts, self.identity, run_id=self.run_id, snapshot_sha256=self.snapshot.sha256,
            round_index=hb.current_round, first_sequence=self.sequence, policy_version=self.snapshot.version,
            reward_spec_id=self.spec_id)
        self.sequence += len(proofs)
        groups = [proofs[i:i + g] for i in range(0, len(proofs), g)]
        return RoundWork(hb.current_round, self.snapshot.version, examples, scored, groups)

    def submit(self, work: RoundWork, groups: Sequence[int] | None = None) -> pb.SubmitProofsResponse:
        """Submit the work's groups (all by default); records which were accepted and the ticket."""
        chosen = range(len(work.groups)) if groups is None else groups
        reply = self.client.submit_proofs([p for i in chosen for p in work.groups[i]])
        by_id = {work.groups[i][0].group_id: i for i in chosen}
        for v in reply.verdicts:
            work.verdicts.append(v)
            if v.accepted and by_id.get(v.group_id) is not None:
                work.accepted.append(by_id[v.group_id])
        if reply.HasField("ticket"):
            work.ticket = reply.ticket
        return reply

    def accepted_batch(self, work: RoundWork) -> ScoredBatch | None:
        """What this node's gradient rests on: only its accepted groups (None when there are none)."""
        if not work.accepted:
            return None
        g = self.train_cfg.grpo
        return work.scored.select_groups(sorted(work.accepted), g.loss_type, g.max_completion_length)

    # -- a new version
    def report(self, version: int, sha256: bytes) -> pb.HeartbeatResponse:
        """Report the parameter hash this node computed for ``version`` (what publication counts)."""
        return self.heartbeat(computed=pb.PolicySnapshotRef(version=version, sha256=sha256), sample=False)

    def training_state(self) -> dict:
        """This node's weights and optimizer state, the live tensors: what a version is (:mod:`.training_state`)."""
        t = self.trainer
        return training_state(self.model, t.optimizer, t.trainable, t.scheduler)

    def state_sha256(self) -> bytes:
        return proving.state_dict_sha256(self.training_state())

    def upload(self, version: int, sha256: bytes) -> pb.UploadSnapshotResponse:
        """Upload this node's training state as ``version`` (``sha256``: its state hash) and wait for
        the coordinator's reply (see :meth:`start_upload`)."""
        return self.start_upload(version, sha256).result()

    def start_upload(self, version: int, sha256: bytes, *, stall_s: float = DEFAULT_STALL_S) -> UploadCall:
        """Start uploading this node's training state as ``version``, streamed from the live tensors as
        a canonical version file: nothing is saved, and the state is read once. It must not change
        until the call is done (the join loop steps only after publication, and cancels the call
        first when another peer published)."""
        return self.client.start_upload_version(version_file(self.training_state()),
                                                pb.PolicySnapshotRef(version=version, sha256=sha256), stall_s=stall_s)
