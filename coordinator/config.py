"""Run configuration of a coordinator: pydantic models loaded from a TOML file (``run.toml``).

One file fixes everything a swarm run agrees on: the model, the dataset, the reward functions and
their weights, the GRPO settings, the swarm settings (round size, staleness η, spot-check rate,
averaging timeouts, minimum peers), the run seed and the run id. Sections shared with a single
node (``[data]``, ``[[rewards]]``, ``[grpo]``, ``[optim]``) are the node's own pydantic sections
(:mod:`grpo_swarm.node.config`), so a key means the same thing in both files.

Every field is validated with ``extra="forbid"``; an error names the field
(``run.toml: grpo.group_size: Input should be greater than or equal to 2``), formatted like the
node's :class:`~grpo_swarm.node.config.ConfigError`. The commented example is
``templates/run.toml`` (``grpo-coordinator init`` writes it).

:meth:`RunConfig.verifier_policy` and :meth:`RunConfig.run_spec` turn the config into the
protocol's :class:`~grpo_swarm.protocol.verify.VerifierPolicy` and
:class:`~grpo_swarm.protocol.run_spec.RunSpec` (what :class:`~grpo_swarm.protocol.recorder.RunRecorder`
records in ``run_started``).
"""

from __future__ import annotations

import math
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from grpo_swarm.node.config import (
    ConfigError,
    DataSettings,
    GRPOSettings,
    OptimSettings,
    RewardSettings,
    Section,
    _format_validation,
)
from grpo_swarm.protocol.publication import PUBLISH_QUORUM
from grpo_swarm.protocol.stalls import DEFAULT_WINDOW_ROUNDS

__all__ = [
    "ConfigError",
    "RunConfig",
    "RunSettings",
    "RunModelSettings",
    "RunDataSettings",
    "SwarmSettings",
    "TEMPLATE",
    "load_run_config",
    "parse_run_config",
    "resolve_rewards",
    "template_text",
]

TEMPLATE = "run.toml"
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MIN_DEFAULT_PROOF_TIME_SKEW_S = 600.0  # the derived proof-time window is never shorter than this
MAX_PROOF_TIME_SKEW_S = 30 * 86400.0  # ... nor longer than this (nor may it be set longer)


class RunSettings(Section):
    id: str = Field(..., pattern=RUN_ID_PATTERN, description="run id: letters, digits, . _ -; at most 64")
    seed: int = Field(0, ge=0, lt=2**64, description="run seed: prompt assignment, dataset order")


class RunModelSettings(Section):
    name: str = Field(..., min_length=1, description="hub id | local folder | file.gguf | smollm2 | tiny[:seed]")
    revision: str | None = Field(None, min_length=1, description="hub revision (commit) to pin; None = default")
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class RunDataSettings(DataSettings):
    size: int | None = Field(None, ge=1, description="examples used; None = the whole split")


class SwarmSettings(Section):
    prompts_per_round: int = Field(8, ge=1, description="prompts assigned to each node per round (× G completions)")
    samples_per_round: int = Field(
        256, ge=1, description="completions the swarm gathers per round before averaging (multiple of G)")
    max_staleness: int = Field(1, ge=0, description="η: policy versions a proof may lag behind the current one")
    max_round_lag: int = Field(0, ge=0, description="rounds a proof may lag behind the current round")
    spot_check_rate: float = Field(0.05, ge=0, le=1, description="p: share of proofs whose log-probs are re-checked")
    publish_quorum: float = Field(
        PUBLISH_QUORUM, ge=0.5, lt=1, description="a new version is published only when nodes holding MORE than this "
                                                  "share of its round's verified sample weight report its hash")
    stall_window_rounds: int = Field(
        DEFAULT_WINDOW_ROUNDS, ge=0, description="rounds a failed round (two or more ticket holders, nothing "
                                                 "published) counts: after two of them, a node that held a ticket "
                                                 "in each sits out the next rounds (one in turn while several "
                                                 "did); 0 = off")
    sampling_tolerance: float | None = Field(
        0.05, ge=0, description="spot-checks: nats a token may fall short of the argmax of log-probs + the run's keyed "
                                "noise (proof of sampling); None = sampling not checked")
    ban_after_failures: int = Field(3, ge=0, description="failed checks (spot-check, sampling, rewards, advantages, "
                                                         "completion) before a node's key is banned; 0 = never")
    withheld_audit_strikes: int = Field(
        2, ge=1, description="times within 100 rounds that most of a round's other members report a node for "
                             "withholding its share-audit reveal before it is banned (a node that crashes between "
                             "its reduction and its reveal looks the same); 1 = at the first")
    matchmaking_timeout_s: float = Field(30.0, gt=0, description="averaging: time to form a group")
    averaging_timeout_s: float = Field(120.0, gt=0, description="averaging: time for one all-reduce")
    sender_timeout_s: float = Field(
        5.0, gt=0, description="averaging: a sender that sends nothing for this long, or a reducer that returns "
                               "nothing for twice this, has stalled: the attempt fails and the retry leaves it out "
                               "(raise it for slow uplinks: one part per reducer must cross the slowest in time)")
    sit_out_limit: int = Field(
        16, ge=0, le=64, description="averaging: a node the others left out of a round's retry for breaking an attempt "
                                     "first (or that the breaker blamed) sits out the next 1, 2, 4, ... rounds (doubling "
                                     "with each such round in the last 64), at most this many; 0 = never")
    straggler_wait: float = Field(
        1.0, ge=0, le=10, description="averaging: a partial group waits for the round's missing peers up to this "
                                      "many times the node's own time from the round's close to its averaging (its "
                                      "gradient), at least 2 s and at most half of matchmaking_timeout_s")
    min_peers: int = Field(2, ge=1, description="live nodes needed before a round starts (nobody may start sampling before)")
    heartbeat_interval_s: float = Field(10.0, gt=0, description="how often nodes report to the coordinator")
    round_timeout_s: float = Field(
        600.0, gt=0, description="close a round after this long even below samples_per_round (if it has any)")
    close_when_all_submitted: bool = Field(
        True, description="close a round below samples_per_round once every live node (seen within 3 heartbeat "
                          "intervals) has submitted its whole assignment in it: a swarm smaller than samples_per_round "
                          "needs, or one whose node went away, does not wait out round_timeout_s every round. Live keys "
                          "without verified work (in the open round or the last 2) are waited for only as long again "
                          "as the round took (at least 3 heartbeat intervals), except in the run's first round")
    upload_grace_s: float = Field(
        10.0, gt=0, description="publication: a contributor may race the upload of a new version after this "
                                "many seconds per contributor ranked before it (the first by node id uploads at once)")
    max_proof_time_skew_s: float | None = Field(
        None, gt=0, le=MAX_PROOF_TIME_SKEW_S,
        description="proofs whose time_ms is further than this from the coordinator's clock, either way, are "
                    "rejected TIME_SKEW; None = max(600, (max_staleness + max_round_lag + 1) × round_timeout_s)")

    @field_validator("sampling_tolerance", "matchmaking_timeout_s", "averaging_timeout_s", "heartbeat_interval_s",
                     "round_timeout_s", "straggler_wait", "sender_timeout_s", "upload_grace_s",
                     "max_proof_time_skew_s")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    def proof_time_skew_ms(self) -> int:
        """The verifier's ``max_time_skew_ms`` (it rejects ``abs(time_ms - now) > skew``). A proof is
        stamped when it is made; the default lets it wait as long as it can still be accepted (it may
        lag η versions and ``max_round_lag`` rounds behind, a round lasts up to round_timeout_s) plus
        the round it was made in, and never less than 10 minutes (clock skew between volunteers'
        machines, retries across a coordinator restart). Timestamps such as 0, a date years ahead or
        -2**63 are refused under any setting."""
        if self.max_proof_time_skew_s is not None:
            return int(self.max_proof_time_skew_s * 1000)
        rounds = self.max_staleness + self.max_round_lag + 1
        return int(min(MAX_PROOF_TIME_SKEW_S, max(MIN_DEFAULT_PROOF_TIME_SKEW_S, rounds * self.round_timeout_s)) * 1000)


class RunConfig(Section):
    run: RunSettings
    model: RunModelSettings
    data: RunDataSettings = Field(default_factory=RunDataSettings)
    rewards: list[RewardSettings] = Field(..., min_length=1)
    grpo: GRPOSettings = Field(default_factory=GRPOSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    swarm: SwarmSettings = Field(default_factory=SwarmSettings)

    # -- what the protocol records -------------------------------------------------------------

    def verifier_policy(self, **extra: Any):
        """The run's :class:`VerifierPolicy`; ``extra`` sets what needs the tokenizer (``eos_token_ids``,
        ``vocab_size``) or tolerances."""
        from grpo_swarm.protocol.verify import VerifierPolicy

        return VerifierPolicy(
            reward_specs=tuple(r.model_dump() for r in self.rewards),
            max_completion_tokens=self.grpo.max_completion_length,
            advantage_scale="group" if self.grpo.scale_rewards == "group" else "none",
            spot_check_rate=self.swarm.spot_check_rate,
            max_time_skew_ms=self.swarm.proof_time_skew_ms(),
            sampling_tolerance=self.swarm.sampling_tolerance,
            bind_version=True,
            ban_after_failures=self.swarm.ban_after_failures,
            **extra,
        )

    def node_payload(self, dataset_size: int) -> dict:
        """The ``node`` object of ``run_started``: what a node or an auditor needs to rebuild prompts."""
        return {
            "model": self.model.name,
            "model_revision": self.model.revision,
            "dataset": {"spec": self.data.dataset, "split": self.data.split, "seed": self.run.seed,
                        "size": dataset_size},
            "use_chat_template": self.data.use_chat_template,
            "max_prompt_length": self.data.max_prompt_length,
            "sampling": {"temperature": self.grpo.temperature, "top_p": self.grpo.top_p, "top_k": self.grpo.top_k,
                         "max_completion_length": self.grpo.max_completion_length},
        }

    def run_spec(self, dataset_size: int, **policy_extra: Any):
        """The :class:`RunSpec` for :class:`RunRecorder` once the dataset's size is known."""
        from grpo_swarm.protocol.run_spec import RunSpec

        if self.data.size is not None:
            dataset_size = min(dataset_size, self.data.size)
        return RunSpec(
            run_id=self.run.id, run_seed=self.run.seed, dataset_size=dataset_size,
            prompts_per_round=self.swarm.prompts_per_round, group_size=self.grpo.group_size,
            policy=self.verifier_policy(**policy_extra), max_staleness=self.swarm.max_staleness,
            max_round_lag=self.swarm.max_round_lag, node=self.node_payload(dataset_size),
            publish_quorum=self.swarm.publish_quorum, stall_window_rounds=self.swarm.stall_window_rounds,
            withheld_audit_strikes=self.swarm.withheld_audit_strikes,
        )


def _cross_checks(cfg: RunConfig) -> list[str]:
    """Constraints between fields, each as ``field: message``."""
    problems = []
    names = [r.name for r in cfg.rewards]
    for i, r in enumerate(cfg.rewards):
        if not r.name.strip():
            problems.append(f"rewards.{i}.name: must not be empty")
        if not math.isfinite(r.weight):
            problems.append(f"rewards.{i}.weight: must be finite")
        if names.index(r.name) != i:
            problems.append(f"rewards.{i}.name: {r.name!r} is listed twice (reward names must be unique)")
    if cfg.grpo.scale_rewards == "batch":
        problems.append("grpo.scale_rewards: 'batch' cannot be verified per group in a swarm; use 'group' or 'none'")
    if "prompts_per_step" in cfg.grpo.model_fields_set:
        problems.append("grpo.prompts_per_step: not used by a swarm run; set swarm.prompts_per_round")
    if cfg.swarm.samples_per_round % cfg.grpo.group_size:
        problems.append(f"swarm.samples_per_round: {cfg.swarm.samples_per_round} is not a multiple of "
                        f"grpo.group_size ({cfg.grpo.group_size})")
    if cfg.data.size is not None and cfg.swarm.prompts_per_round > cfg.data.size:
        problems.append(f"swarm.prompts_per_round: {cfg.swarm.prompts_per_round} exceeds data.size ({cfg.data.size})")
    if cfg.swarm.averaging_timeout_s <= 2 * cfg.swarm.sender_timeout_s:
        problems.append(f"swarm.sender_timeout_s: {cfg.swarm.sender_timeout_s:g} leaves no time for a reducer (twice "
                        f"it) within swarm.averaging_timeout_s ({cfg.swarm.averaging_timeout_s:g})")
    if cfg.grpo.delta is not None and cfg.grpo.delta <= 1 + cfg.grpo.eps_high:
        problems.append(f"grpo.delta: must exceed 1 + epsilon_high ({1 + cfg.grpo.eps_high:g})")
    return problems


def parse_run_config(data: dict, source: str = "<run config>") -> RunConfig:
    """Validate a TOML-shaped dict; ConfigError naming every bad field."""
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None
    problems = _cross_checks(cfg)
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))
    return cfg


def load_run_config(path: str | Path) -> RunConfig:
    """Load and validate a run config file; ConfigError (naming the field) when anything is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run config not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    return parse_run_config(data, str(path))


def template_text() -> str:
    """The commented example ``run.toml`` shipped with the package."""
    return resources.files("grpo_swarm.coordinator").joinpath("templates", TEMPLATE).read_text()


def resolve_rewards(cfg: RunConfig, source: str = "<run config>") -> None:
    """Resolve every reward function (built-in or plugin, with its args); ConfigError naming the entry.
    Imports the node's reward module (torch), so it is kept out of :func:`load_run_config`."""
    from grpo_swarm.node.rewards import RewardError, resolve_reward

    problems = []
    for i, r in enumerate(cfg.rewards):
        try:
            resolve_reward(r.name, r.args)
        except RewardError as exc:
            problems.append(f"{source}: rewards.{i}.name: {exc}")
    if problems:
        raise ConfigError("\n".join(problems))

