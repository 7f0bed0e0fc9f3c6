"""How every member checks every slot of a group: one verdict per slot, the same on every honest member.

:func:`group_verdicts` turns a group's ``(peer ids, gathered entries)`` (:mod:`.gather`) into one
:class:`SlotVerdict` per slot. It depends only on the gathered bytes and this round's settings
(coordinator key, run id, round, norm bound, weight mode, expected peers), which every honest
member shares: all honest members reach the same verdicts, so an excluded member is left out the
same way everywhere (no timeouts, no partial averages). Beyond each slot's own checks (signature,
ticket, round, norm, weight), the group's signed accusations, first-failure pointers and sit-out
lists leave out members caught, breaking the last attempt, or breaking earlier rounds.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.errors import ProtocolError, ReasonCode
from grpo_swarm.protocol.identity import (
    Identity,
    base58_encode,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)
from grpo_swarm.protocol.rpc import verify_ticket

from .gather import GATHER_DOMAIN, MAX_ACCUSATIONS, decode_gather, decode_hivemind_entry, is_int
from .reasons import Reason
from .tickets import TicketClaims, parse_ticket

_TICKET_REASON = {
    ReasonCode.BAD_SIGNATURE: Reason.TICKET_BAD_SIGNATURE,
    ReasonCode.UNKNOWN_KEY: Reason.TICKET_WRONG_SIGNER,
    ReasonCode.WRONG_RUN: Reason.TICKET_WRONG_RUN,
    ReasonCode.STALE_VERSION: Reason.TICKET_WRONG_ROUND,
}


def pointer_counts(reason: str) -> bool:
    """Whether a ``first_failed`` pointer with this reason counts towards naming a breaker: all but a
    first BAD_GROUP_ID (NOT_IN_GROUP; see :func:`next_first_failed`)."""
    return reason != Reason.NOT_IN_GROUP.value


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

    @functools.cached_property
    def expected_peer_ids(self) -> frozenset[bytes] | None:
        """The libp2p peer ids of :attr:`expected_keys` (None: anyone)."""
        return None if self.expected_keys is None else frozenset(map(peer_id_from_public_key, self.expected_keys))


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
    if not is_int(mode_id) or mode_id not in (0, 1, 2):
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
                                        Reason.AUDIT_FAILED, Reason.SKETCH_WITHHELD, Reason.AUDIT_UNANSWERED,
                                        Reason.NOT_IN_GROUP, Reason.NOT_IN_GROUP_AGAIN))


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


def struck_breakers(verdicts: Sequence[SlotVerdict]) -> list[bytes]:
    """The members this attempt's verdicts left out for breaking that later rounds hold it against
    (:mod:`.sit_outs`): every BROKE_WITH (left out with the breaker that blamed it: one word against
    another, so both pay the same), and a BROKE_FIRST that blamed nobody else in the group, or whose
    blamed peer went out with it. A breaker whose blamed groupmate stayed (the round could not spare
    both) is not held against anyone: a peer that hangs up on one member only makes that member look
    like the breaker, and in a round of three the gathers of that case and of the honest one mirror
    each other, so a memory would let the hostile peer keep an honest one out of many rounds for one
    hang-up."""
    by_id = {v.peer_id: v for v in verdicts}
    out = []
    for v in verdicts:
        if v.reason == Reason.BROKE_WITH:
            out.append(v.peer_id)
        elif v.reason == Reason.BROKE_FIRST:
            blamed = by_id.get(bytes(v.first_failed[0])) if v.first_failed is not None else None
            if blamed is None or blamed.peer_id == v.peer_id or blamed.reason == Reason.BROKE_WITH:
                out.append(v.peer_id)
    return out


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
