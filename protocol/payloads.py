"""Log payloads (version 1) and their encoding helpers; hex = lowercase hex, b64 = standard base64 with padding.

Log payloads (version 1; hex = lowercase hex, b64 = standard base64 with padding):

=====================  ===========================================================================
kind                   payload
=====================  ===========================================================================
run_started            :meth:`RunSpec.to_payload`: run constants, the verifier ``policy``, the
                       spot-check salt commitment of round 0 (hex or null), optional
                       ``log_signers``, ``node`` (dataset, model, sampling; read by the hooks),
                       ``publish_quorum`` (absent in older logs: 0.5), ``stall_window_rounds``
                       (absent in older logs: 0, the stall rule off)
node_registered        ``{"node_id", "public_key": hex}``
snapshot_published     ``{"version", "sha256": hex}`` (the new current version); the first one of a
                       log is the initial weights; every later one is version current + 1 and adds
                       ``"round"`` (the producing round: the last closed since the previous
                       publication), ``"support_weight"`` (round weight of its participants that
                       reported this hash), ``"total_weight"`` (the round's), ``"reporters"``
                       ([node_id], sorted) and ``"uploader"`` (when known); it needs
                       support_weight > quorum x total_weight (run_started ``publish_quorum``,
                       default 0.5; see :mod:`.publication`)
hash_reported          ``{"node_id", "version", "sha256": hex, "round" or null, "weight"}``: a node's
                       parameter hash for version current + 1, logged when new or changed;
                       ``weight`` is its weight in the producing round ``round`` (0 without
                       verified work in it, or when banned)
upload_refused         ``{"node_id", "version", "sha256": hex, "code", "detail", "round" or null,
                       "support_weight", "total_weight"}``: an upload the publication rule refused
                       (code ``WRONG_VERSION``, ``NO_ROUND_CLOSED``, ``NOT_REPORTED``, ``NO_QUORUM``)
proofs_accepted        ``{"node_id", "group_id", "round", "version", "proofs": [b64 RewardProof],
                       "spot_checked": [completion indices]}``
proofs_rejected        ``{"node_id" or null, "code", "detail", "member" or null, "evidence":
                       {"proofs": [b64]} | {"bytes": b64, "size", "sha256": hex, "truncated"}}``
round_closed           ``{"round", "participants": [node_id], "weights": {node_id: w},
                       "samples": {node_id: n}, "tokens": {node_id: n}, "version",
                       "spot_check_salt": hex or null, "next_spot_check_commitment": hex or null}``;
                       ``samples`` / ``tokens``: each participant's accepted proofs and the sum of
                       their ``num_completion_tokens`` in the round, ``version`` the current
                       version at the close (all three absent in older logs): what the final
                       admission tickets say (:func:`.recorder.final_ticket`); ``benched``:
                       ``{node_id: reason}``, the participants the stall rule sits out of the
                       round's averaging (:mod:`.stalls`: no final ticket, hash reports count 0,
                       weight kept in the total; absent when the run's ``stall_window_rounds`` is 0)
node_banned            ``{"node_id", "reason", "evidence_index" or null}``, plus ``"by"``:
                       ``"operator"`` (``grpo-coordinator ban``) or ``"reports"`` (then also
                       ``"round"`` and ``"reporters"`` [node_id, sorted], and ``evidence_index`` is
                       the deciding peer_reported entry, the entry right before; :mod:`.peers`);
                       absent for a ban after ``ban_after_failures`` failed checks
node_unbanned          ``{"node_id", "reason", "by": "operator"}``: the operator lifted the ban;
                       reports against the node made before it no longer count
peer_reported          ``{"node_id" (the reporter), "round", "peer_node_id", "reason", "envelope":
                       b64}``: a participant of closed round ``round`` reports another participant
                       it excluded from that round's averaging; ``envelope`` is the reporter's
                       signed SignedEnvelope around its PeerReport (with the evidence, <= 64 KiB)
round_dispatched       ``{"node_id", "round", "version"}``: the version the node's first Heartbeat
                       of the round bound it to sample that round's prompts with
=====================  ===========================================================================
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any, Sequence

from . import grpo_swarm_pb2 as pb
from .identity import PUBLIC_KEY_SIZE, node_id_from_public_key
from .verify import Verdict

RewardProof = pb.RewardProof
SALT_SIZE = 32
MAX_EVIDENCE_BYTES = 64 * 1024


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ValueError(f"{what} is not valid base64") from None


def hex_bytes(text: Any, what: str, size: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a hex string")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{what} is not hex") from None
    if size is not None and len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes")
    return raw


def accepted_payload(proofs: Sequence[RewardProof], verdict: Verdict) -> dict:
    first = proofs[0]
    return {
        "node_id": node_id_from_public_key(first.node_public_key),
        "group_id": first.group_id,
        "round": first.round_index,
        "version": first.policy.version,
        "proofs": [b64(p.SerializeToString()) for p in sorted(proofs, key=lambda p: p.completion_index)],
        "spot_checked": sorted(verdict.spot_checked),
    }


def raw_evidence(data: bytes) -> dict:
    data = bytes(data)
    return {"bytes": b64(data[:MAX_EVIDENCE_BYTES]), "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "truncated": len(data) > MAX_EVIDENCE_BYTES}


def rejected_payload(verdict: Verdict, *, proofs: Sequence[RewardProof] | None = None, raw: bytes | None = None) -> dict:
    if (proofs is None) == (raw is None):
        raise ValueError("give the rejected proofs or the raw bytes")
    node_id = None
    if proofs:
        key = proofs[0].node_public_key
        if len(key) == PUBLIC_KEY_SIZE:
            node_id = node_id_from_public_key(key)
    evidence = {"proofs": [b64(p.SerializeToString()) for p in proofs]} if proofs is not None else raw_evidence(raw)
    return {"node_id": node_id, "code": verdict.code.value, "detail": verdict.detail, "member": verdict.member,
            "evidence": evidence}

