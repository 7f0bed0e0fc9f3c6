"""grpo_swarm.protocol.proofs and .canonical: signing, tampering, golden bytes, parsing, fuzzing."""

from __future__ import annotations

import hashlib
import math
import struct
import subprocess
import sys
import textwrap

import pytest
from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpo_swarm.protocol import ProtocolError, ReasonCode
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.canonical import MAX_DEPTH, canonical_bytes, is_repeated_field
from grpo_swarm.protocol.identity import Identity
from grpo_swarm.protocol.proofs import (
    build_reward_proof,
    logprobs_commitment,
    open_envelope,
    parse_proof,
    parse_proof_batch,
    prompt_hash,
    proof_signing_bytes,
    seal_envelope,
    sign_proof,
    token_ids_hash,
    validate_proof,
    verify_proof_signature,
)

SEED = bytes(range(32))
IDENT = Identity.from_seed(SEED)
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def example_kwargs(**over):
    kw = dict(
        run_id="run-1",
        policy_version=7,
        snapshot_sha256=hashlib.sha256(b"snapshot-7").digest(),
        round_index=3,
        prompt_index=42,
        prompt_text="What is 2+3? Answer:",
        group_id="g/3/42",
        group_size=4,
        completion_index=2,
        completion_token_ids=[17, 4, 0, 99999],
        completion_text=" 5. Done ✓",
        behaviour_logprobs=[-0.5, -1.25, -0.0, -3.0],
        rewards=[("accuracy", 1.0), ("format", 0.25), ("math", None)],
        reward_total=1.25,
        reward_spec_id="spec-abc",
        advantage=0.8660254037844386,
        sequence=11,
        time_ms=1_700_000_000_000,
    )
    kw.update(over)
    return kw


def signed_example(**over) -> pb.RewardProof:
    return sign_proof(build_reward_proof(**example_kwargs(**over)), IDENT)


# Canonical signing bytes and Ed25519 signature of signed_example(): if these change, every
# deployed verifier disagrees with this code. Change only with a new protocol version.
GOLDEN_SIGNING_BYTES_HEX = (
    "6772706f2d737761726d2f76312f52657761726450726f6f660a000000010000000572756e2d3100000002000000"
    "2003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b800000003010000003400000001"
    "00000000000000070000000200000020a2f85683c6a1b64df75239c418c40b94c4346b16a965fc09a90ee8c48375"
    "230400000004000000000000000300000005000000000000002a00000006000000206c3f0e3dbfcb0713c21767a9"
    "d4d72a6548a526b0f3abaca2889dd30d7af9b4730000000700000006672f332f3432000000080000000000000004"
    "0000000900000000000000020000000a000000209115bb088552e4f5e5d56edb742931959bd9fd214eb0deb15cf2"
    "842f983729440000000b0000000c20352e20446f6e6520e29c930000000c00000000000000040000000d00000020"
    "12ad1ad698eb7d8eaa6c8f63bc3ac8c74131e1302539339bf68a9276a5bdc52e0000000e00000004bf000000bfa0"
    "000000000000c04000000000000f0000000400000000000000110000000000000004000000000000000000000000"
    "0001869f00000010000000030000002100000001000000086163637572616379000000023ff00000000000000000"
    "0003010000001f0000000100000006666f726d6174000000023fd000000000000000000003010000001d00000001"
    "000000046d6174680000000200000000000000000000000300000000113ff4000000000000000000120000000873"
    "7065632d616263000000133febb67ae8584caa00000014000000000000000b000000150000018bcfe56800"
)
GOLDEN_SIGNATURE_HEX = (
    "d84d624cc987257e141570407e4fc30a75b5da7547b04cdd4d9eaec16f4792f5"
    "e2526d4b37d946262c7689f90412548e06a1205743413b0db49ac7d9abb2cd04"
)


# ---- build / sign / verify -----------------------------------------------------------------------
def test_build_computes_hashes():
    p = build_reward_proof(**example_kwargs())
    assert p.prompt_sha256 == hashlib.sha256("What is 2+3? Answer:".encode()).digest() == prompt_hash(
        "What is 2+3? Answer:"
    )
    assert p.completion_token_ids_sha256 == hashlib.sha256(struct.pack("<4I", 17, 4, 0, 99999)).digest()
    assert p.completion_token_ids_sha256 == token_ids_hash([17, 4, 0, 99999])
    # -0.0 is committed as +0.0
    assert p.behaviour_logprobs_sha256 == hashlib.sha256(struct.pack("<4f", -0.5, -1.25, 0.0, -3.0)).digest()
    assert p.behaviour_logprobs_sha256 == logprobs_commitment([-0.5, -1.25, -0.0, -3.0])
    assert list(p.behaviour_logprobs) == [-0.5, -1.25, -0.0, -3.0]
    assert list(p.completion_token_ids) == [17, 4, 0, 99999]
    assert p.num_completion_tokens == 4
    assert [(r.name, r.value, r.applicable) for r in p.rewards] == [
        ("accuracy", 1.0, True),
        ("format", 0.25, True),
        ("math", 0.0, False),
    ]
    assert p.policy.version == 7 and p.signature == b"" and p.node_public_key == b""
    nan = build_reward_proof(**example_kwargs(rewards={"accuracy": 1.0, "format": 0.25, "math": math.nan}))
    assert nan.rewards == p.rewards  # NaN (as in node.rewards.RewardResult) = not applicable
    lean = build_reward_proof(**example_kwargs(), include_logprobs=False, include_token_ids=False)
    assert not lean.behaviour_logprobs and not lean.completion_token_ids
    assert lean.behaviour_logprobs_sha256 == p.behaviour_logprobs_sha256
    by_hash = build_reward_proof(**{**example_kwargs(prompt_text=None), "prompt_sha256": p.prompt_sha256})
    assert by_hash.prompt_sha256 == p.prompt_sha256


def test_build_accepts_numpy_and_torch_scalars():
    np = pytest.importorskip("numpy")
    p = build_reward_proof(
        **example_kwargs(
            completion_token_ids=np.array([17, 4, 0, 99999], dtype=np.int64),
            behaviour_logprobs=np.array([-0.5, -1.25, -0.0, -3.0], dtype=np.float32),
            advantage=np.float32(0.5),
            prompt_index=np.int64(42),
        )
    )
    assert p.prompt_index == 42 and list(p.completion_token_ids) == [17, 4, 0, 99999]


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(behaviour_logprobs=[-0.5]), "log-probabilities for 4"),
        (dict(completion_token_ids=[1, 2, 3, -1]), "outside"),
        (dict(completion_token_ids=[1, 2, 3, 2**32]), "outside"),
        (dict(completion_token_ids=[1.0, 2, 3, 4]), "integer"),
        (dict(behaviour_logprobs=[-0.5, math.nan, 0, 0]), "not finite"),
        (dict(behaviour_logprobs=[-0.5, -1e39, 0, 0]), "float32"),
        (dict(advantage=math.inf), "advantage is not finite"),
        (dict(reward_total=math.nan), "reward_total is not finite"),
        (dict(rewards=[("a", 1.0), ("a", 0.0)]), "appears twice"),
        (dict(rewards=[]), "no reward values"),
        (dict(completion_index=4), "not below group_size"),
        (dict(snapshot_sha256=b"short"), "policy.sha256 must be 32 bytes"),
        (dict(run_id=""), "run_id is empty"),
        (dict(prompt_sha256=b"x" * 32), "exactly one"),
    ],
)
def test_build_rejects_bad_input(over, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_reward_proof(**example_kwargs(**over))


def test_sign_verify_round_trip():
    p = signed_example()
    assert p.node_public_key == IDENT.public_key_bytes and len(p.signature) == 64
    assert verify_proof_signature(p)
    q = parse_proof(p.SerializeToString())
    assert q == p and verify_proof_signature(q)
    with pytest.raises(ValueError, match="another identity"):
        sign_proof(q, Identity.generate())


def test_golden_canonical_bytes_and_signature():
    p = signed_example()
    assert proof_signing_bytes(p).hex() == GOLDEN_SIGNING_BYTES_HEX
    assert p.signature.hex() == GOLDEN_SIGNATURE_HEX  # Ed25519 is deterministic


def _mutate_scalar(field: FieldDescriptor, v):
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return v + "x"
    if t == FieldDescriptor.TYPE_BYTES:
        return bytes([v[0] ^ 1]) + v[1:] if v else b"\x01"
    if t == FieldDescriptor.TYPE_BOOL:
        return not v
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return v + 0.5
    return v + 1


def _mutations(msg, prefix=""):
    """(path, mutate(copy)) for every field of ``msg`` (recursing into messages): change the value,
    and for repeated fields also drop / add / reorder an element."""
    for field in msg.DESCRIPTOR.fields:
        name, path = field.name, prefix + field.name
        if is_repeated_field(field):
            if field.message_type is not None:
                for sub_path, sub_mut in _mutations(getattr(msg, name)[0], f"{path}[0]."):
                    yield sub_path, (lambda m, n=name, f=sub_mut: f(getattr(m, n)[0]))
                yield path + ".reverse", lambda m, n=name: getattr(m, n).reverse()
                yield path + ".pop", lambda m, n=name: getattr(m, n).pop()
                yield path + ".dup", lambda m, n=name: getattr(m, n).add().CopyFrom(getattr(m, n)[0])
            else:
                yield path + "[0]", lambda m, n=name, f=field: getattr(m, n).__setitem__(
                    0, _mutate_scalar(f, getattr(m, n)[0])
                )
                yield path + ".pop", lambda m, n=name: getattr(m, n).pop()
                yield path + ".append", lambda m, n=name: getattr(m, n).append(getattr(m, n)[0])
        elif field.message_type is not None:
            for sub_path, sub_mut in _mutations(getattr(msg, name), path + "."):
                yield sub_path, (lambda m, n=name, f=sub_mut: f(getattr(m, n)))
            yield path + ".clear", lambda m, n=name: m.ClearField(n)
        else:
            yield path, lambda m, n=name, f=field: setattr(m, n, _mutate_scalar(f, getattr(m, n)))


def test_any_single_field_tamper_breaks_signature():
    p = signed_example()
    covered = set()
    for path, mutate in _mutations(p):
        if path == "signature":
            continue
        q = pb.RewardProof()
        q.CopyFrom(p)
        mutate(q)
        assert q != p, path
        assert proof_signing_bytes(q) != proof_signing_bytes(p), path
        assert not verify_proof_signature(q), f"tampering with {path} kept the signature valid"
        covered.add(path.split(".")[0].split("[")[0])
    assert covered == {f.name for f in pb.RewardProof.DESCRIPTOR.fields} - {"signature"}
    # the signature itself: any bit flip
    for i in range(64):
        q = pb.RewardProof()
        q.CopyFrom(p)
        q.signature = p.signature[:i] + bytes([p.signature[i] ^ 0x80]) + p.signature[i + 1 :]
        assert not verify_proof_signature(q)


def test_resigning_with_other_key_is_detected_by_key_binding():
    # an attacker can re-sign a stolen proof with their own key, but then the proof names their key
    p = signed_example()
    q = pb.RewardProof()
    q.CopyFrom(p)
    q.node_public_key, q.signature = b"", b""
    other = Identity.generate()
    sign_proof(q, other)
    assert verify_proof_signature(q) and q.node_public_key == other.public_key_bytes != p.node_public_key


SUBPROCESS_SIGNER = textwrap.dedent(
    """
    import sys, json
    sys.path.insert(0, sys.argv[1])
    from test_protocol_proofs import example_kwargs
    from grpo_swarm.protocol.identity import Identity
    from grpo_swarm.protocol.proofs import build_reward_proof, sign_proof, proof_signing_bytes
    ident = Identity.generate()
    p = sign_proof(build_reward_proof(**example_kwargs(time_ms=None)), ident)
    print(json.dumps({"proof": p.SerializeToString().hex(), "canon": proof_signing_bytes(p).hex(),
                      "key": ident.public_key_bytes.hex()}))
    """
)


def test_proof_signed_in_another_process_verifies_here():
    import json
    from pathlib import Path

    out = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_SIGNER, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    p = parse_proof(bytes.fromhex(got["proof"]))  # verifies the signature
    assert p.node_public_key.hex() == got["key"]
    assert proof_signing_bytes(p).hex() == got["canon"]
    assert p.time_ms > 1_700_000_000_000


# ---- parse_proof errors --------------------------------------------------------------------------
def _expect(code: ReasonCode, data, match: str = "", **kw):
    with pytest.raises(ProtocolError) as exc:
        parse_proof(data, **kw)
    assert exc.value.code == code, exc.value
    assert match in exc.value.detail, exc.value.detail
    return exc.value


def _reserialise(**fields) -> bytes:
    p = signed_example()
    for k, v in fields.items():
        setattr(p, k, v)
    return p.SerializeToString()


def test_parse_errors_are_clear():
    good = signed_example().SerializeToString()
    assert str(_expect(ReasonCode.OVERSIZED, good, "limit 100", max_bytes=100)).startswith("OVERSIZED: ")
    _expect(ReasonCode.OVERSIZED, b"\0" * ((1 << 20) + 1), "limit 1048576")
    _expect(ReasonCode.MALFORMED, "not bytes", "must be bytes")
    _expect(ReasonCode.MALFORMED, b"\xff\xff\xff", "not a valid protobuf RewardProof")
    _expect(ReasonCode.MALFORMED, good[:-5], "")
    _expect(ReasonCode.MALFORMED, good + b"\xf8\x06\x01", "unknown fields")  # field 111, varint
    _expect(ReasonCode.MALFORMED, _reserialise(node_public_key=b"k" * 31), "node_public_key must be 32 bytes, got 31")
    _expect(ReasonCode.MALFORMED, _reserialise(signature=b"s" * 65), "signature must be 64 bytes, got 65")
    _expect(ReasonCode.MALFORMED, _reserialise(signature=b""), "signature must be 64 bytes, got 0")
    _expect(ReasonCode.MALFORMED, _reserialise(prompt_sha256=b""), "prompt_sha256 must be 32 bytes")
    _expect(ReasonCode.MALFORMED, _reserialise(advantage=math.nan), "advantage is not finite")
    _expect(ReasonCode.MALFORMED, _reserialise(num_completion_tokens=5), "4 behaviour_logprobs for 5")
    _expect(ReasonCode.MALFORMED, _reserialise(completion_index=9), "not below group_size")
    _expect(ReasonCode.BAD_SIGNATURE, _reserialise(completion_text="tampered"), "signature does not verify")
    assert parse_proof(_reserialise(completion_text="tampered"), verify=False).completion_text == "tampered"
    # raw values that contradict their commitments
    p = signed_example()
    p.behaviour_logprobs[0] = -0.75
    _expect(ReasonCode.MALFORMED, p.SerializeToString(), "do not match behaviour_logprobs_sha256")
    p = signed_example()
    p.completion_token_ids[0] = 18
    _expect(ReasonCode.MALFORMED, p.SerializeToString(), "do not match completion_token_ids_sha256")
    p = signed_example()
    p.ClearField("policy")
    _expect(ReasonCode.MALFORMED, p.SerializeToString(), "policy (PolicySnapshotRef) is missing")
    p = signed_example()
    p.rewards[2].value = 1.0  # not applicable but non-zero
    _expect(ReasonCode.MALFORMED, p.SerializeToString(), "not applicable")


def test_unknown_field_inside_nested_message_is_rejected():
    p = signed_example()
    policy = p.policy.SerializeToString() + b"\x18\x05"  # PolicySnapshotRef field 3 (unknown)
    p.ClearField("policy")
    data = p.SerializeToString() + b"\x1a" + bytes([len(policy)]) + policy  # RewardProof.policy = 3
    _expect(ReasonCode.MALFORMED, data, "RewardProof.policy has unknown fields")


def test_non_canonical_wire_forms_give_same_signing_bytes():
    """Unpacked repeated floats, reordered and duplicated fields parse to the same values, so
    the signature (over canonical bytes, not wire bytes) still verifies."""
    p = signed_example()
    unpacked = b"".join(b"\x75" + struct.pack("<f", v) for v in p.behaviour_logprobs)  # field 14, fixed32
    q = pb.RewardProof()
    q.CopyFrom(p)
    q.ClearField("behaviour_logprobs")
    wire = unpacked + q.SerializeToString()  # logprobs first and unpacked
    r = parse_proof(wire)
    assert proof_signing_bytes(r) == proof_signing_bytes(p)
    # last value wins for a duplicated scalar; canonical bytes reflect the parsed value
    r2 = parse_proof(b"\x0a\x03xyz" + p.SerializeToString())  # run_id given twice
    assert r2.run_id == "run-1"


def test_batch_and_envelope():
    proofs = [signed_example(sequence=i, completion_index=i % 4) for i in range(3)]
    batch = pb.ProofBatch(proofs=proofs)
    data = batch.SerializeToString()
    assert parse_proof_batch(data) == batch
    with pytest.raises(ProtocolError) as exc:
        parse_proof_batch(data, max_proofs=2)
    assert exc.value.code == ReasonCode.OVERSIZED
    bad = pb.ProofBatch()
    bad.CopyFrom(batch)
    bad.proofs[1].advantage += 1
    with pytest.raises(ProtocolError, match=r"proofs\[1\]") as exc:
        parse_proof_batch(bad.SerializeToString())
    assert exc.value.code == ReasonCode.BAD_SIGNATURE

    env = seal_envelope(batch, IDENT, nonce=5, time_ms=1)
    assert env.kind == "grpo_swarm.v1.ProofBatch" and len(env.signature) == 64
    opened = open_envelope(env.SerializeToString(), expected_kind="grpo_swarm.v1.ProofBatch")
    assert parse_proof_batch(opened.payload) == batch
    with pytest.raises(ProtocolError, match="expected"):
        open_envelope(env.SerializeToString(), expected_kind="other")
    for field, value in [("nonce", 6), ("payload", b"x"), ("kind", "k2"), ("time_ms", 2)]:
        t = pb.SignedEnvelope()
        t.CopyFrom(env)
        setattr(t, field, value)
        with pytest.raises(ProtocolError) as exc:
            open_envelope(t.SerializeToString())
        assert exc.value.code == ReasonCode.BAD_SIGNATURE, field


def test_protocol_error_pickles_and_codes_are_stable():
    import pickle

    e = pickle.loads(pickle.dumps(ProtocolError(ReasonCode.WRONG_RUN, "run x")))
    assert e.code is ReasonCode.WRONG_RUN and e.detail == "run x" and str(e) == "WRONG_RUN: run x"
    required = """BAD_SIGNATURE UNKNOWN_KEY BANNED_KEY REPLAYED_SEQUENCE STALE_VERSION UNASSIGNED_PROMPT
        REWARD_MISMATCH ADVANTAGE_MISMATCH BAD_COMPLETION SPOT_CHECK_FAILED MALFORMED OVERSIZED WRONG_RUN""".split()
    for name in required:
        assert ReasonCode[name].value == name == ReasonCode(name)


# ---- canonical encoding --------------------------------------------------------------------------
def test_canonical_spec_example():
    s = bytes(range(32))
    got = canonical_bytes(pb.PolicySnapshotRef(version=7, sha256=s))
    want = b"grpo-swarm/v1/PolicySnapshotRef\n" + struct.pack(">IQ", 1, 7) + struct.pack(">II", 2, 32) + s
    assert got == want
    # unset scalars encode as their defaults, explicitly
    assert canonical_bytes(pb.PolicySnapshotRef()) == b"grpo-swarm/v1/PolicySnapshotRef\n" + struct.pack(
        ">IQII", 1, 0, 2, 0
    )
    v = pb.RewardValue(name="a", value=-0.0, applicable=True)
    assert canonical_bytes(v) == b"grpo-swarm/v1/RewardValue\n" + struct.pack(">II", 1, 1) + b"a" + struct.pack(
        ">Id", 2, 0.0
    ) + struct.pack(">I", 3) + b"\x01"


def test_canonical_rules():
    a = pb.RewardValue(name="x", value=0.0)
    b = pb.RewardValue(name="x", value=-0.0)
    assert canonical_bytes(a) == canonical_bytes(b)  # -0.0 normalised
    with pytest.raises(ProtocolError) as exc:
        canonical_bytes(pb.RewardValue(name="x", value=math.nan))
    assert exc.value.code == ReasonCode.MALFORMED and "NaN" in exc.value.detail
    with pytest.raises(ProtocolError):
        p = pb.RewardProof()
        p.behaviour_logprobs.append(math.nan)
        canonical_bytes(p)
    # excluded field
    env = pb.SignedEnvelope(payload=b"p", signature=b"s" * 64)
    assert canonical_bytes(env, exclude="signature") == canonical_bytes(
        pb.SignedEnvelope(payload=b"p"), exclude="signature"
    )
    assert canonical_bytes(env) != canonical_bytes(env, exclude="signature")
    with pytest.raises(ValueError, match="no field"):
        canonical_bytes(env, exclude="sig")
    with pytest.raises(TypeError):
        canonical_bytes(b"bytes")
    # domain separation: same body, different type → different bytes
    assert canonical_bytes(pb.ProofBatch()) != canonical_bytes(pb.RewardProof())[: len(b"grpo-swarm/v1/ProofBatch\n")]
    # a message field that is unset differs from one that is set to its default
    assert canonical_bytes(pb.RewardProof()) != canonical_bytes(pb.RewardProof(policy=pb.PolicySnapshotRef()))


def test_canonical_maps_oneofs_and_depth():
    s1, s2 = struct_pb2.Struct(), struct_pb2.Struct()
    s1.fields["b"].number_value = 1
    s1.fields["a"].string_value = "x"
    s2.fields["a"].string_value = "x"
    s2.fields["b"].number_value = 1
    assert canonical_bytes(s1) == canonical_bytes(s2)  # map order does not matter
    # oneof members have presence: number 0 vs empty string vs unset are all different
    encodings = {
        canonical_bytes(struct_pb2.Value(number_value=0)),
        canonical_bytes(struct_pb2.Value(string_value="")),
        canonical_bytes(struct_pb2.Value(bool_value=False)),
        canonical_bytes(struct_pb2.Value()),
    }
    assert len(encodings) == 4
    deep = struct_pb2.Value()
    cur = deep
    for _ in range(MAX_DEPTH + 2):
        cur = cur.list_value.values.add()
    with pytest.raises(ProtocolError, match="deeper"):
        canonical_bytes(deep)


# ---- fuzzing -------------------------------------------------------------------------------------
_ids = st.text(min_size=0, max_size=12)
_doubles = st.floats(allow_nan=True, allow_infinity=True)
_u32 = st.integers(0, 2**32 - 1)
_u64 = st.integers(0, 2**64 - 1)


@st.composite
def random_proofs(draw):
    """Arbitrary RewardProof values (including invalid ones: NaN, wrong lengths, ...)."""
    n = draw(st.integers(0, 6))
    return pb.RewardProof(
        run_id=draw(_ids),
        node_public_key=draw(st.binary(max_size=40)),
        policy=draw(st.none() | st.builds(pb.PolicySnapshotRef, version=_u64, sha256=st.binary(max_size=40))),
        round_index=draw(_u64),
        prompt_index=draw(_u64),
        prompt_sha256=draw(st.binary(max_size=40)),
        group_id=draw(_ids),
        group_size=draw(_u32),
        completion_index=draw(_u32),
        completion_token_ids_sha256=draw(st.binary(max_size=40)),
        completion_text=draw(st.text(max_size=40)),
        num_completion_tokens=draw(st.integers(0, 8)),
        behaviour_logprobs_sha256=draw(st.binary(max_size=40)),
        behaviour_logprobs=draw(st.lists(st.floats(width=32), min_size=n, max_size=n)),
        completion_token_ids=draw(st.lists(_u32, min_size=0, max_size=8)),
        rewards=draw(
            st.lists(st.builds(pb.RewardValue, name=_ids, value=_doubles, applicable=st.booleans()), max_size=4)
        ),
        reward_total=draw(_doubles),
        reward_spec_id=draw(_ids),
        advantage=draw(_doubles),
        sequence=draw(_u64),
        time_ms=draw(st.integers(-(2**63), 2**63 - 1)),
        signature=draw(st.binary(max_size=70)),
    )


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_parse_random_bytes(data):
    for fn in (parse_proof, parse_proof_batch, open_envelope):
        try:
            fn(data)
        except ProtocolError as e:
            assert e.code in (ReasonCode.MALFORMED, ReasonCode.BAD_SIGNATURE, ReasonCode.OVERSIZED)
            assert e.detail


GOOD_WIRE = signed_example().SerializeToString()


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert", "delete"]),
            st.integers(0, len(GOOD_WIRE)),
            st.binary(min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_parse_mutated_valid_proof(ops):
    data = bytearray(GOOD_WIRE)
    for op, pos, blob in ops:
        pos = min(pos, len(data))
        if op == "flip" and pos < len(data):
            data[pos] ^= blob[0] or 1
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = blob
        elif op == "delete":
            del data[pos : pos + len(blob)]
    try:
        p = parse_proof(bytes(data))
    except ProtocolError as e:
        assert e.detail
    else:  # only a semantically identical message may survive (e.g. a flip inside a duplicated tag)
        assert proof_signing_bytes(p) == proof_signing_bytes(signed_example())


@FUZZ
@given(random_proofs())
def test_fuzz_canonical_and_validation(p):
    try:
        c1 = proof_signing_bytes(p)
    except ProtocolError as e:
        assert e.code == ReasonCode.MALFORMED
        return
    assert proof_signing_bytes(p) == c1  # deterministic
    q = pb.RewardProof.FromString(p.SerializeToString())
    assert proof_signing_bytes(q) == c1  # survives the wire
    assert c1.startswith(b"grpo-swarm/v1/RewardProof\n")
    try:
        validate_proof(p)
    except ProtocolError as e:
        assert e.code == ReasonCode.MALFORMED
    assert verify_proof_signature(p) is False
    try:
        parse_proof(p.SerializeToString())
    except ProtocolError:
        pass


@FUZZ
@given(random_proofs(), random_proofs())
def test_fuzz_canonical_injective(a, b):
    try:
        ca, cb = proof_signing_bytes(a), proof_signing_bytes(b)
    except ProtocolError:
        return
    a.ClearField("signature")
    b.ClearField("signature")
    assert (ca == cb) == (_zero_signs_normalised(a) == _zero_signs_normalised(b))


def _zero_signs_normalised(p: pb.RewardProof) -> pb.RewardProof:
    """The canonical encoding writes -0.0 as +0.0 by specification, so it is injective on messages
    with -0.0 replaced by +0.0 (protobuf equality tells them apart)."""
    q = pb.RewardProof()
    q.CopyFrom(p)
    q.behaviour_logprobs[:] = [v + 0.0 for v in q.behaviour_logprobs]
    q.reward_total += 0.0
    q.advantage += 0.0
    for r in q.rewards:
        r.value += 0.0
    return q
