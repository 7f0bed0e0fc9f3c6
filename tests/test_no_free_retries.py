"""The attacks an outside review got accepted, replayed against a real coordinator on loopback:
cherry-picked and fabricated work is now refused, a failed check cannot be retried, it costs the
node its round, and enough of them its key. Every refusal is in the log with its reason code, and
``grpo-audit`` replays the log to the same verdicts.

The attacker is a registered node with the real (tiny) model: it samples honestly, then edits what
it submits, keeping everything the coordinator can recompute cheaply consistent (rewards, totals,
advantages, decoded text, true log-probabilities under the policy) so that only the spot-check's
log-prob and sampling checks can tell.
"""

from __future__ import annotations

import struct

import pytest
import torch

from grpo_swarm.coordinator.core import Coordinator
from grpo_swarm.coordinator.service import start_server
from grpo_swarm.node import grpo, proving
from grpo_swarm.node.noise import group_keys
from grpo_swarm.protocol.audit import audit
from grpo_swarm.protocol.client import CoordinatorClient, CoordinatorError
from grpo_swarm.protocol.log import ProtocolLog
from grpo_swarm.protocol.proofs import build_reward_proof, sign_proof
from grpo_swarm.protocol.run_spec import load_hooks

from coordinator_world import HonestNode, Served
from protocol_world import proof_fields


@pytest.fixture
def served(tmp_path):
    # every member checked: each forgery below is looked at (selection is tested in test_protocol_verify)
    s = Served(tmp_path, spot_check_rate=1.0, samples_per_round=4096)
    yield s
    s.stop()


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


class Attacker(HonestNode):
    """An honest node's sampler and keys, and the means to re-sign anything it likes."""

    def resign(self, group, members: dict[int, list[int]] | None = None) -> list:
        """``group`` re-signed with fresh sequences; member k's tokens replaced by ``members[k]`` with
        its text, true log-probs under the policy, recomputed rewards, and the group's advantages
        recomputed from the totals: consistent in everything but how the tokens were chosen."""
        members = members or {}
        recompute = proving.make_reward_recomputer(self.trainer.reward_functions, self.examples)
        decode = proving.make_decoder(self.tokenizer)
        true_logprobs = proving.make_logprob_fn(self.model, self.tokenizer, self.examples)
        weights = [r.weight for r in self.train_cfg.rewards]
        fields = []
        for p in sorted(group, key=lambda q: q.completion_index):
            f = proof_fields(p)
            ids = members.get(p.completion_index)
            if ids is not None:
                f.update(completion_token_ids=ids, completion_text=decode(ids), behaviour_logprobs=[0.0] * len(ids))
                probe = build_reward_proof(**f)
                f["behaviour_logprobs"] = true_logprobs(probe).logprobs
                values = recompute(probe)
                f["rewards"] = [(name, None if v is None else _f32(v)) for name, v in values.items()]
                f["reward_total"] = _f32(sum(w * v for w, (_, v) in zip(weights, f["rewards"]) if v is not None))
            fields.append(f)
        adv = grpo.group_advantages(torch.tensor([f["reward_total"] for f in fields]), len(fields)).tolist()
        out = []
        for f, a in zip(fields, adv):
            f.update(advantage=a, sequence=self.sequence, time_ms=f["time_ms"] + 1)
            self.sequence += 1
            out.append(sign_proof(build_reward_proof(**f, node_public_key=self.identity.public_key_bytes),
                                  self.identity))
        return out

    def submit(self, proofs):
        return self.client.submit_proofs(proofs)

    def edit_logprobs(self, group, member: int, delta: float) -> list:
        """``group`` with member ``member``'s claimed log-probs shifted by ``delta``, re-signed."""
        f = proof_fields(group[member])
        f["behaviour_logprobs"] = [x + delta for x in f["behaviour_logprobs"]]
        edited = sign_proof(build_reward_proof(**f, node_public_key=self.identity.public_key_bytes), self.identity)
        return [edited if q.completion_index == member else q for q in group]


def verdict_of(reply, i=0):
    v = reply.verdicts[i]
    return v.code if not v.accepted else "ACCEPTED"


def logged_codes(served) -> list[str]:
    log = ProtocolLog(served.data_dir / "protocol.sqlite", create=False, readonly=True)
    try:
        return [e.payload["code"] for e in log.entries() if e.kind == "proofs_rejected"]
    finally:
        log.close()


def audit_passes(served):
    hooks = load_hooks(served.coordinator.spec.to_payload(), model="tiny", snapshots=str(served.data_dir / "snapshots"))
    result = audit(served.data_dir / "protocol.sqlite", hooks)
    assert result.ok, result.problem
    return result


def test_edited_logprob_is_caught_and_cannot_be_retried(served, tmp_path):
    """Finding 1: one member's log-probs edited (+0.5) fails the spot-check; re-signing it (another
    time_ms, new sequences) is refused GROUP_BURNED, and the node's other, honest groups of the
    round are refused TICKET_VOIDED: no ticket for the round."""
    node = Attacker(served.address, tmp_path)
    hb, groups = node.round_proofs(seed=1)
    reply = node.submit(node.edit_logprobs(groups[0], 1, +0.5))
    assert verdict_of(reply) == "SPOT_CHECK_FAILED" and not reply.HasField("ticket")
    retry = node.submit(node.resign(groups[0]))  # the honest group, re-signed: the coin is not re-rolled
    assert verdict_of(retry) == "GROUP_BURNED"
    other = node.submit(groups[1])  # honest work in the same round no longer counts
    assert verdict_of(other) == "TICKET_VOIDED" and not other.HasField("ticket")
    assert logged_codes(served) == ["SPOT_CHECK_FAILED", "GROUP_BURNED", "TICKET_VOIDED"]
    result = audit_passes(served)
    assert result.nodes[node.identity.node_id].failed_checks == 1


def test_made_up_completion_with_true_logprobs_is_caught(served, tmp_path):
    """Finding 2: a completion written by the node (the right answer), carrying its true
    log-probabilities under the policy and consistent rewards, is not what the member's keyed noise
    samples: SAMPLING_MISMATCH."""
    node = Attacker(served.address, tmp_path)
    hb, groups = node.round_proofs(seed=2)
    group = groups[0]
    ex = node.examples[group[0].prompt_index]
    answer = node.tokenizer(ex.columns["answer"], add_special_tokens=False).input_ids
    eos = node.tokenizer.eos_token_id
    written = (answer + [eos])[: node.train_cfg.grpo.max_completion_length]
    reply = node.submit(node.resign(group, {0: written}))
    assert verdict_of(reply) == "SAMPLING_MISMATCH", reply.verdicts[0].detail
    audit_passes(served)


def test_best_k_of_n_group_is_caught(served, tmp_path):
    """Finding 2: sampling 3G completions (other members' keys) and keeping the best G, relabelled
    as members 0..G-1 with their true log-probs: the swapped-in members fail the sampling check."""
    node = Attacker(served.address, tmp_path)
    hb = node.client.heartbeat(node.snapshot.version)
    g = node.train_cfg.grpo.group_size
    prompt = hb.prompt_indices[0]
    ex = node.examples[prompt]
    keys = group_keys(int(node.spec["run_seed"]), node.identity.node_id, hb.current_round, [prompt], 3 * g)
    node.trainer.cfg.grpo.group_size = 3 * g  # sample 3G, score them all
    try:
        texts, rollouts = node.trainer.rollout([ex], seed=0, noise_keys=keys)
        scored = node.trainer.score([ex], texts, rollouts)
    finally:
        node.trainer.cfg.grpo.group_size = g
    totals = scored.rewards.total.tolist()
    best = sorted(range(3 * g), key=lambda i: (-totals[i], -i))[:g]  # ties go to the extra samples
    assert max(best) >= g
    _, groups = node.round_proofs(seed=3)  # a real group of that prompt to build on
    group = next(gr for gr in groups if gr[0].prompt_index == prompt)
    ids = rollouts.completion_lists()
    reply = node.submit(node.resign(group, {k: ids[i] for k, i in enumerate(best)}))
    assert verdict_of(reply) == "SAMPLING_MISMATCH", reply.verdicts[0].detail
    audit_passes(served)


def test_copied_completion_is_caught(served, tmp_path):
    """Finding 2: the best member's completion copied over the worst one's (its true log-probs and
    rewards, advantages recomputed): the copy is not the worst member's sample."""
    node = Attacker(served.address, tmp_path)
    hb, groups = node.round_proofs(seed=4)
    group = next((gr for gr in groups if len({p.reward_total for p in gr}) > 1), groups[0])
    ranked = sorted(group, key=lambda p: p.reward_total)
    worst, best = ranked[0], ranked[-1]
    if list(worst.completion_token_ids) == list(best.completion_token_ids):
        pytest.skip("all members sampled the same completion")
    reply = node.submit(node.resign(group, {worst.completion_index: list(best.completion_token_ids)}))
    assert verdict_of(reply) == "SAMPLING_MISMATCH", reply.verdicts[0].detail
    audit_passes(served)


def test_the_honest_node_is_accepted_with_every_member_checked(served, tmp_path):
    """The checks above do not touch honest work: every group accepted with all members spot-checked."""
    node = HonestNode(served.address, tmp_path)
    hb, groups = node.round_proofs(seed=5)
    reply = node.client.submit_proofs([p for g in groups for p in g])
    assert all(v.accepted for v in reply.verdicts), [v.detail for v in reply.verdicts]
    assert reply.ticket.accepted_samples == sum(len(g) for g in groups)
    audit_passes(served)


def test_three_failed_checks_ban_the_key(tmp_path):
    """ban_after_failures = 3 (the default): the third failure, in the third round, bans the key; the
    ban is logged with the failed group as evidence and the key is refused from then on."""
    served = Served(tmp_path, spot_check_rate=1.0, samples_per_round=8)
    try:
        (tmp_path / "cheat").mkdir(), (tmp_path / "honest").mkdir()
        cheat = Attacker(served.address, tmp_path / "cheat")
        honest = HonestNode(served.address, tmp_path / "honest")
        for r in range(3):
            hb, groups = cheat.round_proofs(seed=10 + r)
            assert verdict_of(cheat.submit(cheat.edit_logprobs(groups[0], 0, -1.0))) == "SPOT_CHECK_FAILED"
            if r < 2:  # the honest node closes the round (2 groups x G = 8 samples)
                _, hg = honest.round_proofs(seed=20 + r)
                assert honest.client.submit_proofs([p for g in hg for p in g]).round_closed
        with pytest.raises(CoordinatorError) as e:
            cheat.client.heartbeat(0)
        assert e.value.code == "PERMISSION_DENIED"
        log = ProtocolLog(served.data_dir / "protocol.sqlite", create=False, readonly=True)
        bans = [e for e in log.entries() if e.kind == "node_banned"]
        rounds = [e.payload for e in log.entries() if e.kind == "round_closed"]
        log.close()
        assert len(bans) == 1 and bans[0].payload["node_id"] == cheat.identity.node_id
        assert "3 failed checks" in bans[0].payload["reason"] and bans[0].payload["evidence_index"] is not None
        assert all(cheat.identity.node_id not in r["participants"] for r in rounds)  # voided rounds
        result = audit_passes(served)
        assert result.nodes[cheat.identity.node_id].banned and result.nodes[cheat.identity.node_id].failed_checks == 3
    finally:
        served.stop()


def test_penalties_survive_a_coordinator_restart(tmp_path):
    """Burned groups and voided rounds are rebuilt from the log: a restart is not a free retry."""
    served = Served(tmp_path, spot_check_rate=1.0, samples_per_round=4096)
    try:
        node = Attacker(served.address, tmp_path)
        hb, groups = node.round_proofs(seed=6)
        assert verdict_of(node.submit(node.edit_logprobs(groups[0], 2, +0.5))) == "SPOT_CHECK_FAILED"
    finally:
        served.stop()
    coordinator = Coordinator(served.cfg, served.data_dir)  # the same data dir: state from the log
    server, port, _ = start_server(coordinator)
    try:
        node.client.close()
        node.client = CoordinatorClient(f"127.0.0.1:{port}", node.identity, timeout_s=30)
        assert verdict_of(node.submit(node.resign(groups[0]))) == "GROUP_BURNED"
        assert verdict_of(node.submit(groups[1])) == "TICKET_VOIDED"
    finally:
        server.stop(0).wait()
        coordinator.close()


def test_proofs_need_a_dispatch_and_its_version(tmp_path):
    """A node that never heartbeated in the round has nothing dispatched: UNASSIGNED_PROMPT."""
    served = Served(tmp_path, spot_check_rate=0.0, samples_per_round=4096)
    try:
        node = HonestNode(served.address, tmp_path)
        hb, groups = node.round_proofs(seed=7)
        assert hb.sample_version == node.snapshot.version == 0 and hb.may_sample
        stranger = Attacker(served.address, tmp_path)  # registered, but samples without a heartbeat
        g = [build_reward_proof(**{**proof_fields(p), "group_id": p.group_id.replace(node.identity.node_id,
                                                                                     stranger.identity.node_id)},
                                node_public_key=stranger.identity.public_key_bytes) for p in groups[0]]
        g = [sign_proof(p, stranger.identity) for p in g]
        reply = stranger.submit(g)
        assert verdict_of(reply) in ("UNASSIGNED_PROMPT",)
        assert "not dispatched" in reply.verdicts[0].detail or "not assigned" in reply.verdicts[0].detail
    finally:
        served.stop()
