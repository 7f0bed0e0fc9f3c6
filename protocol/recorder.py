"""The coordinator's logging verifier: :class:`RunRecorder` verifies proofs and writes what it does
to a protocol log; :func:`restore_state` rebuilds its state from that log after a restart.

Spot-check salts: the verifier draws a secret 32-byte salt per round and logs ``SHA-256(salt)``
before the round (run_started for round 0, ``next_spot_check_commitment`` of the previous
round_closed after that); round_closed reveals it. Proofs verified during round ``r`` are
selected with round ``r``'s salt (:func:`.verify.spot_check_selected`), so the selection can be
replayed once the round is closed. A run started with a null commitment uses the empty salt.

Snapshot publication follows :mod:`.publication`: :meth:`RunRecorder.report_hash` logs each new or
changed parameter-hash report (``hash_reported``, with the reporter's weight in the producing
round), :meth:`RunRecorder.publish_snapshot` refuses a version > 0 without a quorum of them, and
:meth:`RunRecorder.refuse_upload` logs an upload the rule refused (``upload_refused``).

Round close: ``round_closed`` records each participant's accepted samples and completion tokens
(``samples``, ``tokens``) and the version current at the close; :attr:`RunRecorder.final_tickets`
holds the final admission ticket of each participant of the last closed round, derived from that
entry alone (:func:`final_ticket`), so a restarted recorder signs the very same tickets again.

Peers (:mod:`.peers`): :meth:`RunRecorder.report_peer` logs a round participant's report against
another (``peer_reported``) and bans the peer right after the report that gives it a majority of
its round's other participants; :meth:`RunRecorder.unban` lifts a ban (``node_unbanned``).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from typing import Callable, Iterable, Mapping, Sequence

from . import grpo_swarm_pb2 as pb
from .errors import ProtocolError
from .identity import PUBLIC_KEY_SIZE, Identity, node_id_from_public_key
from .log import (
    HASH_REPORTED,
    NODE_BANNED,
    NODE_REGISTERED,
    NODE_UNBANNED,
    PEER_REPORTED,
    PROOFS_ACCEPTED,
    PROOFS_REJECTED,
    ROUND_CLOSED,
    ROUND_DISPATCHED,
    RUN_STARTED,
    SNAPSHOT_PUBLISHED,
    UPLOAD_REFUSED,
    ChainChecker,
    LogEntry,
    LogError,
    ProtocolLog,
)
from .payloads import SALT_SIZE, b64, hex_bytes, unb64, accepted_payload, rejected_payload
from .peers import PeerReports, ReportTally, ban_payload
from .proofs import parse_proof
from .publication import Publication, PublicationRefused, Tally, refused_payload
from .rpc import sign_ticket
from .run_spec import AuditHooks, RunSpec
from .stalls import StallRule
from .verify import EVIDENCE_CODES, InMemoryVerifierState, Verdict

RewardProof = pb.RewardProof

# a node's hash reports (and refused uploads) logged per version: an honest node reports once (again
# after a resync); a node that flips its report at every heartbeat would add a log entry each time
MAX_REPORTS_PER_VERSION = 3


class RunRecorder:
    """A verifier that writes what it does to a protocol log (the heart of a coordinator, and what
    the tests drive). Holds the in-memory state and the secret per-round spot-check salts.

    ``on_salt(round, salt)`` is called with each newly drawn secret salt *before* its commitment is
    logged, so a coordinator can store it durably first (and reveal it after a restart);
    :meth:`resume` rebuilds a recorder from an existing log and those stored salts."""

    def __init__(self, log: ProtocolLog, identity: Identity, spec: RunSpec, *, salted: bool = True,
                 hooks: AuditHooks | None = None, urandom: Callable[[int], bytes] = os.urandom,
                 on_salt: Callable[[int, bytes], None] | None = None, _resume: bool = False):
        self.log, self.identity, self._urandom = log, identity, urandom
        self.salted = salted
        self._on_salt = on_salt
        self.round_accepted: Counter[str] = Counter()  # node -> accepted proofs this round
        self.round_tokens: Counter[str] = Counter()  # node -> completion tokens of those proofs
        self.hooks = hooks or AuditHooks()
        self.publication = Publication(spec.publish_quorum)  # replaced by the restored one on resume
        self.peers = PeerReports(spec.withheld_audit_strikes)  # replaced by the restored one on resume
        self.stalls = StallRule(spec.stall_window_rounds, spec.publish_quorum)  # likewise
        self.final_tickets: dict[str, pb.AdmissionTicket] = {}  # node -> its ticket of the last closed round
        self.benched: dict[str, str] = {}  # node -> why it sits out the last closed round (no final ticket)
        self.closed_ms: int | None = None  # when the last round closed (its round_closed entry's time)
        self._logged_for: tuple = (-1, None)  # (current version, producing round) the counts below are for
        self._logged: Counter[tuple[str, str]] = Counter()  # (entry kind, node id) -> entries logged
        if _resume:
            return
        self._salt = self._draw_salt(0)
        spec = RunSpec(**{**spec.__dict__, "spot_check_commitment": hashlib.sha256(self._salt).digest() if salted else None})
        self.spec = spec
        self.state = spec.new_state(self._salt)
        self.verifier = self.hooks.verifier(self.state, spec.policy)
        self.log.append(RUN_STARTED, spec.to_payload(), identity)

    def _draw_salt(self, round_index: int) -> bytes:
        if not self.salted:
            return b""
        salt = self._urandom(SALT_SIZE)
        if self._on_salt is not None:
            self._on_salt(round_index, salt)
        return salt

    @classmethod
    def resume(cls, log: ProtocolLog, identity: Identity, *, salts: Mapping[int, bytes], hooks: AuditHooks | None = None,
               urandom: Callable[[int], bytes] = os.urandom,
               on_salt: Callable[[int, bytes], None] | None = None) -> RunRecorder:
        """A recorder that continues ``log`` (written by ``identity``): the state is rebuilt from its
        entries (:func:`restore_state`, which checks the chain), ``salts`` are the stored secrets.
        LogError when the log is empty, broken or not signed by ``identity``."""
        publication, peers, stalls, round_tokens = Publication(), PeerReports(), StallRule(), Counter()
        spec, state, round_accepted = restore_state(log.entries(), salts, trusted=[identity.public_key_bytes],
                                                    publication=publication, peers=peers, round_tokens=round_tokens,
                                                    stalls=stalls)
        publication.quorum = spec.publish_quorum
        rec = cls(log, identity, spec, salted=spec.spot_check_commitment is not None, hooks=hooks, urandom=urandom,
                  on_salt=on_salt, _resume=True)
        if rec.salted and state.spot_check_salt is None:
            raise LogError(f"the secret spot-check salt of the open round {state.current_round} is not stored")
        rec.spec, rec.state, rec.round_accepted, rec.round_tokens = spec, state, round_accepted, round_tokens
        rec.publication, rec.peers, rec.stalls = publication, peers, stalls
        rec._salt = state.spot_check_salt or b""
        rec.verifier = rec.hooks.verifier(state, spec.policy)
        closed = log.last(ROUND_CLOSED)
        if closed is not None:
            rec._issue_final_tickets(closed)
        last = log.last()
        if last is not None and last.kind == PEER_REPORTED:  # stopped between a deciding report and its ban
            rec._ban_if_reported(last.payload["round"], last.payload["peer_node_id"], last.index)
        return rec

    def register(self, public_key: bytes) -> str:
        node_id = self.state.register(public_key)
        self.log.append(NODE_REGISTERED, {"node_id": node_id, "public_key": bytes(public_key).hex()}, self.identity)
        return node_id

    def publish_snapshot(self, version: int, sha256: bytes, *, uploader: str | None = None) -> LogEntry:
        """Log a new current version. The first one is the run's initial weights; every later one
        must pass :meth:`check_publication` (PublicationRefused, nothing logged, otherwise) and its
        entry records the producing round and the support behind the hash."""
        if not self.state.snapshots:
            payload = {"version": version, "sha256": bytes(sha256).hex()}
        else:
            payload = self.publication.published_payload(version, sha256, uploader, self.state.current_version,
                                                         self.state.is_banned)
        self.state.publish_snapshot(version, sha256)
        entry = self.log.append(SNAPSHOT_PUBLISHED, payload, self.identity)
        self.publication.published()
        self.stalls.published(payload.get("round"))
        return entry

    def report_hash(self, node_id: str, version: int, sha256: bytes,
                    may_log: Callable[[], bool] | None = None) -> LogEntry | None:
        """Record a node's parameter hash for the next version; logs ``hash_reported`` when the
        report is new or changed (None when it repeats). ValueError unless version = current + 1.
        Not recorded (None): a node's changes past MAX_REPORTS_PER_VERSION reports for one version, or
        past its first when it has no weight in the producing round (no say in the tally): a node that
        flipped its report at every heartbeat added a log entry each time, and keys are free."""
        st, pub = self.state, self.publication
        if not self._may_log(HASH_REPORTED, node_id):
            return None
        if may_log is not None and pub.reports.get(node_id) != (version, bytes(sha256)) and not may_log():
            return None  # (asked only for what would be logged: a repeat is not)
        payload = pub.report(node_id, version, sha256, st.current_version, st.is_banned)
        if payload is None:
            return None
        return self._log_counted(HASH_REPORTED, node_id, payload)

    def _may_log(self, kind: str, node_id: str) -> bool:
        """Whether another of ``node_id``'s ``kind`` entries may be logged while this version is current
        and this round the producing one: MAX_REPORTS_PER_VERSION for a node with weight in that round,
        1 for one without (no say in the tally), so that a key's requests cannot write at their rate."""
        pub = self.publication
        if (self.state.current_version, pub.round) != self._logged_for:  # (a publication or a close: afresh)
            self._logged_for, self._logged = (self.state.current_version, pub.round), Counter()
        weighted = pub.weight_of(node_id, self.state.is_banned) > 0
        return self._logged[(kind, node_id)] < (MAX_REPORTS_PER_VERSION if weighted else 1)

    def _log_counted(self, kind: str, node_id: str, payload: dict) -> LogEntry:
        self._logged[(kind, node_id)] += 1
        return self.log.append(kind, payload, self.identity)

    def check_publication(self, version: int, sha256: bytes, uploader: str | None) -> Tally:
        """The tally when ``uploader`` may publish ``sha256`` as ``version`` now; PublicationRefused otherwise."""
        return self.publication.check(version, sha256, uploader, self.state.current_version, self.state.is_banned)

    def refuse_upload(self, node_id: str, version: int, sha256: bytes, refusal: PublicationRefused,
                      may_log: Callable[[], bool] | None = None) -> LogEntry | None:
        """Log an upload the publication rule refused, with its reason and the support it had; as hash
        reports are (:meth:`_may_log`), at most 3 of a node's refusals while a version is current, 1 of
        a node without weight (None past that): each upload attempt of a fresh key was an entry, ~300 a
        second from one client."""
        if not self._may_log(UPLOAD_REFUSED, node_id) or (may_log is not None and not may_log()):
            return None
        return self._log_counted(UPLOAD_REFUSED, node_id, refused_payload(node_id, version, sha256, refusal))

    def ban(self, node_id: str, reason: str, evidence_index: int | None = None, *, by: str | None = None) -> LogEntry:
        """Ban ``node_id`` (logged ``node_banned``); ``by`` = "operator" for an operator's ban."""
        payload = {"node_id": node_id, "reason": reason, "evidence_index": evidence_index}
        if by is not None:
            payload["by"] = by
        return self._ban(payload)

    def _ban(self, payload: dict) -> LogEntry:
        entry = self.log.append(NODE_BANNED, payload, self.identity)
        self.state.ban(payload["node_id"], payload["reason"])
        return entry

    def unban(self, node_id: str, reason: str = "") -> LogEntry:
        """Lift a ban (logged ``node_unbanned``). The reports against the node made so far stop
        counting; its failed-check count stays (its next failure past the limit bans it again)."""
        if not self.state.is_banned(node_id):
            raise ValueError(f"node {node_id} is not banned")
        entry = self.log.append(NODE_UNBANNED, {"node_id": node_id, "reason": reason, "by": "operator"}, self.identity)
        self.state.banned.discard(node_id)
        self.peers.unbanned(node_id)
        return entry

    def report_peer(self, reporter: str, report: pb.PeerReport,
                    envelope: pb.SignedEnvelope) -> tuple[int, ReportTally, bool]:
        """A participant's report against another participant of a closed round (:mod:`.peers`):
        logged once (``peer_reported``, with the signed ``envelope`` it came in), and the peer banned
        right after the report that gives it a majority. Returns (log index of the report, the tally,
        whether this call repeated an earlier report). ReportRefused (nothing logged) when the rule
        refuses it."""
        r, peer = report.round_index, report.peer_node_id
        self.peers.check(reporter, r, peer)
        earlier = self.peers.reported(reporter, r, peer)
        if earlier is not None:
            return earlier, self.peers.tally(r, peer, self.state.is_banned), True
        entry = self.log.append(PEER_REPORTED, {"node_id": reporter, "round": r, "peer_node_id": peer,
                                                "reason": report.reason,
                                                "envelope": b64(envelope.SerializeToString())}, self.identity)
        self.peers.record(reporter, r, peer, entry.index, report.reason)
        return entry.index, self._ban_if_reported(r, peer, entry.index), False

    def _ban_if_reported(self, round_index: int, peer: str, report_index: int) -> ReportTally:
        tally = self.peers.after_report(round_index, peer, self.state.is_banned)
        if tally.majority and not self.state.is_banned(peer):
            self._ban(ban_payload(tally, report_index))
        return tally

    def dispatch(self, node_id: str, round_index: int, version: int) -> int:
        """Bind the version ``node_id`` must sample round ``round_index`` with (its first Heartbeat in
        the round); logged once. Returns the bound version."""
        bound = self.state.dispatched_version(node_id, round_index)
        if bound is None:
            self.state.record_dispatch(node_id, round_index, version)
            self.log.append(ROUND_DISPATCHED, {"node_id": node_id, "round": round_index, "version": version},
                            self.identity)
            bound = version
        return bound

    def _record(self, proofs: Sequence[RewardProof], verdict: Verdict, now_ms: int | None) -> LogEntry:
        if verdict.accepted:
            node_id = node_id_from_public_key(proofs[0].node_public_key)
            entry = self.log.append(PROOFS_ACCEPTED, accepted_payload(proofs, verdict), self.identity, time_ms=now_ms)
            self.round_accepted[node_id] += len(proofs)
            self.round_tokens[node_id] += sum(p.num_completion_tokens for p in proofs)
            return entry
        entry = self.log.append(PROOFS_REJECTED, rejected_payload(verdict, proofs=proofs), self.identity, time_ms=now_ms)
        if verdict.code in EVIDENCE_CODES:  # the verifier burned the group and voided the round
            self._penalise(node_id_from_public_key(proofs[0].node_public_key), entry.index)
        return entry

    def _penalise(self, node_id: str, evidence_index: int) -> None:
        """A failed check voids the node's admission count for this round; enough of them ban it."""
        self.round_accepted.pop(node_id, None)
        self.round_tokens.pop(node_id, None)
        limit = self.spec.policy.ban_after_failures
        failures = self.state.failures.get(node_id, 0)
        if limit and failures >= limit and not self.state.is_banned(node_id):
            self.ban(node_id, f"{failures} failed checks (ban_after_failures = {limit})", evidence_index)

    def submit(self, proofs: Sequence[RewardProof], *, now_ms: int | None = None) -> list[Verdict]:
        """Verify proofs (any number of groups) and log one accepted/rejected entry per group."""
        return [verdict for _, verdict, _ in self.submit_logged(proofs, now_ms=now_ms)]

    def submit_logged(self, proofs: Sequence[RewardProof], *,
                      now_ms: int | None = None) -> list[tuple[list[RewardProof], Verdict, LogEntry]]:
        """:meth:`submit`, returning each group with its verdict and the log entry recording it."""
        return [(group, verdict, self._record(group, verdict, now_ms))
                for group, verdict in self.verifier.verify_batch(proofs, now_ms=now_ms)]

    def submit_bytes(self, blobs: Sequence[bytes], *, now_ms: int | None = None) -> Verdict:
        """Verify one group received as serialised proofs; unparseable bytes are logged as evidence."""
        for data in blobs:
            try:
                parse_proof(data, verify=False)
            except ProtocolError as e:
                verdict = Verdict.reject(e.code, e.detail)
                self.log.append(PROOFS_REJECTED, rejected_payload(verdict, raw=data), self.identity, time_ms=now_ms)
                return verdict
        proofs = [parse_proof(d, verify=False) for d in blobs]
        verdict = self.verifier.verify_group(proofs, now_ms=now_ms)
        self._record(proofs, verdict, now_ms)
        return verdict

    def close_round(self, weights: Mapping[str, float] | None = None) -> LogEntry:
        """Close the current round: participants = nodes (not banned) with proofs accepted during it
        (and not voided since); weights default to their share of those proofs. Records each
        participant's samples and tokens, issues the final tickets (:attr:`final_tickets`). Reveals
        this round's salt, commits to the next."""
        participants = sorted(n for n in self.round_accepted if not self.state.is_banned(n))
        if weights is None:
            total = sum(self.round_accepted[n] for n in participants)
            weights = {n: self.round_accepted[n] / total for n in participants} if total else {}
        benched = self.stalls.benched(self.state.current_round, weights)
        next_salt = self._draw_salt(self.state.current_round + 1)
        payload = {
            "round": self.state.current_round,
            "participants": participants,
            "weights": dict(weights),
            "samples": {n: self.round_accepted[n] for n in participants},
            "tokens": {n: self.round_tokens[n] for n in participants},
            "version": self.state.current_version,
            "spot_check_salt": self._salt.hex() if self.salted else None,
            "next_spot_check_commitment": hashlib.sha256(next_salt).hexdigest() if self.salted else None,
        }
        if self.stalls.window:
            payload["benched"] = benched
        entry = self.log.append(ROUND_CLOSED, payload, self.identity)
        closed_round(entry.payload, self.publication, self.peers, self.stalls)
        self._salt = next_salt
        self.state.close_round(next_salt)
        self.round_accepted.clear()
        self.round_tokens.clear()
        self._issue_final_tickets(entry)
        return entry

    def _issue_final_tickets(self, entry: LogEntry) -> None:
        """The final tickets of the round ``entry`` (a round_closed) closed; none for an older log's
        entry without samples and tokens."""
        keys = {n: k for k, n in self.state.keys.items()}
        p = entry.payload
        self.benched = dict(p.get("benched") or {})
        self.closed_ms = entry.time_ms
        self.final_tickets = {} if "samples" not in p else {
            n: final_ticket(self.spec.run_id, entry, n, keys[n], self.identity) for n in ticket_holders(p)}


def ticket_holders(round_closed: Mapping) -> list[str]:
    """The participants of a ``round_closed`` payload that get a final ticket: all but those the
    stall rule sat out (``benched``, :mod:`.stalls`)."""
    benched = round_closed.get("benched") or {}
    return [n for n in round_closed["participants"] if n not in benched]


def closed_round(payload: Mapping, publication: Publication | None, peers: PeerReports | None,
                 stalls: StallRule | None) -> None:
    """Feed a ``round_closed`` payload to the rules that follow the log: the publication's producing
    round, the participants who may report each other (those that averaged), the stall rule's
    ticket holders."""
    holders = ticket_holders(payload)
    if publication is not None:
        publication.round_closed(payload["round"], payload["weights"], payload.get("benched") or ())
    if peers is not None:
        peers.round_closed(payload["round"], holders)
    if stalls is not None:
        stalls.round_closed(payload["round"], holders, payload.get("benched") or ())


def final_ticket(run_id: str, entry: LogEntry, node_id: str, public_key: bytes, identity: Identity) -> pb.AdmissionTicket:
    """The final admission ticket of participant ``node_id`` of the round closed by ``entry`` (a
    round_closed with samples, tokens and version): everything in it comes from the entry, so it
    is the same ticket whenever it is made (Ed25519 signatures are deterministic)."""
    p = entry.payload
    return sign_ticket(pb.AdmissionTicket(
        run_id=run_id, round_index=p["round"], node_id=node_id, node_public_key=bytes(public_key),
        accepted_samples=p["samples"][node_id], accepted_tokens=p["tokens"][node_id], policy_version=p["version"],
        time_ms=entry.time_ms, log_index=entry.index, final=True), identity)


def _accepted_proof(text: str, index: int) -> pb.RewardProof:
    """A proof of one of this coordinator's own ``proofs_accepted`` entries (chain and signature
    checked): decoded for its sequence and token count, not validated again — re-validating every
    accepted proof was over half of a restart's replay."""
    try:
        return pb.RewardProof.FromString(unb64(text, "proof"))
    except Exception as e:  # noqa: BLE001 - DecodeError, a bad base64 string: a broken entry
        raise LogError(f"an accepted proof does not decode: {type(e).__name__}", index=index) from None


def restore_state(entries: Iterable[LogEntry], salts: Mapping[int, bytes], *,
                  trusted: Iterable[bytes] | None = None,
                  publication: Publication | None = None, peers: PeerReports | None = None,
                  round_tokens: Counter | None = None,
                  stalls: StallRule | None = None) -> tuple[RunSpec, InMemoryVerifierState, Counter]:
    """The verifier state at the end of a log, without re-verifying proofs (the log is the
    recorder's own; its chain and signatures are checked): (spec, state, accepted proofs per node
    in the open round). ``salts`` maps round -> secret salt. ``publication``, when given, is fed
    the round closes, hash reports and publications (the producing round and its standing reports);
    ``peers`` the round closes, peer reports and unbans; ``stalls`` (set up with the run's window
    and quorum here) the round closes and publications; ``round_tokens`` gets the completion tokens
    per node in the open round. LogError on a broken or empty log."""
    if round_tokens is None:
        round_tokens = Counter()
    checker = ChainChecker(trusted)
    spec: RunSpec | None = None
    state: InMemoryVerifierState | None = None
    round_accepted: Counter[str] = Counter()
    for e in entries:
        problem = checker.feed(e)
        if problem is not None:
            raise LogError(problem.reason, index=problem.index)
        p = e.payload
        if e.kind == RUN_STARTED:
            if spec is not None:
                raise LogError("a second run_started entry", index=e.index)
            spec = RunSpec.from_payload(p)
            state = spec.new_state(salts.get(0) if spec.spot_check_commitment is not None else b"")
            if stalls is not None:
                stalls.window, stalls.quorum = spec.stall_window_rounds, spec.publish_quorum
            if peers is not None:
                peers.withheld_audit_strikes = spec.withheld_audit_strikes
            continue
        if state is None:
            raise LogError(f"{e.kind} before run_started", index=e.index)
        if e.kind == NODE_REGISTERED:
            state.register(hex_bytes(p["public_key"], "public_key", PUBLIC_KEY_SIZE))
        elif e.kind == NODE_BANNED:
            state.ban(p["node_id"], str(p.get("reason", "")))
        elif e.kind == NODE_UNBANNED:
            state.banned.discard(p["node_id"])
            if peers is not None:
                peers.unbanned(p["node_id"])
        elif e.kind == PEER_REPORTED:
            if peers is not None:
                peers.record(p["node_id"], p["round"], p["peer_node_id"], e.index, str(p.get("reason", "")))
                peers.after_report(p["round"], p["peer_node_id"], state.is_banned)
        elif e.kind == SNAPSHOT_PUBLISHED:
            state.publish_snapshot(p["version"], hex_bytes(p["sha256"], "sha256", 32))
            if publication is not None:
                publication.published()
            if stalls is not None:
                stalls.published(p.get("round"))
        elif e.kind == HASH_REPORTED:
            if publication is not None:
                publication.report(p["node_id"], p["version"], hex_bytes(p["sha256"], "sha256", 32),
                                   state.current_version, state.is_banned)
        elif e.kind == PROOFS_ACCEPTED:
            proofs = [_accepted_proof(b, e.index) for b in p["proofs"]]
            state.record_accepted(p["node_id"], p["group_id"], max(q.sequence for q in proofs))
            round_accepted[p["node_id"]] += len(proofs)
            round_tokens[p["node_id"]] += sum(q.num_completion_tokens for q in proofs)
        elif e.kind == PROOFS_REJECTED:
            failed = evidence_failure(p)
            if failed is not None:
                state.record_failure(*failed)
                round_accepted.pop(failed[0], None)
                round_tokens.pop(failed[0], None)
        elif e.kind == ROUND_DISPATCHED:
            state.record_dispatch(p["node_id"], p["round"], p["version"])
        elif e.kind == ROUND_CLOSED:
            salted = spec.spot_check_commitment is not None
            state.close_round(salts.get(state.current_round + 1) if salted else b"")
            round_accepted.clear()
            round_tokens.clear()
            closed_round(p, publication, peers, stalls)
    if spec is None:
        raise LogError("the log has no run_started entry")
    return spec, state, round_accepted



def evidence_failure(payload: Mapping) -> tuple[str, str, int] | None:
    """(node, group, round) of a logged rejection that counts as a failed check (:data:`EVIDENCE_CODES`
    on signed proofs), else None."""
    from .errors import ReasonCode

    if ReasonCode(payload["code"]) not in EVIDENCE_CODES or "proofs" not in payload["evidence"]:
        return None
    first = parse_proof(unb64(payload["evidence"]["proofs"][0], "proof"), verify=False)
    return node_id_from_public_key(first.node_public_key), first.group_id, first.round_index
