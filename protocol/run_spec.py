"""The run specification: everything fixed for a run that verification depends on (the
``run_started`` payload of the protocol log), and the model-side callables a replay may use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .identity import PUBLIC_KEY_SIZE
from .payloads import hex_bytes
from .publication import PUBLISH_QUORUM, check_quorum
from .stalls import DEFAULT_WINDOW_ROUNDS
from .verify import DecodeFn, InMemoryVerifierState, LogprobFn, PromptHashFn, RewardRecomputer, Verifier, VerifierPolicy

HOOKS_ENTRY_POINT_GROUP = "grpo_swarm.audit_hooks"


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
    publish_quorum: float = PUBLISH_QUORUM  # a new version needs MORE than this share of its round's weight
    stall_window_rounds: int = DEFAULT_WINDOW_ROUNDS  # :mod:`.stalls`: rounds a failed round counts; 0 = off
    # :mod:`.peers`: majorities of withheld-audit-reveal reports (strikes) within a window that ban; 1 = at once
    withheld_audit_strikes: int = 2

    def __post_init__(self):
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ValueError("run_id must be a non-empty string")
        for name in ("run_seed", "dataset_size", "prompts_per_round", "group_size", "max_staleness", "max_round_lag",
                     "stall_window_rounds"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0")
        if self.dataset_size < 1 or self.group_size < 1 or not 1 <= self.prompts_per_round <= self.dataset_size:
            raise ValueError("need dataset_size >= 1, group_size >= 1, 1 <= prompts_per_round <= dataset_size")
        if self.run_seed >= 2**64:
            raise ValueError("run_seed must be below 2**64")
        if self.spot_check_commitment is not None and len(self.spot_check_commitment) != 32:
            raise ValueError("spot_check_commitment must be 32 bytes")
        object.__setattr__(self, "publish_quorum", check_quorum(self.publish_quorum))
        if not isinstance(self.withheld_audit_strikes, int) or isinstance(self.withheld_audit_strikes, bool) \
                or self.withheld_audit_strikes < 1:
            raise ValueError("withheld_audit_strikes must be an integer >= 1")
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
            "publish_quorum": self.publish_quorum,
            "stall_window_rounds": self.stall_window_rounds,
            "withheld_audit_strikes": self.withheld_audit_strikes,
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
                spot_check_commitment=hex_bytes(commitment, "spot_check_commitment", 32) if commitment is not None else None,
                log_signers=tuple(hex_bytes(k, "log_signers", PUBLIC_KEY_SIZE) for k in signers),
                # logs written before the quorum rule carry none: they get the default
                publish_quorum=obj.get("publish_quorum", PUBLISH_QUORUM),
                # logs written before the stall rule carry none: nobody sat out, so it is off
                stall_window_rounds=obj.get("stall_window_rounds", 0),
                # logs written before the strike rule carry none: one majority of such reports banned
                withheld_audit_strikes=obj.get("withheld_audit_strikes", 1),
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

