"""Reward proofs: build, sign, verify and parse :class:`RewardProof` (and signed envelopes).

A ``RewardProof`` says: *node K, sampling with policy version V (snapshot S), produced completion C
for prompt P (index i, assigned in round r) as member k of GRPO group g of size G; reward function
j gave value v_j, the total was T under reward spec R, the advantage A; this is K's n-th proof.*
K signs ``canonical_bytes(proof, exclude="signature")`` (:mod:`.canonical`) with Ed25519.

Hashes (raw 32-byte SHA-256 digests):

* ``prompt_sha256`` = SHA-256 of the rendered prompt text (exactly the string given to the
  tokenizer, chat template applied) encoded as UTF-8 — :func:`prompt_hash`;
* ``completion_token_ids_sha256`` = SHA-256 of the completion token ids, each as a little-endian
  uint32, concatenated (``struct.pack("<%dI" % n, *ids)``) — :func:`token_ids_hash`;
* ``behaviour_logprobs_sha256`` = SHA-256 of the per-token behaviour log-probabilities, each as an
  IEEE-754 binary32 little-endian value (round-to-nearest from the given value, ``-0.0`` written
  as ``+0.0``; NaN and infinities rejected) — :func:`logprobs_commitment`.

The raw ``behaviour_logprobs`` and ``completion_token_ids`` are optional in the message; if
present they must match their hash (checked by :func:`validate_proof`), so a spot-checker can
recompute log-probabilities without asking the peer again.

Parsing (:func:`parse_proof`, :func:`parse_proof_batch`, :func:`open_envelope`) never raises
anything but :class:`~.errors.ProtocolError`: size limit first (OVERSIZED), then protobuf parsing,
unknown fields and structural rules (MALFORMED), then the signature (BAD_SIGNATURE). Whether the
contents are *true* (known key, assigned prompt, rewards, advantage, sequence, version, time) is
for the verifier to check, with the other reason codes.
"""

from __future__ import annotations

import hashlib
import math
import operator
import struct
import time
from typing import Mapping, Sequence

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from . import grpo_swarm_pb2 as pb
from .canonical import canonical_bytes, encoder_for, is_repeated_field
from .errors import ProtocolError, ReasonCode
from .identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, verify_signature

RewardProof = pb.RewardProof
ProofBatch = pb.ProofBatch
PolicySnapshotRef = pb.PolicySnapshotRef
RewardValue = pb.RewardValue
SignedEnvelope = pb.SignedEnvelope

SIGNATURE_FIELD = "signature"
HASH_SIZE = 32
MAX_PROOF_BYTES = 1 << 20  # 1 MiB
MAX_BATCH_BYTES = 16 << 20
MAX_BATCH_PROOFS = 4096
MAX_ENVELOPE_BYTES = 16 << 20
MAX_ID_CHARS = 256  # run_id, group_id, reward_spec_id, reward names, envelope kind
MAX_REWARDS = 64
_U32 = 2**32
_U64 = 2**64
_I64 = 2**63


# ---- hashes ------------------------------------------------------------------------------------
def prompt_hash(prompt_text: str) -> bytes:
    if not isinstance(prompt_text, str):
        raise TypeError(f"prompt text must be str, got {type(prompt_text).__name__}")
    return hashlib.sha256(prompt_text.encode("utf-8")).digest()


def _token_ids(ids: Sequence[int]) -> list[int]:
    repeated = type(ids).__name__.startswith("Repeated")  # a protobuf repeated field: ints only
    if repeated or isinstance(ids, list):
        try:  # fast path (C level): ints in range
            struct.pack(f"<{len(ids)}I", *ids)
            if repeated or all(type(t) is int for t in ids):
                return list(ids)
        except (struct.error, TypeError, OverflowError):
            pass  # the checks below say what is wrong
    out = [operator.index(t) for t in ids]
    for t in out:
        if not 0 <= t < _U32:
            raise ValueError(f"token id {t} is outside [0, 2**32)")
    return out


def token_ids_hash(ids: Sequence[int]) -> bytes:
    ids = _token_ids(ids)
    return hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).digest()


def _float32_le(values: Sequence[float]) -> bytes:
    try:  # fast path (C level) for plain finite floats in binary32 range
        fast = [float(v) + 0.0 for v in values]  # -0.0 -> +0.0
        if math.isfinite(sum(fast)):
            return struct.pack(f"<{len(fast)}f", *fast)
    except (TypeError, ValueError, OverflowError):
        pass  # the loop below says what is wrong
    vals = []
    for v in values:
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"log-probability {v} is not finite")
        vals.append(v + 0.0)  # -0.0 -> +0.0
    try:
        return struct.pack(f"<{len(vals)}f", *vals)
    except OverflowError as e:
        raise ValueError(f"log-probability out of float32 range ({e})") from None


def logprobs_commitment(values: Sequence[float]) -> bytes:
    return hashlib.sha256(_float32_le(values)).digest()


def group_id_for(node_id: str, round_index: int, prompt_index: int) -> str:
    """A group id that is unique per node, round and prompt (the assignment samples prompts
    without replacement within a round): ``"<node_id>/<round>/<prompt>"``."""
    return f"{node_id}/{operator.index(round_index)}/{operator.index(prompt_index)}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---- building and signing ----------------------------------------------------------------------
def build_reward_proof(
    *,
    run_id: str,
    policy_version: int,
    snapshot_sha256: bytes,
    round_index: int,
    prompt_index: int,
    group_id: str,
    group_size: int,
    completion_index: int,
    completion_token_ids: Sequence[int],
    completion_text: str,
    behaviour_logprobs: Sequence[float],
    rewards: Mapping[str, float | None] | Sequence[tuple[str, float | None]],
    reward_total: float,
    reward_spec_id: str,
    advantage: float,
    sequence: int,
    prompt_text: str | None = None,
    prompt_sha256: bytes | None = None,
    time_ms: int | None = None,
    node_public_key: bytes = b"",
    include_logprobs: bool = True,
    include_token_ids: bool = True,
) -> RewardProof:
    """An unsigned RewardProof from plain Python values (ints/floats, or numpy/torch scalars).

    Give the prompt as ``prompt_text`` (hashed here) or its ``prompt_sha256``. A reward value of
    None or NaN means "not applicable" (stored as value 0, applicable false), as in
    ``grpo_swarm.node.rewards.RewardResult.per_function``; infinities are rejected. ``include_logprobs`` /
    ``include_token_ids`` also store the raw values next to their hashes. ``node_public_key`` may
    be left empty; :func:`sign_proof` fills it in. Raises ValueError/TypeError on bad input.
    """
    if (prompt_text is None) == (prompt_sha256 is None):
        raise ValueError("give exactly one of prompt_text and prompt_sha256")
    p_hash = prompt_hash(prompt_text) if prompt_text is not None else bytes(prompt_sha256)
    ids = _token_ids(completion_token_ids)
    lps = [float(v) for v in behaviour_logprobs]
    if len(lps) != len(ids):
        raise ValueError(f"{len(lps)} behaviour log-probabilities for {len(ids)} completion tokens")
    items = list(rewards.items()) if isinstance(rewards, Mapping) else list(rewards)
    reward_values = []
    for name, value in items:
        if value is None or math.isnan(float(value)):  # also numpy/torch scalar NaN
            reward_values.append(RewardValue(name=name, value=0.0, applicable=False))
        else:
            reward_values.append(RewardValue(name=name, value=float(value), applicable=True))
    proof = RewardProof(
        run_id=run_id,
        node_public_key=bytes(node_public_key),
        policy=PolicySnapshotRef(version=operator.index(policy_version), sha256=bytes(snapshot_sha256)),
        round_index=operator.index(round_index),
        prompt_index=operator.index(prompt_index),
        prompt_sha256=p_hash,
        group_id=group_id,
        group_size=operator.index(group_size),
        completion_index=operator.index(completion_index),
        completion_token_ids_sha256=token_ids_hash(ids),
        completion_text=completion_text,
        num_completion_tokens=len(ids),
        behaviour_logprobs_sha256=logprobs_commitment(lps),
        behaviour_logprobs=lps if include_logprobs else [],
        completion_token_ids=ids if include_token_ids else [],
        rewards=reward_values,
        reward_total=float(reward_total),
        reward_spec_id=reward_spec_id,
        advantage=float(advantage),
        sequence=operator.index(sequence),
        time_ms=now_ms() if time_ms is None else operator.index(time_ms),
    )
    try:
        validate_proof(proof, require_signature=False)
    except ProtocolError as e:
        raise ValueError(e.detail) from None
    return proof


_proof_signing_bytes = encoder_for(RewardProof.DESCRIPTOR, SIGNATURE_FIELD)


def proof_signing_bytes(proof: RewardProof) -> bytes:
    """The bytes a RewardProof's signature covers: ``canonical_bytes(proof, exclude="signature")``."""
    return _proof_signing_bytes(proof)


def sign_proof(proof: RewardProof, identity: Identity) -> RewardProof:
    """Set ``node_public_key`` (if empty) and ``signature``; returns the same (mutated) proof.

    Raises ValueError if the proof names another key, ProtocolError if it is malformed.
    """
    if not proof.node_public_key:
        proof.node_public_key = identity.public_key_bytes
    elif proof.node_public_key != identity.public_key_bytes:
        raise ValueError("proof.node_public_key belongs to another identity")
    proof.signature = b""
    validate_proof(proof, require_signature=False)
    proof.signature = identity.sign(proof_signing_bytes(proof))
    return proof


def verify_proof_signature(proof: RewardProof) -> bool:
    """True iff the proof's signature is valid for its ``node_public_key``. Never raises."""
    try:
        if not isinstance(proof, RewardProof):
            return False
        return verify_signature(proof.node_public_key, proof_signing_bytes(proof), proof.signature)
    except Exception:  # noqa: BLE001 - NaN fields, garbage: simply not a valid signature
        return False


# ---- structural validation ---------------------------------------------------------------------
def _bad(detail: str) -> ProtocolError:
    return ProtocolError(ReasonCode.MALFORMED, detail)


def _check_len(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise _bad(f"{name} must be {size} bytes, got {len(value)}")


def _check_id(name: str, value: str) -> None:
    if not value:
        raise _bad(f"{name} is empty")
    if len(value) > MAX_ID_CHARS:
        raise _bad(f"{name} is longer than {MAX_ID_CHARS} characters")


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise _bad(f"{name} is not finite ({value})")


def validate_proof(proof: RewardProof, *, require_signature: bool = True) -> None:
    """Structural rules every proof must satisfy; raises ProtocolError(MALFORMED). Does not check
    the signature's validity, only its length. With ``require_signature=False`` (a proof being
    built) the signature and node_public_key may still be empty."""
    # Each rule is tested inline (the verifier's hot path) and, when it fails, re-run through the
    # helper that raises its error: same rules, order and messages as one helper call per rule.
    if not isinstance(proof, RewardProof):
        raise _bad(f"expected a RewardProof, got {type(proof).__name__}")
    run_id = proof.run_id
    if not run_id or len(run_id) > MAX_ID_CHARS:
        _check_id("run_id", run_id)
    key, sig = proof.node_public_key, proof.signature
    if (require_signature or key) and len(key) != PUBLIC_KEY_SIZE:
        _check_len("node_public_key", key, PUBLIC_KEY_SIZE)
    if (require_signature or sig) and len(sig) != SIGNATURE_SIZE:
        _check_len("signature", sig, SIGNATURE_SIZE)
    if not proof.HasField("policy"):
        raise _bad("policy (PolicySnapshotRef) is missing")
    if len(proof.policy.sha256) != HASH_SIZE:
        _check_len("policy.sha256", proof.policy.sha256, HASH_SIZE)
    if len(proof.prompt_sha256) != HASH_SIZE:
        _check_len("prompt_sha256", proof.prompt_sha256, HASH_SIZE)
    group_id = proof.group_id
    if not group_id or len(group_id) > MAX_ID_CHARS:
        _check_id("group_id", group_id)
    group_size = proof.group_size
    if group_size < 1:
        raise _bad("group_size must be at least 1")
    if proof.completion_index >= group_size:
        raise _bad(f"completion_index {proof.completion_index} is not below group_size {group_size}")
    ids_sha, lps_sha = proof.completion_token_ids_sha256, proof.behaviour_logprobs_sha256
    if len(ids_sha) != HASH_SIZE:
        _check_len("completion_token_ids_sha256", ids_sha, HASH_SIZE)
    if len(lps_sha) != HASH_SIZE:
        _check_len("behaviour_logprobs_sha256", lps_sha, HASH_SIZE)
    n = proof.num_completion_tokens
    lps = proof.behaviour_logprobs[:]  # a list of floats (binary32 values)
    if lps:
        if len(lps) != n:
            raise _bad(f"{len(lps)} behaviour_logprobs for {n} completion tokens")
        if not math.isfinite(sum(lps)):  # binary32 values: the sum is finite iff all are
            for v in lps:
                _check_finite("behaviour_logprobs", v)
        if 0.0 in lps:  # -0.0 is hashed as +0.0
            lps = [v + 0.0 for v in lps]
        # = logprobs_commitment(lps): finite binary32 values pack exactly
        if hashlib.sha256(struct.pack(f"<{len(lps)}f", *lps)).digest() != lps_sha:
            raise _bad("behaviour_logprobs do not match behaviour_logprobs_sha256")
    ids = proof.completion_token_ids[:]  # a list of ints in [0, 2**32)
    if ids:
        if len(ids) != n:
            raise _bad(f"{len(ids)} completion_token_ids for {n} completion tokens")
        if hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).digest() != ids_sha:  # = token_ids_hash(ids)
            raise _bad("completion_token_ids do not match completion_token_ids_sha256")
    rewards = proof.rewards
    if not rewards:
        raise _bad("no reward values")
    if len(rewards) > MAX_REWARDS:
        raise _bad(f"more than {MAX_REWARDS} reward values")
    seen = set()
    for r in rewards:
        name, value = r.name, r.value
        if not name or len(name) > MAX_ID_CHARS:
            _check_id("reward name", name)
        if name in seen:
            raise _bad(f"reward {name!r} appears twice")
        seen.add(name)
        if not math.isfinite(value):
            _check_finite(f"reward {name!r}", value)
        if value != 0.0 and not r.applicable:
            raise _bad(f"reward {name!r} is not applicable but has value {value}")
    if not math.isfinite(proof.reward_total):
        _check_finite("reward_total", proof.reward_total)
    spec = proof.reward_spec_id
    if not spec or len(spec) > MAX_ID_CHARS:
        _check_id("reward_spec_id", spec)
    if not math.isfinite(proof.advantage):
        _check_finite("advantage", proof.advantage)


# ---- parsing -----------------------------------------------------------------------------------
def _check_bytes(data, max_bytes: int, what: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _bad(f"{what} must be bytes, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise ProtocolError(ReasonCode.OVERSIZED, f"{what} is {size} bytes, limit {max_bytes}")
    return bytes(data)


def _reject_unknown_fields(msg: Message, where: str) -> None:
    if len(UnknownFieldSet(msg)):
        raise _bad(f"{where} has unknown fields (wrong schema version or garbage)")
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            continue  # no map fields in this schema; their values are checked by the parser
        if is_repeated_field(field):
            for i, item in enumerate(value):
                _reject_unknown_fields(item, f"{where}.{field.name}[{i}]")
        else:
            _reject_unknown_fields(value, f"{where}.{field.name}")


def _parse(cls, data: bytes, what: str):
    msg = cls()
    try:
        msg.ParseFromString(data)
    except Exception as e:  # noqa: BLE001 - DecodeError, RecursionError, ...: all mean garbage
        raise _bad(f"{what} is not a valid protobuf {cls.DESCRIPTOR.name}: {type(e).__name__}: {e}") from None
    _reject_unknown_fields(msg, what)
    return msg


def _check_proof(proof: RewardProof, verify: bool, what: str) -> None:
    try:
        validate_proof(proof, require_signature=True)
    except ProtocolError as e:
        raise ProtocolError(e.code, f"{what}: {e.detail}") from None
    if verify and not verify_proof_signature(proof):
        raise ProtocolError(ReasonCode.BAD_SIGNATURE, f"{what}: signature does not verify for its node_public_key")


def parse_proof(data: bytes, *, max_bytes: int = MAX_PROOF_BYTES, verify: bool = True) -> RewardProof:
    """Parse and structurally validate one serialised RewardProof (and, by default, its signature).

    Raises ProtocolError: OVERSIZED (more than ``max_bytes``), MALFORMED (not a RewardProof,
    unknown fields, wrong key/signature/hash lengths, inconsistent fields), BAD_SIGNATURE.
    """
    data = _check_bytes(data, max_bytes, "RewardProof")
    proof = _parse(RewardProof, data, "RewardProof")
    _check_proof(proof, verify, "RewardProof")
    return proof


def parse_proof_batch(
    data: bytes,
    *,
    max_bytes: int = MAX_BATCH_BYTES,
    max_proofs: int = MAX_BATCH_PROOFS,
    max_proof_bytes: int = MAX_PROOF_BYTES,
    verify: bool = True,
) -> ProofBatch:
    """Parse a ProofBatch; every proof is checked like :func:`parse_proof` (first failure raises,
    its detail says which proof)."""
    data = _check_bytes(data, max_bytes, "ProofBatch")
    batch = _parse(ProofBatch, data, "ProofBatch")
    if len(batch.proofs) > max_proofs:
        raise ProtocolError(ReasonCode.OVERSIZED, f"ProofBatch has {len(batch.proofs)} proofs, limit {max_proofs}")
    for i, proof in enumerate(batch.proofs):
        if proof.ByteSize() > max_proof_bytes:
            raise ProtocolError(ReasonCode.OVERSIZED, f"proofs[{i}] is larger than {max_proof_bytes} bytes")
        _check_proof(proof, verify, f"proofs[{i}]")
    return batch


# ---- signed envelopes --------------------------------------------------------------------------
def envelope_signing_bytes(envelope: SignedEnvelope) -> bytes:
    return canonical_bytes(envelope, exclude=SIGNATURE_FIELD)


def seal_envelope(
    payload: bytes | Message, identity: Identity, *, nonce: int, kind: str | None = None, time_ms: int | None = None
) -> SignedEnvelope:
    """Sign ``payload`` (bytes, or a message serialised here; ``kind`` defaults to its full name)."""
    if isinstance(payload, Message):
        kind = kind or payload.DESCRIPTOR.full_name
        payload = payload.SerializeToString()
    if not kind:
        raise ValueError("kind is required for a bytes payload")
    if len(kind) > MAX_ID_CHARS:
        raise ValueError(f"kind is longer than {MAX_ID_CHARS} characters")
    env = SignedEnvelope(
        payload=bytes(payload),
        kind=kind,
        signer_public_key=identity.public_key_bytes,
        nonce=operator.index(nonce),
        time_ms=now_ms() if time_ms is None else operator.index(time_ms),
    )
    env.signature = identity.sign(envelope_signing_bytes(env))
    return env


def parse_envelope(data: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> SignedEnvelope:
    """Parse a SignedEnvelope without checking it; ProtocolError (OVERSIZED, MALFORMED) otherwise."""
    return _parse(SignedEnvelope, _check_bytes(data, max_bytes, "SignedEnvelope"), "SignedEnvelope")


def check_envelope(env: SignedEnvelope, *, expected_kind: str | None = None) -> SignedEnvelope:
    """Check a parsed envelope's kind, key and signature; ProtocolError (MALFORMED, BAD_SIGNATURE)."""
    _check_id("SignedEnvelope.kind", env.kind)
    if expected_kind is not None and env.kind != expected_kind:
        raise _bad(f"SignedEnvelope.kind is {env.kind!r}, expected {expected_kind!r}")
    _check_len("SignedEnvelope.signer_public_key", env.signer_public_key, PUBLIC_KEY_SIZE)
    _check_len("SignedEnvelope.signature", env.signature, SIGNATURE_SIZE)
    if not verify_signature(env.signer_public_key, envelope_signing_bytes(env), env.signature):
        raise ProtocolError(ReasonCode.BAD_SIGNATURE, "SignedEnvelope signature does not verify")
    return env


def open_envelope(
    data: bytes, *, expected_kind: str | None = None, max_bytes: int = MAX_ENVELOPE_BYTES
) -> SignedEnvelope:
    """Parse a SignedEnvelope and verify its signature; ProtocolError (OVERSIZED, MALFORMED,
    BAD_SIGNATURE) otherwise. The caller checks the signer, nonce and time, then parses the payload."""
    return check_envelope(parse_envelope(data, max_bytes=max_bytes), expected_kind=expected_kind)
