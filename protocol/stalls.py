"""Rounds that published nothing, and who sits out the next ones: the coordinator's stall rule.

One implementation, used by the coordinator's :class:`~.recorder.RunRecorder` (live),
:func:`~.recorder.restore_state` (after a restart) and the offline audit (:mod:`.audit`), so the
three cannot disagree about a log (like :mod:`.publication` and :mod:`.peers`).

Why. Within a round the members' signed pointers name who broke an attempt, and rounds of five or
more leave a breaker out of the retry. A round of three cannot: a member that breaks with one other
member only, then names it, looks exactly like that member breaking with it, and the third member
cannot tell which of the two lies. Across rounds the coordinator can tell: a round whose ticket
holders include the staller fails whenever the staller wants; a round without it does not.

The rule. Round r *failed* when at least two nodes held its final tickets and it published no
version (once round r + 1 closes, r can no longer produce one). At the close of round c, the
failed rounds among ``c - window <= r < c`` are an *incident* when there are at least
:data:`MIN_FAILED_ROUNDS` of them; its *incumbents* are the participants of its first failed round
(ticket holders, and those a probe or a finding sat out) and the ticket holders of the last round
before it that published. The *suspects* are the nodes that held a
ticket in every failed round whose ticket holders were all incumbents (their intersection).

* **Newcomers wait.** During an incident a participant that is not an incumbent sits out, and a
  failed round a newcomer held a ticket in does not count: else a staller switching to a fresh key
  (or to one that did work before and stayed away) would fail a round its old key was absent from,
  drop the old key from the intersection, and leave an honest member as the only suspect.
* **Found.** When the suspects are one node and a round it sat out (with no one else but nodes
  found) published, it is found: it sits out (no final ticket; its accepted work stays accepted and
  logged, but it does not average and its hash reports count 0) for ``window`` rounds, twice as long
  each time it is found again (``window * 2**k`` the k-th time after the first). Without that
  round the lone suspect is probed first: with two stallers, single probes drop each of them in
  turn (the other fails the round) and the last node left would be an honest one.
* **Probe.** While several suspects remain, one of them sits out each round, in turn: the one that
  sat out least recently (then by node id). A round the staller fails while another suspect sits
  out drops that suspect from the intersection.
* **Explained.** A failed round a node found (and still sitting out) held a ticket in is explained
  and no longer counts: the rounds that still fail point at a second staller.
* **Group probe.** When no suspect is left to probe (two or more stallers: each failed the rounds
  the other sat out), a group sits out: every failed round held a staller, and with all of them out
  the round publishes, so a group can hold them all only if it meets every counted failed round's
  ticket holders and is not contained in a group a failed round sat out. The group that last
  published sits out again (held while it keeps publishing); else the largest groups the quorum
  allows are tried in an order drawn from the round index. A group that failed is never tried again
  while its round is in the window, so whatever the order (a key ground to sort late in some rounds
  gains nothing more) the search ends within the bound below.

Each group sits out (found, then newcomers, then the probe) only while the participants that stay
hold more than the publish quorum of the round's weight (else the round could not publish without
them). Those sitting out keep their weight in the round's total, so sitting someone out never
lowers the bar a publication must clear.

What it bounds. A staller is an incumbent of every incident it starts and holds a ticket in every
failed round, so it stays a suspect; with k suspects it fails at most k - 1 probe rounds before it
is found. Among n ticket holders it fails at most n + 1 rounds in any window (besides rounds a probe
could not sit anyone out of, for the quorum), and a key found again
sits out twice as long as the last time: O(n log T) failed rounds in T for one key. Fresh keys do
not reset that to every round: each sits out as a newcomer until the incident leaves the window, so
a staller with many keys still fails at most n + 1 rounds per window. An honest swarm pays only
after two failed rounds in one window: one member sits out each round until they leave it (or a
member that kept failing rounds is found), and nodes joining meanwhile wait.

Several colluding stallers, each failing every round it holds a ticket in, holding less than the
rest: once single probes have dropped every suspect, group probes find a group holding them all
within C(n, m) failed rounds at most (m: the largest group the quorum lets sit out), and it then
sits out while rounds publish; each time the failures leave the window the incident ends, and the
stallers fail two rounds before it resumes (simulated in ``tests/test_stall_rule.py``). Not
bounded: colluders that fail only some of their rounds can still make an honest node the lone
suspect and have it found (a round it sat out published because they let it); as with bans by
reports, the rule can only be sure of one hostile node among a round's ticket holders.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Iterable, Mapping

DEFAULT_WINDOW_ROUNDS = 16  # failed rounds count this many rounds; 0 turns the rule off
MIN_FAILED_ROUNDS = 2  # one failed round alone benches nobody: an honest swarm's crash costs nothing more
MAX_GROUPS_TRIED = 20_000  # a group probe's search at one close (C(16, 8) = 12,870): a few ms


class StallRule:
    """The ticket holders of every closed round in the window, whether it published, and who was
    found. Feed it round closes (:meth:`round_closed`) and publications (:meth:`published`) in log
    order; ask :meth:`benched` at each close, before logging it."""

    def __init__(self, window: int = DEFAULT_WINDOW_ROUNDS, quorum: float = 0.5):
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"stall_window_rounds must be an integer >= 0, got {window!r}")
        self.window, self.quorum = window, quorum
        self.holders: dict[int, frozenset[str]] = {}  # closed round -> its final ticket holders
        self.members: dict[int, frozenset[str]] = {}  # closed round -> its participants but newcomers sitting out
        self.published_rounds: set[int] = set()
        self.found: dict[str, int] = {}  # node -> times it was found
        self.sits_out_until: dict[str, int] = {}  # node -> the first round it takes part in again
        self.reasons: dict[str, str] = {}  # node -> why it was found, the last time
        self.last_out: dict[str, int] = {}  # node -> the last round it sat out
        self._settled = -1  # the last close whose finding was made

    # -- what the log records
    def round_closed(self, round_index: int, holders: Iterable[str], benched: Iterable[str] = ()) -> None:
        self._settle(int(round_index))
        incumbents, benched = self.incumbents(int(round_index)), frozenset(str(n) for n in benched)
        self.holders[int(round_index)] = frozenset(str(n) for n in holders)
        # a newcomer sitting out stays one: it must not become an incumbent when this round is the
        # first failed one left in the window
        newcomers = benched - incumbents if incumbents is not None else frozenset()
        self.members[int(round_index)] = self.holders[int(round_index)] | (benched - newcomers)
        self.last_out.update({n: int(round_index) for n in benched})
        # a long run keeps two windows: the failed rounds' and the rounds before them (for incumbents)
        for r in [r for r in self.holders if r < round_index - 2 * self.window]:
            del self.holders[r], self.members[r]
        self.published_rounds = {r for r in self.published_rounds if r >= round_index - 2 * self.window}

    def published(self, round_index: int | None) -> None:
        """A version produced by round ``round_index`` was published (None: the initial weights)."""
        if round_index is not None:
            self.published_rounds.add(int(round_index))

    # -- the rule
    def failed_rounds(self, closing: int) -> list[int]:
        """The rounds in ``[closing - window, closing)`` with two or more ticket holders that published nothing."""
        return sorted(r for r, h in self.holders.items()
                      if closing - self.window <= r < closing and len(h) >= 2 and r not in self.published_rounds)

    def incumbents(self, closing: int) -> frozenset[str] | None:
        """The participants of the first failed round in the window (ticket holders and those a probe
        or a finding sat out, not the newcomers that sat it out) and the ticket holders of the last
        round before it that published, while the window holds an incident
        (:data:`MIN_FAILED_ROUNDS` failed rounds or more); None otherwise. (The first failed round
        alone is not enough: stallers back first from a round they broke can close the next one with
        only their own work in it, and everyone else would be a newcomer, whose failed rounds do not
        count.)"""
        failed = self.failed_rounds(closing)
        if self.window == 0 or len(failed) < MIN_FAILED_ROUNDS:
            return None
        before = [r for r in self.members if r < failed[0] and r in self.published_rounds]
        return self.members[failed[0]] | (self.holders[max(before)] if before else frozenset())

    def suspects(self, closing: int) -> tuple[list[int], frozenset[str]]:
        """(the failed rounds that count, the nodes that held a ticket in every one of them). Only the
        failed rounds whose ticket holders were all incumbents count: a round a newcomer held a
        ticket in may have been its doing, and must not clear the incumbent that did the others.
        Nor do rounds a node found (and still sitting out) held a ticket in: they are explained, and
        the rest point at a second staller. No suspects without an incident."""
        incumbents = self.incumbents(closing)
        if incumbents is None:
            return self.failed_rounds(closing), frozenset()
        explained = {n for n, until in self.sits_out_until.items() if until > closing}
        counted = [r for r in self.failed_rounds(closing)
                   if self.holders[r] <= incumbents and not self.holders[r] & explained]
        return counted, frozenset.intersection(*(self.holders[r] for r in counted)) if counted else frozenset()

    def bench_of(self, round_index: int) -> frozenset[str]:
        """Who a probe or a finding sat out of round ``round_index`` (newcomers not counted)."""
        return self.members[round_index] - self.holders[round_index]

    def cleared_by_absence(self, node: str, closing: int, failed: list[int]) -> bool:
        """Whether a round of this incident that ``node`` sat out, with no one else but nodes found,
        published: the others did fine without it. (Sitting out in a group that published clears
        nobody in particular.)"""
        return bool(failed) and any(
            failed[0] <= r < closing and r in self.published_rounds and node in self.bench_of(r)
            and self.bench_of(r) - {node} <= set(self.found) for r in self.holders)

    def last_good_group(self, closing: int) -> frozenset[str]:
        """The nodes sat out of the latest round in the window that published with two or more sat out
        (empty if none): a group probe that worked, tried first again."""
        for r in sorted(self.holders, reverse=True):
            if closing - self.window <= r < closing and r in self.published_rounds and len(self.bench_of(r)) >= 2:
                return self.bench_of(r)
        return frozenset()

    def group_probe(self, closing: int, weights: Mapping[str, float], out: Mapping[str, str]) -> frozenset[str]:
        """The group to sit out of round ``closing`` when single probes have nobody left (empty: none).

        Every failed round held a staller; all the stallers sitting out at once, the round publishes.
        So a group can hold them all only if it meets every counted failed round's ticket holders and
        is not contained in the group a failed round sat out. Of those, the last group that published
        comes first (held while it keeps publishing), then the largest groups the quorum allows, in an
        order drawn from the round index (a group a failed round sat out never fits again, so the
        order only decides which of the remaining groups comes first)."""
        incumbents = self.incumbents(closing)
        if incumbents is None:
            return frozenset()
        counted, _ = self.suspects(closing)
        pool = [n for n in sorted(weights) if n in incumbents and n not in out]
        total = math.fsum(float(weights[n]) for n in sorted(weights))
        failed_benches = [self.bench_of(r) for r in counted]

        def within_quorum(group) -> bool:
            staying = math.fsum(float(weights[n]) for n in sorted(weights) if n not in out and n not in group)
            return staying > self.quorum * total

        def fits(group: frozenset[str]) -> bool:
            return (within_quorum(group) and all(group & self.holders[r] for r in counted)
                    and not any(group <= bench for bench in failed_benches))

        last = self.last_good_group(closing) - set(out)
        if last and last <= set(pool) and fits(last):
            return last
        order = sorted(pool, key=lambda n: hashlib.sha256(f"{closing}:{n}".encode()).digest())
        # the largest size the quorum can allow: that many of the pool's lightest nodes sitting out
        lightest = sorted(pool, key=lambda n: (float(weights[n]), n))
        largest = next((k for k in range(len(pool) - 1, 1, -1) if within_quorum(set(lightest[:k]))), 0)
        tried = 0
        for size in range(largest, 1, -1):
            for group in itertools.combinations(order, size):
                tried += 1
                if tried > MAX_GROUPS_TRIED:
                    return frozenset()
                if fits(frozenset(group)):
                    return frozenset(group)
        return frozenset()

    def _settle(self, closing: int) -> None:
        """The finding at the close of round ``closing``, made once: a lone suspect not already
        sitting out, once a round of the incident published without it (:meth:`cleared_by_absence`),
        is found and sits out ``window * 2**k`` rounds (k: times found before)."""
        if closing <= self._settled:
            return
        self._settled = closing
        failed, suspects = self.suspects(closing)
        if len(suspects) != 1:
            return
        (node,) = suspects
        if self.sits_out_until.get(node, -1) > closing or not self.cleared_by_absence(node, closing, failed):
            return
        times = self.found.get(node, 0)
        self.found[node] = times + 1
        self.sits_out_until[node] = closing + self.window * 2 ** times
        self.reasons[node] = (f"held a ticket in every round that published nothing in the last {self.window} "
                              f"({', '.join(map(str, failed))}); found {times + 1} time(s), sits out rounds "
                              f"{closing}-{self.sits_out_until[node] - 1}")

    def benched(self, closing: int, weights: Mapping[str, float]) -> dict[str, str]:
        """Who sits out round ``closing`` (node -> reason) among its participants (``weights``: each
        participant's share of the round's accepted work)."""
        self._settle(closing)
        total = math.fsum(float(weights[n]) for n in sorted(weights))
        out: dict[str, str] = {}

        def sit_out(who: Mapping[str, str]) -> None:  # only while the rest could still publish without them
            staying = math.fsum(float(weights[n]) for n in sorted(weights) if n not in out and n not in who)
            if who and staying > self.quorum * total:
                out.update(who)

        found = {n: self.reasons[n] for n in sorted(weights) if self.sits_out_until.get(n, -1) > closing}
        sit_out(found)
        incumbents = self.incumbents(closing)
        if incumbents is not None:
            first = self.failed_rounds(closing)[0]
            sit_out({n: f"took no part in round {first}, the first of the last {self.window} that published "
                        f"nothing: a node new to the rounds sits out while they fail"
                     for n in sorted(weights) if n not in incumbents and n not in out})
        counted, suspects = self.suspects(closing)
        if counted:  # failed rounds that no node sitting out as found explains
            present = sorted((suspects & set(weights)) - set(out))
            last = self.last_good_group(closing) - set(out)
            group = self.group_probe(closing, weights, out) if not present or last else frozenset()
            if group and (not present or group == last):
                why = ("sits out again with the group that published without it" if group == last else
                       "in a group that may hold every staller (single probes left nobody)")
                sit_out({n: f"{why}: {len(group)} nodes; rounds that published nothing in the last {self.window}: "
                            f"{', '.join(map(str, counted))}" for n in sorted(group)})
            elif present:
                probe = min(present, key=lambda n: (self.last_out.get(n, -1), n))
                sit_out({probe: f"one of {len(present)} nodes that held a ticket in every round that published "
                                f"nothing in the last {self.window} ({', '.join(map(str, counted))}), sitting out "
                                f"in turn"})
        return out
