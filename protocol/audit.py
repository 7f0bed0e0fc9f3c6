"""Auditing a run from its protocol log: replay every verification, report per node.

Log payloads (version 1; hex = lowercase hex, b64 = standard base64 with padding):

=====================  ===========================================================================
kind                   payload
=====================  ===========================================================================
run_started            :meth:`RunSpec.to_payload`: run constants, the verifier ``policy``, the
                       spot-check salt commitment of round 0 (hex or null), optional
                       ``log_signers``, and ``node`` (dataset, model, sampling; read by the hooks)
node_registered        ``{"node_id", "public_key": hex}``
snapshot_published     ``{"version", "sha256": hex}`` (the new current version)
proofs_accepted        ``{"node_id", "group_id", "round", "version", "proofs": [b64 RewardProof],
                       "spot_checked": [completion indices]}``
proofs_rejected        ``{"node_id" or null, "code", "detail", "member" or null, "evidence":
                       {"proofs": [b64]} | {"bytes": b64, "size", "sha256": hex, "truncated"}}``
round_closed           ``{"round", "participants": [node_id], "weights": {node_id: w},
                       "spot_check_salt": hex or null, "next_spot_check_commitment": hex or null}``
node_banned            ``{"node_id", "reason", "evidence_index" or null}``
=====================  ===========================================================================

Spot-check salts: the verifier draws a secret 32-byte salt per round and logs ``SHA-256(salt)``
before the round (run_started for round 0, ``next_spot_check_commitment`` of the previous
round_closed after that); round_closed reveals it. Proofs verified during round ``r`` are
selected with round ``r``'s salt (:func:`.verify.spot_check_selected`), so the selection can be
replayed once the round is closed. A run started with a null commitment uses the empty salt.

:func:`audit` replays a log: the chain and every signature (:mod:`.log`), then each entry's
meaning, in order, on a fresh :class:`~.verify.InMemoryVerifierState`: accepted groups must be
accepted again (spot-checks too when the hooks have a model), rejected ones rejected again with the
same reason code, registrations / snapshots / rounds / bans consistent. It stops at the first bad
entry. Checks the :class:`AuditHooks` cannot do (no reward recomputation, tokenizer or model) are
counted as skipped, never passed silently. :func:`write_report` writes per-node tables and plots.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import json
import math
import os
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import grpo_swarm_pb2 as pb
from .errors import ProtocolError, ReasonCode
from .identity import PUBLIC_KEY_SIZE, Identity, node_id_from_public_key
from .log import (
    NODE_BANNED,
    NODE_REGISTERED,
    PROOFS_ACCEPTED,
    PROOFS_REJECTED,
    ROUND_CLOSED,
    RUN_STARTED,
    SNAPSHOT_PUBLISHED,
    ChainChecker,
    LogEntry,
    LogError,
    ProtocolLog,
    read_log,
)
from .proofs import MAX_PROOF_BYTES, parse_proof
from .verify import (
    DecodeFn,
    InMemoryVerifierState,
    LogprobFn,
    PromptHashFn,
    RewardRecomputer,
    Verdict,
    Verifier,
    VerifierPolicy,
)

RewardProof = pb.RewardProof
SALT_SIZE = 32
MAX_EVIDENCE_BYTES = 64 * 1024
HOOKS_ENTRY_POINT_GROUP = "grpo_swarm.audit_hooks"


# ---- run spec ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """Everything fixed for a run that verification depends on (the ``run_started`` payload)."""

    run_id: str
    run_seed: int
    dataset_size: int
    prompts_per_round: int
    group_size: int
    policy: VerifierPolicy
    max_staleness: int = 0
    max_round_lag: int = 0
    node: Mapping[str, Any] = field(default_factory=dict)  # dataset/model/sampling, for the hooks
    spot_check_commitment: bytes | None = None
    log_signers: tuple[bytes, ...] = ()

    def __post_init__(self):
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ValueError("run_id must be a non-empty string")
        for name in ("run_seed", "dataset_size", "prompts_per_round", "group_size", "max_staleness", "max_round_lag"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0")
        if self.dataset_size < 1 or self.group_size < 1 or not 1 <= self.prompts_per_round <= self.dataset_size:
            raise ValueError("need dataset_size >= 1, group_size >= 1, 1 <= prompts_per_round <= dataset_size")
        if self.run_seed >= 2**64:
            raise ValueError("run_seed must be below 2**64")
        if self.spot_check_commitment is not None and len(self.spot_check_commitment) != 32:
            raise ValueError("spot_check_commitment must be 32 bytes")
        object.__setattr__(self, "node", dict(self.node))
        object.__setattr__(self, "log_signers", tuple(bytes(k) for k in self.log_signers))

    def to_payload(self) -> dict:
        out = {
            "run_id": self.run_id,
            "run_seed": self.run_seed,
            "dataset_size": self.dataset_size,
            "prompts_per_round": self.prompts_per_round,
            "group_size": self.group_size,
            "max_staleness": self.max_staleness,
            "max_round_lag": self.max_round_lag,
            "policy": self.policy.to_json(),
            "node": dict(self.node),
            "spot_check_commitment": self.spot_check_commitment.hex() if self.spot_check_commitment else None,
        }
        if self.log_signers:
            out["log_signers"] = [k.hex() for k in self.log_signers]
        return out

    @classmethod
    def from_payload(cls, obj: Mapping[str, Any]) -> RunSpec:
        if not isinstance(obj, Mapping):
            raise ValueError("run_started payload must be an object")
        try:
            commitment = obj.get("spot_check_commitment")
            signers = obj.get("log_signers") or []
            return cls(
                run_id=obj["run_id"], run_seed=obj["run_seed"], dataset_size=obj["dataset_size"],
                prompts_per_round=obj["prompts_per_round"], group_size=obj["group_size"],
                policy=VerifierPolicy.from_json(obj["policy"]), max_staleness=obj.get("max_staleness", 0),
                max_round_lag=obj.get("max_round_lag", 0), node=obj.get("node") or {},
                spot_check_commitment=_hex(commitment, "spot_check_commitment", 32) if commitment is not None else None,
                log_signers=tuple(_hex(k, "log_signers", PUBLIC_KEY_SIZE) for k in signers),
            )
        except KeyError as e:
            raise ValueError(f"run_started payload lacks {e.args[0]!r}") from None
        except (TypeError, AttributeError, OverflowError) as e:
            raise ValueError(f"run_started payload: {type(e).__name__}: {e}") from None

    def new_state(self, salt: bytes | None = b"") -> InMemoryVerifierState:
        return InMemoryVerifierState(
            run_id=self.run_id, run_seed=self.run_seed, dataset_size=self.dataset_size,
            prompts_per_round=self.prompts_per_round, group_size=self.group_size, max_staleness=self.max_staleness,
            max_round_lag=self.max_round_lag, spot_check_salt=salt,
        )


@dataclass
class AuditHooks:
    """The model-side callables a replay may use (built by ``grpo_swarm.node.proving.audit_hooks``)."""

    reward_recomputer: RewardRecomputer | None = None
    decode_fn: DecodeFn | None = None
    prompt_sha256_fn: PromptHashFn | None = None
    logprob_fn: LogprobFn | None = None
    notes: list[str] = field(default_factory=list)

    def verifier(self, state, policy: VerifierPolicy) -> Verifier:
        return Verifier(state, policy, reward_recomputer=self.reward_recomputer, logprob_fn=self.logprob_fn,
                        decode_fn=self.decode_fn, prompt_sha256_fn=self.prompt_sha256_fn)


DEFAULT_HOOKS = "grpo_swarm.node.proving:audit_hooks"  # what grpo-swarm's own entry point names


def hooks_spec() -> str | None:
    """The hooks factory to use: an installed ``grpo_swarm.audit_hooks`` entry point (every installed
    distribution is scanned, so a stale egg-info next to the sources cannot hide it), else
    :data:`DEFAULT_HOOKS` when that module is importable, else None."""
    import importlib.util
    from importlib.metadata import distributions

    found = sorted({(ep.name, ep.value) for dist in distributions() for ep in dist.entry_points
                    if ep.group == HOOKS_ENTRY_POINT_GROUP})
    if found:
        return found[0][1]
    try:
        if importlib.util.find_spec(DEFAULT_HOOKS.partition(":")[0]) is not None:
            return DEFAULT_HOOKS
    except ImportError:
        pass
    return None


def load_hooks(run: Mapping[str, Any], *, model: str | None = None, snapshots: str | None = None,
               spec: str | None = None, **kw) -> AuditHooks | None:
    """Hooks for ``run`` from ``spec`` (``"package.module:function"``, chosen by the auditor — never
    by the log) or :func:`hooks_spec`; None when there is none."""
    import importlib

    spec = spec or hooks_spec()
    if spec is None:
        return None
    module, _, attr = spec.partition(":")
    fn = importlib.import_module(module)
    for part in attr.split("."):
        fn = getattr(fn, part)
    return fn(run, model=model, snapshots=snapshots, **kw)


# ---- payload builders (the coordinator writes these) ---------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ValueError(f"{what} is not valid base64") from None


def _hex(text: Any, what: str, size: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a hex string")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{what} is not hex") from None
    if size is not None and len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes")
    return raw


def accepted_payload(proofs: Sequence[RewardProof], verdict: Verdict) -> dict:
    first = proofs[0]
    return {
        "node_id": node_id_from_public_key(first.node_public_key),
        "group_id": first.group_id,
        "round": first.round_index,
        "version": first.policy.version,
        "proofs": [_b64(p.SerializeToString()) for p in sorted(proofs, key=lambda p: p.completion_index)],
        "spot_checked": sorted(verdict.spot_checked),
    }


def raw_evidence(data: bytes) -> dict:
    data = bytes(data)
    return {"bytes": _b64(data[:MAX_EVIDENCE_BYTES]), "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "truncated": len(data) > MAX_EVIDENCE_BYTES}


def rejected_payload(verdict: Verdict, *, proofs: Sequence[RewardProof] | None = None, raw: bytes | None = None) -> dict:
    if (proofs is None) == (raw is None):
        raise ValueError("give the rejected proofs or the raw bytes")
    node_id = None
    if proofs:
        key = proofs[0].node_public_key
        if len(key) == PUBLIC_KEY_SIZE:
            node_id = node_id_from_public_key(key)
    evidence = {"proofs": [_b64(p.SerializeToString()) for p in proofs]} if proofs is not None else raw_evidence(raw)
    return {"node_id": node_id, "code": verdict.code.value, "detail": verdict.detail, "member": verdict.member,
            "evidence": evidence}


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
        spec, state, round_accepted = restore_state(log.entries(), salts, trusted=[identity.public_key_bytes])
        rec = cls(log, identity, spec, salted=spec.spot_check_commitment is not None, hooks=hooks, urandom=urandom,
                  on_salt=on_salt, _resume=True)
        if rec.salted and state.spot_check_salt is None:
            raise LogError(f"the secret spot-check salt of the open round {state.current_round} is not stored")
        rec.spec, rec.state, rec.round_accepted = spec, state, round_accepted
        rec._salt = state.spot_check_salt or b""
        rec.verifier = rec.hooks.verifier(state, spec.policy)
        return rec

    def register(self, public_key: bytes) -> str:
        node_id = self.state.register(public_key)
        self.log.append(NODE_REGISTERED, {"node_id": node_id, "public_key": bytes(public_key).hex()}, self.identity)
        return node_id

    def publish_snapshot(self, version: int, sha256: bytes) -> LogEntry:
        self.state.publish_snapshot(version, sha256)
        return self.log.append(SNAPSHOT_PUBLISHED, {"version": version, "sha256": bytes(sha256).hex()}, self.identity)

    def ban(self, node_id: str, reason: str, evidence_index: int | None = None) -> None:
        self.state.ban(node_id)
        self.log.append(NODE_BANNED, {"node_id": node_id, "reason": reason, "evidence_index": evidence_index},
                        self.identity)

    def _record(self, proofs: Sequence[RewardProof], verdict: Verdict, now_ms: int | None) -> LogEntry:
        if verdict.accepted:
            self.round_accepted[node_id_from_public_key(proofs[0].node_public_key)] += len(proofs)
            return self.log.append(PROOFS_ACCEPTED, accepted_payload(proofs, verdict), self.identity, time_ms=now_ms)
        return self.log.append(PROOFS_REJECTED, rejected_payload(verdict, proofs=proofs), self.identity, time_ms=now_ms)

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
        self._salt = next_salt
        self.state.close_round(next_salt)
        self.round_accepted.clear()
        return entry


def restore_state(entries: Iterable[LogEntry], salts: Mapping[int, bytes], *,
                  trusted: Iterable[bytes] | None = None) -> tuple[RunSpec, InMemoryVerifierState, Counter]:
    """The verifier state at the end of a log, without re-verifying proofs (the log is the
    recorder's own; its chain and signatures are checked): (spec, state, accepted proofs per node
    in the open round). ``salts`` maps round -> secret salt. LogError on a broken or empty log."""
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
            state.register(_hex(p["public_key"], "public_key", PUBLIC_KEY_SIZE))
        elif e.kind == NODE_BANNED:
            state.ban(p["node_id"])
        elif e.kind == SNAPSHOT_PUBLISHED:
            state.publish_snapshot(p["version"], _hex(p["sha256"], "sha256", 32))
        elif e.kind == PROOFS_ACCEPTED:
            proofs = [parse_proof(_unb64(b, "proof"), verify=False) for b in p["proofs"]]
            state.record_accepted(p["node_id"], p["group_id"], max(q.sequence for q in proofs))
            round_accepted[p["node_id"]] += len(proofs)
        elif e.kind == ROUND_CLOSED:
            salted = spec.spot_check_commitment is not None
            state.close_round(salts.get(state.current_round + 1) if salted else b"")
            round_accepted.clear()
    if spec is None:
        raise LogError("the log has no run_started entry")
    return spec, state, round_accepted


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
    (ReasonCode.UNASSIGNED_PROMPT,), (ReasonCode.BAD_COMPLETION,), (ReasonCode.REWARD_MISMATCH,),
    (ReasonCode.ADVANTAGE_MISMATCH,), (ReasonCode.SPOT_CHECK_FAILED,))) for code in codes}

# Which skipped check could explain a logged rejection the replay cannot reproduce.
_CHECKS_FOR_CODE = {
    ReasonCode.REWARD_MISMATCH: ("rewards",),
    ReasonCode.BAD_COMPLETION: ("decode", "termination"),
    ReasonCode.UNASSIGNED_PROMPT: ("prompt_hash",),
    ReasonCode.SPOT_CHECK_FAILED: ("spot_check", "spot_check_selection"),
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
                commitment = _hex(c, "commitment", 32)
            elif e.kind == ROUND_CLOSED and commitment is not None:
                salt = _hex(p.get("spot_check_salt"), "salt", SALT_SIZE)
                if hashlib.sha256(salt).digest() != commitment or not isinstance(p.get("round"), int):
                    break
                salts[p["round"]] = salt
                commitment = _hex(p.get("next_spot_check_commitment"), "commitment", 32)
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

    def run(self, entries: Iterable[LogEntry]) -> None:
        for e in entries:
            problem = self.checker.feed(e)
            if problem is not None:
                self.r.problem = AuditProblem(problem.index, e.kind if e.index == problem.index else None, problem.reason)
                return
            self.r.entries += 1
            self.r.kinds[e.kind] += 1
            try:
                self.apply(e)
            except _Bad as bad:
                self.r.problem = AuditProblem(e.index, e.kind, str(bad))
                return
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                self.r.problem = AuditProblem(e.index, e.kind, f"malformed payload: {type(err).__name__}: {err}")
                return

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
            return
        st = self.state
        if e.kind == NODE_REGISTERED:
            key = _hex(p["public_key"], "public_key", PUBLIC_KEY_SIZE)
            if node_id_from_public_key(key) != p["node_id"]:
                raise _Bad("node_id is not the hash of the public key")
            if st.node_for_key(key) is not None:
                raise _Bad(f"node {p['node_id']} registered twice")
            st.register(key)
        elif e.kind == NODE_BANNED:
            node_id = p["node_id"]
            if node_id not in st.keys.values():
                raise _Bad(f"banned node {node_id} is not registered")
            st.ban(node_id)
            self.r.nodes[node_id].banned = True
        elif e.kind == SNAPSHOT_PUBLISHED:
            version, sha = p["version"], _hex(p["sha256"], "sha256", 32)
            if not isinstance(version, int) or version < 0:
                raise _Bad("version must be an integer >= 0")
            if self.snapshot_seen and version <= st.current_version:
                raise _Bad(f"snapshot version {version} does not advance the current {st.current_version}")
            self.snapshot_seen = True
            st.publish_snapshot(version, sha)
        elif e.kind == PROOFS_ACCEPTED:
            self.accepted(e)
        elif e.kind == PROOFS_REJECTED:
            self.rejected(e)
        elif e.kind == ROUND_CLOSED:
            self.round_closed(e)
        else:
            self.r.skipped[f"unknown kind {e.kind}"] += 1

    def _proofs(self, items: Any) -> list[RewardProof]:
        if not isinstance(items, list) or not items:
            raise _Bad("proofs must be a non-empty list")
        return [parse_proof(_unb64(b, "proof"), verify=False) for b in items]

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
                return
        else:
            data = _unb64(evidence["bytes"], "evidence bytes")
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
        next_salt: bytes | None = b""
        if self.salted:
            salt = _hex(p["spot_check_salt"], "spot_check_salt", SALT_SIZE)
            if hashlib.sha256(salt).digest() != self.commitment:
                raise _Bad("revealed spot-check salt does not match its commitment")
            self.commitment = _hex(p["next_spot_check_commitment"], "next_spot_check_commitment", 32)
            next_salt = self.salts.get(st.current_round + 1)
        elif p.get("spot_check_salt") is not None:
            raise _Bad("an unsalted run reveals a salt")
        st.close_round(next_salt)
        self.r.replayed["rounds"] += 1


# ---- report --------------------------------------------------------------------------------------
NODE_COLUMNS = ("node_id", "accepted_groups", "accepted_samples", "rejected_total", "rejected_by_reason",
                "mean_reward", "mean_staleness", "max_staleness", "banned")


def node_rows(result: AuditResult) -> list[dict]:
    rows = []
    for node_id in sorted(result.nodes):
        s = result.nodes[node_id]
        rows.append({
            "node_id": node_id,
            "accepted_groups": s.accepted_groups,
            "accepted_samples": s.accepted_samples,
            "rejected_total": sum(s.rejected.values()),
            "rejected_by_reason": ";".join(f"{k}={v}" for k, v in sorted(s.rejected.items())),
            "mean_reward": None if s.mean_reward is None else round(s.mean_reward, 6),
            "mean_staleness": round(statistics.fmean(s.staleness), 4) if s.staleness else None,
            "max_staleness": max(s.staleness) if s.staleness else None,
            "banned": s.banned,
        })
    return rows


def write_report(result: AuditResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``nodes.csv``, ``nodes.md``, ``summary.json`` and three PNG plots; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = node_rows(result)
    paths = {}
    paths["nodes.csv"] = out / "nodes.csv"
    with open(paths["nodes.csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=NODE_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    paths["nodes.md"] = out / "nodes.md"
    lines = ["| " + " | ".join(NODE_COLUMNS) + " |", "|" + "---|" * len(NODE_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join("" if row[c] is None else str(row[c]) for c in NODE_COLUMNS) + " |")
    paths["nodes.md"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["summary.json"] = out / "summary.json"
    paths["summary.json"].write_text(json.dumps({**result.summary(), "nodes": rows}, indent=2) + "\n", encoding="utf-8")
    paths.update(_plots(result, out))
    return paths


def _plots(result: AuditResult, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    paths = {}
    by_version: dict[int, list[float]] = defaultdict(list)
    for s in result.samples:
        by_version[s.version].append(s.reward)
    fig, ax = plt.subplots(figsize=(6, 4))
    if by_version:
        vs = sorted(by_version)
        ax.plot(vs, [statistics.fmean(by_version[v]) for v in vs], marker="o")
    ax.set(xlabel="policy version", ylabel="mean reward (accepted samples)", title="Reward by policy version")
    ax.grid(alpha=0.3)
    paths["reward_by_version.png"] = out / "reward_by_version.png"
    fig.tight_layout()
    fig.savefig(paths["reward_by_version.png"], dpi=100)
    plt.close(fig)

    rows = node_rows(result)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4))
    if rows:
        names = [r["node_id"][:8] for r in rows]
        ax.bar(names, [r["accepted_samples"] for r in rows], label="accepted")
        ax.bar(names, [r["rejected_total"] for r in rows], bottom=[r["accepted_samples"] for r in rows],
               label="rejected")
        ax.legend()
        ax.tick_params(axis="x", rotation=45)
    ax.set(xlabel="node", ylabel="samples", title="Contributions per node")
    paths["contributions_per_node.png"] = out / "contributions_per_node.png"
    fig.tight_layout()
    fig.savefig(paths["contributions_per_node.png"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    stale = [s.staleness for s in result.samples]
    if stale:
        ax.hist(stale, bins=range(0, max(stale) + 2), align="left", rwidth=0.8)
    ax.set(xlabel="staleness (current version - sampling version)", ylabel="accepted samples",
           title="Staleness of accepted samples")
    paths["staleness_hist.png"] = out / "staleness_hist.png"
    fig.tight_layout()
    fig.savefig(paths["staleness_hist.png"], dpi=100)
    plt.close(fig)
    return paths
