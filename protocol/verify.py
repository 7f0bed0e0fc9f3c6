"""Verifying reward proofs: one :class:`Verdict` per GRPO group, with a reason code and a detail.

A proof counts only as part of its whole group (its advantage depends on every member), so the
unit of verification is a group: :meth:`Verifier.verify_group` accepts all G proofs of a group or
rejects them together, naming the first failing check and member. Checks, in order (the code of
the first failure is the verdict's):

====  =====================================================================  =====================
 #    check                                                                  reason code
====  =====================================================================  =====================
 1    structure (:func:`.proofs.validate_proof`), raw token ids and            MALFORMED
      log-probabilities present (``require_raw``)
 2    signer registered / not banned                                         UNKNOWN_KEY, BANNED_KEY
 3    Ed25519 signature over the canonical bytes                             BAD_SIGNATURE
 4    run id                                                                 WRONG_RUN
 5    the G members agree (key, group, round, prompt, policy, spec) and      INCOMPLETE_GROUP
      are exactly completion indices 0..G-1 with G = the run's group size;
      group_id is ``<node id>/<round>/<prompt>`` (else MALFORMED)
 6    every sequence above the node's last accepted one, no duplicates       REPLAYED_SEQUENCE
 7    ``time_ms`` within ``max_time_skew_ms`` of now (when a skew is set)    TIME_SKEW
 8    ``current - η <= version <= current`` and the snapshot hash is the     STALE_VERSION
      one published for that version
 9    round open (``current_round - lag <= round <= current_round``),        UNASSIGNED_PROMPT
      prompt in :func:`.assignment.assign_prompts` for the signer's node
      id, prompt hash = the dataset row's rendered prompt, and the group
      not already accepted (one group per assigned prompt); with
      ``bind_version``, the round was dispatched to the node (a Heartbeat)   UNASSIGNED_PROMPT
      and the proofs name the version it was dispatched at                   STALE_VERSION
 9b   the group did not fail a check before (no second try), and the node    GROUP_BURNED,
      did not fail one in this round or the proofs' round                    TICKET_VOIDED
10    completion: 1..max tokens, ids < vocab, EOS only as the last token,    BAD_COMPLETION
      an EOS unless the completion hit the token limit, text = decoded ids
11    reward spec id, each reward recomputed from the text and the row,      REWARD_MISMATCH
      weighted total
12    advantages = group normalisation of the members' totals                ADVANTAGE_MISMATCH
13    spot-check of the selected members: recomputed log-probabilities       SPOT_CHECK_FAILED
      under the claimed policy version agree with the claimed ones, and
      (``sampling_tolerance`` set) every token is the argmax of the          SAMPLING_MISMATCH
      processed log-probabilities plus the run's keyed noise
      (:mod:`.sampling_noise`), within the tolerance
====  =====================================================================  =====================

Failures are evidence. A group rejected with one of :data:`EVIDENCE_CODES` (what the node's own
signed proofs contradict: a spot-check, the sampling check, rewards, advantages, the completion)
is recorded in the state (:meth:`VerifierState.record_failure`): the group is burned (the same
node, round and prompt is refused ``GROUP_BURNED`` ever after, whatever is re-signed), the node's
work in the current round and in the proofs' round is voided (later groups refused
``TICKET_VOIDED``; the recorder drops its admission count), and after
``ban_after_failures`` such failures the recorder bans the key. A check therefore cannot be
re-rolled: what is checked is fixed before the node signs (below), and a failed check costs the
node its round.

Tolerances (all stated in :class:`VerifierPolicy`):

* **rewards** — node.rewards keeps values as binary32, so a recomputed value is rounded to binary32
  and must then be *equal* (tolerance 0, "exact", for rule rewards); a function may be given an
  absolute tolerance in ``reward_tolerances`` (e.g. a model-judged reward). The total is
  ``sum_f weight_f * value_f`` over applicable functions, compared with relative tolerance
  ``total_rel_tolerance`` (1e-6) of ``max(1, sum_f |weight_f * value_f|)``: node.rewards adds in
  binary32 (unit round-off 6e-8 per operation), the verifier in binary64.
* **advantages** — ``A_i = (T_i - mean(T)) / (std(T) + 1e-4)`` with the *sample* std, exactly as
  ``grpo_swarm.node.grpo.group_advantages`` (``scale="none"``: ``T_i - mean``). The node computes
  in binary32, the verifier in binary64; the allowed difference is
  ``advantage_tolerance + 2·G·2^-24·(max|T| / (std + 1e-4) + |A_i|)`` — 1e-5 plus a bound on the
  binary32 rounding of the mean, the subtraction, the std and the division.
* **spot-check** — mean |Δ| <= ``spot_check_mean_abs`` and max |Δ| <= ``spot_check_max_abs`` over
  the completion's tokens. The defaults (1e-3, 1e-2) are ≥ 50× the largest honest differences
  measured between sampling-time and recomputed fp32 log-probabilities (tiny model 1e-6, SmolLM2
  3.5e-5 max / 1.8e-5 mean; ``python bench/proofs.py``), and ≥ 20× below what typed-in completions
  with invented log-probabilities show (mean ≥ 0.12, max ≥ 0.23 nats on a tiny model taught the
  task; ≥ 3.8 / 9.9 on SmolLM2). Runs that sample in bf16 or with another engine than the verifier
  must measure and set their own. What it proves: the claimed log-probabilities are the policy's.
* **sampling** — the completion's tokens are the argmax of the recomputed processed log-probs plus
  the keyed noise, up to ``sampling_tolerance`` nats of shortfall per position
  (:mod:`.sampling_noise`). With it a node can neither write a completion nor choose among several
  samples (best-of-n, copying a good completion over a bad one): each member's completion is fixed
  by the policy and its identity.

Spot-check selection: member ``k`` of the group of prompt ``q`` that node ``n`` answered in round
``r`` of run ``R`` is checked iff ``int(SHA-256(b"grpo-swarm/v2/spot-check\\n" || u32(len(salt)) ||
salt || u32(len(R)) || R || u32(len(n)) || n || u64(r) || u64(q) || u32(k))[:8]) < p·2^64``
(big-endian; strings UTF-8). It depends on nothing the node signs or chooses: re-signing, changing
``time_ms`` or the completion does not move it. The salt is the verifier's secret for the round
current at verification (committed in the log before the round, revealed when it closes, see
:mod:`.recorder`), so a node cannot know before submitting which members will be checked, and
auditors can replay the selection once it is revealed. With an empty salt the selection is public.

The verifier needs no model: reward recomputation, token decoding, prompt hashing and the spot
check's log-probabilities are injected callables (``grpo_swarm.node.proving`` builds them from
node.rewards, a tokenizer, the dataset and node.logprobs). A check whose callable is missing is
skipped and listed in :attr:`Verdict.skipped`.
"""

from __future__ import annotations

import hashlib
import math
import operator
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from nacl.bindings import crypto_core_ed25519_is_valid_point

from . import grpo_swarm_pb2 as pb
from .assignment import assign_prompts
from .errors import ProtocolError, ReasonCode
from .identity import node_id_from_public_key, verify_signature
from .log import canonical_json
from .proofs import group_id_for, parse_proof, proof_signing_bytes, validate_proof

RewardProof = pb.RewardProof
SPOT_CHECK_DOMAIN = b"grpo-swarm/v2/spot-check\n"
REWARD_SPEC_PREFIX = "rs1-"
STD_EPS = 1e-4  # as grpo_swarm.node.grpo.STD_EPS (TRL)
F32_UNIT_ROUNDOFF = 2.0**-24
_U64 = 2**64

RewardRecomputer = Callable[[RewardProof], Mapping[str, "float | None"]]
LogprobFn = Callable[[RewardProof], "Sequence[float] | Recomputed"]
DecodeFn = Callable[[Sequence[int]], str]
PromptHashFn = Callable[[int], bytes]


@dataclass(frozen=True)
class Recomputed:
    """What a spot-check recomputes for one completion: each token's log-probability under the
    claimed policy and, when the verifier has the run's noise, each position's sampling shortfall
    (:func:`grpo_swarm.node.noise.shortfalls`; 0 where the token is the noisy argmax)."""

    logprobs: Sequence[float]
    shortfalls: Sequence[float] | None = None


# Rejections the node's own signed proofs prove wrong: they burn the group and void the node's round.
EVIDENCE_CODES = frozenset({ReasonCode.SPOT_CHECK_FAILED, ReasonCode.SAMPLING_MISMATCH, ReasonCode.REWARD_MISMATCH,
                            ReasonCode.ADVANTAGE_MISMATCH, ReasonCode.BAD_COMPLETION})


class SpotCheckUnavailable(Exception):
    """Raised by a logprob_fn that cannot check this proof for reasons not the prover's (e.g. the
    verifier has no copy of that policy version): the spot check is skipped, not failed."""


# ---- verdicts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """``accepted`` or not; ``code`` (None when accepted) and ``detail`` say why.

    ``member``: the completion index of the member that failed (None if the group as a whole);
    ``spot_checked``: completion indices whose log-probabilities were recomputed and agreed;
    ``skipped``: names of checks that were not performed (missing callables, unknown salt)."""

    accepted: bool
    code: ReasonCode | None
    detail: str
    member: int | None = None
    spot_checked: tuple[int, ...] = ()
    skipped: tuple[str, ...] = ()

    @classmethod
    def ok(cls, detail: str = "accepted", **kw) -> Verdict:
        return cls(True, None, detail, **kw)

    @classmethod
    def reject(cls, code: ReasonCode | str, detail: str, **kw) -> Verdict:
        return cls(False, ReasonCode(code), detail, **kw)

    def __str__(self) -> str:
        return "accepted" if self.accepted else f"{self.code.value}: {self.detail}"


class _Reject(Exception):
    def __init__(self, code: ReasonCode, detail: str, member: int | None = None):
        self.code, self.detail, self.member = code, detail, member


# ---- reward specs --------------------------------------------------------------------------------
def normalise_reward_specs(specs: Iterable[Mapping[str, Any]]) -> list[dict]:
    """``[{"name", "weight", "args"}]`` with defaults filled in (weight 1.0, args {}); ValueError if
    a spec has other keys or no name."""
    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, Mapping):
            raise ValueError(f"reward spec #{i} must be a mapping")
        extra = set(spec) - {"name", "weight", "args"}
        if extra:
            raise ValueError(f"reward spec #{i} has unknown keys {sorted(extra)}")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"reward spec #{i} needs a non-empty name")
        weight = float(spec.get("weight", 1.0))
        if not math.isfinite(weight):
            raise ValueError(f"reward spec #{i} ({name}): weight must be finite")
        args = dict(spec.get("args") or {})
        out.append({"name": name, "weight": weight, "args": args})
    if not out:
        raise ValueError("at least one reward function is needed")
    if len({s["name"] for s in out}) != len(out):
        raise ValueError("reward function names must be unique")
    return out


def reward_spec_id(specs: Iterable[Mapping[str, Any]]) -> str:
    """``"rs1-" + SHA-256(canonical_json([{"name", "weight", "args"}, ...])).hex()``: names the reward
    functions, their order, weights and arguments (what a proof's ``reward_spec_id`` must be)."""
    return REWARD_SPEC_PREFIX + hashlib.sha256(canonical_json(normalise_reward_specs(specs))).hexdigest()


# ---- policy and state ----------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifierPolicy:
    """What the verifier checks and how strictly (fixed for a run, recorded in ``run_started``)."""

    reward_specs: tuple[Mapping[str, Any], ...]  # [{"name", "weight", "args"}], the run's reward functions
    max_completion_tokens: int
    eos_token_ids: tuple[int, ...] = ()  # empty: termination not checked
    vocab_size: int | None = None
    reward_tolerances: Mapping[str, float] = field(default_factory=dict)  # absolute, per function; default 0
    total_rel_tolerance: float = 1e-6
    advantage_scale: str = "group"  # "group" (sample std + 1e-4) or "none"
    advantage_tolerance: float = 1e-5
    spot_check_rate: float = 0.0  # p
    spot_check_mean_abs: float = 1e-3
    spot_check_max_abs: float = 1e-2
    require_raw: bool = True  # proofs must carry completion_token_ids and behaviour_logprobs
    max_time_skew_ms: int | None = None  # None: timestamps not checked
    sampling_tolerance: float | None = None  # nats of shortfall allowed per token; None: sampling not checked
    bind_version: bool = False  # proofs must name the version their round was dispatched at
    ban_after_failures: int = 0  # failed checks (EVIDENCE_CODES) before a ban; 0: never

    def __post_init__(self):
        specs = tuple(normalise_reward_specs(self.reward_specs))
        object.__setattr__(self, "reward_specs", specs)
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        object.__setattr__(self, "reward_tolerances", dict(self.reward_tolerances))
        if self.max_completion_tokens < 1:
            raise ValueError("max_completion_tokens must be >= 1")
        if self.advantage_scale not in ("group", "none"):
            raise ValueError("advantage_scale must be 'group' or 'none' (batch scaling is not verifiable per group)")
        if not 0.0 <= self.spot_check_rate <= 1.0:
            raise ValueError("spot_check_rate must be in [0, 1]")
        for name, tol in self.reward_tolerances.items():
            if name not in self.reward_names or not (tol >= 0 and math.isfinite(tol)):
                raise ValueError(f"reward_tolerances[{name!r}] must name a reward and be finite >= 0")
        for v in (self.total_rel_tolerance, self.advantage_tolerance, self.spot_check_mean_abs, self.spot_check_max_abs):
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError("tolerances must be finite and >= 0")
        if self.sampling_tolerance is not None and not (self.sampling_tolerance >= 0 and math.isfinite(self.sampling_tolerance)):
            raise ValueError("sampling_tolerance must be finite and >= 0 (or None)")
        if not isinstance(self.ban_after_failures, int) or self.ban_after_failures < 0:
            raise ValueError("ban_after_failures must be an integer >= 0")

    @property
    def reward_names(self) -> tuple[str, ...]:
        return tuple(s["name"] for s in self.reward_specs)

    @property
    def reward_weights(self) -> tuple[float, ...]:
        return tuple(s["weight"] for s in self.reward_specs)

    @property
    def reward_spec_id(self) -> str:
        return reward_spec_id(self.reward_specs)

    def to_json(self) -> dict:
        return {
            "reward_specs": [dict(s) for s in self.reward_specs],
            "max_completion_tokens": self.max_completion_tokens,
            "eos_token_ids": list(self.eos_token_ids),
            "vocab_size": self.vocab_size,
            "reward_tolerances": dict(self.reward_tolerances),
            "total_rel_tolerance": self.total_rel_tolerance,
            "advantage_scale": self.advantage_scale,
            "advantage_tolerance": self.advantage_tolerance,
            "spot_check_rate": self.spot_check_rate,
            "spot_check_mean_abs": self.spot_check_mean_abs,
            "spot_check_max_abs": self.spot_check_max_abs,
            "require_raw": self.require_raw,
            "max_time_skew_ms": self.max_time_skew_ms,
            "sampling_tolerance": self.sampling_tolerance,
            "bind_version": self.bind_version,
            "ban_after_failures": self.ban_after_failures,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> VerifierPolicy:
        if not isinstance(obj, Mapping):
            raise ValueError("verifier policy must be an object")
        known = set(cls.__dataclass_fields__)
        extra = set(obj) - known
        if extra:
            raise ValueError(f"verifier policy has unknown keys {sorted(extra)}")
        kw = dict(obj)
        try:
            kw["reward_specs"] = tuple(kw.get("reward_specs") or ())
            kw["eos_token_ids"] = tuple(kw.get("eos_token_ids") or ())
            return cls(**kw)
        except (TypeError, AttributeError, OverflowError) as e:
            raise ValueError(f"verifier policy: {type(e).__name__}: {e}") from None


class VerifierState(Protocol):
    """What the verifier reads and updates. :class:`InMemoryVerifierState` keeps it in memory; the
    coordinator backs it with its database. Run constants are plain attributes."""

    run_id: str
    run_seed: int
    dataset_size: int
    prompts_per_round: int
    group_size: int
    max_staleness: int  # η: versions a proof may lag behind the current one
    max_round_lag: int  # rounds a proof may lag behind the current round
    current_version: int
    current_round: int
    spot_check_salt: bytes | None  # this round's secret; None = unknown (selection cannot be replayed)

    def node_for_key(self, public_key: bytes) -> str | None: ...
    def is_banned(self, node_id: str) -> bool: ...
    def last_sequence(self, node_id: str) -> int: ...  # -1 when none accepted yet
    def snapshot_sha256(self, version: int) -> bytes | None: ...
    def group_accepted(self, group_id: str) -> bool: ...
    def record_accepted(self, node_id: str, group_id: str, max_sequence: int) -> None: ...
    def group_burned(self, group_id: str) -> bool: ...
    def round_voided(self, node_id: str, round_index: int) -> bool: ...
    def record_failure(self, node_id: str, group_id: str, round_index: int) -> int: ...  # -> failures so far
    def dispatched_version(self, node_id: str, round_index: int) -> int | None: ...


@dataclass
class InMemoryVerifierState:
    run_id: str
    run_seed: int
    dataset_size: int
    prompts_per_round: int
    group_size: int
    max_staleness: int = 0
    max_round_lag: int = 0
    current_version: int = 0
    current_round: int = 0
    spot_check_salt: bytes | None = b""
    keys: dict[bytes, str] = field(default_factory=dict)
    banned: set[str] = field(default_factory=set)
    ban_reasons: dict[str, str] = field(default_factory=dict)  # why each ban was logged (the latest)
    sequences: dict[str, int] = field(default_factory=dict)
    snapshots: dict[int, bytes] = field(default_factory=dict)
    accepted_groups: set[str] = field(default_factory=set)
    burned_groups: set[str] = field(default_factory=set)
    voided: set[tuple[str, int]] = field(default_factory=set)  # (node, round)
    failures: dict[str, int] = field(default_factory=dict)
    dispatched: dict[tuple[str, int], int] = field(default_factory=dict)  # (node, round) -> version

    # -- VerifierState
    def node_for_key(self, public_key: bytes) -> str | None:
        return self.keys.get(bytes(public_key))

    def is_banned(self, node_id: str) -> bool:
        return node_id in self.banned

    def last_sequence(self, node_id: str) -> int:
        return self.sequences.get(node_id, -1)

    def snapshot_sha256(self, version: int) -> bytes | None:
        return self.snapshots.get(version)

    def group_accepted(self, group_id: str) -> bool:
        return group_id in self.accepted_groups

    def record_accepted(self, node_id: str, group_id: str, max_sequence: int) -> None:
        self.sequences[node_id] = max(self.sequences.get(node_id, -1), max_sequence)
        self.accepted_groups.add(group_id)

    def group_burned(self, group_id: str) -> bool:
        return group_id in self.burned_groups

    def round_voided(self, node_id: str, round_index: int) -> bool:
        return (node_id, round_index) in self.voided

    def record_failure(self, node_id: str, group_id: str, round_index: int) -> int:
        """A failed check: burn the group, void the node's current round and the proofs' round."""
        self.burned_groups.add(group_id)
        self.voided.update({(node_id, round_index), (node_id, self.current_round)})
        self.failures[node_id] = self.failures.get(node_id, 0) + 1
        return self.failures[node_id]

    def dispatched_version(self, node_id: str, round_index: int) -> int | None:
        return self.dispatched.get((node_id, round_index))

    def record_dispatch(self, node_id: str, round_index: int, version: int) -> None:
        self.dispatched.setdefault((node_id, round_index), version)

    # -- updates (what log entries do)
    def register(self, public_key: bytes) -> str:
        node_id = node_id_from_public_key(public_key)
        self.keys[bytes(public_key)] = node_id
        return node_id

    def ban(self, node_id: str, reason: str = "") -> None:
        self.banned.add(node_id)
        self.ban_reasons[node_id] = reason

    def ban_reason(self, node_id: str) -> str:
        """Why ``node_id`` is banned, as its ``node_banned`` entry says ("" if it is not banned)."""
        return self.ban_reasons.get(node_id, "") if node_id in self.banned else ""

    def publish_snapshot(self, version: int, sha256: bytes) -> None:
        if version < self.current_version:
            raise ValueError(f"snapshot version {version} is older than the current {self.current_version}")
        self.snapshots[version] = bytes(sha256)
        self.current_version = version
        # check 8 refuses versions below current - η before it looks a hash up
        for old in [v for v in self.snapshots if v < version - self.max_staleness]:
            del self.snapshots[old]

    def close_round(self, next_salt: bytes | None = b"") -> None:
        self.current_round += 1
        self.spot_check_salt = next_salt
        self.forget_rounds_before(self.current_round - self.max_round_lag)

    def forget_rounds_before(self, round_index: int) -> None:
        """Drop what is kept per round (accepted and burned groups, voided rounds, dispatches) for
        rounds below ``round_index``: check 9 refuses proofs of those rounds before it looks any of it
        up, so a long run's state stays the size of its open rounds, not of its history."""
        def recent(group_id: str) -> bool:
            r = round_of_group(group_id)
            return r is not None and r >= round_index

        self.accepted_groups = {g for g in self.accepted_groups if recent(g)}
        self.burned_groups = {g for g in self.burned_groups if recent(g)}
        self.voided = {(n, r) for n, r in self.voided if r >= round_index}
        self.dispatched = {(n, r): v for (n, r), v in self.dispatched.items() if r >= round_index}


# ---- helpers -------------------------------------------------------------------------------------
def round_of_group(group_id: str) -> int | None:
    """The round of a ``<node id>/<round>/<prompt>`` group id (None for any other string)."""
    parts = str(group_id).split("/")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


def _lp(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">I", len(raw)) + raw


def spot_check_selected(run_id: str, node_id: str, round_index: int, prompt_index: int, member: int, rate: float,
                        salt: bytes = b"") -> bool:
    """Whether member ``member`` of a group is spot-checked at rate ``rate`` (see module docstring):
    a function of the salt and the group's identity only, never of what the node signs."""
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    h = hashlib.sha256(SPOT_CHECK_DOMAIN + struct.pack(">I", len(salt)) + bytes(salt) + _lp(run_id) + _lp(node_id)
                       + struct.pack(">QQI", round_index, prompt_index, member)).digest()
    return int.from_bytes(h[:8], "big") < int(rate * _U64)


_F32 = struct.Struct("<f")


def _f32(x: float) -> float:
    """Round to binary32 (as node.rewards stores reward values); OverflowError if out of range."""
    return _F32.unpack(_F32.pack(x))[0]


def expected_advantages(totals: Sequence[float], scale: str = "group") -> list[float]:
    """node.grpo.group_advantages for one group, in binary64: (T - mean) / (sample std + 1e-4)."""
    g = len(totals)
    mean = math.fsum(totals) / g
    centred = [t - mean for t in totals]
    if scale == "none":
        return centred
    std = math.sqrt(math.fsum(c * c for c in centred) / (g - 1)) if g > 1 else 0.0
    return [c / (std + STD_EPS) for c in centred]


def advantage_tolerances(totals: Sequence[float], advantages: Sequence[float], base: float, scale: str) -> list[float]:
    g = len(totals)
    big = max(abs(t) for t in totals)
    if scale == "none":
        return [base + 2 * g * F32_UNIT_ROUNDOFF * (big + abs(a)) for a in advantages]
    mean = math.fsum(totals) / g
    std = math.sqrt(math.fsum((t - mean) ** 2 for t in totals) / (g - 1)) if g > 1 else 0.0
    return [base + 2 * g * F32_UNIT_ROUNDOFF * (big / (std + STD_EPS) + abs(a)) for a in advantages]


# ---- the verifier --------------------------------------------------------------------------------
_GROUP_FIELDS = ("group_id", "round_index", "prompt_index", "prompt_sha256", "group_size", "reward_spec_id")
_group_fields = operator.attrgetter(*_GROUP_FIELDS)  # the fields all members of a group share
_policy_fields = operator.attrgetter("version", "sha256")


class Verifier:
    """Checks groups of reward proofs against a :class:`VerifierState` and a :class:`VerifierPolicy`."""

    def __init__(
        self,
        state: VerifierState,
        policy: VerifierPolicy,
        *,
        reward_recomputer: RewardRecomputer | None = None,
        logprob_fn: LogprobFn | None = None,
        decode_fn: DecodeFn | None = None,
        prompt_sha256_fn: PromptHashFn | None = None,
    ):
        self.state = state
        self.policy = policy
        self.reward_recomputer = reward_recomputer
        self.logprob_fn = logprob_fn
        self.decode_fn = decode_fn
        self.prompt_sha256_fn = prompt_sha256_fn
        self._spec_id = policy.reward_spec_id
        self._names = policy.reward_names
        self._weights = policy.reward_weights
        self._tols = tuple(policy.reward_tolerances.get(n, 0.0) for n in self._names)
        self._eos = frozenset(policy.eos_token_ids)
        self._total_rel_tol = policy.total_rel_tolerance

    # -- entry points
    def verify_group(self, proofs: Sequence[RewardProof], *, now_ms: int | None = None, commit: bool = True) -> Verdict:
        """Verify the G proofs of one group; on acceptance (and ``commit``) record it in the state."""
        skipped: list[str] = []
        try:
            checked = self._check_group(list(proofs), now_ms, skipped)
        except _Reject as r:
            if commit and r.code in EVIDENCE_CODES:
                p = proofs[0]
                self.state.record_failure(node_id_from_public_key(p.node_public_key), p.group_id, p.round_index)
            return Verdict.reject(r.code, r.detail, member=r.member, skipped=tuple(dict.fromkeys(skipped)))
        first = proofs[0]
        if commit:
            node_id = node_id_from_public_key(first.node_public_key)
            self.state.record_accepted(node_id, first.group_id, max(p.sequence for p in proofs))
        return Verdict.ok(f"group {first.group_id} accepted ({len(proofs)} proofs)", spot_checked=checked,
                          skipped=tuple(dict.fromkeys(skipped)))

    def verify_batch(self, proofs: Sequence[RewardProof], *, now_ms: int | None = None,
                     commit: bool = True) -> list[tuple[list[RewardProof], Verdict]]:
        """Split ``proofs`` into groups (by group_id, in order of first appearance) and verify each."""
        groups: dict[str, list[RewardProof]] = {}
        for p in proofs:
            groups.setdefault(p.group_id if isinstance(p, RewardProof) else "", []).append(p)
        return [(g, self.verify_group(g, now_ms=now_ms, commit=commit)) for g in groups.values()]

    def verify_proof_bytes(self, blobs: Sequence[bytes], *, now_ms: int | None = None,
                           commit: bool = True) -> tuple[list[RewardProof] | None, Verdict]:
        """Parse serialised proofs (one group) and verify them; garbage gives MALFORMED/OVERSIZED."""
        proofs = []
        for i, data in enumerate(blobs):
            try:
                proofs.append(parse_proof(data, verify=False))
            except ProtocolError as e:
                return None, Verdict.reject(e.code, f"proof #{i}: {e.detail}")
        return proofs, self.verify_group(proofs, now_ms=now_ms, commit=commit)

    def spot_check_members(self, proofs: Sequence[RewardProof]) -> list[int] | None:
        """Completion indices selected for the spot-check (None: the salt is unknown)."""
        salt = self.state.spot_check_salt
        if salt is None:
            return None
        if not proofs:
            return []
        rate = self.policy.spot_check_rate
        node_id = node_id_from_public_key(proofs[0].node_public_key)  # one signer per group (checked)
        return [p.completion_index for p in proofs
                if spot_check_selected(p.run_id, node_id, p.round_index, p.prompt_index, p.completion_index, rate,
                                       salt)]

    # -- the checks
    def _check_group(self, proofs: list[RewardProof], now_ms: int | None, skipped: list[str]) -> tuple[int, ...]:
        st, pol = self.state, self.policy
        if not proofs:
            raise _Reject(ReasonCode.INCOMPLETE_GROUP, "empty group")
        # 1. structure
        for i, p in enumerate(proofs):
            if not isinstance(p, RewardProof):
                raise _Reject(ReasonCode.MALFORMED, f"item {i} is a {type(p).__name__}, not a RewardProof")
            try:
                validate_proof(p, require_signature=True)
            except ProtocolError as e:
                raise _Reject(e.code, f"completion {p.completion_index}: {e.detail}", p.completion_index) from None
            if pol.require_raw and (len(p.completion_token_ids) != p.num_completion_tokens
                                    or len(p.behaviour_logprobs) != p.num_completion_tokens):
                raise _Reject(ReasonCode.MALFORMED, f"completion {p.completion_index}: completion_token_ids and "
                              "behaviour_logprobs are required", p.completion_index)
        first = proofs[0]
        key = first.node_public_key
        node_id = node_id_from_public_key(key)
        # 2-4. key, signature, run
        for p in proofs:
            if p.node_public_key != key:
                raise _Reject(ReasonCode.INCOMPLETE_GROUP, "group members are signed by different keys",
                              p.completion_index)
        known = st.node_for_key(key)
        if known is None:
            raise _Reject(ReasonCode.UNKNOWN_KEY, f"key of node {node_id} is not registered")
        if st.is_banned(known):
            raise _Reject(ReasonCode.BANNED_KEY, f"node {known} is banned")
        for p in proofs:
            k = p.completion_index
            if not verify_signature(key, proof_signing_bytes(p), p.signature):
                if not crypto_core_ed25519_is_valid_point(key):  # say why, if it is the key
                    raise _Reject(ReasonCode.BAD_SIGNATURE, f"node {node_id}'s public key is not a valid Ed25519 key")
                raise _Reject(ReasonCode.BAD_SIGNATURE, f"completion {k}: signature does not verify", k)
            if p.run_id != st.run_id:
                raise _Reject(ReasonCode.WRONG_RUN, f"run_id {p.run_id!r} is not this run ({st.run_id!r})", k)
        # 5. group shape
        expected_gid = group_id_for(node_id, first.round_index, first.prompt_index)
        ref = _group_fields(first)
        ref_policy = _policy_fields(first.policy)
        for p in proofs:
            if _group_fields(p) != ref:  # say which field, in _GROUP_FIELDS order
                for name in _GROUP_FIELDS:
                    if getattr(p, name) != getattr(first, name):
                        raise _Reject(ReasonCode.INCOMPLETE_GROUP, f"members disagree on {name}", p.completion_index)
            if _policy_fields(p.policy) != ref_policy:
                raise _Reject(ReasonCode.INCOMPLETE_GROUP, "members disagree on the policy", p.completion_index)
        if first.group_id != expected_gid:
            raise _Reject(ReasonCode.MALFORMED, f"group_id {first.group_id!r} is not {expected_gid!r}")
        if first.group_size != st.group_size:
            raise _Reject(ReasonCode.INCOMPLETE_GROUP, f"group_size {first.group_size}, the run's is {st.group_size}")
        indices = sorted(p.completion_index for p in proofs)
        if indices != list(range(st.group_size)):
            missing = sorted(set(range(st.group_size)) - set(indices))
            dup = sorted({i for i in indices if indices.count(i) > 1})
            raise _Reject(ReasonCode.INCOMPLETE_GROUP,
                          f"group {first.group_id}: {len(proofs)} of {st.group_size} members"
                          + (f", missing {missing}" if missing else "") + (f", duplicated {dup}" if dup else ""))
        # 6. sequences
        last = st.last_sequence(node_id)
        seqs = [p.sequence for p in proofs]
        if len(set(seqs)) != len(seqs):
            raise _Reject(ReasonCode.REPLAYED_SEQUENCE, "a sequence number is used twice in the group")
        for p in proofs:
            if p.sequence <= last:
                raise _Reject(ReasonCode.REPLAYED_SEQUENCE,
                              f"sequence {p.sequence} is not above node {node_id}'s last accepted {last}",
                              p.completion_index)
        # 7. time
        if pol.max_time_skew_ms is not None and now_ms is not None:
            for p in proofs:
                if abs(p.time_ms - now_ms) > pol.max_time_skew_ms:
                    raise _Reject(ReasonCode.TIME_SKEW, f"time_ms {p.time_ms} is more than {pol.max_time_skew_ms} ms "
                                  f"from {now_ms}", p.completion_index)
        # 8. version
        v, cur = first.policy.version, st.current_version
        if v > cur or cur - v > st.max_staleness:
            raise _Reject(ReasonCode.STALE_VERSION,
                          f"policy version {v} outside [{cur - st.max_staleness}, {cur}] (η={st.max_staleness})")
        published = st.snapshot_sha256(v)
        if published is None:
            raise _Reject(ReasonCode.STALE_VERSION, f"no snapshot was published for version {v}")
        if published != first.policy.sha256:
            raise _Reject(ReasonCode.STALE_VERSION, f"snapshot hash for version {v} is not the published one")
        # 9. assignment
        r = first.round_index
        if r > st.current_round or st.current_round - r > st.max_round_lag:
            raise _Reject(ReasonCode.UNASSIGNED_PROMPT, f"round {r} is not open (current {st.current_round}, "
                          f"lag <= {st.max_round_lag})")
        if first.prompt_index >= st.dataset_size:
            raise _Reject(ReasonCode.UNASSIGNED_PROMPT, f"prompt {first.prompt_index} is outside the dataset")
        assigned = assign_prompts(st.run_seed, node_id, r, st.dataset_size, st.prompts_per_round)
        if first.prompt_index not in assigned:
            raise _Reject(ReasonCode.UNASSIGNED_PROMPT,
                          f"prompt {first.prompt_index} is not assigned to node {node_id} in round {r}")
        if self.prompt_sha256_fn is not None:
            try:
                expected_hash = self.prompt_sha256_fn(first.prompt_index)
            except Exception as e:  # noqa: BLE001 - a row that cannot be rendered cannot be verified
                raise _Reject(ReasonCode.UNASSIGNED_PROMPT, f"prompt {first.prompt_index} cannot be rendered: "
                              f"{type(e).__name__}: {e}") from None
            if expected_hash != first.prompt_sha256:
                raise _Reject(ReasonCode.UNASSIGNED_PROMPT,
                              f"prompt_sha256 is not the hash of dataset row {first.prompt_index}'s prompt")
        else:
            skipped.append("prompt_hash")
        if st.group_accepted(first.group_id):
            raise _Reject(ReasonCode.UNASSIGNED_PROMPT, f"group {first.group_id} was already accepted (one group "
                          "per assigned prompt)")
        if pol.bind_version:
            bound = st.dispatched_version(node_id, r)
            if bound is None:
                raise _Reject(ReasonCode.UNASSIGNED_PROMPT, f"round {r} was not dispatched to node {node_id} "
                              "(a Heartbeat in the round binds the version to sample with)")
            if v != bound:
                raise _Reject(ReasonCode.STALE_VERSION, f"round {r} was dispatched to node {node_id} at version "
                              f"{bound}: its proofs must be sampled with it, not v{v}")
        # 9b. no second try
        if st.group_burned(first.group_id):
            raise _Reject(ReasonCode.GROUP_BURNED, f"group {first.group_id} already failed a check: it cannot be "
                          "submitted again")
        if st.round_voided(node_id, r) or st.round_voided(node_id, st.current_round):
            raise _Reject(ReasonCode.TICKET_VOIDED, f"node {node_id} failed a check in round {r} or "
                          f"{st.current_round}: its work there no longer counts")
        # 10. completions
        for p in proofs:
            self._check_completion(p, skipped)
        # 11. rewards
        if first.reward_spec_id != self._spec_id:
            raise _Reject(ReasonCode.REWARD_MISMATCH, f"reward_spec_id {first.reward_spec_id!r} is not the run's")
        for p in proofs:
            self._check_rewards(p, skipped)
        # 12. advantages
        by_index = sorted(proofs, key=lambda p: p.completion_index)
        totals = [p.reward_total for p in by_index]
        expected = expected_advantages(totals, pol.advantage_scale)
        tols = advantage_tolerances(totals, expected, pol.advantage_tolerance, pol.advantage_scale)
        for p, a, tol in zip(by_index, expected, tols):
            if not abs(p.advantage - a) <= tol:
                raise _Reject(ReasonCode.ADVANTAGE_MISMATCH, f"completion {p.completion_index}: advantage "
                              f"{p.advantage!r}, the group's totals give {a!r} (tolerance {tol:.2e})",
                              p.completion_index)
        # 13. spot-check
        return self._spot_check(by_index, skipped)

    def _check_completion(self, p: RewardProof, skipped: list[str]) -> None:
        pol, k = self.policy, p.completion_index
        n = p.num_completion_tokens
        if not 1 <= n <= pol.max_completion_tokens:
            raise _Reject(ReasonCode.BAD_COMPLETION, f"completion {k} has {n} tokens, allowed 1..{pol.max_completion_tokens}", k)
        ids = p.completion_token_ids[:]  # a list: one pass over the repeated field
        if not ids:
            skipped.append("termination")
            return
        if pol.vocab_size is not None and max(ids) >= pol.vocab_size:
            raise _Reject(ReasonCode.BAD_COMPLETION, f"completion {k} has a token id >= vocab size {pol.vocab_size}", k)
        if self._eos:
            if not self._eos.isdisjoint(ids[:-1]):
                raise _Reject(ReasonCode.BAD_COMPLETION, f"completion {k} continues after an EOS token", k)
            if n < pol.max_completion_tokens and ids[-1] not in self._eos:
                raise _Reject(ReasonCode.BAD_COMPLETION, f"completion {k} stops after {n} tokens without an EOS", k)
        else:
            skipped.append("termination")
        if self.decode_fn is not None:
            try:
                text = self.decode_fn(ids)  # a fresh list, not used again here
            except Exception as e:  # noqa: BLE001 - ids the tokenizer cannot decode are the prover's fault
                raise _Reject(ReasonCode.BAD_COMPLETION, f"completion {k}: token ids do not decode ({type(e).__name__})", k)
            if text != p.completion_text:
                raise _Reject(ReasonCode.BAD_COMPLETION, f"completion {k}: completion_text is not the decoded token ids", k)
        else:
            skipped.append("decode")

    def _check_rewards(self, p: RewardProof, skipped: list[str]) -> None:
        k = p.completion_index
        values = [(r.name, r.value, r.applicable) for r in p.rewards]  # one pass over the submessages
        if tuple([v[0] for v in values]) != self._names:
            raise _Reject(ReasonCode.REWARD_MISMATCH, f"completion {k}: rewards {[v[0] for v in values]}, the run's "
                          f"are {list(self._names)}", k)
        total, scale, applicable = 0.0, 0.0, 0
        for (_, value, app), w in zip(values, self._weights):
            if app:
                total += w * value
                scale += abs(w * value)
                applicable += 1
        if applicable == 0:
            raise _Reject(ReasonCode.REWARD_MISMATCH, f"completion {k}: no reward function applies", k)
        tol = self._total_rel_tol * max(1.0, scale)
        if not abs(p.reward_total - total) <= tol:
            raise _Reject(ReasonCode.REWARD_MISMATCH, f"completion {k}: reward_total {p.reward_total!r} is not the "
                          f"weighted sum of its rewards ({total!r})", k)
        if self.reward_recomputer is None:
            skipped.append("rewards")
            return
        try:
            recomputed = self.reward_recomputer(p)
            if type(recomputed) is not dict and not isinstance(recomputed, Mapping):
                raise TypeError(f"the recomputer returned a {type(recomputed).__name__}, not a mapping")
        except Exception as e:  # noqa: BLE001 - a reward that cannot be recomputed is not accepted
            raise _Reject(ReasonCode.REWARD_MISMATCH, f"completion {k}: reward recomputation failed: "
                          f"{type(e).__name__}: {e}", k)
        for (name, value, app), tol in zip(values, self._tols):
            v = recomputed.get(name)
            if v is not None and type(v) is not float:
                try:
                    v = float(v)
                except (TypeError, ValueError, OverflowError):
                    raise _Reject(ReasonCode.REWARD_MISMATCH, f"completion {k}: recomputed {name} {v!r} is not a "
                                  "number", k) from None
            if v is None or v != v:  # None or NaN: not applicable
                if app:
                    raise _Reject(ReasonCode.REWARD_MISMATCH, f"completion {k}: {name} does not apply, "
                                  f"the proof says {value!r}", k)
                continue
            if not app:
                raise _Reject(ReasonCode.REWARD_MISMATCH, f"completion {k}: {name} applies ({v!r}), the proof "
                              "says it does not", k)
            try:
                v32 = _f32(v)
            except OverflowError:
                raise _Reject(ReasonCode.REWARD_MISMATCH, f"completion {k}: recomputed {name} {v!r} is not a "
                              "binary32 number", k) from None
            if not abs(value - v32) <= tol:
                raise _Reject(ReasonCode.REWARD_MISMATCH, f"completion {k}: {name} is {value!r}, recomputed "
                              f"{v32!r} (tolerance {tol})", k)

    def _check_sampling(self, p: RewardProof, shortfalls: Sequence[float] | None, skipped: list[str]) -> None:
        k, tol = p.completion_index, self.policy.sampling_tolerance
        if shortfalls is None:
            skipped.append("sampling_check")
            return
        if len(shortfalls) != p.num_completion_tokens:
            raise _Reject(ReasonCode.SAMPLING_MISMATCH, f"completion {k}: {len(shortfalls)} sampling shortfalls for "
                          f"{p.num_completion_tokens} tokens", k)
        for t, gap in enumerate(shortfalls):
            if not gap <= tol:  # NaN fails too
                raise _Reject(ReasonCode.SAMPLING_MISMATCH,
                              f"completion {k}: token {t} is {float(gap):.3g} nats below the argmax of the policy's "
                              f"log-probabilities plus the run's noise (allowed {tol:g}): not what this member's "
                              "sampler draws", k)

    def _spot_check(self, proofs: list[RewardProof], skipped: list[str]) -> tuple[int, ...]:
        pol = self.policy
        if pol.spot_check_rate <= 0.0:
            return ()
        selected = self.spot_check_members(proofs)
        if selected is None:
            skipped.append("spot_check_selection")
            return ()
        if not selected:
            return ()
        if self.logprob_fn is None:
            skipped.append("spot_check")
            return ()
        done = []
        by_index = {p.completion_index: p for p in proofs}
        for k in selected:
            p = by_index[k]
            if not p.behaviour_logprobs or not p.completion_token_ids:
                raise _Reject(ReasonCode.SPOT_CHECK_FAILED, f"completion {k} was selected for the spot-check but "
                              "carries no token ids / log-probabilities", k)
            try:
                result = self.logprob_fn(p)
                if not isinstance(result, Recomputed):
                    result = Recomputed(result)
                got = [float(x) for x in result.logprobs]
            except SpotCheckUnavailable as e:
                skipped.append(f"spot_check ({e})")
                continue
            except Exception as e:  # noqa: BLE001 - a completion the policy cannot score fails
                raise _Reject(ReasonCode.SPOT_CHECK_FAILED, f"completion {k}: recomputation failed: "
                              f"{type(e).__name__}: {e}", k)
            claimed = p.behaviour_logprobs
            if len(got) != len(claimed):
                raise _Reject(ReasonCode.SPOT_CHECK_FAILED, f"completion {k}: {len(got)} recomputed log-probs for "
                              f"{len(claimed)} tokens", k)
            diffs = [abs(a - b) for a, b in zip(got, claimed)]
            worst = max(diffs)
            mean = math.fsum(diffs) / len(diffs)
            if not (mean <= pol.spot_check_mean_abs and worst <= pol.spot_check_max_abs):
                raise _Reject(ReasonCode.SPOT_CHECK_FAILED,
                              f"completion {k}: log-probabilities under policy v{p.policy.version} differ from the "
                              f"claimed ones by mean {mean:.3g} / max {worst:.3g} (allowed {pol.spot_check_mean_abs:g} "
                              f"/ {pol.spot_check_max_abs:g}): not sampled from this policy", k)
            if pol.sampling_tolerance is not None:
                self._check_sampling(p, result.shortfalls, skipped)
            done.append(k)
        return tuple(done)
