"""Auditing a run from its protocol log: replay every verification, per node.

:func:`audit` replays a log: the chain and every signature (:mod:`.log`), then each entry's
meaning, in order, on a fresh :class:`~.verify.InMemoryVerifierState`: accepted groups must be
accepted again (spot-checks too when the hooks have a model), rejected ones rejected again with the
same reason code, registrations / snapshots / rounds / bans consistent. It stops at the first bad
entry. Snapshot publication is replayed with :mod:`.publication`'s rule: every hash report must
carry the weight its reporter had in the producing round, and every snapshot_published after the
first (the initial weights) must be version current + 1 backed by a logged quorum of reports from
that round's participants; a logged refusal must be one the rule makes. A round_closed that
records ``samples`` and ``tokens`` (what the final admission tickets say) must list exactly the
nodes with accepted, unvoided work in the round (not banned), with the samples and completion
tokens their accepted proofs add up to, and the current version. Peer reports are replayed with
:mod:`.peers`' rule: each ``peer_reported`` must carry a report envelope signed by its reporter, a
participant (not banned) of that closed round, against another participant, logged once; a
report that gives the peer a majority of its round's other participants must be followed at once
by its ban (``"by": "reports"``, naming those reporters), and no ban may claim reports without one.
``node_unbanned`` must lift a standing ban. A round_closed's ``benched`` must be whom
:mod:`.stalls`' rule sits out, replayed from the earlier rounds' ticket holders and publications. Checks the
:class:`AuditHooks` cannot do (no reward recomputation, tokenizer or model) are counted as
skipped, never passed silently. :func:`write_report` writes per-node tables and plots.
The log's payloads are described in :mod:`.payloads`; :mod:`.report` writes per-node tables and plots.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from . import grpo_swarm_pb2 as pb
from .errors import ProtocolError, ReasonCode
from .identity import PUBLIC_KEY_SIZE, node_id_from_public_key
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
    read_log,
)
from .payloads import SALT_SIZE, hex_bytes, unb64
from .recorder import closed_round, evidence_failure
from .hygiene import parse_request
from .peers import MAX_REPORT_EVIDENCE_BYTES, MAX_REPORT_REASON_CHARS, PeerReports, ReportRefused, ban_payload
from .proofs import MAX_PROOF_BYTES, check_envelope, parse_envelope, parse_proof
from .rpc import REQUEST_KIND
from .publication import Publication, PublicationRefused
from .run_spec import AuditHooks, RunSpec, load_hooks
from .stalls import StallRule
from .verify import InMemoryVerifierState, Verdict, Verifier

RewardProof = pb.RewardProof

__all__ = ["AuditProblem", "AuditResult", "NodeStats", "Sample", "audit", "load_hooks"]


# ---- replay --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditProblem:
    index: int
    kind: str | None
    reason: str

    def __str__(self) -> str:
        return f"entry {self.index}" + (f" ({self.kind})" if self.kind else "") + f": {self.reason}"


@dataclass
class NodeStats:
    accepted_groups: int = 0
    accepted_samples: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason code -> proofs (raw evidence counts 1)
    reward_sum: float = 0.0
    staleness: list = field(default_factory=list)
    banned: bool = False
    failed_checks: int = 0  # rejections that are evidence (verify.EVIDENCE_CODES)
    benched_rounds: int = 0  # rounds the stall rule sat it out (protocol.stalls)

    @property
    def mean_reward(self) -> float | None:
        return self.reward_sum / self.accepted_samples if self.accepted_samples else None


@dataclass(frozen=True)
class Sample:
    index: int  # log entry
    node_id: str
    version: int
    staleness: int
    reward: float
    round: int


@dataclass
class AuditResult:
    entries: int = 0
    problem: AuditProblem | None = None
    kinds: Counter = field(default_factory=Counter)
    replayed: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    notes: list = field(default_factory=list)
    nodes: dict = field(default_factory=lambda: defaultdict(NodeStats))
    samples: list = field(default_factory=list)
    run: RunSpec | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> dict:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "first_bad_entry": None if self.problem is None else {
                "index": self.problem.index, "kind": self.problem.kind, "reason": self.problem.reason},
            "kinds": dict(self.kinds),
            "replayed": dict(self.replayed),
            "skipped": dict(self.skipped),
            "notes": list(self.notes),
        }


class _Bad(Exception):
    pass


# The order of the verifier's checks (see verify.py), to tell whether a replay that skipped a check
# could have failed later than the live verification did.
_CHECK_RANK = {code: i for i, codes in enumerate((
    (ReasonCode.MALFORMED, ReasonCode.OVERSIZED), (ReasonCode.UNKNOWN_KEY, ReasonCode.BANNED_KEY),
    (ReasonCode.BAD_SIGNATURE,), (ReasonCode.WRONG_RUN,), (ReasonCode.INCOMPLETE_GROUP,),
    (ReasonCode.REPLAYED_SEQUENCE,), (ReasonCode.TIME_SKEW,), (ReasonCode.STALE_VERSION,),
    (ReasonCode.UNASSIGNED_PROMPT,), (ReasonCode.GROUP_BURNED, ReasonCode.TICKET_VOIDED), (ReasonCode.BAD_COMPLETION,),
    (ReasonCode.REWARD_MISMATCH,), (ReasonCode.ADVANTAGE_MISMATCH,),
    (ReasonCode.SPOT_CHECK_FAILED, ReasonCode.SAMPLING_MISMATCH))) for code in codes}

# Which skipped check could explain a logged rejection the replay cannot reproduce.
_CHECKS_FOR_CODE = {
    ReasonCode.REWARD_MISMATCH: ("rewards",),
    ReasonCode.BAD_COMPLETION: ("decode", "termination"),
    ReasonCode.UNASSIGNED_PROMPT: ("prompt_hash",),
    ReasonCode.SPOT_CHECK_FAILED: ("spot_check", "spot_check_selection"),
    ReasonCode.SAMPLING_MISMATCH: ("spot_check", "spot_check_selection", "sampling_check"),
}


def _entry_sources(log: str | os.PathLike | Iterable[LogEntry]) -> Callable[[], Iterable[LogEntry]]:
    if isinstance(log, (str, os.PathLike)):
        return lambda: read_log(log)
    entries = list(log)
    return lambda: iter(entries)


def _revealed_salts(entries: Iterable[LogEntry], trusted) -> dict[int, bytes]:
    """Round -> salt, for rounds whose salt was revealed consistently with its commitment."""
    checker = ChainChecker(trusted)
    salts: dict[int, bytes] = {}
    commitment = None
    try:
        for e in entries:
            if checker.feed(e) is not None:
                break
            p = e.payload
            if e.kind == RUN_STARTED:
                c = p.get("spot_check_commitment")
                if c is None:
                    return {}
                commitment = hex_bytes(c, "commitment", 32)
            elif e.kind == ROUND_CLOSED and commitment is not None:
                salt = hex_bytes(p.get("spot_check_salt"), "salt", SALT_SIZE)
                if hashlib.sha256(salt).digest() != commitment or not isinstance(p.get("round"), int):
                    break
                salts[p["round"]] = salt
                commitment = hex_bytes(p.get("next_spot_check_commitment"), "commitment", 32)
    except (LogError, ValueError):
        pass
    return salts


def audit(log: str | os.PathLike | Iterable[LogEntry], hooks: AuditHooks | None = None, *,
          trusted_signers: Iterable[bytes] | None = None) -> AuditResult:
    """Replay a whole log (a SQLite/JSONL path or entries); the result names the first bad entry."""
    hooks = hooks or AuditHooks()
    trusted = list(trusted_signers) if trusted_signers is not None else None
    source = _entry_sources(log)
    result = AuditResult(notes=list(hooks.notes))
    try:
        salts = _revealed_salts(source(), trusted)
        _Replay(result, hooks, trusted, salts).run(source())
    except LogError as e:
        result.problem = AuditProblem(e.index if e.index is not None else result.entries, None,
                                      e.reason + (f" (line {e.line})" if e.line is not None else ""))
    if result.problem is None and result.entries == 0:
        result.problem = AuditProblem(0, None, "the log has no entries")
    return result


class _Replay:
    def __init__(self, result: AuditResult, hooks: AuditHooks, trusted, salts: dict[int, bytes]):
        self.r, self.hooks, self.salts = result, hooks, salts
        self.checker = ChainChecker(trusted)
        self.spec: RunSpec | None = None
        self.state: InMemoryVerifierState | None = None
        self.verifier: Verifier | None = None
        self.commitment: bytes | None = None
        self.salted = False
        self.snapshot_seen = False
        self.publication = Publication()
        self.peers = PeerReports()
        self.stalls = StallRule(0)
        self.round_samples: Counter = Counter()  # node -> accepted proofs in the open round (voided: dropped)
        self.round_tokens: Counter = Counter()
        self.pending_ban: tuple[Any, int] | None = None  # (tally, report index) a ban by reports must follow
        self.ban_by_reports_due = False

    def run(self, entries: Iterable[LogEntry]) -> None:
        for e in entries:
            problem = self.checker.feed(e)
            if problem is not None:
                self.r.problem = AuditProblem(problem.index, e.kind if e.index == problem.index else None, problem.reason)
                return
            self.r.entries += 1
            self.r.kinds[e.kind] += 1
            try:
                self.ban_by_reports_due = self.ban_follows(e)
                self.apply(e)
            except _Bad as bad:
                self.r.problem = AuditProblem(e.index, e.kind, str(bad))
                return
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                self.r.problem = AuditProblem(e.index, e.kind, f"malformed payload: {type(err).__name__}: {err}")
                return
        if self.pending_ban is not None:  # a live log read between a deciding report and its ban
            tally, index = self.pending_ban
            self.r.notes.append(f"the log ends after entry {index}, which gives node {tally.peer} a majority of "
                                f"reports; its ban should be the next entry")

    def ban_follows(self, e: LogEntry) -> bool:
        """A report that gave its peer a majority must be followed by the peer's ban, at once: True
        when ``e`` is that ban (checked against the replayed reports)."""
        if self.pending_ban is None:
            return False
        tally, index = self.pending_ban
        self.pending_ban = None
        if e.kind != NODE_BANNED or e.payload.get("by") != "reports" or e.payload.get("node_id") != tally.peer:
            raise _Bad(f"entry {index} gave node {tally.peer} reports from {len(tally.reporters)} of the "
                       f"{tally.others} other participants of round {tally.round} ({tally.needed} ban it), "
                       "but its ban does not follow")
        if dict(e.payload) != ban_payload(tally, index):
            raise _Bad(f"the ban by reports does not match the replayed reports: round {tally.round}, "
                       f"reporters {list(tally.reporters)}, evidence index {index}")
        return True

    # -- entries
    def apply(self, e: LogEntry) -> None:
        p = e.payload
        if e.kind == RUN_STARTED:
            self.spec = RunSpec.from_payload(p)
            self.r.run = self.spec
            self.salted = self.spec.spot_check_commitment is not None
            self.commitment = self.spec.spot_check_commitment
            self.state = self.spec.new_state(self.salts.get(0) if self.salted else b"")
            self.verifier = self.hooks.verifier(self.state, self.spec.policy)
            self.publication = Publication(self.spec.publish_quorum)
            self.stalls = StallRule(self.spec.stall_window_rounds, self.spec.publish_quorum)
            self.peers.withheld_audit_strikes = self.spec.withheld_audit_strikes
            return
        st = self.state
        if e.kind == NODE_REGISTERED:
            key = hex_bytes(p["public_key"], "public_key", PUBLIC_KEY_SIZE)
            if node_id_from_public_key(key) != p["node_id"]:
                raise _Bad("node_id is not the hash of the public key")
            if st.node_for_key(key) is not None:
                raise _Bad(f"node {p['node_id']} registered twice")
            st.register(key)
        elif e.kind == NODE_BANNED:
            node_id = p["node_id"]
            if node_id not in st.keys.values():
                raise _Bad(f"banned node {node_id} is not registered")
            if p.get("by") == "reports":
                if not self.ban_by_reports_due:
                    raise _Bad(f"a ban of {node_id} by reports that no majority of its round's reports asked for")
                self.r.replayed["bans_by_reports"] += 1
            st.ban(node_id)
            self.r.nodes[node_id].banned = True
        elif e.kind == NODE_UNBANNED:
            node_id = self._node(p["node_id"])
            if not st.is_banned(node_id):
                raise _Bad(f"unbans node {node_id}, which is not banned")
            st.banned.discard(node_id)
            self.peers.unbanned(node_id)
            self.r.nodes[node_id].banned = False
            self.r.replayed["unbans"] += 1
        elif e.kind == PEER_REPORTED:
            self.peer_reported(e)
        elif e.kind == SNAPSHOT_PUBLISHED:
            version, sha = p["version"], hex_bytes(p["sha256"], "sha256", 32)
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise _Bad("version must be an integer >= 0")
            if self.snapshot_seen and version <= st.current_version:
                raise _Bad(f"snapshot version {version} does not advance the current {st.current_version}")
            if self.snapshot_seen:  # the first one is the initial weights; later ones need a quorum
                self.published_by_quorum(e)
            self.snapshot_seen = True
            st.publish_snapshot(version, sha)
            self.publication.published()
            self.stalls.published(p.get("round"))
        elif e.kind == HASH_REPORTED:
            self.hash_reported(e)
        elif e.kind == UPLOAD_REFUSED:
            self.upload_refused(e)
        elif e.kind == PROOFS_ACCEPTED:
            self.accepted(e)
        elif e.kind == PROOFS_REJECTED:
            self.rejected(e)
        elif e.kind == ROUND_CLOSED:
            self.round_closed(e)
            closed_round(p, self.publication, self.peers, self.stalls)
        elif e.kind == ROUND_DISPATCHED:
            self.dispatched(e)
        else:
            self.r.skipped[f"unknown kind {e.kind}"] += 1

    def _proofs(self, items: Any) -> list[RewardProof]:
        if not isinstance(items, list) or not items:
            raise _Bad("proofs must be a non-empty list")
        return [parse_proof(unb64(b, "proof"), verify=False) for b in items]

    def _count_skipped(self, verdict: Verdict) -> None:
        for name in verdict.skipped:
            self.r.skipped[name] += 1

    def accepted(self, e: LogEntry) -> None:
        p = e.payload
        try:
            proofs = self._proofs(p["proofs"])
        except ProtocolError as err:
            raise _Bad(f"an accepted proof does not parse: {err}") from None
        node_id = node_id_from_public_key(proofs[0].node_public_key) if len(proofs[0].node_public_key) == 32 else None
        if p["node_id"] != node_id or p["group_id"] != proofs[0].group_id:
            raise _Bad("node_id / group_id do not match the proofs")
        selected = self.verifier.spot_check_members(proofs)
        logged = p["spot_checked"]
        verdict = self.verifier.verify_group(proofs, now_ms=e.time_ms, commit=True)
        self._count_skipped(verdict)
        if not verdict.accepted:
            raise _Bad(f"logged as accepted, replay rejects it: {verdict}")
        self.r.replayed["accepted_groups"] += 1
        self.r.replayed["spot_checks"] += len(verdict.spot_checked)
        if selected is not None and sorted(selected) != sorted(logged):
            raise _Bad(f"spot-check selection is {sorted(selected)}, the log says {sorted(logged)} were checked")
        stats = self.r.nodes[node_id]
        stats.accepted_groups += 1
        stats.accepted_samples += len(proofs)
        self.round_samples[node_id] += len(proofs)
        self.round_tokens[node_id] += sum(q.num_completion_tokens for q in proofs)
        cur = self.state.current_version
        for q in proofs:
            stats.reward_sum += q.reward_total
            stats.staleness.append(cur - q.policy.version)
            self.r.samples.append(Sample(e.index, node_id, q.policy.version, cur - q.policy.version, q.reward_total,
                                         q.round_index))

    def rejected(self, e: LogEntry) -> None:
        p = e.payload
        code = ReasonCode(p["code"])
        evidence = p["evidence"]
        if not isinstance(evidence, Mapping):
            raise _Bad("evidence must be an object")
        node_key = p.get("node_id") or "(unknown)"
        if "proofs" in evidence:
            try:
                proofs = self._proofs(evidence["proofs"])
            except ProtocolError as err:
                if err.code != code:
                    raise _Bad(f"logged {code.value}, the evidence gives {err.code.value}: {err.detail}") from None
                self.r.replayed["rejections"] += 1
                self.r.nodes[node_key].rejected[code.value] += len(evidence["proofs"])
                return
            verdict = self.verifier.verify_group(proofs, now_ms=e.time_ms, commit=False)
            self._count_skipped(verdict)
            n = len(proofs)
            if verdict.code != code:
                # a check the replay had to skip may be what failed live; then the replay can only
                # accept, or fail at a later check
                could = _CHECKS_FOR_CODE.get(code, ())
                explained = any(s.split(" ")[0] in could for s in verdict.skipped) and (
                    verdict.accepted or _CHECK_RANK[verdict.code] >= _CHECK_RANK[code])
                if not explained:
                    replay = "accepts it" if verdict.accepted else f"gives {verdict.code.value}: {verdict.detail}"
                    raise _Bad(f"logged as rejected ({code.value}), replay {replay}")
                self.r.skipped[f"rejection {code.value} (unconfirmed)"] += 1
                self.r.nodes[node_key].rejected[code.value] += n
                self._failed_check(p)
                return
            self._failed_check(p)
        else:
            data = unb64(evidence["bytes"], "evidence bytes")
            size = evidence["size"]
            if evidence.get("truncated"):
                if code != ReasonCode.OVERSIZED or not isinstance(size, int) or size <= MAX_PROOF_BYTES:
                    raise _Bad("truncated evidence only stands for OVERSIZED messages")
                self.r.skipped["rejection OVERSIZED (truncated evidence)"] += 1
                self.r.nodes[node_key].rejected[code.value] += 1
                return
            if size != len(data) or hashlib.sha256(data).hexdigest() != evidence["sha256"]:
                raise _Bad("evidence bytes do not match their size / sha256")
            try:
                parse_proof(data, verify=False)
            except ProtocolError as err:
                if err.code != code:
                    raise _Bad(f"logged {code.value}, the evidence gives {err.code.value}") from None
            else:
                raise _Bad(f"logged {code.value}, but the evidence bytes parse as a proof")
            n = 1
        self.r.replayed["rejections"] += 1
        self.r.nodes[node_key].rejected[code.value] += n

    def _failed_check(self, payload: Mapping) -> None:
        """A rejection that is evidence burns the group and voids the node's round, as it did live."""
        failed = evidence_failure(payload)
        if failed is not None:
            self.state.record_failure(*failed)
            self.r.nodes[failed[0]].failed_checks += 1
            self.round_samples.pop(failed[0], None)  # the node's round is voided, as it was live
            self.round_tokens.pop(failed[0], None)

    def dispatched(self, e: LogEntry) -> None:
        p, st = e.payload, self.state
        node_id, r, v = p["node_id"], p["round"], p["version"]
        if node_id not in st.keys.values():
            raise _Bad(f"round dispatched to {node_id}, which is not registered")
        if r != st.current_round:
            raise _Bad(f"round {r} dispatched while round {st.current_round} is open")
        if st.dispatched_version(node_id, r) is not None:
            raise _Bad(f"round {r} dispatched to {node_id} twice")
        if not isinstance(v, int) or v > st.current_version or st.current_version - v > st.max_staleness \
                or v not in st.snapshots:
            raise _Bad(f"dispatched at version {v}, outside the published [{st.current_version - st.max_staleness}, "
                       f"{st.current_version}]")
        st.record_dispatch(node_id, r, v)
        self.r.replayed["dispatches"] += 1

    def round_closed(self, e: LogEntry) -> None:
        p, st = e.payload, self.state
        if p["round"] != st.current_round:
            raise _Bad(f"closes round {p['round']}, the current round is {st.current_round}")
        participants, weights = p["participants"], p["weights"]
        if not isinstance(participants, list) or not isinstance(weights, Mapping):
            raise _Bad("participants must be a list and weights an object")
        registered = set(st.keys.values())
        for n in participants:
            if n not in registered:
                raise _Bad(f"participant {n} is not registered")
            if st.is_banned(n):
                raise _Bad(f"participant {n} is banned")
        if set(weights) != set(participants):
            raise _Bad("weights must name exactly the participants")
        for n, w in weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
                raise _Bad(f"weight of {n} must be a finite number >= 0")
        if "samples" in p or "tokens" in p:  # what the final tickets say: the accepted work, replayed
            expected = sorted(n for n in self.round_samples if not st.is_banned(n))
            if participants != expected:
                raise _Bad(f"participants {participants} are not the nodes with accepted, unvoided work in the "
                           f"round {expected}")
            for name, counted in (("samples", self.round_samples), ("tokens", self.round_tokens)):
                want = {n: counted[n] for n in expected}
                if p.get(name) != want:
                    raise _Bad(f"{name} {p.get(name)} are not what the round's accepted proofs add up to {want}")
            if p.get("version") != st.current_version:
                raise _Bad(f"closed at version {p.get('version')!r}, the current version is {st.current_version}")
            self.r.replayed["final_tickets"] += len(participants)
        benched = p.get("benched", {})
        expected_benched = self.stalls.benched(p["round"], weights)
        if benched != expected_benched:
            raise _Bad(f"benched {benched} is not what the stall rule sits out: {expected_benched}")
        for n in benched:
            self.r.nodes[n].benched_rounds += 1
        self.r.replayed["benched"] += len(benched)
        self.round_samples.clear()
        self.round_tokens.clear()
        next_salt: bytes | None = b""
        if self.salted:
            salt = hex_bytes(p["spot_check_salt"], "spot_check_salt", SALT_SIZE)
            if hashlib.sha256(salt).digest() != self.commitment:
                raise _Bad("revealed spot-check salt does not match its commitment")
            self.commitment = hex_bytes(p["next_spot_check_commitment"], "next_spot_check_commitment", 32)
            next_salt = self.salts.get(st.current_round + 1)
        elif p.get("spot_check_salt") is not None:
            raise _Bad("an unsalted run reveals a salt")
        st.close_round(next_salt)
        self.r.replayed["rounds"] += 1

    # -- peer reports (protocol.peers)
    def peer_reported(self, e: LogEntry) -> None:
        p, st = e.payload, self.state
        reporter = self._node(p["node_id"])
        try:
            env = check_envelope(parse_envelope(unb64(p["envelope"], "envelope")), expected_kind=REQUEST_KIND["ReportPeer"])
            report = parse_request(pb.PeerReport, env.payload)
        except ProtocolError as err:
            raise _Bad(f"the report envelope is not a signed PeerReport: {err}") from None
        if node_id_from_public_key(env.signer_public_key) != reporter:
            raise _Bad(f"the report envelope is signed by {node_id_from_public_key(env.signer_public_key)}, not by "
                       f"the reporter {reporter}")
        if (report.round_index, report.peer_node_id, report.reason) != (p["round"], p["peer_node_id"], p["reason"]):
            raise _Bad("round / peer_node_id / reason differ from the signed report")
        if len(report.reason) > MAX_REPORT_REASON_CHARS or len(report.evidence) > MAX_REPORT_EVIDENCE_BYTES:
            raise _Bad("the report's reason or evidence is over its limit")
        if st.is_banned(reporter):
            raise _Bad(f"a report by {reporter}, which is banned")
        r, peer = report.round_index, report.peer_node_id
        try:
            self.peers.check(reporter, r, peer)
        except ReportRefused as refused:
            raise _Bad(f"a report the rule refuses ({refused.status}): {refused.detail}") from None
        if self.peers.reported(reporter, r, peer) is not None:
            raise _Bad(f"{reporter} already reported {peer} for round {r} (a report is logged once)")
        self.peers.record(reporter, r, peer, e.index, report.reason)
        tally = self.peers.after_report(r, peer, st.is_banned)
        if tally.majority and not st.is_banned(peer):
            self.pending_ban = (tally, e.index)
        self.r.replayed["peer_reports"] += 1

    # -- snapshot publication (protocol.publication)
    def _node(self, node_id: Any) -> str:
        if not isinstance(node_id, str) or node_id not in self.state.keys.values():
            raise _Bad(f"node {node_id!r} is not registered")
        return node_id

    def hash_reported(self, e: LogEntry) -> None:
        p, st = e.payload, self.state
        node_id = self._node(p["node_id"])
        if not self.snapshot_seen:
            raise _Bad("a hash report before the initial snapshot")
        expected = self.publication.report(node_id, p["version"], hex_bytes(p["sha256"], "sha256", 32),
                                           st.current_version, st.is_banned)
        if expected is None:
            raise _Bad(f"repeats node {node_id}'s standing report (only new or changed reports are logged)")
        if dict(p) != expected:
            raise _Bad(f"logged round {p.get('round')!r} weight {p.get('weight')!r}; the replay gives round "
                       f"{expected['round']!r} weight {expected['weight']!r}")
        self.r.replayed["hash_reports"] += 1

    def published_by_quorum(self, e: LogEntry) -> None:
        p, st = e.payload, self.state
        uploader = p.get("uploader")
        if uploader is not None:
            self._node(uploader)
        try:
            expected = self.publication.published_payload(p["version"], hex_bytes(p["sha256"], "sha256", 32), uploader,
                                                          st.current_version, st.is_banned)
        except PublicationRefused as refused:
            raise _Bad(f"published without a quorum of the producing round's reports: {refused}") from None
        if dict(p) != expected:
            diff = sorted(k for k in set(p) | set(expected) if p.get(k) != expected.get(k))
            raise _Bad(f"{', '.join(diff)} differ from the replayed tally of round {expected['round']}")
        self.r.replayed["publications"] += 1

    def upload_refused(self, e: LogEntry) -> None:
        p, st = e.payload, self.state
        node_id = self._node(p["node_id"])
        version = p["version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise _Bad("version must be an integer")
        try:
            self.publication.check(version, hex_bytes(p["sha256"], "sha256", 32), node_id, st.current_version,
                                   st.is_banned)
        except PublicationRefused as refused:
            if refused.code != p["code"]:
                raise _Bad(f"logged {p['code']}, the replay refuses it with {refused.code}") from None
        else:
            raise _Bad(f"logged as refused ({p['code']}), the replay allows the publication")
        self.r.replayed["upload_refusals"] += 1
