"""Training configuration: pydantic models, loaded from TOML and overridden by ``section.key=value``.

Every field is validated; an error names the field (``grpo.epsilon_high: Input should be ...``).
The embedded default (``configs/arithmetic-demo.toml``) is the CPU demo: a tiny model learning
single-digit addition.
"""

from __future__ import annotations

import math

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEMO_CONFIG = "arithmetic-demo.toml"


class ConfigError(ValueError):
    """The configuration file or an override is invalid; the message names the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(Section):
    name: str = Field("tiny", description="tiny[:seed] | smollm2 | path/to/file.gguf | local folder | hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    backend: Literal["transformers", "vllm"] = Field("transformers", description="generation backend")


class DataSettings(Section):
    dataset: str = Field("arithmetic", description="gsm8k | arithmetic[:MAX[:OPS]] | file.jsonl | HF dataset")
    split: str = "train"
    use_chat_template: bool | None = Field(None, description="None = when the tokenizer has one")
    max_prompt_length: int = Field(512, ge=1)


class RewardSettings(Section):
    name: str
    weight: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict)


class GRPOSettings(Section):
    group_size: int = Field(8, ge=2, description="G: completions per prompt")
    prompts_per_step: int = Field(8, ge=1)
    max_completion_length: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon: float = Field(0.2, ge=0, description="ε_low")
    epsilon_high: float | None = Field(None, ge=0, description="ε_high; None = epsilon")
    delta: float | None = Field(None, gt=1, description="INTELLECT-2 two-sided ratio cap")
    beta: float = Field(0.0, ge=0, description="KL weight; 0 = no reference model")
    kl_bias_correction: bool = Field(True, description="KL term × π_θ/π_old (DeepSeek-V3.2; TRL's default)")
    num_iterations: int = Field(1, ge=1, description="μ: optimisation passes over each batch")
    importance_cap: float = Field(2.0, gt=0, description="cap of π_old/π_behaviour")
    importance_mode: Literal["truncate", "mask"] = "truncate"
    use_behaviour_correction: bool = Field(
        True, description="weight tokens by π_old/π_behaviour (stale or mismatched samplers)"
    )

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class OptimSettings(Section):
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float = Field(1.0, gt=0)
    groups_per_microbatch: int = Field(8, ge=1, description="gradient accumulation unit")
    warmup_steps: int = Field(0, ge=0)
    lr_decay: Literal["none", "cosine"] = Field("none", description="after the warm-up: a constant lr, or a cosine "
                                                                    "down to min_lr over lr_decay_steps")
    lr_decay_steps: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check_decay(self) -> "OptimSettings":
        if self.lr_decay == "cosine" and self.lr_decay_steps < 1:
            raise ValueError("lr_decay_steps: a cosine decay needs at least 1 step")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: {self.min_lr:g} is above lr {self.lr:g}")
        return self

    def lr_factor(self, step: int) -> float:
        """The multiple of ``lr`` for optimizer step ``step`` (0 = the first): the linear warm-up, then
        ``lr_decay``. A pure function of the step, so every swarm peer steps with the same lr."""
        factor = min(1.0, (step + 1) / (self.warmup_steps + 1))
        if self.lr_decay == "cosine":
            done = min(1.0, max(0, step - self.warmup_steps) / self.lr_decay_steps)
            floor = self.min_lr / self.lr
            factor *= floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * done))
        return factor


class RunSettings(Section):
    steps: int = Field(100, ge=1)
    seed: int = 0
    output_dir: str = "runs/demo"
    checkpoint_every: int = Field(0, ge=0, description="0 = only at the end")
    eval_every: int = Field(0, ge=0)
    tensorboard: bool = False
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    keep_freed_memory: bool = Field(True, description="keep freed CPU memory for reuse (glibc malloc tuning, "
                                                      "node/allocator.py); the process keeps its peak heap")


class TrainConfig(Section):
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    rewards: list[RewardSettings] = Field(default_factory=lambda: [RewardSettings(name="arithmetic_accuracy")])
    grpo: GRPOSettings = Field(default_factory=GRPOSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    run: RunSettings = Field(default_factory=RunSettings)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if not self.rewards:
            raise ValueError("rewards: at least one reward function is needed")
        return self


def _format_validation(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{source}: {where}: {err['msg']}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``grpo.lr=1e-5`` → (["grpo", "lr"], 1e-5); the value is read as a TOML value when it parses."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def read_toml(path: Path | None) -> tuple[dict, str]:
    if path is None:
        text = resources.files("grpo_swarm.node").joinpath("configs", DEMO_CONFIG).read_text()
        return tomllib.loads(text), f"<embedded {DEMO_CONFIG}>"
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text()), str(path)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a TOML config (the embedded demo when ``path`` is None) and apply overrides."""
    data, source = read_toml(path)
    data = apply_overrides(data, overrides or [])
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None
