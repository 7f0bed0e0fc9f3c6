"""The compiled canonical encoder and the C-level fast paths of proofs.py (made for verification
throughput) give exactly what the original, field-by-field algorithms give: same bytes, same errors."""

from __future__ import annotations

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
