"""grpo_swarm.protocol.verify: honest groups from real rollouts pass; the attack catalogue is rejected,
each attack with its own reason code; tolerances; spot-check selection; fuzzing of every parser."""

from __future__ import annotations

import hashlib
import math
import random
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from json_strategies import json_values

from grpo_swarm.node import grpo
from grpo_swarm.protocol import ReasonCode
from grpo_swarm.protocol.run_spec import RunSpec
from grpo_swarm.protocol.proofs import MAX_PROOF_BYTES, build_reward_proof, prompt_hash, proof_signing_bytes
from grpo_swarm.protocol.verify import (
    SpotCheckUnavailable,
    Verdict,
    Verifier,
    VerifierPolicy,
    advantage_tolerances,
    expected_advantages,
    reward_spec_id,
    spot_check_selected,
)
from grpo_swarm.node.noise import group_keys
from protocol_world import EOS, REWARDS, World, forge, identity, inflate, with_totals

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture])
NODE = identity(0)
OTHER = identity(1)


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return World(group_size=4, prompts_per_round=4)


@pytest.fixture(scope="module")
def honest(world):
    """Round-0 groups of NODE (sequences 0..15) and of OTHER (unregistered in most tests)."""
    return {"node": world.groups(NODE, 0, 0), "other": world.groups(OTHER, 0, 0)}


def fresh(world, *nodes, **policy_changes):
    state = world.state(*(nodes or (NODE,)))
    return state, world.verifier(state, **policy_changes)


def wrong_member(groups):
    """(group, member index) of a completion whose answer is wrong."""
    for g in groups:
        for p in g:
            if p.rewards[0].value == 0.0:
                return g, p.completion_index
    raise AssertionError("every sampled answer was right")


# ---- honest ----------------------------------------------------------------------------------------
def test_honest_groups_are_accepted_with_every_member_spot_checked(world, honest):
    state, v = fresh(world, spot_check_rate=1.0)
    rewards = []
    for g in honest["node"]:
        verdict = v.verify_group(g)
        assert verdict.accepted, verdict
        assert verdict.code is None and verdict.skipped == ()
        assert verdict.spot_checked == tuple(range(world.group_size))
        rewards += [p.reward_total for p in g]
    # the real rollouts exercise the reward arithmetic: right and wrong answers, overlong penalties
    assert len(set(rewards)) >= 2
    assert state.last_sequence(NODE.node_id) == 15
    assert len(state.accepted_groups) == 4


def test_verdict_shape():
    ok, bad = Verdict.ok(), Verdict.reject("BAD_SIGNATURE", "x", member=2)
    assert ok.accepted and ok.code is None and str(ok) == "accepted"
    assert not bad.accepted and bad.code is ReasonCode.BAD_SIGNATURE and str(bad) == "BAD_SIGNATURE: x"


# ---- the attack catalogue --------------------------------------------------------------------------
def attack_forged_signature(world, honest):
    state, v = fresh(world)
    g = list(honest["node"][0])
    p = g[1].__deepcopy__()
    p.signature = OTHER.sign(proof_signing_bytes(p))  # someone else signs in NODE's name
    g[1] = p
    return v.verify_group(g)


def attack_unknown_key(world, honest):
    state, v = fresh(world)  # OTHER is not registered; its proofs are otherwise honest
    return v.verify_group(honest["other"][0])


def attack_banned_key(world, honest):
    state, v = fresh(world)
    state.ban(NODE.node_id)
    return v.verify_group(honest["node"][0])


def attack_replayed_sequence(world, honest):
    state, v = fresh(world)
    assert v.verify_group(honest["node"][1]).accepted  # sequences 4..7
    return v.verify_group(honest["node"][0])  # sequences 0..3: not above the last accepted one


def attack_replayed_group(world, honest):
    state, v = fresh(world)
    assert v.verify_group(honest["node"][0]).accepted
    return v.verify_group(honest["node"][0])  # the very same signed proofs again


def inflated(g, k):
    return inflate(g, k, NODE)


def attack_inflated_reward(world, honest):
    state, v = fresh(world)
    return v.verify_group(inflated(*wrong_member(honest["node"])))


def attack_unassigned_prompt(world, honest):
    state, v = fresh(world)
    assigned = {ex.index for ex in world.assigned(NODE, 0)}
    easy = next(ex for ex in world.examples if ex.index not in assigned and ex.columns["answer"] == "0")
    (g,) = world.groups(NODE, 0, 100, examples=[easy])  # a cherry-picked easy prompt
    return v.verify_group(g)


def attack_stale_version(world, honest):
    state, v = fresh(world)
    state.publish_snapshot(1, b"\x01" * 32)
    state.publish_snapshot(2, b"\x02" * 32)  # current 2, η = 1: version 0 is too old
    return v.verify_group(honest["node"][0])


def attack_advantage(world, honest):
    state, v = fresh(world)
    g = honest["node"][0]
    return v.verify_group([forge(p, NODE, advantage=p.advantage + (0.5 if p.completion_index == 0 else 0.0))
                           for p in g])


def node_rewards(world, p):
    """(rewards, total) exactly as node.rewards computes them for proof ``p``'s completion."""
    from grpo_swarm.node.rewards import compute_rewards

    ex = world.examples[p.prompt_index]
    res = compute_rewards(world.reward_functions, [ex.prompt], [p.completion_text],
                          {k: [v] for k, v in ex.columns.items()}, [list(p.completion_token_ids)])
    values = res.per_function[0].tolist()
    return [(n, None if math.isnan(v) else v) for n, v in zip(res.names, values)], float(res.total[0])


def attack_fabricated_completion(world, honest):
    """A node writes the right answer itself (with made-up log-probabilities) instead of sampling."""
    state, v = fresh(world, spot_check_rate=1.0)
    g, k = wrong_member(honest["node"])
    answer = world.examples[g[0].prompt_index].columns["answer"]
    ids = world.tokenizer(answer, add_special_tokens=False).input_ids + [EOS]
    fake = {"completion_token_ids": ids, "completion_text": answer, "behaviour_logprobs": [-0.05] * len(ids)}
    rewards, total = node_rewards(world, forge(g[k], NODE, **fake))
    assert rewards[0] == ("arithmetic_accuracy", 1.0)
    fake["rewards"] = rewards
    totals = [total if p.completion_index == k else p.reward_total for p in g]
    forged = with_totals(g, NODE, totals, {k: fake})
    # everything else about the forgery is consistent: without the spot-check it passes
    state2, v2 = fresh(world, spot_check_rate=0.0)
    unchecked = v2.verify_group(forged)
    assert unchecked.accepted, unchecked
    return v.verify_group(forged)


def attack_truncated_bytes(world, honest):
    state, v = fresh(world)
    blobs = [p.SerializeToString() for p in honest["node"][0]]
    blobs[2] = blobs[2][: len(blobs[2]) // 2]
    return v.verify_proof_bytes(blobs)[1]


def attack_oversized_bytes(world, honest):
    state, v = fresh(world)
    blobs = [p.SerializeToString() for p in honest["node"][0]]
    blobs[0] = blobs[0] + b"\x00" * (MAX_PROOF_BYTES + 1 - len(blobs[0]))
    return v.verify_proof_bytes(blobs)[1]


def attack_garbage_bytes(world, honest):
    state, v = fresh(world)
    return v.verify_proof_bytes([random.Random(7).randbytes(300)] * 4)[1]


def attack_wrong_run(world, honest):
    state, v = fresh(world)
    return v.verify_group([forge(p, NODE, run_id="another-run") for p in honest["node"][0]])


def attack_time_skew(world, honest):
    state, v = fresh(world, max_time_skew_ms=60_000)
    g = honest["node"][0]
    return v.verify_group(g, now_ms=g[0].time_ms + 10 * 60_000)


def attack_incomplete_group(world, honest):
    state, v = fresh(world)
    return v.verify_group(honest["node"][0][:3])


def attack_text_swapped(world, honest):
    """The tokens are the sampled ones but the text (what rewards are computed on) is the answer."""
    state, v = fresh(world)
    g, k = wrong_member(honest["node"])
    answer = world.examples[g[0].prompt_index].columns["answer"]
    totals = [p.reward_total + (1.0 if p.completion_index == k else 0.0) for p in g]
    rewards = [("arithmetic_accuracy", 1.0), ("overlong_penalty", g[k].rewards[1].value)]
    return v.verify_group(with_totals(g, NODE, totals, {k: {"completion_text": answer, "rewards": rewards}}))


ATTACKS = {
    "forged signature": (attack_forged_signature, ReasonCode.BAD_SIGNATURE),
    "unknown key": (attack_unknown_key, ReasonCode.UNKNOWN_KEY),
    "banned key": (attack_banned_key, ReasonCode.BANNED_KEY),
    "replayed sequence": (attack_replayed_sequence, ReasonCode.REPLAYED_SEQUENCE),
    "inflated reward": (attack_inflated_reward, ReasonCode.REWARD_MISMATCH),
    "unassigned (cherry-picked) prompt": (attack_unassigned_prompt, ReasonCode.UNASSIGNED_PROMPT),
    "version beyond the staleness bound": (attack_stale_version, ReasonCode.STALE_VERSION),
    "advantage inconsistent with rewards": (attack_advantage, ReasonCode.ADVANTAGE_MISMATCH),
    "fabricated completion": (attack_fabricated_completion, ReasonCode.SPOT_CHECK_FAILED),
    "truncated bytes": (attack_truncated_bytes, ReasonCode.MALFORMED),
    "oversized bytes": (attack_oversized_bytes, ReasonCode.OVERSIZED),
    "garbage bytes": (attack_garbage_bytes, ReasonCode.MALFORMED),
    # further ways to cheat, each with its own code as well
    "replayed group": (attack_replayed_group, ReasonCode.REPLAYED_SEQUENCE),
    "proof of another run": (attack_wrong_run, ReasonCode.WRONG_RUN),
    "timestamp far off": (attack_time_skew, ReasonCode.TIME_SKEW),
    "group with a member missing": (attack_incomplete_group, ReasonCode.INCOMPLETE_GROUP),
    "text swapped for the right answer": (attack_text_swapped, ReasonCode.BAD_COMPLETION),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_rejected_with_its_reason_code(world, honest, name):
    attack, code = ATTACKS[name]
    verdict = attack(world, honest)
    assert not verdict.accepted, f"{name} was accepted"
    assert verdict.code is code, f"{name}: {verdict}"
    assert verdict.detail


def test_each_attack_class_has_its_own_code():
    main = ["forged signature", "unknown key", "banned key", "replayed sequence", "inflated reward",
            "unassigned (cherry-picked) prompt", "version beyond the staleness bound",
            "advantage inconsistent with rewards", "fabricated completion"]
    codes = [ATTACKS[n][1] for n in main]
    assert len(set(codes)) == len(codes)
    assert {ATTACKS[n][1] for n in ("truncated bytes", "oversized bytes", "garbage bytes")} == {
        ReasonCode.MALFORMED, ReasonCode.OVERSIZED}


# ---- more rejections, one check each ---------------------------------------------------------------
def test_small_order_key_cannot_sign(world, honest):
    """A registered key of small order (the identity point) with the trivial forgery R = identity,
    S = 0, which satisfies the cofactorless equation for any message (OpenSSL accepts it): rejected
    as BAD_SIGNATURE (libsodium refuses such keys), before any other check."""
    identity_point = bytes([1]) + bytes(31)
    state, v = fresh(world)
    state.register(identity_point)
    forged = []
    for p in honest["node"][0]:
        q = p.__deepcopy__()
        q.node_public_key = identity_point
        q.signature = identity_point + bytes(32)
        forged.append(q)
    verdict = v.verify_group(forged)
    assert verdict.code is ReasonCode.BAD_SIGNATURE, verdict
    assert "not a valid Ed25519 key" in verdict.detail
    assert not state.accepted_groups


def test_member_pinpointed_and_nothing_recorded_on_rejection(world, honest):
    g, k = wrong_member(honest["node"])
    state, v = fresh(world)
    verdict = v.verify_group(inflated(g, k))
    assert verdict.code is ReasonCode.REWARD_MISMATCH and verdict.member == k
    assert state.last_sequence(NODE.node_id) == -1 and not state.accepted_groups


def test_group_shape_rules(world, honest):
    g = honest["node"][0]
    state, v = fresh(world)
    dup = [g[0], g[1], g[1], g[3]]
    assert v.verify_group(dup).code is ReasonCode.INCOMPLETE_GROUP
    assert v.verify_group([]).code is ReasonCode.INCOMPLETE_GROUP
    mixed = g[:3] + [honest["node"][1][3]]
    assert v.verify_group(mixed).code is ReasonCode.INCOMPLETE_GROUP
    renamed = [forge(p, NODE, group_id="mine/0/0") for p in g]
    assert v.verify_group(renamed).code is ReasonCode.MALFORMED
    assert v.verify_group([g[0], "not a proof"]).code is ReasonCode.MALFORMED
    same_seq = [forge(p, NODE, sequence=50) for p in g]
    assert v.verify_group(same_seq).code is ReasonCode.REPLAYED_SEQUENCE


def test_version_and_snapshot_rules(world, honest):
    g = honest["node"][0]
    state, v = fresh(world)
    state.publish_snapshot(1, b"\x01" * 32)
    assert v.verify_group(g).accepted  # one version behind, η = 1
    state, v = fresh(world)
    future = [forge(p, NODE, policy_version=3) for p in g]
    assert v.verify_group(future).code is ReasonCode.STALE_VERSION
    other_snapshot = [forge(p, NODE, snapshot_sha256=b"\xee" * 32) for p in g]
    assert "not the published" in v.verify_group(other_snapshot).detail


def test_assignment_rules(world, honest):
    g = honest["node"][0]
    state, v = fresh(world)
    state.current_round = 1  # round 0 closed, lag 0
    assert v.verify_group(g).code is ReasonCode.UNASSIGNED_PROMPT
    state, v = fresh(world)
    wrong_prompt = [forge(p, NODE, prompt_sha256=prompt_hash("9+9=")) for p in g]
    verdict = v.verify_group(wrong_prompt)
    assert verdict.code is ReasonCode.UNASSIGNED_PROMPT and "prompt_sha256" in verdict.detail
    # a second group for the same prompt (a re-sample, say, to pick the luckier one)
    assert v.verify_group(g).accepted
    again = world.groups(NODE, 0, 500, examples=[world.examples[g[0].prompt_index]])[0]
    verdict = v.verify_group(again)
    assert verdict.code is ReasonCode.UNASSIGNED_PROMPT and "already accepted" in verdict.detail


def test_completion_rules(world, honest):
    g = honest["node"][0]
    state, v = fresh(world)
    p = g[0]

    def one(k, **changes):
        return v.verify_group([forge(q, NODE, **changes) if q.completion_index == k else q for q in g], commit=False)

    eos_inside = one(0, completion_token_ids=[EOS, 10, 11, 12], behaviour_logprobs=[-1.0] * 4, completion_text="")
    assert eos_inside.code is ReasonCode.BAD_COMPLETION and "after an EOS" in eos_inside.detail
    short = one(0, completion_token_ids=[10], behaviour_logprobs=[-1.0], completion_text="")
    assert short.code is ReasonCode.BAD_COMPLETION and "without an EOS" in short.detail
    long = one(0, completion_token_ids=[10] * 5, behaviour_logprobs=[-1.0] * 5)
    assert long.code is ReasonCode.BAD_COMPLETION
    out_of_vocab = one(0, completion_token_ids=[10_000, EOS], behaviour_logprobs=[-1.0] * 2)
    assert out_of_vocab.code is ReasonCode.BAD_COMPLETION
    no_raw = [q.__deepcopy__() for q in g]
    no_raw[0].ClearField("behaviour_logprobs")
    no_raw[0].signature = NODE.sign(proof_signing_bytes(no_raw[0]))
    assert v.verify_group(no_raw).code is ReasonCode.MALFORMED
    assert p.completion_text == world.tokenizer.decode(list(p.completion_token_ids), skip_special_tokens=True)


def test_reward_rules(world, honest):
    g = honest["node"][0]
    state, v = fresh(world)

    def one(**changes):
        return v.verify_group([forge(q, NODE, **changes) if q.completion_index == 0 else q for q in g], commit=False)

    r = g[0].rewards
    swapped = one(rewards=[("overlong_penalty", r[1].value), ("arithmetic_accuracy", r[0].value)])
    assert swapped.code is ReasonCode.REWARD_MISMATCH
    total_off = one(reward_total=g[0].reward_total + 0.25)
    assert total_off.code is ReasonCode.REWARD_MISMATCH and "weighted sum" in total_off.detail
    not_applicable = one(rewards=[("arithmetic_accuracy", r[0].value), ("overlong_penalty", None)])
    assert not_applicable.code is ReasonCode.REWARD_MISMATCH
    other_spec = [forge(q, NODE, reward_spec_id="rs1-other") for q in g]
    assert v.verify_group(other_spec).code is ReasonCode.REWARD_MISMATCH
    # rule rewards are exact: a recomputed value one binary32 ulp away is a mismatch
    def next_f32(x):  # the next binary32 number above x >= 0
        return struct.unpack("<f", struct.pack("<I", struct.unpack("<I", struct.pack("<f", x))[0] + 1))[0]

    off_by_ulp = Verifier(world.state(NODE), world.policy, reward_recomputer=lambda proof: {
        "arithmetic_accuracy": next_f32(proof.rewards[0].value), "overlong_penalty": proof.rewards[1].value})
    assert off_by_ulp.verify_group(g).code is ReasonCode.REWARD_MISMATCH
    failing = Verifier(world.state(NODE), world.policy, reward_recomputer=lambda proof: 1 / 0)
    verdict = failing.verify_group(g)
    assert verdict.code is ReasonCode.REWARD_MISMATCH and "ZeroDivisionError" in verdict.detail


def test_stated_reward_tolerance_for_non_rule_rewards(world, honest):
    g = honest["node"][0]
    noisy = lambda proof: {"arithmetic_accuracy": proof.rewards[0].value, "overlong_penalty": proof.rewards[1].value + 1e-4}  # noqa: E731
    strict = Verifier(world.state(NODE), world.policy, reward_recomputer=noisy)
    assert strict.verify_group(g).code is ReasonCode.REWARD_MISMATCH
    tolerant_policy = VerifierPolicy(**{**world.policy.__dict__, "reward_tolerances": {"overlong_penalty": 1e-3}})
    tolerant = Verifier(world.state(NODE), tolerant_policy, reward_recomputer=noisy)
    assert tolerant.verify_group(g).accepted


def test_missing_callables_are_listed_as_skipped(world, honest):
    v = Verifier(world.state(NODE), VerifierPolicy(**{**world.policy.__dict__, "spot_check_rate": 1.0}))
    verdict = v.verify_group(honest["node"][0])
    assert verdict.accepted
    assert set(verdict.skipped) == {"prompt_hash", "decode", "rewards", "spot_check"}


def test_spot_check_unavailable_snapshot_is_skipped_not_failed(world, honest):
    def unavailable(proof):
        raise SpotCheckUnavailable("no copy of that version")

    state = world.state(NODE)
    policy = VerifierPolicy(**{**world.policy.__dict__, "spot_check_rate": 1.0})
    v = Verifier(state, policy, reward_recomputer=world.hooks.reward_recomputer, logprob_fn=unavailable)
    verdict = v.verify_group(honest["node"][0])
    assert verdict.accepted and verdict.spot_checked == ()
    assert any(s.startswith("spot_check (no copy") for s in verdict.skipped)
    broken = Verifier(world.state(NODE), policy, logprob_fn=lambda proof: [0.0])  # wrong length
    assert broken.verify_group(honest["node"][0]).code is ReasonCode.SPOT_CHECK_FAILED


def test_spot_check_uses_the_claimed_version(world, honest):
    """After a training step the current weights no longer reproduce version-0 log-probabilities, the
    version-0 snapshot does: the check must load the claimed version."""
    from grpo_swarm.node import proving

    w = World(group_size=4, prompts_per_round=4, lr=3e-2)
    (g,) = w.groups(NODE, 0, 0)[:1]
    w.train_step(w.assigned(NODE, 0))
    policy = VerifierPolicy(**{**w.policy.__dict__, "spot_check_rate": 1.0})
    current_only = proving.make_logprob_fn(w.model, w.tokenizer, w.examples)
    wrong = Verifier(w.state(NODE), policy, logprob_fn=current_only).verify_group(g)
    assert wrong.code is ReasonCode.SPOT_CHECK_FAILED
    right = Verifier(w.state(NODE), policy, logprob_fn=w.hooks.logprob_fn).verify_group(g)
    assert right.accepted and len(right.spot_checked) == 4


# ---- advantages ------------------------------------------------------------------------------------
@FUZZ
@given(st.integers(2, 16).flatmap(lambda g: st.lists(
    st.floats(-100, 100, allow_nan=False, width=32), min_size=g, max_size=g)), st.sampled_from(["group", "none"]))
def test_advantages_match_node_grpo_within_stated_tolerance(totals, scale):
    t = torch.tensor(totals, dtype=torch.float32)
    node = grpo.group_advantages(t, len(totals), scale).tolist()
    ours = expected_advantages([float(x) for x in t.tolist()], scale)
    tols = advantage_tolerances([float(x) for x in t.tolist()], ours, 1e-5, scale)
    for a, b, tol in zip(node, ours, tols):
        assert abs(a - b) <= tol, (totals, a, b, tol)


def test_advantage_tolerance_is_tight_for_rule_rewards():
    tols = advantage_tolerances([1.0, 0.0, 0.0, 1.0], expected_advantages([1.0, 0.0, 0.0, 1.0]), 1e-5, "group")
    assert max(tols) < 2e-5


# ---- spot-check selection --------------------------------------------------------------------------
def test_spot_check_selection_rate_determinism_and_salt():
    """Selection is a coin per (run, node, round, prompt, member) under the round's salt."""
    ids = [("run", f"node{i % 7}", i // 7 % 5, i, i % 8) for i in range(20000)]
    for p in (0.05, 0.25):
        hits = sum(spot_check_selected(*x, p) for x in ids)
        sigma = math.sqrt(len(ids) * p * (1 - p))
        assert abs(hits - p * len(ids)) < 5 * sigma
    assert all(spot_check_selected(*x, 1.0) for x in ids[:50]) and not any(spot_check_selected(*x, 0.0) for x in ids[:50])
    a = [spot_check_selected(*x, 0.5, b"salt-a") for x in ids[:2000]]
    assert a == [spot_check_selected(*x, 0.5, b"salt-a") for x in ids[:2000]]  # replayable
    b = [spot_check_selected(*x, 0.5, b"salt-b") for x in ids[:2000]]
    assert 800 < sum(x != y for x, y in zip(a, b)) < 1200  # a different salt is a fresh coin
    # the specification, spelled out
    salt = b"\x07" * 32
    h = hashlib.sha256(b"grpo-swarm/v2/spot-check\n" + struct.pack(">I", 32) + salt + struct.pack(">I", 3) + b"run"
                       + struct.pack(">I", 5) + b"node1" + struct.pack(">QQI", 4, 9, 2)).digest()
    assert spot_check_selected("run", "node1", 4, 9, 2, 0.3, salt) == (int.from_bytes(h[:8], "big") < int(0.3 * 2**64))


def test_selection_ignores_everything_the_node_signs(world, honest):
    """Re-signing a group (another time_ms, sequence or completion) leaves its selection unchanged:
    the node has no free coin to re-roll."""
    state, verifier = fresh(world, spot_check_rate=0.5)
    state.spot_check_salt = b"\x01" * 32
    for group in honest["node"]:
        again = [forge(p, NODE, time_ms=p.time_ms + 1000 + i, sequence=p.sequence + 100) for i, p in enumerate(group)]
        assert verifier.spot_check_members(group) == verifier.spot_check_members(again)


def test_unknown_salt_means_selection_skipped(world, honest):
    state, v = fresh(world, spot_check_rate=1.0)
    state.spot_check_salt = None
    verdict = v.verify_group(honest["node"][0])
    assert verdict.accepted and "spot_check_selection" in verdict.skipped


# ---- specs and policies ----------------------------------------------------------------------------
def test_reward_spec_id_and_policy_round_trip(world):
    assert reward_spec_id(REWARDS) == world.policy.reward_spec_id
    assert reward_spec_id([{"name": "arithmetic_accuracy"}]) == reward_spec_id(
        [{"name": "arithmetic_accuracy", "weight": 1, "args": {}}])
    assert reward_spec_id([{"name": "a", "weight": 2.0}]) != reward_spec_id([{"name": "a", "weight": 1.0}])
    assert VerifierPolicy.from_json(world.policy.to_json()) == world.policy
    spec = world.run_spec(spot_check_commitment=b"\x01" * 32, log_signers=(b"\x02" * 32,))
    assert RunSpec.from_payload(spec.to_payload()) == spec
    for bad in ({"reward_specs": []}, {**world.policy.to_json(), "bogus": 1},
                {**world.policy.to_json(), "advantage_scale": "batch"},
                {**world.policy.to_json(), "spot_check_rate": 2}):
        with pytest.raises(ValueError):
            VerifierPolicy.from_json(bad)




@FUZZ
@given(st.dictionaries(st.sampled_from(["run_id", "run_seed", "dataset_size", "prompts_per_round", "group_size",
                                        "policy", "node", "max_staleness", "spot_check_commitment", "log_signers",
                                        "reward_specs", "max_completion_tokens", "eos_token_ids", "x"]),
                       json_values, max_size=10))
def test_fuzz_run_spec_and_policy_parsers(obj):
    for parse in (RunSpec.from_payload, VerifierPolicy.from_json):
        try:
            parse(obj)
        except ValueError:
            pass


# ---- fuzzing the byte path -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def byte_verifier(world):
    return world.verifier(world.state(NODE), spot_check_rate=1.0)


@FUZZ
@given(st.lists(st.binary(max_size=600), min_size=1, max_size=4))
def test_fuzz_random_bytes_give_a_verdict(byte_verifier, blobs):
    proofs, verdict = byte_verifier.verify_proof_bytes(blobs, commit=False)
    assert isinstance(verdict, Verdict) and not verdict.accepted and verdict.code is not None


@FUZZ
@given(st.integers(0, 3), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       st.booleans())
def test_fuzz_mutated_honest_bytes(byte_verifier, honest, member, edits, truncate):
    g = honest["node"][0]
    blobs = [p.SerializeToString() for p in g]
    data = bytearray(blobs[member])
    for pos, val in edits:
        data[pos % len(data)] = val
    if truncate:
        data = data[: edits[0][0] % len(data)]
    blobs[member] = bytes(data)
    proofs, verdict = byte_verifier.verify_proof_bytes(blobs, commit=False)
    assert isinstance(verdict, Verdict)
    if verdict.accepted:  # only a mutation that leaves the signed content unchanged can pass
        assert proof_signing_bytes(proofs[member]) == proof_signing_bytes(g[member])


@FUZZ
@given(st.data())
def test_fuzz_field_values_never_crash_the_verifier(byte_verifier, honest, data):
    """Arbitrary (validly signed) values in every field: a verdict, never an exception."""
    g = honest["node"][0]
    p = g[0]
    fields = {
        "policy_version": st.integers(0, 2**64 - 1), "round_index": st.integers(0, 2**64 - 1),
        "prompt_index": st.integers(0, 2**64 - 1), "group_size": st.integers(1, 2**32 - 1),
        "completion_token_ids": st.lists(st.integers(0, 2**32 - 1), max_size=8),
        "completion_text": st.text(max_size=20), "reward_total": st.floats(-1e300, 1e300),
        "advantage": st.floats(-1e300, 1e300), "sequence": st.integers(0, 2**64 - 1),
        "time_ms": st.integers(-2**63, 2**63 - 1), "group_id": st.text(min_size=1, max_size=40),
        "rewards": st.lists(st.tuples(st.sampled_from(["arithmetic_accuracy", "overlong_penalty", "x"]),
                                      st.none() | st.floats(-1e6, 1e6)), min_size=1, max_size=3, unique_by=lambda t: t[0]),
    }
    chosen = data.draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=4, unique=True))
    changes = {k: data.draw(fields[k]) for k in chosen}
    if "completion_token_ids" in changes:
        changes["behaviour_logprobs"] = [-1.0] * len(changes["completion_token_ids"])
    if "group_size" in changes:
        changes["completion_index"] = 0
    try:
        forged = forge(p, NODE, **changes)
    except ValueError:
        return  # build_reward_proof refuses it: never on the wire from an honest builder
    verdict = byte_verifier.verify_group([forged] + list(g[1:]), commit=False)
    assert isinstance(verdict, Verdict)


# ---- SmolLM2: honest log-probabilities agree, a written completion does not ------------------------
@pytest.mark.slow
def test_spot_check_on_smollm2(smollm2_dequantised):
    """Sampling-time vs recomputed log-probabilities on the real model stay far inside the policy's
    tolerance; a completion typed in with invented log-probabilities fails (bench/proofs.py measures
    the same on more samples)."""
    from grpo_swarm.node import proving
    from grpo_swarm.node.data import arithmetic_examples, render_prompt
    from grpo_swarm.node.rollout import SamplingParams, TransformersBackend, eos_and_pad_ids

    torch.set_num_threads(2)
    sm = smollm2_dequantised[0]  # (read only: the session's one load, tests/conftest.py)
    examples = arithmetic_examples(4, seed=3, max_operand=9)
    text = render_prompt(sm.tokenizer, examples[0], use_chat_template=False)  # short: a quick test
    eos, pad = eos_and_pad_ids(sm.model, sm.tokenizer)
    backend = TransformersBackend(sm.model, eos, pad)
    signer = identity(5)
    keys = group_keys(77, signer.node_id, 0, [0], 2)
    batch = backend.generate([sm.tokenizer(text, add_special_tokens=False).input_ids], 2,
                             SamplingParams(max_new_tokens=10), seed=0, noise_keys=keys)
    fn = proving.make_logprob_fn(sm.model, sm.tokenizer, examples, use_chat_template=False, run_seed=77)
    policy = VerifierPolicy(reward_specs=REWARDS, max_completion_tokens=12, sampling_tolerance=0.05)
    for k, ids in enumerate(batch.completion_lists()):
        proof = build_reward_proof(
            run_id="r", policy_version=0, snapshot_sha256=bytes(32), round_index=0, prompt_index=0, prompt_text=text,
            group_id="g", group_size=2, completion_index=k, completion_token_ids=ids, completion_text="",
            behaviour_logprobs=batch.behaviour_logps[k, : len(ids)].tolist(), rewards=[("a", 0.0)], reward_total=0.0,
            reward_spec_id="s", advantage=0.0, sequence=k, node_public_key=signer.public_key_bytes)
        got = fn(proof)
        diffs = [abs(a - b) for a, b in zip(got.logprobs, proof.behaviour_logprobs)]
        assert max(diffs) <= policy.spot_check_max_abs / 10 and sum(diffs) / len(diffs) <= policy.spot_check_mean_abs / 10
        assert max(got.shortfalls) <= policy.sampling_tolerance / 100  # every token is the noisy argmax
    written = sm.tokenizer(examples[0].columns["answer"], add_special_tokens=False).input_ids + [eos[0]]
    fake = build_reward_proof(
        run_id="r", policy_version=0, snapshot_sha256=bytes(32), round_index=0, prompt_index=0, prompt_text=text,
        group_id="g", group_size=2, completion_index=0, completion_token_ids=written, completion_text="",
        behaviour_logprobs=[-0.05] * len(written), rewards=[("a", 0.0)], reward_total=0.0, reward_spec_id="s",
        advantage=0.0, sequence=9, node_public_key=signer.public_key_bytes)
    got = fn(fake)
    diffs = [abs(a - b) for a, b in zip(got.logprobs, fake.behaviour_logprobs)]
    assert max(diffs) > policy.spot_check_max_abs
    assert max(got.shortfalls) > policy.sampling_tolerance  # and its tokens are not what the sampler draws


# ---- version binding and penalties (the state side; the coordinator side is tests/test_no_free_retries.py)
def test_version_bound_at_dispatch(world, honest):
    """With bind_version, a round's proofs must name the version the node was dispatched at: picking
    another of the η + 1 allowed versions is refused, and so is a round never dispatched."""
    state, v = fresh(world, bind_version=True)
    group = honest["node"][0]
    undispatched = v.verify_group(group, commit=False)
    assert undispatched.code is ReasonCode.UNASSIGNED_PROMPT and "not dispatched" in undispatched.detail
    state.publish_snapshot(1, b"\x11" * 32)  # v1 published after the node was dispatched at v0
    state.record_dispatch(NODE.node_id, 0, 1)
    other = v.verify_group(group, commit=False)
    assert other.code is ReasonCode.STALE_VERSION and "dispatched" in other.detail
    state.dispatched[(NODE.node_id, 0)] = 0
    assert v.verify_group(group).accepted


def test_a_failed_check_burns_the_group_and_voids_the_round(world, honest):
    state, v = fresh(world, spot_check_rate=1.0)
    g0, g1 = honest["node"][0], honest["node"][1]
    bad = [forge(p, NODE, behaviour_logprobs=[x + 0.5 for x in p.behaviour_logprobs]) if p.completion_index == 0 else p
           for p in g0]
    assert v.verify_group(bad).code is ReasonCode.SPOT_CHECK_FAILED
    assert state.failures[NODE.node_id] == 1 and state.group_burned(g0[0].group_id)
    assert v.verify_group(g0).code is ReasonCode.GROUP_BURNED  # the honest original: too late
    assert v.verify_group(g1).code is ReasonCode.TICKET_VOIDED
    state.close_round()  # the next round is a fresh start (the ban threshold counts across rounds)
    assert state.failures[NODE.node_id] == 1


def test_a_long_run_keeps_only_its_open_rounds_and_old_work_stays_refused(world, honest):
    """The state drops per-round records once check 9 refuses their round anyway (and hashes of versions
    check 8 refuses), so it does not grow with the run's length — and what it dropped cannot be
    resubmitted: an old round's accepted or burned group, re-signed with fresh sequence numbers, is
    refused as not open."""
    state = world.run_spec(max_round_lag=1).new_state(b"")
    state.register(NODE.public_key_bytes)
    state.publish_snapshot(0, world.shas[0])
    v = world.verifier(state, spot_check_rate=1.0)
    g0, g1 = honest["node"][0], honest["node"][1]
    assert v.verify_group(g0).accepted
    bad = [forge(p, NODE, behaviour_logprobs=[x + 0.5 for x in p.behaviour_logprobs]) if p.completion_index == 0 else p
           for p in g1]
    assert v.verify_group(bad).code is ReasonCode.SPOT_CHECK_FAILED
    state.record_dispatch(NODE.node_id, 0, 0)
    state.close_round()  # round 1 open; round 0 is within the lag of 1: nothing dropped yet
    assert state.group_accepted(g0[0].group_id) and state.group_burned(g1[0].group_id)
    assert state.round_voided(NODE.node_id, 0) and state.dispatched_version(NODE.node_id, 0) == 0
    for r in range(1, 60):
        state.record_dispatch(NODE.node_id, r, 0)
        state.record_dispatch(OTHER.node_id, r, 0)
        state.close_round()
    for version in range(1, 40):
        state.publish_snapshot(version, bytes([version]) * 32)
    assert state.current_round == 60
    assert not state.accepted_groups and not state.burned_groups and not state.voided
    assert set(state.dispatched) == {(n.node_id, 59) for n in (NODE, OTHER)}  # rounds 59..60 are kept
    assert sorted(state.snapshots) == [38, 39]  # versions current - η .. current
    state.snapshots[0] = world.shas[0]  # (so that only the round, not the version, can refuse them)
    state.current_version = 0
    seq = 1000
    for group in (g0, g1):  # the accepted one and the burned one, with sequences never used
        resigned = [forge(p, NODE, sequence=seq + p.completion_index) for p in group]
        seq += len(group)
        verdict = v.verify_group(resigned)
        assert verdict.code is ReasonCode.UNASSIGNED_PROMPT and "round 0 is not open" in verdict.detail
