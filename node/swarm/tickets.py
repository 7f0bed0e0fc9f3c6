"""What each member puts in hivemind's ``gather`` and how every member checks every slot of a group.

hivemind's leader relays the gathered entries of a group unsigned, so each member signs its own:

    entry     = msgpack([payload, signature])
    payload   = msgpack([GATHER_VERSION, ticket_bytes, round_index, attempt, committed_norm,
                         [[accused_peer_id, reason], ...], nonce_commitment, audit_fraction,
                         [first_failed_peer_id, reason] or [], [sit_out_peer_id, ...]])
    signature = Ed25519(node key, GATHER_DOMAIN || payload)

``ticket_bytes`` is the coordinator-signed ``AdmissionTicket`` (protobuf bytes), ``committed_norm``
the L2 norm of the member's whole gradient (its parts are held to it during the reduction), and
the accusations name peers this member caught sending invalid data in an earlier attempt of the
same round (they are excluded from the retry). ``nonce_commitment`` is SHA-256 of the nonce the
member reveals after the reduction, from which the group draws the secret projections that check
every reducer's average (:mod:`.share_audit`); ``audit_fraction`` the share of rows this member
wants that audit to read (the group reads the largest fraction its contributors ask for, so nobody
can lower it for the others). ``first_failed`` names the peer this member saw fail first in its
previous attempt of the round, and how (see :func:`group_verdicts`: a member most of its group saw
break an attempt first, with no finding of its own to show for it, is left out of the retry).
``sit_out`` lists the peers that broke earlier rounds by this member's verdicts there (or by most of
the round's peers' pointers, :func:`breakers_outside`) and whose sit-out has not run out
(:mod:`.sit_outs`): most of the group listing one leaves it out. The
signature is checked against the public key inside the slot's libp2p peer id (Ed25519 peer ids
embed the key), so a leader cannot alter or swap entries without the slot failing. Nothing a peer
sends is unpickled: msgpack of bytes, ints, floats and strings only, with size limits and no
extension types.

:func:`group_verdicts` turns a group's ``(peer ids, gathered entries)`` into one
:class:`SlotVerdict` per slot. It depends only on the gathered bytes and this round's settings
(coordinator key, run id, round, norm bound, weight mode, expected peers), which every honest
member shares: all honest members reach the same verdicts, so an excluded member is left out the
same way everywhere (no timeouts, no partial averages).

Reduction weights come from the ticket, never from what a sender claims: the verified number of
sequences (``grpo``, ``dr_grpo``) or of completion tokens (``bnpo``, ``dapo``) — see
:func:`weight_mode_for_loss`. :class:`TicketClaims` reads them through ``getattr`` so that the
fields the coordinator does not issue yet (``accepted_tokens``, ``final``) are picked up as soon
as the schema has them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import msgpack

from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.errors import ProtocolError, ReasonCode
from grpo_swarm.protocol.hygiene import parse_request
from grpo_swarm.protocol.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    base58_encode,
    public_key_from_peer_id,
    verify_signature,
)
from grpo_swarm.protocol.rpc import verify_ticket

from .share_sketch import check_audit_fraction

GATHER_DOMAIN = b"grpo-swarm/v1/gather\n"
GATHER_VERSION = 5
NONCE_COMMITMENT_BYTES = 32
MAX_TICKET_BYTES = 4096
MAX_ACCUSATIONS = 64
MAX_REASON_CHARS = 64
MAX_PEER_ID_BYTES = 64
MAX_SIT_OUT = 16
MAX_ENTRY_BYTES = MAX_TICKET_BYTES + MAX_ACCUSATIONS * (MAX_PEER_ID_BYTES + MAX_REASON_CHARS + 8) + \
    MAX_SIT_OUT * (MAX_PEER_ID_BYTES + 2) + 512

WEIGHT_MODES = ("sequences", "tokens")
_LOSS_WEIGHT_MODE = {"grpo": "sequences", "dr_grpo": "sequences", "bnpo": "tokens", "dapo": "tokens"}


class Reason(str, Enum):
    """Why a slot was excluded before the reduction, or a peer banned during it."""

    # -- before the reduction (every honest member reaches the same verdict)
    MALFORMED_GATHER = "MALFORMED_GATHER"  # entry does not decode / wrong structure or types
    BAD_PEER_ID = "BAD_PEER_ID"  # not an Ed25519 peer id: no key to check the entry against
    BAD_GATHER_SIGNATURE = "BAD_GATHER_SIGNATURE"  # entry not signed by the slot's peer key
    TICKET_MALFORMED = "TICKET_MALFORMED"
    TICKET_BAD_SIGNATURE = "TICKET_BAD_SIGNATURE"  # not signed by the coordinator (forged or altered)
    TICKET_WRONG_SIGNER = "TICKET_WRONG_SIGNER"  # signed by a key that is not the coordinator's
    TICKET_WRONG_RUN = "TICKET_WRONG_RUN"
    TICKET_WRONG_ROUND = "TICKET_WRONG_ROUND"  # a ticket of another round
    TICKET_OF_ANOTHER_NODE = "TICKET_OF_ANOTHER_NODE"  # ticket key is not the slot's peer key
    TICKET_NOT_FINAL = "TICKET_NOT_FINAL"
    WRONG_ROUND = "WRONG_ROUND"  # the entry is for another round
    NO_WEIGHT = "NO_WEIGHT"  # the ticket gives no positive weight in this weight mode
    NORM_OVER_BOUND = "NORM_OVER_BOUND"  # committed gradient norm not finite or above the bound
    NOT_IN_ROUND = "NOT_IN_ROUND"  # not among the round's expected peers
    ACCUSED = "ACCUSED"  # a valid member caught it sending invalid data earlier in this round
    ACCUSES_MOST = "ACCUSES_MOST"  # its accusations name more than half of the group's other members
    ACCUSES_UNPROMPTED = "ACCUSES_UNPROMPTED"  # accusations (or a first failure) in its first attempt of the round,
    # before any attempt could have shown it anything
    UNCORROBORATED = "UNCORROBORATED"  # the sole accuser of a member: one word against another, so it is left out
    # with the member it accuses when the round can spare both
    BROKE_FIRST = "BROKE_FIRST"  # most of the others saw it fail first in the last attempt, and it names no
    # finding of its own (an abort, end or refusal with no cause: an honest member aborts only for one)
    BROKE_WITH = "BROKE_WITH"  # the peer a BROKE_FIRST member says failed first for it: one word against
    # another, so both are left out when the round can spare both
    SITS_OUT = "SITS_OUT"  # most of the others remember it breaking an earlier round (BROKE_FIRST, BROKE_WITH, or
    # named by most of the round's peers while away from the retry) and its sit-out has not run out (.sit_outs);
    # only while the round can spare it
    NOT_A_CONTRIBUTOR = "NOT_A_CONTRIBUTOR"  # declared itself auxiliary
    # -- during the reduction: invalid content (an accusation, excluded from the retry)
    BAD_COMPRESSION = "BAD_COMPRESSION"
    BAD_DTYPE = "BAD_DTYPE"
    BAD_SHAPE = "BAD_SHAPE"
    NON_FINITE = "NON_FINITE"
    MAGNITUDE = "MAGNITUDE"
    NORM_EXCEEDED = "NORM_EXCEEDED"  # parts' norm above the committed norm
    MALFORMED_PART = "MALFORMED_PART"
    NOT_A_SENDER = "NOT_A_SENDER"  # an excluded or unknown peer sent parts (refused, not counted)
    # -- during the reduction: failures (not accusations: could be a crash or an abort)
    GROUP_VIEW_MISMATCH = "GROUP_VIEW_MISMATCH"  # a groupmate holds another view of the group (its members,
    # their order, their gather entries): the leader showed us different groups (no member is to blame)
    SENDER_FAILED = "SENDER_FAILED"  # stopped, timed out or disconnected while sending
    REDUCER_FAILED = "REDUCER_FAILED"  # did not return its share (error code, timeout, disconnect)
    NOT_IN_GROUP = "NOT_IN_GROUP"  # a reducer answered BAD_GROUP_ID: it is not running this group. Once names
    # nobody as the attempt's breaker (an honest member's matchmaking can give up on a group its leader still
    # counts in; it then runs the retry) ...
    NOT_IN_GROUP_AGAIN = "NOT_IN_GROUP_AGAIN"  # ... but the same reducer answering so in this member's previous
    # attempt too is no such race: a pointer with this reason counts (see next_first_failed)
    STALLED = "STALLED"  # a failure seen first-hand as silence: a wait on it timed out while the attempt was
    # live (not an end, refusal or CANCELLED, which another member's abort also causes). Named in the next
    # gather, so that a member stalling every attempt cannot fail the round; never reported (a dropped link)
    # -- after the reduction: the share audit (see .share_audit)
    WRONG_AVERAGE = "WRONG_AVERAGE"  # its share's average fails the secret-projection check
    SKETCH_MISMATCH = "SKETCH_MISMATCH"  # its sketch differs from the parts it sent (seen by their reducer)
    SKETCH_IMPLAUSIBLE = "SKETCH_IMPLAUSIBLE"  # a sketch too large for its committed norm
    BAD_AUDIT_ENTRY = "BAD_AUDIT_ENTRY"  # malformed / wrongly signed / wrong nonce in the audit exchange
    AUDIT_WITHHELD = "AUDIT_WITHHELD"  # no reveal or sketch in time after the reduction (an accusation:
    # silent once the seed is known, a reducer caught by a sampled audit would get a free retry)
    AUDIT_FAILED = "AUDIT_FAILED"  # outputs differing between members, or our own audit broke (a failure)

    def __str__(self) -> str:
        return self.value


_TICKET_REASON = {
    ReasonCode.BAD_SIGNATURE: Reason.TICKET_BAD_SIGNATURE,
    ReasonCode.UNKNOWN_KEY: Reason.TICKET_WRONG_SIGNER,
    ReasonCode.WRONG_RUN: Reason.TICKET_WRONG_RUN,
    ReasonCode.STALE_VERSION: Reason.TICKET_WRONG_ROUND,
}


def weight_mode_for_loss(loss_type: str) -> str:
    """``sequences`` for grpo / dr_grpo (their step loss is a mean over sequences), ``tokens`` for
    bnpo / dapo (a mean over all completion tokens of the step); see :func:`grpo.sequence_token_weights`."""
    try:
        return _LOSS_WEIGHT_MODE[loss_type]
    except KeyError:
        raise ValueError(f"unknown loss type {loss_type!r}; expected one of {sorted(_LOSS_WEIGHT_MODE)}") from None


# ---- tickets ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TicketClaims:
    """What the averaging reads from a verified ticket. Fields the schema does not have yet read as
    None (``accepted_tokens``, ``final``); ``sequences`` falls back to ``accepted_samples`` (one
    sample is one completion, i.e. one sequence)."""

    run_id: str
    round_index: int
    node_public_key: bytes
    sequences: int
    tokens: int | None
    final: bool | None

    @classmethod
    def from_ticket(cls, ticket) -> TicketClaims:
        seqs = getattr(ticket, "accepted_sequences", None)
        if seqs is None:
            seqs = ticket.accepted_samples
        tokens = getattr(ticket, "accepted_tokens", None)
        final = getattr(ticket, "final", None)
        return cls(run_id=ticket.run_id, round_index=int(ticket.round_index),
                   node_public_key=bytes(ticket.node_public_key), sequences=int(seqs),
                   tokens=None if tokens is None else int(tokens), final=None if final is None else bool(final))

    def weight(self, mode: str) -> float:
        """The reduction weight in ``mode``; 0 when the ticket has no count of that kind."""
        if mode == "sequences":
            return float(self.sequences)
        if mode == "tokens":
            return float(self.tokens) if self.tokens is not None else 0.0
        raise ValueError(f"weight mode must be one of {WEIGHT_MODES}, got {mode!r}")


def parse_ticket(data: bytes, ticket_type=pb.AdmissionTicket):
    """Parse ticket bytes (no unknown fields, size-limited); ProtocolError(MALFORMED/OVERSIZED)."""
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(ReasonCode.MALFORMED, "ticket must be bytes")
    if len(data) > MAX_TICKET_BYTES:
        raise ProtocolError(ReasonCode.OVERSIZED, f"ticket is {len(data)} bytes > {MAX_TICKET_BYTES}")
    return parse_request(ticket_type, bytes(data), "AdmissionTicket")


# ---- gather entries --------------------------------------------------------------------------------
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


def _is_int(x) -> bool:
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


def pointer_counts(reason: str) -> bool:
    """Whether a ``first_failed`` pointer with this reason counts towards naming a breaker: all but a
    first BAD_GROUP_ID (NOT_IN_GROUP; see :func:`next_first_failed`)."""
    return reason != Reason.NOT_IN_GROUP.value


def decode_gather(entry: bytes) -> tuple[bytes, bytes, GatherClaim]:
    """(payload, signature, claim) of a signed entry; ValueError if it is malformed (not checked: the signature)."""
    top = strict_unpack(entry, MAX_ENTRY_BYTES)
    if not (isinstance(top, list) and len(top) == 2 and isinstance(top[0], bytes) and isinstance(top[1], bytes)):
        raise ValueError("entry is not [payload, signature]")
    payload, signature = top
    if len(signature) != SIGNATURE_SIZE:
        raise ValueError("signature has the wrong length")
    body = strict_unpack(payload, MAX_ENTRY_BYTES)
    if not (isinstance(body, list) and len(body) == 10 and body[0] == GATHER_VERSION and _is_int(body[0])):
        raise ValueError(f"payload is not a version-{GATHER_VERSION} gather")
    _, ticket_bytes, round_index, attempt, norm, accusations, nonce_commitment, audit_fraction, first, sit_out = body
    if not isinstance(ticket_bytes, bytes) or len(ticket_bytes) > MAX_TICKET_BYTES:
        raise ValueError("ticket is not bytes of bounded size")
    if not (_is_int(round_index) and _is_int(attempt) and round_index >= 0 and attempt >= 0):
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


# ---- verdicts --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundRules:
    """This round's settings, the same on every honest member."""

    coordinator_key: bytes
    run_id: str
    round_index: int
    norm_bound: float
    weight_mode: str
    expected_keys: frozenset[bytes] | None = None  # node public keys of the round's peers (None: anyone)
    require_final: bool = False
    ticket_type: type = pb.AdmissionTicket
    min_contributors: int = 1  # an attempt with fewer valid members fails (a strict majority of the round's peers)


@dataclass
class SlotVerdict:
    """One group slot after verification. ``ok`` slots contribute with ``weight``; the others are
    left out (auxiliary, share 0, their parts refused)."""

    peer_id: bytes
    ok: bool
    reason: Reason | None = None
    detail: str = ""
    public_key: bytes = b""
    weight: float = 0.0
    committed_norm: float = 0.0
    client_mode: bool = False
    accusations: tuple[tuple[bytes, str], ...] = ()
    first_failed: tuple[bytes, str] | None = None
    sit_out: tuple[bytes, ...] = ()
    accused_by: list[bytes] = field(default_factory=list)
    nonce_commitment: bytes = b""
    attempt: int = 0
    audit_fraction: float = 1.0

    def reject(self, reason: Reason, detail: str) -> SlotVerdict:
        self.ok, self.reason, self.detail = False, reason, detail
        return self


def verify_slot(peer_id: bytes, raw_entry: bytes, rules: RoundRules) -> SlotVerdict:
    """Check one slot: peer key, gather signature, ticket (signature, run, round, node key, final),
    entry round, committed norm, weight and round membership."""
    v = SlotVerdict(peer_id=bytes(peer_id), ok=True)
    try:
        _, mode_id, entry = decode_hivemind_entry(raw_entry)
        payload, signature, claim = decode_gather(entry)
    except Exception as e:  # noqa: BLE001 - any decoding failure is the sender's fault
        return v.reject(Reason.MALFORMED_GATHER, f"{type(e).__name__}: {e}")
    if not _is_int(mode_id) or mode_id not in (0, 1, 2):
        return v.reject(Reason.MALFORMED_GATHER, "the hivemind averaging mode is not 0, 1 or 2")
    v.client_mode = mode_id == 1  # hivemind AveragingMode.CLIENT: cannot accept connections, reduces nothing
    if mode_id == 2:  # AveragingMode.AUX: sends nothing
        return v.reject(Reason.NOT_A_CONTRIBUTOR, "the member declared itself auxiliary")
    try:
        v.public_key = public_key_from_peer_id(bytes(peer_id))
    except ProtocolError as e:
        return v.reject(Reason.BAD_PEER_ID, e.detail)
    if not verify_signature(v.public_key, GATHER_DOMAIN + payload, signature):
        return v.reject(Reason.BAD_GATHER_SIGNATURE, "the gather entry is not signed by the slot's peer key")
    v.accusations, v.first_failed, v.sit_out = claim.accusations, claim.first_failed, claim.sit_out
    if claim.attempt == 0 and (claim.accusations or claim.first_failed is not None):
        return v.reject(Reason.ACCUSES_UNPROMPTED, "its first attempt of the round already names a peer: no "
                                                   "earlier attempt can have shown it anything")
    v.nonce_commitment, v.attempt, v.audit_fraction = claim.nonce_commitment, claim.attempt, claim.audit_fraction
    try:
        ticket = parse_ticket(claim.ticket_bytes, rules.ticket_type)
        verify_ticket(ticket, rules.coordinator_key, run_id=rules.run_id, round_index=rules.round_index)
    except ProtocolError as e:
        return v.reject(_TICKET_REASON.get(e.code, Reason.TICKET_MALFORMED), e.detail)
    claims = TicketClaims.from_ticket(ticket)
    if claims.node_public_key != v.public_key:
        return v.reject(Reason.TICKET_OF_ANOTHER_NODE,
                        f"ticket is for node key {claims.node_public_key.hex()[:16]}..., the slot is "
                        f"{v.public_key.hex()[:16]}...")
    if rules.require_final and not claims.final:
        return v.reject(Reason.TICKET_NOT_FINAL, "the round needs the coordinator's final ticket")
    if claim.round_index != rules.round_index:
        return v.reject(Reason.WRONG_ROUND, f"entry is for round {claim.round_index}, not {rules.round_index}")
    norm = claim.committed_norm
    if not (math.isfinite(norm) and 0.0 <= norm <= rules.norm_bound):
        return v.reject(Reason.NORM_OVER_BOUND, f"committed gradient norm {norm!r} is not in [0, {rules.norm_bound}]")
    v.committed_norm = norm
    v.weight = claims.weight(rules.weight_mode)
    if not (math.isfinite(v.weight) and v.weight > 0):
        what = "completion tokens" if rules.weight_mode == "tokens" else "sequences"
        return v.reject(Reason.NO_WEIGHT, f"the ticket gives no verified {what}")
    if rules.expected_keys is not None and v.public_key not in rules.expected_keys:
        return v.reject(Reason.NOT_IN_ROUND, "the peer is not among this round's peers")
    return v


def group_verdicts(peer_ids: Sequence[bytes], gathered: Sequence[bytes], rules: RoundRules) -> list[SlotVerdict]:
    """Verdicts for every slot of a group, in slot order. After the per-slot checks, in a group of
    three or more valid members, a member whose accusations name more than half of the others is
    excluded (ACCUSES_MOST) and its accusations ignored: with an honest majority no member catches
    most of its group, and one hostile member accusing everyone would otherwise stop every round.
    Then a peer named in the accusations of any remaining valid slot is excluded (one pass); the
    sole accuser of a peer goes with it while the round can spare both (UNCORROBORATED: one word
    against another, so that a member cannot remove others and stay itself); the first breaker
    of the last attempt, if any (:func:`_first_breaker`); and the members sitting out for breaking
    earlier rounds (:func:`_sitting_out`)."""
    if len(peer_ids) != len(gathered):
        raise ValueError("peer ids and gathered entries differ in length")
    if len(set(map(bytes, peer_ids))) != len(peer_ids):
        raise ValueError("a peer appears twice in the group")
    verdicts = [verify_slot(p, g, rules) for p, g in zip(peer_ids, gathered)]
    valid = {v.peer_id for v in verdicts if v.ok}
    if len(valid) >= 3:
        for v in [v for v in verdicts if v.ok]:
            named = {bytes(a) for a, _ in v.accusations} & (valid - {v.peer_id})
            if 2 * len(named) > len(valid) - 1:
                v.reject(Reason.ACCUSES_MOST, f"its accusations name {len(named)} of the {len(valid) - 1} other "
                                              "members: not believed")
    accusers: dict[bytes, list[tuple[bytes, str]]] = {}
    for v in verdicts:
        if v.ok:
            for accused, reason in v.accusations:
                accusers.setdefault(bytes(accused), []).append((v.peer_id, reason))
    for v in verdicts:
        if v.ok and v.peer_id in accusers:
            v.accused_by = [a for a, _ in accusers[v.peer_id]]
            reasons = ", ".join(sorted({r for _, r in accusers[v.peer_id]}))
            v.reject(Reason.ACCUSED, f"named earlier in this round ({reasons}) by "
                                     f"{len(v.accused_by)} member(s)")
    by_id = {v.peer_id: v for v in verdicts}
    sole = sorted((v.accused_by[0], v.peer_id) for v in verdicts
                  if v.reason == Reason.ACCUSED and len(v.accused_by) == 1)
    for accuser, accused in sole:
        if by_id[accuser].ok and sum(u.ok for u in verdicts) - 1 >= rules.min_contributors:
            by_id[accuser].reject(Reason.UNCORROBORATED, f"no other member backs its accusation of "
                                                         f"{base58_encode(accused)}: one word against another")
    believed = valid - {v.peer_id for v in verdicts if v.reason == Reason.ACCUSES_MOST}
    _first_breaker(verdicts, believed, rules.min_contributors)
    _sitting_out(verdicts, believed, rules.min_contributors)
    return verdicts


# a first failure that is a finding of the member's own (it names the peer in its accusations); the
# others (an end, a refusal, CANCELLED, another view of the group, a broken audit) an abort also causes
_FAILURES = frozenset(r.value for r in (Reason.SENDER_FAILED, Reason.REDUCER_FAILED, Reason.GROUP_VIEW_MISMATCH,
                                        Reason.AUDIT_FAILED, Reason.NOT_IN_GROUP, Reason.NOT_IN_GROUP_AGAIN))


def next_first_failed(previous: tuple[bytes, str] | None, seen: tuple[bytes, str] | None
                      ) -> tuple[bytes, str] | None:
    """The ``first_failed`` pointer of a member's next gather: ``seen``, the first failure of the attempt
    just made, or, where it saw none (no group found, a group refused for too few valid members),
    ``previous``, the pointer this attempt's gather carried: a breaker back first for the retry could
    otherwise lead a group too small to leave it out, and the pointers against it would be gone by
    the attempt after. A reducer that answered BAD_GROUP_ID first here and in the attempt the
    pointer came from (refusing, or failing it first any other way) is named NOT_IN_GROUP_AGAIN. One
    BAD_GROUP_ID names nobody: an honest member whose matchmaking gave up on a group its leader
    still counted in answers so, and runs the retry. Failing the same member first two attempts in a
    row is no such race, and a ticket holder refusing every attempt would otherwise fail the round
    unnamed (or named once, when its first refusal reached this member as a broken stream)."""
    if seen is None:
        return previous
    if seen[1] == Reason.NOT_IN_GROUP.value and previous is not None and bytes(previous[0]) == bytes(seen[0]):
        return bytes(seen[0]), Reason.NOT_IN_GROUP_AGAIN.value
    return seen


def _first_breaker(verdicts: list[SlotVerdict], believed: set[bytes], min_contributors: int) -> None:
    """Leave out of the retry the member that broke the last attempt. An honest member aborts only for
    a cause: its own finding (named in its accusations) or a groupmate's failure, which it then
    passes on to everyone as CANCELLED, ends and refusals; so one that aborts at once in every
    attempt would otherwise fail the round unnamed. Each member's gather names whom it saw fail first
    (``first_failed``); a valid member named so by more than half of the other believed members
    (those not left out as ACCUSES_MOST), and by at least two, broke first (a first BAD_GROUP_ID,
    NOT_IN_GROUP, names nobody: see :func:`next_first_failed`). Unless its own first failure is a finding
    against a member of this group, which it accuses (the catch that started the abort), it is
    excluded (BROKE_FIRST), and so is the peer it says failed first for it (BROKE_WITH) when the
    round can spare both: that is one word against another (a peer that breaks only towards one
    member makes that member look like the breaker to the rest), so neither is believed."""
    by_id = {v.peer_id: v for v in verdicts}
    ok = [v for v in verdicts if v.ok]
    named: dict[bytes, int] = {}
    for v in verdicts:
        if v.peer_id in believed and v.first_failed is not None and bytes(v.first_failed[0]) != v.peer_id \
                and pointer_counts(v.first_failed[1]):
            named[bytes(v.first_failed[0])] = named.get(bytes(v.first_failed[0]), 0) + 1
    for v in ok:
        n = named.get(v.peer_id, 0)
        if n < 2 or 2 * n <= len(believed) - 1:  # (one member's word alone is one word against another)
            continue
        cause = v.first_failed
        if cause is not None and cause[1] not in _FAILURES and bytes(cause[0]) in by_id and \
                any(bytes(p) == bytes(cause[0]) for p, _ in v.accusations):
            continue
        other = by_id.get(bytes(cause[0])) if cause is not None else None
        v.reject(Reason.BROKE_FIRST, f"{named[v.peer_id]} of the {len(believed) - 1} other members saw it fail "
                                     "first in their last attempt, and it names no finding of its own")
        if other is not None and other.ok and sum(u.ok for u in verdicts) - 1 >= min_contributors:
            other.reject(Reason.BROKE_WITH, "named by a member that broke the last attempt first as the peer that "
                                            "failed first for it: one word against another")
        return  # (at most one member can be named so by a majority)


def breakers_outside(verdicts: Sequence[SlotVerdict], round_peer_ids: frozenset[bytes]) -> dict[bytes, int]:
    """The round's peers outside this group that more than half of the round's other peers, and at
    least two, name among the group's contributors as the peer they saw fail first in their last
    attempt, with how many name it. A peer that breaks the first attempt and then leads groups of its
    own never meets the verdicts that would leave it out (BROKE_FIRST); these pointers, signed in the
    retry's gathers, are the evidence its sit-out then rests on (:mod:`.sit_outs`)."""
    in_group = {v.peer_id for v in verdicts}
    named: dict[bytes, int] = {}
    for v in verdicts:
        if v.ok and v.first_failed is not None and pointer_counts(v.first_failed[1]):
            peer = bytes(v.first_failed[0])
            if peer in round_peer_ids and peer not in in_group:
                named[peer] = named.get(peer, 0) + 1
    return {p: n for p, n in named.items() if n >= 2 and 2 * n > len(round_peer_ids) - 1}


def _sitting_out(verdicts: list[SlotVerdict], believed: set[bytes], min_contributors: int) -> None:
    """Leave out the valid members that more than half of the other believed members, and at least
    two, list as sitting out (:mod:`.sit_outs`), while the round can spare them: the most listed
    first, then by peer id. A list is a member's memory of verdicts in groups it was in, which rest on
    signed gathers, so honest members of the same groups list the same peers; a minority listing an
    honest peer (hostile members, or one that saw other groups) leaves nobody out."""
    listed: dict[bytes, int] = {}
    for v in verdicts:
        if v.peer_id in believed:
            for p in set(map(bytes, v.sit_out)) - {v.peer_id}:
                listed[p] = listed.get(p, 0) + 1
    by_id = {v.peer_id: v for v in verdicts}
    for peer in sorted(listed, key=lambda p: (-listed[p], p)):
        v, n = by_id.get(peer), listed[peer]
        if v is None or not v.ok or n < 2 or 2 * n <= len(believed - {peer}):
            continue
        if sum(u.ok for u in verdicts) - 1 < min_contributors:
            return
        v.reject(Reason.SITS_OUT, f"{n} of the {len(believed - {peer})} other members list it as sitting out: "
                                  "it broke an earlier round's averaging first")


GROUP_VIEW_DOMAIN = b"grpo-swarm/v1/group-view\n"
GROUP_VIEW_BYTES = 32


def group_view(group_id: bytes, peer_ids: Sequence[bytes], gathered: Sequence[bytes]) -> bytes:
    """A digest of everything a member's plan for the group rests on: hivemind's group id, the
    members in slot order and their gather entries. The leader alone sends each member its group
    (hivemind's BEGIN_ALLREDUCE), so a hostile leader could show members different groups under
    one group id; reductions carry this digest and refuse a groupmate whose view differs
    (:data:`Reason.GROUP_VIEW_MISMATCH`, a failure), so members never judge each other's parts
    by different plans."""
    h = hashlib.sha256(GROUP_VIEW_DOMAIN + len(group_id).to_bytes(2, "big") + bytes(group_id))
    h.update(len(peer_ids).to_bytes(4, "big"))
    for peer, entry in zip(peer_ids, gathered, strict=True):
        h.update(len(peer).to_bytes(4, "big") + bytes(peer) + len(entry).to_bytes(4, "big") + bytes(entry))
    return h.digest()


def accusation_list(accused: Iterable[tuple[bytes, str]]) -> tuple[tuple[bytes, str], ...]:
    """Deduplicated (peer id, reason) pairs, at most :data:`MAX_ACCUSATIONS`."""
    seen: dict[bytes, str] = {}
    for p, r in accused:
        seen.setdefault(bytes(p), str(r))
    return tuple(sorted(seen.items()))[:MAX_ACCUSATIONS]


def check_own_ticket(ticket_bytes: bytes, identity: Identity, rules: RoundRules) -> TicketClaims:
    """Check this node's own ticket before a round (the same checks its groupmates make); raises
    ProtocolError or ValueError naming what is wrong."""
    ticket = parse_ticket(ticket_bytes, rules.ticket_type)
    verify_ticket(ticket, rules.coordinator_key, run_id=rules.run_id, round_index=rules.round_index)
    claims = TicketClaims.from_ticket(ticket)
    if claims.node_public_key != identity.public_key_bytes:
        raise ValueError("the ticket was issued to another node key")
    if rules.require_final and not claims.final:
        raise ValueError("the round needs the coordinator's final ticket")
    if not claims.weight(rules.weight_mode) > 0:
        raise ValueError(f"the ticket gives no weight in mode {rules.weight_mode!r}")
    return claims


def is_valid_public_key(key: bytes) -> bool:
    return isinstance(key, (bytes, bytearray)) and len(key) == PUBLIC_KEY_SIZE
