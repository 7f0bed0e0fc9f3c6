"""Shared by tests/test_swarm_averaging.py and its peer processes (tests/swarm_peer.py): the test
run's constants, the synthetic gradients, the GRPO batches, and tickets signed by a test-only
coordinator key.

Tickets use :func:`ticket_type`: the real ``AdmissionTicket`` schema plus ``accepted_tokens`` when
the coordinator's schema does not have that field yet (the averager reads it through
``TicketClaims``); it needs nothing else from the extension.
"""

from __future__ import annotations

import functools

import torch

RUN_ID = "swarm-test-run"
SMALL_SHAPES = [(3000,), (40, 25), (7,)]
NORM_BOUND = 1e3
# GRPO batches: 5 prompts x 4 completions; which groups each peer holds, by swarm size K
NUM_GROUPS, GROUP_SIZE, MAX_COMPLETION = 5, 4, 6
GROUPS = {3: [[0], [1, 2], [3, 4]], 2: [[0, 1], [2, 3, 4]]}
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def small_grads(round_index: int, index: int) -> list[torch.Tensor]:
    """Peer ``index``'s synthetic gradient for a small round (deterministic, norm ≈ 0.1 x sqrt(n))."""
    g = torch.Generator().manual_seed(1000 * round_index + index)
    return [0.1 * torch.randn(s, generator=g) for s in SMALL_SHAPES]


@functools.cache
def ticket_type():
    """AdmissionTicket with ``accepted_tokens`` (the field tokens-weighted losses need)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    from grpo_swarm.protocol import grpo_swarm_pb2 as pb

    if "accepted_tokens" in pb.AdmissionTicket.DESCRIPTOR.fields_by_name:
        return pb.AdmissionTicket
    fdp = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "grpo_swarm_test_tickets.proto"
    msg = next(m for m in fdp.message_type if m.name == "AdmissionTicket")
    msg.field.add(name="accepted_tokens", number=max(f.number for f in msg.field) + 1,
                  type=descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
                  label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("grpo_swarm.v1.AdmissionTicket"))


def make_ticket(coordinator, node_public_key: bytes, round_index: int, sequences: int, tokens: int = 0,
                run_id: str = RUN_ID) -> bytes:
    """A ticket signed by ``coordinator`` (an Identity) with ``sign_ticket``."""
    from grpo_swarm.protocol.identity import node_id_from_public_key
    from grpo_swarm.protocol.rpc import sign_ticket

    t = ticket_type()(run_id=run_id, round_index=round_index, node_id=node_id_from_public_key(node_public_key),
                      node_public_key=node_public_key, accepted_samples=sequences, accepted_tokens=tokens,
                      policy_version=0, time_ms=1)
    return sign_ticket(t, coordinator).SerializeToString()


def make_trainer():
    """The tiny-model GRPOTrainer every process builds the same way (the loss type is the batch's)."""
    from grpo_swarm.node.config import load_config
    from grpo_swarm.node.models import build_tiny_model
    from grpo_swarm.node.rewards import build_reward_functions
    from grpo_swarm.node.trainer import GRPOTrainer

    cfg = load_config(None, [f"grpo.prompts_per_step={NUM_GROUPS}", f"grpo.group_size={GROUP_SIZE}",
                             f"grpo.max_completion_length={MAX_COMPLETION}",
                             f"optim.groups_per_microbatch={NUM_GROUPS}"])
    loaded = build_tiny_model(0)
    rewards = build_reward_functions([r.model_dump() for r in cfg.rewards])
    return GRPOTrainer(loaded.model, loaded.tokenizer, cfg, rewards)


def union_batch(trainer):
    """The whole swarm's scored batch (seeded rollout; rewards forced so every group has a signal)."""
    from grpo_swarm.node import grpo
    from grpo_swarm.node.data import arithmetic_examples

    examples = arithmetic_examples(NUM_GROUPS, seed=1, max_operand=4)
    texts, rollouts = trainer.rollout(examples, seed=5)
    # the random tiny model never samples EOS: end the completions at varied lengths, as an EOS would,
    # so that token weights (bnpo, dapo) and sequence weights (grpo, dr_grpo) differ between peers
    n, width = rollouts.completion_ids.shape
    lengths = torch.tensor([1 + (7 * i) % width for i in range(n)])
    keep = torch.arange(width)[None, :] < lengths[:, None]
    rollouts.completion_mask = rollouts.completion_mask * keep
    rollouts.completion_ids = torch.where(keep, rollouts.completion_ids, torch.full_like(rollouts.completion_ids,
                                                                                         trainer.pad_id))
    rollouts.behaviour_logps = rollouts.behaviour_logps * keep
    rollouts.truncated = rollouts.truncated & (lengths >= width)
    batch = trainer.score(examples, texts, rollouts)
    batch.advantages = grpo.group_advantages(torch.arange(NUM_GROUPS * GROUP_SIZE, dtype=torch.float32) % 3,
                                             GROUP_SIZE)
    return trainer.prepare(batch)


def gradient(trainer, batch, groups, loss_type: str) -> tuple[list[torch.Tensor], int, int]:
    """(gradient of ``groups`` of ``batch`` under ``loss_type``, sequences, completion tokens)."""
    sub = batch.select_groups(list(groups), loss_type, MAX_COMPLETION)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.compute_gradients(sub)
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.trainable]
    trainer.optimizer.zero_grad(set_to_none=True)
    mask = sub.rollouts.completion_mask
    return grads, int(mask.size(0)), int(mask.sum())
