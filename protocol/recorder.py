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
from .payloads import SALT_SIZE, hex_bytes, unb64, accepted_payload, rejected_payload
from .proofs import parse_proof
from .publication import Publication, PublicationRefused, Tally, refused_payload
from .run_spec import AuditHooks, RunSpec
from .verify import EVIDENCE_CODES, InMemoryVerifierState, Verdict

RewardProof = pb.RewardProof


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
        self.hooks = hooks or AuditHooks()
        self.publication = Publication(spec.publish_quorum)  # replaced by the restored one on resume
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
        publication = Publication()
        spec, state, round_accepted = restore_state(log.entries(), salts, trusted=[identity.public_key_bytes],
                                                    publication=publication)
        publication.quorum = spec.publish_quorum
        rec = cls(log, identity, spec, salted=spec.spot_check_commitment is not None, hooks=hooks, urandom=urandom,
                  on_salt=on_salt, _resume=True)
        if rec.salted and state.spot_check_salt is None:
            raise LogError(f"the secret spot-check salt of the open round {state.current_round} is not stored")
        rec.spec, rec.state, rec.round_accepted = spec, state, round_accepted
        rec.publication = publication
        rec._salt = state.spot_check_salt or b""
        rec.verifier = rec.hooks.verifier(state, spec.policy)
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
        return entry

    def report_hash(self, node_id: str, version: int, sha256: bytes) -> LogEntry | None:
        """Record a node's parameter hash for the next version; logs ``hash_reported`` when the
        report is new or changed (None when it repeats). ValueError unless version = current + 1."""
        payload = self.publication.report(node_id, version, sha256, self.state.current_version, self.state.is_banned)
        return None if payload is None else self.log.append(HASH_REPORTED, payload, self.identity)

    def check_publication(self, version: int, sha256: bytes, uploader: str | None) -> Tally:
        """The tally when ``uploader`` may publish ``sha256`` as ``version`` now; PublicationRefused otherwise."""
        return self.publication.check(version, sha256, uploader, self.state.current_version, self.state.is_banned)

    def refuse_upload(self, node_id: str, version: int, sha256: bytes, refusal: PublicationRefused) -> LogEntry:
        """Log an upload the publication rule refused, with its reason and the support it had."""
        return self.log.append(UPLOAD_REFUSED, refused_payload(node_id, version, sha256, refusal), self.identity)

    def ban(self, node_id: str, reason: str, evidence_index: int | None = None) -> None:
        self.state.ban(node_id)
        self.log.append(NODE_BANNED, {"node_id": node_id, "reason": reason, "evidence_index": evidence_index},
                        self.identity)

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
            self.round_accepted[node_id_from_public_key(proofs[0].node_public_key)] += len(proofs)
            return self.log.append(PROOFS_ACCEPTED, accepted_payload(proofs, verdict), self.identity, time_ms=now_ms)
        entry = self.log.append(PROOFS_REJECTED, rejected_payload(verdict, proofs=proofs), self.identity, time_ms=now_ms)
        if verdict.code in EVIDENCE_CODES:  # the verifier burned the group and voided the round
            self._penalise(node_id_from_public_key(proofs[0].node_public_key), entry.index)
        return entry

    def _penalise(self, node_id: str, evidence_index: int) -> None:
        """A failed check voids the node's admission count for this round; enough of them ban it."""
        self.round_accepted.pop(node_id, None)
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
        """Close the current round: participants = nodes (not banned) with proofs accepted during it;
        weights default to their share of those proofs. Reveals this round's salt, commits to the next."""
        participants = sorted(n for n in self.round_accepted if not self.state.is_banned(n))
        if weights is None:
            total = sum(self.round_accepted[n] for n in participants)
            weights = {n: self.round_accepted[n] / total for n in participants} if total else {}
        next_salt = self._draw_salt(self.state.current_round + 1)
        payload = {
            "round": self.state.current_round,
            "participants": participants,
            "weights": dict(weights),
            "spot_check_salt": self._salt.hex() if self.salted else None,
            "next_spot_check_commitment": hashlib.sha256(next_salt).hexdigest() if self.salted else None,
        }
        entry = self.log.append(ROUND_CLOSED, payload, self.identity)
        self.publication.round_closed(entry.payload["round"], entry.payload["weights"])
        self._salt = next_salt
        self.state.close_round(next_salt)
        self.round_accepted.clear()
        return entry


def restore_state(entries: Iterable[LogEntry], salts: Mapping[int, bytes], *,
                  trusted: Iterable[bytes] | None = None,
                  publication: Publication | None = None) -> tuple[RunSpec, InMemoryVerifierState, Counter]:
    """The verifier state at the end of a log, without re-verifying proofs (the log is the
    recorder's own; its chain and signatures are checked): (spec, state, accepted proofs per node
    in the open round). ``salts`` maps round -> secret salt. ``publication``, when given, is fed
    the round closes, hash reports and publications (the producing round and its standing reports).
    LogError on a broken or empty log."""
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
            continue
        if state is None:
            raise LogError(f"{e.kind} before run_started", index=e.index)
        if e.kind == NODE_REGISTERED:
            state.register(hex_bytes(p["public_key"], "public_key", PUBLIC_KEY_SIZE))
        elif e.kind == NODE_BANNED:
            state.ban(p["node_id"])
        elif e.kind == SNAPSHOT_PUBLISHED:
            state.publish_snapshot(p["version"], hex_bytes(p["sha256"], "sha256", 32))
            if publication is not None:
                publication.published()
        elif e.kind == HASH_REPORTED:
            if publication is not None:
                publication.report(p["node_id"], p["version"], hex_bytes(p["sha256"], "sha256", 32),
                                   state.current_version, state.is_banned)
        elif e.kind == PROOFS_ACCEPTED:
            proofs = [parse_proof(unb64(b, "proof"), verify=False) for b in p["proofs"]]
            state.record_accepted(p["node_id"], p["group_id"], max(q.sequence for q in proofs))
            round_accepted[p["node_id"]] += len(proofs)
        elif e.kind == PROOFS_REJECTED:
            failed = evidence_failure(p)
            if failed is not None:
                state.record_failure(*failed)
                round_accepted.pop(failed[0], None)
        elif e.kind == ROUND_DISPATCHED:
            state.record_dispatch(p["node_id"], p["round"], p["version"])
        elif e.kind == ROUND_CLOSED:
            salted = spec.spot_check_commitment is not None
            state.close_round(salts.get(state.current_round + 1) if salted else b"")
            round_accepted.clear()
            if publication is not None:
                publication.round_closed(p["round"], p["weights"])
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
