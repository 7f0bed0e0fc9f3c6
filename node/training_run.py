"""A single-node training run: build everything from a config, loop over steps, log, checkpoint."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .allocator import keep_freed_memory
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import PromptSampler, load_dataset_spec
from .metrics_log import MetricsLog
from .models import LoadedModel, load_model
from .rewards import build_reward_functions
from .trainer import GRPOTrainer, resolve_device


@dataclass
class RunResult:
    trainer: GRPOTrainer
    history: list[dict]
    output_dir: Path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_trainer(cfg: TrainConfig, loaded: LoadedModel | None = None) -> GRPOTrainer:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.keep_freed_memory:
        keep_freed_memory()
    seed_everything(cfg.run.seed)
    loaded = loaded or load_model(cfg.model.name)
    device = resolve_device(cfg.model.device)
    model = loaded.model.to(device)
    rewards = build_reward_functions([r.model_dump() for r in cfg.rewards])
    return GRPOTrainer(model, loaded.tokenizer, cfg, rewards)


def run_training(
    cfg: TrainConfig,
    loaded: LoadedModel | None = None,
    on_step: Callable[[dict], None] | None = None,
    resume: Path | None = None,
) -> RunResult:
    """Train for ``cfg.run.steps`` steps; metrics go to ``<output_dir>/metrics.jsonl``."""
    trainer = build_trainer(cfg, loaded)
    examples = load_dataset_spec(cfg.data.dataset, cfg.data.split, seed=cfg.run.seed)
    sampler = PromptSampler(examples, seed=cfg.run.seed)
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    if resume is not None:
        state = load_checkpoint(resume, trainer.model, trainer.optimizer)
        trainer.step_count, trainer.version = state["step"], state["version"]
        sampler.load_state_dict(state["sampler"])
    log = MetricsLog(out / "metrics.jsonl", out / "tensorboard" if cfg.run.tensorboard else None)
    history = []
    try:
        while trainer.step_count < cfg.run.steps:
            metrics = trainer.step(sampler.next_batch(cfg.grpo.prompts_per_step))
            history.append(metrics)
            log.write(metrics)
            if on_step is not None:
                on_step(metrics)
            every = cfg.run.checkpoint_every
            if every and trainer.step_count % every == 0:
                save_run_checkpoint(out / f"checkpoint-{trainer.step_count}", trainer, sampler)
        save_run_checkpoint(out / "final", trainer, sampler)
    finally:
        log.close()
    return RunResult(trainer=trainer, history=history, output_dir=out)


def save_run_checkpoint(folder: Path, trainer: GRPOTrainer, sampler: PromptSampler) -> Path:
    state = {"step": trainer.step_count, "version": trainer.version, "sampler": sampler.state_dict(),
             "config": json.loads(trainer.cfg.model_dump_json())}
    return save_checkpoint(folder, trainer.model, trainer.optimizer, state)
