"""Which peers sit out the next rounds' averaging for breaking earlier ones: a node's memory of breakers.

Within a round, a member that most of its group saw break an attempt first is left out of the retry
(``BROKE_FIRST``), with the peer it blames when the round can spare both (``BROKE_WITH``): see
:func:`.verdicts.group_verdicts`. Without a memory, a peer that hangs up on every round's first attempt
costs every round a failed attempt and the retry's wait (a reducer timeout: 15 s rounds against
2.5 s with two such peers among five, bench/RESULTS.md). So each node remembers those verdicts —
they rest on signed gathers, so every honest member of the group reached the same ones; so do the
pointers naming a breaker that stayed away from the retry, leading groups of its own — and lists
in its next gathers (``sit_out``) the peers whose sit-out has not run out; a peer that most of the
others list sits out the attempt (``SITS_OUT``), again only while the round can spare it.

The policy, per peer: each round in the last :data:`MEMORY_ROUNDS` in which a verdict left it out
for breaking is a strike; after its latest, it sits out ``2 ** (strikes - 1)`` rounds, at most
``limit``. A link that dropped once costs one round; a peer that breaks every round it is back for
sits out 1, 2, 4, ... rounds, so it breaks a vanishing share of rounds. ``BROKE_WITH`` strikes too:
a peer that hangs up on one member only makes that member look like the breaker, and the member it
framed must not sit out alone. And where the round could not spare the blamed peer too (a round of
three), the breaker does not strike at all: that case and the honest one look the same from the
gathers (:func:`.verdicts.struck_breakers`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from grpo_swarm.protocol.identity import base58_decode

from .gather import MAX_SIT_OUT
from .round_report import AttemptReport

MEMORY_ROUNDS = 64  # strikes older than this many rounds are forgotten
DEFAULT_SIT_OUT_LIMIT = 16  # the longest sit-out, in rounds


class BreakMemory:
    """The rounds in which verdicts left each peer out for breaking, and who sits out which round."""

    def __init__(self, limit: int = DEFAULT_SIT_OUT_LIMIT):
        self.limit = check_limit(limit)
        self._strikes: dict[bytes, list[int]] = {}  # peer id -> rounds it was left out for breaking (sorted)

    def record(self, round_index: int, attempts: Sequence[AttemptReport]) -> None:
        """Take a finished round's verdicts: a peer any attempt left out for breaking in a way that counts
        (:func:`.verdicts.struck_breakers`), or named by most of the round's peers as the breaker of
        their last attempt while it was away from the group (:func:`.verdicts.breakers_outside`),
        strikes once."""
        round_index = int(round_index)
        for peer in {p for a in attempts for p in (*a.struck, *a.broke_away)}:
            rounds = self._strikes.setdefault(base58_decode(peer), [])
            if round_index not in rounds:
                rounds.append(round_index)
                rounds.sort()
        for peer in list(self._strikes):
            self._strikes[peer] = [r for r in self._strikes[peer] if r > round_index - MEMORY_ROUNDS]
            if not self._strikes[peer]:
                del self._strikes[peer]

    def sits_out_until(self, peer: bytes) -> int | None:
        """The last round ``peer`` sits out (None: it has no strikes)."""
        rounds = self._strikes.get(bytes(peer))
        if not rounds or self.limit == 0:
            return None
        return rounds[-1] + min(2 ** (len(rounds) - 1), self.limit)

    def sitting_out(self, round_index: int, me: bytes, peers: Iterable[bytes] | None = None) -> tuple[bytes, ...]:
        """Who sits out ``round_index`` by this node's memory (never ``me``), among ``peers`` when the
        round's peers are known: at most MAX_SIT_OUT, the most recently struck first."""
        candidates = self._strikes.keys() if peers is None else set(map(bytes, peers)) & self._strikes.keys()
        out = []
        for peer in candidates:
            until = self.sits_out_until(peer)
            if peer != bytes(me) and until is not None and int(round_index) <= until:
                out.append(peer)
        out.sort(key=lambda p: (-self._strikes[p][-1], p))
        return tuple(sorted(out[:MAX_SIT_OUT]))


def check_limit(limit) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MEMORY_ROUNDS:
        raise ValueError(f"the sit-out limit must be an integer number of rounds in [0, {MEMORY_ROUNDS}] "
                         f"(0: nobody sits out), got {limit!r}")
    return limit
