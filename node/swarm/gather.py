"""What each member puts in hivemind's ``gather``: the signed entry, its encoding and strict decoding.

hivemind's leader relays the gathered entries of a group unsigned, so each member signs its own:

    entry     = msgpack([payload, signature])
    payload   = msgpack([GATHER_VERSION, ticket_bytes, round_index, attempt, committed_norm,
                         [[accused_peer_id, reason], ...], nonce_commitment, audit_fraction,
                         [first_failed_peer_id, reason] or [], [sit_out_peer_id, ...]])
    signature = Ed25519(node key, GATHER_DOMAIN || payload)

``ticket_bytes`` is the coordinator-signed ``AdmissionTicket`` (protobuf bytes, :mod:`.tickets`),
``committed_norm`` the L2 norm of the member's whole gradient (its parts are held to it during the
reduction), and the accusations name peers this member caught sending invalid data in an earlier
attempt of the same round (they are excluded from the retry). ``nonce_commitment`` is SHA-256 of
the nonce the member reveals after the reduction, from which the group draws the secret
projections that check every reducer's average (:mod:`.share_audit`); ``audit_fraction`` the share
of rows this member wants that audit to read (the group reads the largest fraction its
contributors ask for, so nobody can lower it for the others). ``first_failed`` names the peer this
member saw fail first in its previous attempt of the round, and how (a member most of its group saw
break an attempt first, with no finding of its own to show for it, is left out of the retry:
:mod:`.verdicts`). ``sit_out`` lists the peers that broke earlier rounds by this member's verdicts
there (or by most of the round's peers' pointers, :func:`.verdicts.breakers_outside`) and whose
sit-out has not run out (:mod:`.sit_outs`): most of the group listing one leaves it out. The
signature is checked against the public key inside the slot's libp2p peer id (Ed25519 peer ids
embed the key), so a leader cannot alter or swap entries without the slot failing
(:func:`.verdicts.verify_slot`). Nothing a peer sends is unpickled: msgpack of bytes, ints, floats
and strings only, with size limits and no extension types.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from grpo_swarm.protocol.identity import SIGNATURE_SIZE, Identity

from .share_sketch import check_audit_fraction
from .tickets import MAX_TICKET_BYTES

GATHER_DOMAIN = b"grpo-swarm/v1/gather\n"
GATHER_VERSION = 5
NONCE_COMMITMENT_BYTES = 32
MAX_ACCUSATIONS = 64
MAX_REASON_CHARS = 64
MAX_PEER_ID_BYTES = 64
MAX_SIT_OUT = 16
MAX_ENTRY_BYTES = MAX_TICKET_BYTES + MAX_ACCUSATIONS * (MAX_PEER_ID_BYTES + MAX_REASON_CHARS + 8) + \
    MAX_SIT_OUT * (MAX_PEER_ID_BYTES + 2) + 512


@dataclass(frozen=True)
class GatherClaim:
    """One member's signed gather payload."""

    ticket_bytes: bytes
    round_index: int
    attempt: int
    committed_norm: float
    accusations: tuple[tuple[bytes, str], ...] = ()
    nonce_commitment: bytes = bytes(NONCE_COMMITMENT_BYTES)
    audit_fraction: float = 1.0
    first_failed: tuple[bytes, str] | None = None  # (peer id, reason) first seen failing in the previous attempt
    sit_out: tuple[bytes, ...] = ()  # peers left out for breaking earlier rounds, still sitting out


def encode_gather(identity: Identity, claim: GatherClaim) -> bytes:
    """The signed gather entry of ``claim`` (see the module docstring)."""
    if len(claim.accusations) > MAX_ACCUSATIONS:
        raise ValueError(f"at most {MAX_ACCUSATIONS} accusations per entry")
    if len(claim.sit_out) > MAX_SIT_OUT:
        raise ValueError(f"at most {MAX_SIT_OUT} peers sitting out per entry")
    accusations = sorted([bytes(p), str(r)[:MAX_REASON_CHARS]] for p, r in claim.accusations)
    first = [] if claim.first_failed is None else [bytes(claim.first_failed[0]),
                                                   str(claim.first_failed[1])[:MAX_REASON_CHARS]]
    payload = msgpack.packb([GATHER_VERSION, bytes(claim.ticket_bytes), int(claim.round_index), int(claim.attempt),
                             float(claim.committed_norm), accusations, bytes(claim.nonce_commitment),
                             float(claim.audit_fraction), first, sorted(bytes(p) for p in claim.sit_out)],
                            use_bin_type=True)
    return msgpack.packb([payload, identity.sign(GATHER_DOMAIN + payload)], use_bin_type=True)


def _no_ext(code, data):
    raise ValueError("msgpack extension types are not allowed")


def strict_unpack(data: bytes, max_bytes: int):
    """msgpack → plain Python (bytes, str, int, float, list, None); no extension types, bounded size."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > max_bytes:
        raise ValueError(f"msgpack data must be bytes of at most {max_bytes}")
    # msgpack >= 1.0 bounds every str/bin/array/map length by len(data), checked above
    return msgpack.unpackb(bytes(data), raw=False, use_list=True, strict_map_key=True, ext_hook=_no_ext)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def decode_hivemind_entry(raw: bytes) -> tuple[object, object, bytes]:
    """hivemind's gathered entry ``msgpack([bandwidth, mode, msgpack(user_gather)])`` → (bandwidth,
    mode id, our entry bytes). Raises ValueError on anything else."""
    outer = strict_unpack(raw, MAX_ENTRY_BYTES + 256)
    if not (isinstance(outer, list) and len(outer) == 3 and isinstance(outer[2], bytes)):
        raise ValueError("hivemind entry is not [bandwidth, mode, gather]")
    inner = strict_unpack(outer[2], MAX_ENTRY_BYTES + 16)
    if not isinstance(inner, bytes):
        raise ValueError("gather is not a byte string")
    return outer[0], outer[1], inner


def gather_round(raw: bytes) -> int | None:
    """The round a hivemind gathered entry (or a step's ``data_for_gather``) claims, unverified; None
    when it does not decode. Enough to tell a search of another round: the verdicts check the rest."""
    try:
        return decode_gather(decode_hivemind_entry(raw)[2])[2].round_index
    except Exception:  # noqa: BLE001 - a peer's bytes: anything that does not decode has no round
        return None


def decode_gather(entry: bytes) -> tuple[bytes, bytes, GatherClaim]:
    """(payload, signature, claim) of a signed entry; ValueError if it is malformed (not checked: the signature)."""
    top = strict_unpack(entry, MAX_ENTRY_BYTES)
    if not (isinstance(top, list) and len(top) == 2 and isinstance(top[0], bytes) and isinstance(top[1], bytes)):
        raise ValueError("entry is not [payload, signature]")
    payload, signature = top
    if len(signature) != SIGNATURE_SIZE:
        raise ValueError("signature has the wrong length")
    body = strict_unpack(payload, MAX_ENTRY_BYTES)
    if not (isinstance(body, list) and len(body) == 10 and body[0] == GATHER_VERSION and is_int(body[0])):
        raise ValueError(f"payload is not a version-{GATHER_VERSION} gather")
    _, ticket_bytes, round_index, attempt, norm, accusations, nonce_commitment, audit_fraction, first, sit_out = body
    if not isinstance(ticket_bytes, bytes) or len(ticket_bytes) > MAX_TICKET_BYTES:
        raise ValueError("ticket is not bytes of bounded size")
    if not (is_int(round_index) and is_int(attempt) and round_index >= 0 and attempt >= 0):
        raise ValueError("round and attempt must be non-negative integers")
    if not isinstance(norm, float):
        raise ValueError("committed norm must be a float")
    if not isinstance(accusations, list) or len(accusations) > MAX_ACCUSATIONS:
        raise ValueError("accusations must be a bounded list")
    acc = []
    for item in accusations:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes) and isinstance(item[1], str)
                and len(item[0]) <= MAX_PEER_ID_BYTES and len(item[1]) <= MAX_REASON_CHARS):
            raise ValueError("an accusation is not [peer id, reason]")
        acc.append((item[0], item[1]))
    if not (isinstance(nonce_commitment, bytes) and len(nonce_commitment) == NONCE_COMMITMENT_BYTES):
        raise ValueError(f"nonce commitment is not {NONCE_COMMITMENT_BYTES} bytes")
    if not isinstance(audit_fraction, float):
        raise ValueError("audit fraction must be a float")
    check_audit_fraction(audit_fraction)
    if not (isinstance(first, list) and (first == [] or (
            len(first) == 2 and isinstance(first[0], bytes) and isinstance(first[1], str)
            and len(first[0]) <= MAX_PEER_ID_BYTES and len(first[1]) <= MAX_REASON_CHARS))):
        raise ValueError("first_failed is not [] or [peer id, reason]")
    if not (isinstance(sit_out, list) and len(sit_out) <= MAX_SIT_OUT and all(
            isinstance(p, bytes) and len(p) <= MAX_PEER_ID_BYTES for p in sit_out) and len(set(sit_out)) == len(sit_out)):
        raise ValueError(f"sit_out is not a list of at most {MAX_SIT_OUT} distinct peer ids")
    return payload, signature, GatherClaim(ticket_bytes, round_index, attempt, norm, tuple(acc), nonce_commitment,
                                           audit_fraction, (first[0], first[1]) if first else None, tuple(sit_out))
