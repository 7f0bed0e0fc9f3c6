"""The compiled canonical encoder and the C-level fast paths of proofs.py (made for verification
throughput) give exactly what the original, field-by-field algorithms give: same bytes, same errors."""

from __future__ import annotations

import hashlib
import math
import operator
import struct

import numpy as np
import pytest
from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpo_swarm.protocol import ProtocolError
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol import canonical as C
from grpo_swarm.protocol import proofs as P

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- the original algorithms, verbatim (the specification in canonical.py's docstring) -----------
def ref_canonical(message, exclude=()) -> bytes:
    names = {exclude} if isinstance(exclude, str) else set(exclude)
    out = bytearray(C.domain_tag(message.DESCRIPTOR))
    _ref_body(message, names, out, 0)
    return bytes(out)


def _ref_body(message, exclude, out, depth):
    if depth > C.MAX_DEPTH:
        raise ProtocolError("MALFORMED", f"message nesting deeper than {C.MAX_DEPTH}")
    desc = message.DESCRIPTOR
    for field in sorted(desc.fields, key=lambda f: f.number):
        if field.name in exclude:
            continue
        out += struct.pack(">I", field.number)
        where = f"{desc.name}.{field.name}"
        value = getattr(message, field.name)
        if C._is_map(field):
            key_f = field.message_type.fields_by_name["key"]
            val_f = field.message_type.fields_by_name["value"]
            entries = []
            for k in value:
                kb, vb = bytearray(), bytearray()
                _ref_value(key_f, k, kb, depth, where)
                _ref_value(val_f, value[k], vb, depth, where)
                entries.append((bytes(kb), bytes(vb)))
            entries.sort(key=lambda e: e[0])
            out += C._u32(len(entries), where)
            for kb, vb in entries:
                out += kb
                out += vb
        elif C.is_repeated_field(field):
            out += C._u32(len(value), where)
            if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
                fmt = "f" if field.type == FieldDescriptor.TYPE_FLOAT else "d"
                out += struct.pack(f">{len(value)}{fmt}", *(C._finite_or_inf(v, where) for v in value))
            else:
                for item in value:
                    _ref_value(field, item, out, depth, where)
        elif field.has_presence:
            if message.HasField(field.name):
                out += b"\x01"
                _ref_value(field, value, out, depth, where)
            else:
                out += b"\x00"
        else:
            _ref_value(field, value, out, depth, where)


def _ref_value(field, v, out, depth, where):
    t = field.type
    if t in C._SIGNED:
        out += struct.pack(">q", v)
    elif t in C._UNSIGNED:
        out += struct.pack(">Q", v)
    elif t == FieldDescriptor.TYPE_BOOL:
        out += b"\x01" if v else b"\x00"
    elif t == FieldDescriptor.TYPE_DOUBLE:
        out += struct.pack(">d", C._finite_or_inf(v, where))
    elif t == FieldDescriptor.TYPE_FLOAT:
        out += struct.pack(">f", C._finite_or_inf(v, where))
    elif t == FieldDescriptor.TYPE_STRING:
        b = v.encode("utf-8")
        out += C._u32(len(b), where)
        out += b
    elif t == FieldDescriptor.TYPE_BYTES:
        out += C._u32(len(v), where)
        out += v
    else:
        sub = bytearray()
        _ref_body(v, set(), sub, depth + 1)
        out += C._u32(len(sub), where)
        out += sub


def ref_float32_le(values) -> bytes:
    vals = []
    for v in values:
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"log-probability {v} is not finite")
        vals.append(v + 0.0)
    try:
        return struct.pack(f"<{len(vals)}f", *vals)
    except OverflowError as e:
        raise ValueError(f"log-probability out of float32 range ({e})") from None


def ref_token_ids(ids):
    out = [operator.index(t) for t in ids]
    for t in out:
        if not 0 <= t < 2**32:
            raise ValueError(f"token id {t} is outside [0, 2**32)")
    return out


def outcome(fn, *args, **kw):
    try:
        return ("ok", fn(*args, **kw))
    except Exception as e:  # noqa: BLE001 - compare exception type and message too
        return (type(e).__name__, str(e))


# ---- strategies ----------------------------------------------------------------------------------
floats = st.floats(width=32) | st.sampled_from([-0.0, 0.0, math.inf, -math.inf, math.nan, 1e39, -1e-45])
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def reward_proofs(draw):
    p = pb.RewardProof(
        run_id=draw(st.text(max_size=8)), node_public_key=draw(st.binary(max_size=33)),
        round_index=draw(u64), prompt_index=draw(u64), prompt_sha256=draw(st.binary(max_size=40)),
        group_id=draw(st.text(max_size=10)), group_size=draw(u32), completion_index=draw(u32),
        completion_token_ids_sha256=draw(st.binary(max_size=4)), completion_text=draw(st.text(max_size=30)),
        num_completion_tokens=draw(u32), behaviour_logprobs_sha256=draw(st.binary(max_size=3)),
        behaviour_logprobs=draw(st.lists(floats, max_size=12)), completion_token_ids=draw(st.lists(u32, max_size=12)),
        reward_total=draw(st.floats()), reward_spec_id=draw(st.text(max_size=5)), advantage=draw(st.floats()),
        sequence=draw(u64), time_ms=draw(st.integers(-2**63, 2**63 - 1)), signature=draw(st.binary(max_size=70)),
    )
    if draw(st.booleans()):
        p.policy.version = draw(u64)
        p.policy.sha256 = draw(st.binary(max_size=33))
    for name, value, app in draw(st.lists(st.tuples(st.text(max_size=6), st.floats(), st.booleans()), max_size=4)):
        p.rewards.add(name=name, value=value, applicable=app)
    return p


json_like = st.recursive(
    st.none() | st.booleans() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@FUZZ
@given(reward_proofs(), st.sampled_from([(), "signature", ("signature", "rewards")]))
def test_compiled_canonical_encoder_matches_reference_on_proofs(p, exclude):
    assert outcome(C.canonical_bytes, p, exclude=exclude) == outcome(ref_canonical, p, exclude)


@FUZZ
@given(st.dictionaries(st.text(max_size=6), json_like, max_size=4))
def test_compiled_canonical_encoder_matches_reference_on_maps_and_oneofs(obj):
    s = struct_pb2.Struct()
    s.update(obj)
    assert outcome(C.canonical_bytes, s) == outcome(ref_canonical, s)
    env = pb.SignedEnvelope(payload=b"x", kind="k", nonce=3)
    assert C.canonical_bytes(env, exclude="signature") == ref_canonical(env, "signature")


def test_depth_limit_unchanged():
    v = struct_pb2.Value(string_value="x")
    for _ in range(C.MAX_DEPTH + 2):
        v = struct_pb2.Value(list_value=struct_pb2.ListValue(values=[v]))
    assert outcome(C.canonical_bytes, v) == outcome(ref_canonical, v)
    assert outcome(C.canonical_bytes, v)[0] == "ProtocolError"


@FUZZ
@given(st.lists(floats | st.integers(-2**70, 2**70) | st.booleans(), max_size=20))
def test_float32_fast_path_matches_reference(values):
    assert outcome(P._float32_le, values) == outcome(ref_float32_le, values)


@FUZZ
@given(st.lists(st.integers(-5, 2**33) | st.booleans(), max_size=20))
def test_token_ids_fast_path_matches_reference(ids):
    assert outcome(P._token_ids, ids) == outcome(ref_token_ids, ids)
    assert outcome(P._token_ids, tuple(ids)) == outcome(ref_token_ids, tuple(ids))


@pytest.mark.parametrize("ids", [[1.0, 2], [np.int64(5), 3], [np.uint32(2**32 - 1)], ["7"], [None]])
def test_token_ids_odd_types_match_reference(ids):
    assert outcome(P._token_ids, ids) == outcome(ref_token_ids, ids)


def test_numpy_and_torch_floats_take_the_same_path():
    import torch

    vals = [np.float32(-0.5), torch.tensor(-1.25), -0.0, 3]
    assert P._float32_le(vals) == ref_float32_le(vals)


# ---- the specialised RewardProof signing bytes ---------------------------------------------------
def test_reward_proof_fast_encoder_is_in_use():
    """The schema still has the layout the specialised encoder was written for (else it is silently
    off and verification slows down: update canonical._REWARD_PROOF_LAYOUT and the encoder)."""
    assert C._specialised(pb.RewardProof.DESCRIPTOR, frozenset({"signature"})) is C._reward_proof_unsigned
    assert C._specialised(pb.RewardProof.DESCRIPTOR, frozenset()) is None  # only what signatures cover


def _all_finite(p) -> bool:
    doubles = [p.reward_total, p.advantage, *p.behaviour_logprobs, *(r.value for r in p.rewards)]
    return all(math.isfinite(v) for v in doubles)


@FUZZ
@given(reward_proofs())
def test_reward_proof_fast_encoder_matches_reference(p):
    fast = C._reward_proof_unsigned(p)
    ref = outcome(ref_canonical, p, "signature")
    if fast is None:  # left to the generic encoder: only for input that needs care
        assert not _all_finite(p)
    else:
        assert ref == ("ok", fast)
    assert outcome(P.proof_signing_bytes, p) == ref
    assert outcome(C.canonical_bytes, p, exclude="signature") == ref


def test_encoder_for_other_messages_and_misuse():
    enc = C.encoder_for(pb.RewardProof.DESCRIPTOR, "signature")
    env = pb.SignedEnvelope(payload=b"x", kind="k", nonce=3)
    assert enc(env) == ref_canonical(env, "signature")  # another type: the generic path
    assert outcome(enc, struct_pb2.Value(number_value=1.0)) == outcome(C.canonical_bytes, struct_pb2.Value(),
                                                                        exclude="signature")
    assert outcome(enc, b"not a message")[0] == "TypeError"
    with pytest.raises(ValueError):
        C.encoder_for(pb.RewardProof.DESCRIPTOR, "no_such_field")


# ---- validate_proof: the inlined rules against the original, one helper call per rule --------------
def ref_check_len(name, value, size):
    if len(value) != size:
        raise ProtocolError("MALFORMED", f"{name} must be {size} bytes, got {len(value)}")


def ref_check_id(name, value):
    if not value:
        raise ProtocolError("MALFORMED", f"{name} is empty")
    if len(value) > P.MAX_ID_CHARS:
        raise ProtocolError("MALFORMED", f"{name} is longer than {P.MAX_ID_CHARS} characters")


def ref_check_finite(name, value):
    if not math.isfinite(value):
        raise ProtocolError("MALFORMED", f"{name} is not finite ({value})")


def ref_validate_proof(proof, *, require_signature=True):
    bad = lambda detail: ProtocolError("MALFORMED", detail)  # noqa: E731
    if not isinstance(proof, pb.RewardProof):
        raise bad(f"expected a RewardProof, got {type(proof).__name__}")
    ref_check_id("run_id", proof.run_id)
    if require_signature or proof.node_public_key:
        ref_check_len("node_public_key", proof.node_public_key, 32)
    if require_signature or proof.signature:
        ref_check_len("signature", proof.signature, 64)
    if not proof.HasField("policy"):
        raise bad("policy (PolicySnapshotRef) is missing")
    ref_check_len("policy.sha256", proof.policy.sha256, 32)
    ref_check_len("prompt_sha256", proof.prompt_sha256, 32)
    ref_check_id("group_id", proof.group_id)
    if proof.group_size < 1:
        raise bad("group_size must be at least 1")
    if proof.completion_index >= proof.group_size:
        raise bad(f"completion_index {proof.completion_index} is not below group_size {proof.group_size}")
    ref_check_len("completion_token_ids_sha256", proof.completion_token_ids_sha256, 32)
    ref_check_len("behaviour_logprobs_sha256", proof.behaviour_logprobs_sha256, 32)
    n = proof.num_completion_tokens
    if proof.behaviour_logprobs:
        if len(proof.behaviour_logprobs) != n:
            raise bad(f"{len(proof.behaviour_logprobs)} behaviour_logprobs for {n} completion tokens")
        for v in proof.behaviour_logprobs:
            ref_check_finite("behaviour_logprobs", v)
        if hashlib.sha256(ref_float32_le(proof.behaviour_logprobs)).digest() != proof.behaviour_logprobs_sha256:
            raise bad("behaviour_logprobs do not match behaviour_logprobs_sha256")
    if proof.completion_token_ids:
        if len(proof.completion_token_ids) != n:
            raise bad(f"{len(proof.completion_token_ids)} completion_token_ids for {n} completion tokens")
        ids = ref_token_ids(proof.completion_token_ids)
        if hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).digest() != proof.completion_token_ids_sha256:
            raise bad("completion_token_ids do not match completion_token_ids_sha256")
    if not proof.rewards:
        raise bad("no reward values")
    if len(proof.rewards) > P.MAX_REWARDS:
        raise bad(f"more than {P.MAX_REWARDS} reward values")
    seen = set()
    for r in proof.rewards:
        ref_check_id("reward name", r.name)
        if r.name in seen:
            raise bad(f"reward {r.name!r} appears twice")
        seen.add(r.name)
        ref_check_finite(f"reward {r.name!r}", r.value)
        if not r.applicable and r.value != 0.0:
            raise bad(f"reward {r.name!r} is not applicable but has value {r.value}")
    ref_check_finite("reward_total", proof.reward_total)
    ref_check_id("reward_spec_id", proof.reward_spec_id)
    ref_check_finite("advantage", proof.advantage)


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False) | st.sampled_from([-0.0, 0.0])
odd_floats = finite32 | st.sampled_from([math.nan, math.inf, -math.inf])
names = st.sampled_from(["", "a", "b", "x" * 257, "x" * 256])
lengths = st.sampled_from([0, 31, 32, 33, 64, 63])


def _mutation(draw, p):
    """One field of a valid proof set to an edge value (what the structural rules look at)."""
    what = draw(st.sampled_from([
        "run_id", "node_public_key", "signature", "policy", "policy.sha256", "prompt_sha256", "group_id",
        "group_size", "completion_index", "ids_sha", "lps_sha", "num_tokens", "lps", "ids", "rewards",
        "reward_total", "advantage", "reward_spec_id"]))
    if what in ("run_id", "group_id", "reward_spec_id"):
        setattr(p, what, draw(names))
    elif what in ("node_public_key", "signature", "prompt_sha256"):
        setattr(p, what, bytes(draw(lengths)))
    elif what == "policy":
        p.ClearField("policy")
    elif what == "policy.sha256":
        p.policy.sha256 = bytes(draw(lengths))
    elif what in ("group_size", "completion_index", "num_tokens"):
        setattr(p, {"num_tokens": "num_completion_tokens"}.get(what, what), draw(st.integers(0, 9)))
    elif what == "ids_sha":
        p.completion_token_ids_sha256 = draw(st.binary(min_size=31, max_size=33))
    elif what == "lps_sha":
        p.behaviour_logprobs_sha256 = draw(st.binary(min_size=31, max_size=33))
    elif what == "lps":
        del p.behaviour_logprobs[:]
        p.behaviour_logprobs.extend(draw(st.lists(odd_floats, max_size=6)))
    elif what == "ids":
        del p.completion_token_ids[:]
        p.completion_token_ids.extend(draw(st.lists(u32, max_size=6)))
    elif what == "rewards":
        del p.rewards[:]
        count = draw(st.sampled_from([0, 1, 2, 3, 64, 65]))
        for i in range(count):
            name = draw(names) if count <= 3 else f"r{i}"
            p.rewards.add(name=name, value=draw(odd_floats), applicable=draw(st.booleans()))
    else:
        setattr(p, what, draw(odd_floats))


@st.composite
def near_valid_proofs(draw):
    n = draw(st.integers(1, 6))
    lps = draw(st.lists(finite32, min_size=n, max_size=n))
    p = P.build_reward_proof(
        run_id="run", policy_version=1, snapshot_sha256=bytes(32), round_index=0, prompt_index=3,
        prompt_text="2+2=", group_id="g", group_size=4, completion_index=draw(st.integers(0, 3)),
        completion_token_ids=draw(st.lists(u32, min_size=n, max_size=n)), completion_text="4",
        behaviour_logprobs=lps, rewards=[("a", draw(finite32)), ("b", None)], reward_total=draw(finite32),
        reward_spec_id="rs", advantage=draw(finite32), sequence=0, time_ms=0, node_public_key=bytes(32),
        include_logprobs=draw(st.booleans()), include_token_ids=draw(st.booleans()))
    p.signature = bytes(64)
    for _ in range(draw(st.integers(0, 2))):
        _mutation(draw, p)
    return p


@FUZZ
@given(near_valid_proofs(), st.booleans())
def test_validate_proof_matches_the_rule_by_rule_reference(p, require_signature):
    assert outcome(P.validate_proof, p, require_signature=require_signature) == outcome(
        ref_validate_proof, p, require_signature=require_signature)


@FUZZ
@given(near_valid_proofs())
def test_fast_signing_bytes_match_reference_on_near_valid_proofs(p):
    assert outcome(P.proof_signing_bytes, p) == outcome(ref_canonical, p, "signature")


def test_validate_proof_accepts_negative_zero_logprobs():
    p = P.build_reward_proof(
        run_id="run", policy_version=1, snapshot_sha256=bytes(32), round_index=0, prompt_index=3,
        prompt_text="2+2=", group_id="g", group_size=1, completion_index=0, completion_token_ids=[1, 2],
        completion_text="4", behaviour_logprobs=[-0.0, -1.5], rewards=[("a", -0.0)], reward_total=-0.0,
        reward_spec_id="rs", advantage=-0.0, sequence=0, time_ms=0, node_public_key=bytes(32))
    p.signature = bytes(64)
    assert outcome(P.validate_proof, p) == outcome(ref_validate_proof, p) == ("ok", None)
    assert C._reward_proof_unsigned(p) == ref_canonical(p, "signature")
