"""What a verified averaging round reports: :class:`AttemptReport` per attempt, :class:`RoundResult` per
round (:meth:`.averaging.VerifiedAverager.average`'s return value).

Reports cross hivemind's MPFuture from the averager process by pickling, so they are plain
dataclasses of str/int/float/dict, with peer ids in base58.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from grpo_swarm.protocol.identity import base58_decode

from .reasons import Reason

# what a reducer accused of WRONG_AVERAGE may answer with in its next gather (see reportable())
SELF_EXCLUDED = "this node was excluded"  # how a round's error starts when the verdicts left this node out
AUDIT_COUNTER_ACCUSATIONS = tuple(r.value for r in (Reason.SKETCH_MISMATCH, Reason.AUDIT_WITHHELD,
                                                    Reason.BAD_AUDIT_ENTRY))


@dataclass
class AttemptReport:
    """One matchmaking + all-reduce attempt, as this member saw it. Peer ids are base58 strings;
    reasons read ``"REASON: detail"``."""

    ok: bool = False
    attempt: int = 0
    group_id: str = ""
    members: list[str] = field(default_factory=list)  # every slot of the group, in slot order
    weights: dict[str, float] = field(default_factory=dict)  # contributors -> ticket weight
    excluded: dict[str, str] = field(default_factory=dict)  # left out before the reduction, and why
    accused: dict[str, str] = field(default_factory=dict)  # caught sending/returning invalid data
    failed: dict[str, str] = field(default_factory=dict)  # stopped, timed out, disconnected, refused
    stalled: dict[str, str] = field(default_factory=dict)  # the failed seen as silence while the attempt was live
    first_failed: str = ""  # "peer: REASON", the first peer this member saw fail (or accused) in the attempt
    # left out for breaking in a way later rounds hold against them (verdicts.struck_breakers)
    struck: list[str] = field(default_factory=list)
    # round peers outside the group most of the round's others named as the breaker of their last attempt
    broke_away: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # excluded peers that sent parts anyway
    weight_claims_ignored: dict[str, float] = field(default_factory=dict)  # claimed weight != ticket weight
    # the accusations in every signed gather entry of the group: accuser -> {accused: reason}
    accusations_seen: dict[str, dict[str, str]] = field(default_factory=dict)
    failed_size: int = 0
    bytes_sent: int = 0  # tensor payloads this member sent / received (parts and averages)
    bytes_received: int = 0
    audit_seconds: dict[str, float] = field(default_factory=dict)  # the share audit's steps
    error: str | None = None
    seconds: float = 0.0

    @property
    def total_weight(self) -> float:
        return sum(self.weights.values())

    def accused_pairs(self) -> list[tuple[bytes, str]]:
        """(raw peer id, reason) for the next attempt's gather: the accused, and the stalled (STALLED)."""
        return [*((base58_decode(p), r.split(":", 1)[0]) for p, r in self.accused.items()),
                *((base58_decode(p), Reason.STALLED.value) for p in self.stalled if p not in self.accused)]

    def first_failed_pair(self) -> tuple[bytes, str] | None:
        """(raw peer id, reason) of :attr:`first_failed` for the next attempt's gather, or None."""
        if not self.first_failed:
            return None
        peer, reason = self.first_failed.split(": ", 1)
        return base58_decode(peer), reason


def withdrawn_wrong_averages(attempts: Sequence[AttemptReport], me: str) -> set[str]:
    """Reducers this member accused of WRONG_AVERAGE and then saw, in a later attempt's signed gather,
    name someone else for an audit offence it had not named before (SKETCH_MISMATCH,
    AUDIT_WITHHELD, BAD_AUDIT_ENTRY). One word then stands against another (a sender lying about its
    sketch makes an honest reducer look wrong to everyone but the reducer), so the accusation is left
    out of this member's next gathers: else, added to its true accusation of the liar, it would
    make this member accuse most of its group (ACCUSES_MOST). A counter naming this member is no
    reason (it knows what it sent), nor is one the reducer had already made (it would make one
    counter a shield for every later wrong average)."""
    wrong = Reason.WRONG_AVERAGE.value + ":"
    out = set()
    for i, attempt in enumerate(attempts):
        for peer, reason in attempt.accused.items():
            if not reason.startswith(wrong):
                continue
            before = set(attempt.accusations_seen.get(peer, {}).items())
            for later in attempts[i + 1:]:
                counters = [(named, r) for named, r in later.accusations_seen.get(peer, {}).items()
                            if r.startswith(AUDIT_COUNTER_ACCUSATIONS) and named != me]
                if any(c not in before for c in counters):
                    out.add(peer)
    return out


@dataclass
class RoundResult:
    """The outcome of :meth:`VerifiedAverager.average`: ``grads`` (the averaged tensors, same shapes
    as the input) when ``ok``, else None; every attempt's report."""

    ok: bool
    round_index: int
    grads: list[torch.Tensor] | None
    attempts: list[AttemptReport]
    seconds: float
    error: str | None = None

    @property
    def last(self) -> AttemptReport | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def excluded(self) -> dict[str, str]:
        """Everyone left out of the last attempt before the reduction, with the reason."""
        return dict(self.last.excluded) if self.last else {}

    @property
    def accused(self) -> dict[str, str]:
        """Everyone this member caught sending or returning invalid data in any attempt: what the join
        loop reports to the coordinator."""
        out: dict[str, str] = {}
        for a in self.attempts:
            for p, r in a.accused.items():
                out.setdefault(p, r)
        return out

    @property
    def bytes_sent(self) -> int:
        return sum(a.bytes_sent for a in self.attempts)

    @property
    def bytes_received(self) -> int:
        return sum(a.bytes_received for a in self.attempts)

    def reportable(self) -> dict[str, str]:
        """Who to report to the coordinator, and why: everyone this member accused or excluded on its
        own evidence (not for another member's accusation: that member reports for itself), except a reducer
        accused of WRONG_AVERAGE unless a later attempt showed its signed gather without an audit
        accusation of its own (SKETCH_MISMATCH, AUDIT_WITHHELD, BAD_AUDIT_ENTRY). A sender that lies
        about its sketch, or holds its entry back until the reducer has given up, makes an honest
        reducer look wrong to others; when the reducer names it, one word stands against another and
        neither is reported for it: see :mod:`.share_audit`."""
        wrong = Reason.WRONG_AVERAGE.value
        # what this member saw for itself: its own accusations, and exclusions it verified from signed
        # bytes (tickets, gathers); not exclusions for another member's accusation (ACCUSED): relayed
        # by every honest member, one hostile member's word would make the majority a ban needs
        # (nor one word against another: BROKE_FIRST, BROKE_WITH, UNCORROBORATED; nor what those cost later: SITS_OUT)
        hearsay = tuple(r.value + ":" for r in (Reason.ACCUSED, Reason.BROKE_FIRST, Reason.BROKE_WITH,
                                                Reason.UNCORROBORATED, Reason.SITS_OUT))
        out = {**{p: r for p, r in self.excluded.items() if not r.startswith(hearsay)}, **self.accused}
        for peer in [p for p, reason in out.items() if wrong in reason]:
            # the gathers signed after the accusation: from the attempt after the one where we accused
            # it, or from the one that excluded it (its gathers already carry the reducer's answer)
            first = next(i + 1 if wrong in a.accused.get(peer, "") else i for i, a in enumerate(self.attempts)
                         if wrong in a.accused.get(peer, "") + a.excluded.get(peer, ""))
            later = [a.accusations_seen[peer] for a in self.attempts[first:] if peer in a.accusations_seen]
            disputed = any(r.startswith(AUDIT_COUNTER_ACCUSATIONS) for seen in later for r in seen.values())
            if disputed or not later:
                del out[peer]
        return out

    @property
    def left_out_as_stalled(self) -> bool:
        """The other members saw this node stall (their wait on its parts or averages timed out) and
        left it out of the retry: its link or machine was too slow for the run's sender timeout."""
        return self._left_out_for(Reason.STALLED)

    @property
    def left_out_as_breaker(self) -> bool:
        """Most of the other members saw this node's streams fail first in the last attempt (an abort,
        end or refusal it showed no cause for) and left it out of the retry: its connection dropped,
        or its averager failed."""
        return self._left_out_for(Reason.BROKE_FIRST)

    @property
    def sat_out(self) -> bool:
        """Most of the other members remember this node breaking an earlier round's averaging (or being
        blamed by the one that did) and left it out of this one (:mod:`.sit_outs`)."""
        return self._left_out_for(Reason.SITS_OUT)

    def _left_out_for(self, reason: Reason) -> bool:
        error = self.error or ""
        return error.startswith(SELF_EXCLUDED) and reason.value in error

    def copy_to(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy the averaged gradient into ``tensors`` (e.g. the parameters' ``.grad``)."""
        if not self.ok or self.grads is None:
            raise RuntimeError(f"round {self.round_index} failed: {self.error}")
        with torch.no_grad():
            for dst, src in zip(tensors, self.grads, strict=True):
                dst.copy_(src)

    def summary(self) -> str:
        parts = [f"round {self.round_index}: {'ok' if self.ok else 'FAILED'} in {self.seconds:.2f} s, "
                 f"{len(self.attempts)} attempt(s)"]
        for a in self.attempts:
            parts.append(f"  attempt {a.attempt}: {'ok' if a.ok else 'failed'} group of {len(a.members)}, "
                         f"weight {a.total_weight:g}, excluded {a.excluded}, accused {a.accused}, "
                         f"failed {a.failed}, error {a.error}")
        return "\n".join(parts)
