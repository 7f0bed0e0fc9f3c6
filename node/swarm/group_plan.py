"""How a verified group runs, from its members' verdicts alone: who sends, who reduces, which share.

Every honest member computes the same :class:`GroupPlan` from the same gather entries
(:func:`.verdicts.group_verdicts`), so they cut the gradient into the same shares and agree on
weights and norm bounds without a word more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hivemind.averaging.allreduce import AveragingMode
from hivemind.p2p import PeerID

from .verdicts import SlotVerdict


@dataclass(frozen=True)
class GroupPlan:
    """How a verified group runs: one mode, share, weight and norm bound per slot (slot order)."""

    peer_ids: tuple[PeerID, ...]
    verdicts: tuple[SlotVerdict, ...]
    modes: tuple[AveragingMode, ...]
    fractions: tuple[float, ...]

    @classmethod
    def from_verdicts(cls, peer_ids: Sequence[PeerID], verdicts: Sequence[SlotVerdict]) -> GroupPlan:
        """Valid members send; valid non-client members reduce equal shares (claimed bandwidths are
        ignored); excluded members are auxiliary with share 0, so nobody sends them anything."""
        modes, fractions = [], []
        for v in verdicts:
            if not v.ok:
                modes.append(AveragingMode.AUX)
                fractions.append(0.0)
            elif v.client_mode:
                modes.append(AveragingMode.CLIENT)
                fractions.append(0.0)
            else:
                modes.append(AveragingMode.NODE)
                fractions.append(1.0)
        return cls(tuple(peer_ids), tuple(verdicts), tuple(modes), tuple(fractions))

    def verdict(self, peer_id: PeerID) -> SlotVerdict:
        return self.verdicts[self.peer_ids.index(peer_id)]

    @property
    def contributors(self) -> list[SlotVerdict]:
        return [v for v in self.verdicts if v.ok]

    def audit_servers(self, me: PeerID) -> list[PeerID]:
        """The members the share audit calls: every other contributor that accepts calls (not the
        client-mode ones, whose entries reach the others only through these)."""
        return [p for p, v in zip(self.peer_ids, self.verdicts) if v.ok and not v.client_mode and p != me]

    @property
    def reducers(self) -> int:
        return sum(m == AveragingMode.NODE for m in self.modes)

    @property
    def audit_fraction(self) -> float:
        """The share audit's fraction of rows: the largest any contributor asked for in its signed gather."""
        return max((v.audit_fraction for v in self.contributors), default=1.0)
