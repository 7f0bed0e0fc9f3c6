"""The swarm's peers as the coordinator sees them: announced addresses, reports against peers, and
the rule that bans a peer by reports.

One implementation, used by the coordinator's :class:`~.recorder.RunRecorder` (live),
:func:`~.recorder.restore_state` (after a restart) and the offline audit (:mod:`.audit`), so the
three cannot disagree about a log.

**Addresses.** Nodes report the libp2p multiaddrs their averaging DHT announces (Register and
Heartbeat); the coordinator keeps them and hands every node the addresses of the live peers, so
peers find each other without the coordinator running libp2p. :func:`check_multiaddrs` is a light
syntactic check (hivemind is not a coordinator dependency): at most :data:`MAX_MULTIADDRS`, each at
most :data:`MAX_MULTIADDR_CHARS` printable ASCII characters, "/"-separated non-empty components,
at least one before the final ``/p2p/<peer id>`` — and that peer id must be the node's own (the
libp2p id of its Ed25519 node key, :mod:`.identity`), so that no node can announce addresses under
another's identity — and no UDP transport (:data:`UDP_TRANSPORTS`: averaging streams lose their
ends over QUIC).

**Listing.** The addresses handed out (at most :data:`MAX_PEERS` per reply, live peers only) put
the peers with verified work first: those with accepted proofs in the open round, then the
participants of closed rounds, most recent round first (:meth:`PeerReports.recent_participants`);
only then the others, most recently seen first. Fresh keys cost nothing, so a list of the newest
peers alone could be filled by many keys announcing dead addresses, leaving a joiner nobody to
reach; a place ahead of them costs accepted, spot-checked work in a recent round. Those peers are
marked ``verified``: nodes dial only them once there are any (``node/swarm/peer_dialing.py``), since
every dead address dialled costs a dial's timeout.

**Reports.** After round r closes, its participants (``round_closed`` participants: accepted work,
not voided, not banned) average their gradients. A member that excludes another from that average
reports it (ReportPeer: the round, the peer, a reason, evidence). The rule
(:class:`PeerReports`):

* only a participant of round r may report for round r (others: ``PERMISSION_DENIED``, not
  counted, not logged), r must be closed, and the reported peer must be another participant of r
  (``FAILED_PRECONDITION`` / ``INVALID_ARGUMENT``, not logged);
* each (reporter, round, peer) is logged once (``peer_reported``, with the reporter's signed
  envelope, so the audit can check who reported); a repeat is answered, not logged again;
* the peer is banned (``node_banned`` with ``"by": "reports"``, the round and the reporters, the
  evidence index being the report that tipped it, logged right after that report) as soon as, for
  some closed round r it took part in, the participants of round r (not banned) that reported it —
  for round r or any round within :data:`REPORT_WINDOW_ROUNDS` of it, before or after — are **more
  than half of round r's other participants** (:meth:`PeerReports.decisive_tally`), and at least :data:`MIN_REPORTS_TO_BAN`: with n participants,
  max(2, ⌊(n − 1) / 2⌋ + 1) distinct reporters. 3 participants: 2 reporters ban the third, 1 does
  not; a round of 2 cannot ban by reports (one word against another: operators can). Each reporter
  counts once however often it reports. The window exists because members report only what they
  caught themselves (never another member's accusation, or one hostile member's word would become
  everybody's), and the first catch aborts the attempt, which can stop the others from seeing the
  same parts: a peer that misbehaves round after round is caught first-hand by different members
  in different rounds. Reporters banned since no longer count;
* except when every report in that majority says the peer withheld its share-audit reveal
  (:data:`WITHHELD_REASON`: silent between its reduction and its reveal, where an honest node that
  crashes looks the same as a reducer that learned the seed would catch it): such a majority is a
  *strike*, and the peer is banned at the run's ``withheld_audit_strikes``-th strike within
  :data:`STRIKE_WINDOW_ROUNDS` rounds (1: at once; the reports of a strike that did not ban stop
  counting, so each strike is its own majority). A crash in that window is forgiven once in a while;
  a reducer that falls silent whenever the rows would catch it is banned at its second time;
* a node unbanned by the operator starts afresh: the reports against it made before the unban no
  longer count.

What it costs an attacker: banning an honest node takes reports from more than half of the other
participants of one round — distinct nodes that did accepted, spot-checked work in that round. Fresh
keys (sybils) are not participants of any round and cannot report at all.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .errors import ProtocolError, ReasonCode
from .identity import base58_encode, peer_id_from_public_key

# multiaddr components of the UDP transports (QUIC, WebTransport, WebRTC): refused, the averaging
# cannot run over them (bench/RESULTS.md, session 38)
UDP_TRANSPORTS = frozenset({"udp", "quic", "quic-v1", "webtransport", "webrtc", "webrtc-direct"})
MAX_MULTIADDRS = 8
MAX_MULTIADDR_CHARS = 256
MAX_PEERS = 32  # addresses handed out per reply
PREFERRED_CANDIDATES = 4 * MAX_PEERS  # peers with verified work looked up per reply (some may be silent)
PEER_TTL_INTERVALS = 3  # a peer is live when seen within this many heartbeat intervals
MAX_REPORT_REASON_CHARS = 256
MAX_REPORT_EVIDENCE_BYTES = 64 * 1024
MAX_ADMIN_REASON_CHARS = 256

# status names of refusals (the gRPC status the coordinator answers with)
INVALID_ARGUMENT = "INVALID_ARGUMENT"
PERMISSION_DENIED = "PERMISSION_DENIED"
FAILED_PRECONDITION = "FAILED_PRECONDITION"

_COMPONENT = re.compile(r"[A-Za-z0-9._~:%+\-=@,\[\]]+\Z")
_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]+\Z")
_NODE_ID = re.compile(r"[0-9a-f]{32}\Z")

IsBanned = Callable[[str], bool]


def peer_id_of(public_key: bytes) -> str:
    """The base58 libp2p peer id (``12D3KooW...``) of a node's Ed25519 public key."""
    return base58_encode(peer_id_from_public_key(bytes(public_key)))


def udp_transport(maddr: str) -> str | None:
    """The first component of ``maddr`` that names a UDP transport (None: there is none)."""
    return next((p for p in str(maddr).split("/") if p in UDP_TRANSPORTS), None)


def check_multiaddrs(addrs: Sequence[str], public_key: bytes) -> list[str]:
    """``addrs`` as announced by the node with ``public_key``, duplicates dropped (first kept);
    ProtocolError(MALFORMED) naming the first bad one."""
    addrs = list(addrs)
    if len(addrs) > MAX_MULTIADDRS:
        raise ProtocolError(ReasonCode.MALFORMED, f"{len(addrs)} multiaddrs, at most {MAX_MULTIADDRS}")
    own = peer_id_of(public_key)
    out: list[str] = []
    for i, a in enumerate(addrs):
        what = f"multiaddrs[{i}]"
        if not isinstance(a, str) or not a:
            raise ProtocolError(ReasonCode.MALFORMED, f"{what} is empty")
        if len(a) > MAX_MULTIADDR_CHARS:
            raise ProtocolError(ReasonCode.MALFORMED, f"{what} is longer than {MAX_MULTIADDR_CHARS} characters")
        if not a.startswith("/"):
            raise ProtocolError(ReasonCode.MALFORMED, f"{what} {a[:64]!r} does not start with '/'")
        parts = a[1:].split("/")
        bad = next((p for p in parts if not _COMPONENT.match(p)), None)
        if bad is not None:
            raise ProtocolError(ReasonCode.MALFORMED, f"{what} {a[:64]!r} has an empty or invalid component {bad[:32]!r}")
        if len(parts) < 3 or parts[-2] != "p2p" or not _BASE58.match(parts[-1]):
            raise ProtocolError(ReasonCode.MALFORMED, f"{what} {a[:64]!r} must be an address followed by "
                                                      "/p2p/<peer id>")
        udp = udp_transport(a)
        if udp is not None:
            raise ProtocolError(ReasonCode.MALFORMED, f"{what} {a[:64]!r} uses a UDP transport ({udp}): the swarm "
                                                      "averages over TCP only (hivemind's p2p daemon loses the "
                                                      "ends of long streams over QUIC)")
        if parts[-1] != own:
            raise ProtocolError(ReasonCode.MALFORMED, f"{what} names peer {parts[-1][:16]}..., not this node's "
                                                      f"own peer id {own}")
        if a not in out:
            out.append(a)
    return out


def is_node_id(value: object) -> bool:
    return isinstance(value, str) and bool(_NODE_ID.match(value))


class ReportRefused(Exception):
    """The rule refuses a report; ``status`` is the gRPC status name to answer with."""

    def __init__(self, status: str, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class ReportTally:
    round: int
    peer: str
    reporters: tuple[str, ...]  # participants of the round, not banned, that reported the peer (sorted)
    # for this round or one within REPORT_WINDOW_ROUNDS of it
    others: int  # the round's participants other than the peer
    needed: int  # reports that ban: more than half of ``others``
    withheld_only: bool = False  # every counted report is for a withheld audit reveal: a strike, not a ban
    strikes: tuple[int, ...] = ()  # earlier strikes' rounds within STRIKE_WINDOW_ROUNDS
    strikes_to_ban: int = 1

    @property
    def reported(self) -> bool:
        """Reporters enough for a majority (a ban, or with ``withheld_only`` a strike)."""
        return len(self.reporters) >= self.needed

    @property
    def majority(self) -> bool:
        """Whether the tally bans the peer."""
        return self.reported and (not self.withheld_only or len(self.strikes) + 1 >= self.strikes_to_ban)


# reports count for a round from this many rounds before or after it: members catch a peer first-hand
# (nobody reports another's accusation), and an abort can stop the second from seeing what the first saw
REPORT_WINDOW_ROUNDS = 8
MIN_REPORTS_TO_BAN = 2  # one accuser alone never bans: in a round of two it would be one word against another
WITHHELD_REASON = "AUDIT_WITHHELD"  # how a report for a withheld share-audit reveal starts (node/swarm/reasons.py)
STRIKE_WINDOW_ROUNDS = 100  # strikes (majorities of withheld-reveal reports) count this many rounds (between
# the rounds their tallies name: the first of the report window with a majority)


def reports_needed(participants: int) -> int:
    """Reports that ban a participant of a round of ``participants``: more than half of the others,
    and never fewer than :data:`MIN_REPORTS_TO_BAN` (a round of 2 cannot ban by reports: operators can)."""
    return max(MIN_REPORTS_TO_BAN, (participants - 1) // 2 + 1)


class PeerReports:
    """The participants of every closed round and the reports logged against them. Feed it round
    closes, reports and unbans in log order."""

    def __init__(self, withheld_audit_strikes: int = 1) -> None:
        self.participants: dict[int, frozenset[str]] = {}
        self.reports: dict[tuple[int, str], dict[str, int]] = {}  # (round, peer) -> reporter -> log index
        self.logged: dict[tuple[int, str], dict[str, int]] = {}  # the same, never cleared by a strike
        self.withheld: set[tuple[int, str, str]] = set()  # (round, peer, reporter) of withheld-reveal reports
        self.last_round: dict[str, int] = {}  # node -> the last closed round it took part in
        self.withheld_audit_strikes = withheld_audit_strikes  # the run's (RunSpec): strikes that ban
        self.strikes: dict[str, list[int]] = {}  # peer -> rounds of its strikes (not yet banned for)

    # -- what the log records
    def round_closed(self, round_index: int, participants: Iterable[str]) -> None:
        self.participants[int(round_index)] = frozenset(str(n) for n in participants)
        for n in self.participants[int(round_index)]:
            self.last_round[n] = max(int(round_index), self.last_round.get(n, -1))

    def record(self, reporter: str, round_index: int, peer: str, log_index: int, reason: str = "") -> None:
        self.reports.setdefault((round_index, peer), {}).setdefault(reporter, log_index)
        self.logged.setdefault((round_index, peer), {}).setdefault(reporter, log_index)
        if str(reason).startswith(WITHHELD_REASON):
            self.withheld.add((round_index, peer, reporter))

    def after_report(self, round_index: int, peer: str, is_banned: IsBanned) -> ReportTally:
        """Right after :meth:`record` (live, on restore and in the audit alike): the
        :meth:`decisive_tally`; a majority of withheld-reveal reports that does not ban is a strike,
        kept, and its reports stop counting (the next strike takes a majority of its own)."""
        tally = self.decisive_tally(round_index, peer, is_banned)
        if tally.withheld_only and tally.reported and not tally.majority and not is_banned(peer):
            self.strikes.setdefault(peer, []).append(tally.round)
            for r in range(tally.round - REPORT_WINDOW_ROUNDS + 1, tally.round + REPORT_WINDOW_ROUNDS):
                self.reports.pop((r, peer), None)
        return tally

    def unbanned(self, node_id: str) -> None:
        """The operator's pardon: reports against ``node_id`` made so far no longer count, nor do its strikes."""
        for key in [k for k in self.reports if k[1] == node_id]:
            del self.reports[key]
        self.strikes.pop(node_id, None)

    def recent_participants(self, limit: int) -> list[str]:
        """At most ``limit`` nodes that took part in a closed round, the most recent round first (node id
        order within a round): who the coordinator lists first (see **Listing** above)."""
        return [n for _, n in heapq.nsmallest(limit, ((-r, n) for n, r in self.last_round.items()))]

    # -- the rule
    def check(self, reporter: str, round_index: int, peer: str) -> None:
        """ReportRefused unless ``reporter`` may report ``peer`` for ``round_index``."""
        if not is_node_id(peer):
            raise ReportRefused(INVALID_ARGUMENT, f"peer_node_id {str(peer)[:40]!r} is not a node id (32 hex digits)")
        if peer == reporter:
            raise ReportRefused(INVALID_ARGUMENT, "a node cannot report itself")
        members = self.participants.get(round_index)
        if members is None:
            raise ReportRefused(FAILED_PRECONDITION, f"round {round_index} has not closed: only the members of a "
                                                     "closed round's averaging can report for it")
        if reporter not in members:
            raise ReportRefused(PERMISSION_DENIED, f"node {reporter} is not a participant of round {round_index}: "
                                                   "only its participants may report for it")
        if peer not in members:
            raise ReportRefused(FAILED_PRECONDITION, f"node {peer} is not a participant of round {round_index}")

    def reported(self, reporter: str, round_index: int, peer: str) -> int | None:
        """The log index of ``reporter``'s report of ``peer`` for ``round_index``, None if none."""
        return self.logged.get((round_index, peer), {}).get(reporter)

    def tally(self, round_index: int, peer: str, is_banned: IsBanned) -> ReportTally:
        """Round ``round_index``'s participants (not banned) that reported ``peer`` for any round
        within :data:`REPORT_WINDOW_ROUNDS` of it, before or after."""
        members = self.participants.get(round_index, frozenset())
        others = members - {peer}
        reporters: set[str] = set()
        withheld_only = True
        for r in range(round_index - REPORT_WINDOW_ROUNDS + 1, round_index + REPORT_WINDOW_ROUNDS):
            for n in self.reports.get((r, peer), {}):
                if n in others and not is_banned(n):
                    reporters.add(n)
                    withheld_only = withheld_only and (r, peer, n) in self.withheld
        strikes = tuple(r for r in self.strikes.get(peer, ()) if round_index - r < STRIKE_WINDOW_ROUNDS)
        return ReportTally(round_index, peer, tuple(sorted(reporters)), len(others), reports_needed(len(others) + 1),
                           withheld_only=withheld_only and bool(reporters), strikes=strikes,
                           strikes_to_ban=self.withheld_audit_strikes)

    def decisive_tally(self, round_index: int, peer: str, is_banned: IsBanned) -> ReportTally:
        """After a report for ``round_index``: the first closed round within the window (its report
        may complete another round's majority) whose tally bans ``peer``, else ``round_index``'s tally."""
        for r in range(round_index - REPORT_WINDOW_ROUNDS + 1, round_index + REPORT_WINDOW_ROUNDS):
            if r in self.participants and peer in self.participants[r]:
                tally = self.tally(r, peer, is_banned)
                if tally.majority:
                    return tally
        return self.tally(round_index, peer, is_banned)


def ban_payload(tally: ReportTally, evidence_index: int) -> dict:
    """The ``node_banned`` payload of a ban by reports."""
    out = {"node_id": tally.peer, "reason": f"reported by {len(tally.reporters)} of the {tally.others} other "
                                            f"participants of round {tally.round} (for rounds within "
                                            f"{REPORT_WINDOW_ROUNDS} of it: {', '.join(tally.reporters)})",
           "evidence_index": evidence_index, "by": "reports", "round": tally.round,
           "reporters": list(tally.reporters)}
    if tally.withheld_only and tally.strikes:
        out["reason"] = (f"withheld its share-audit reveal: {out['reason']}, after withholding it in round(s) "
                         f"{', '.join(map(str, tally.strikes))} too")
        out["strikes"] = list(tally.strikes)
    return out
