"""Side-by-side with TRL's GRPOTrainer: build it offline on our model and compare gradients.

Used by ``bench/grpo_vs_trl.py`` (max_abs_grad_diff) and ``tests/test_trl_parity.py``. TRL is the
reference implementation, so this module is the only place that imports it.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedModel

from grpo_swarm.node.rollout import left_pad
from grpo_swarm.node.trainer import ScoredBatch


@dataclass(frozen=True)
class SharedSettings:
    """The settings both implementations are given; everything else is each one's default."""

    group_size: int = 4
    prompts_per_step: int = 2
    max_completion_length: int = 16
    temperature: float = 1.0
    loss_type: str = "grpo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    lr: float = 1e-6

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def make_trl_trainer(model: PreTrainedModel, tokenizer, settings: SharedSettings, prompts: list[str],
                     reward_funcs, output_dir: str | None = None, **trl_overrides):
    """A TRL GRPOTrainer on CPU with TRL's defaults except ``settings`` (and ``trl_overrides``)."""
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=output_dir or tempfile.mkdtemp(prefix="trl-"),
        use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1_000_000,
        num_generations=settings.group_size,
        per_device_train_batch_size=settings.group_size * settings.prompts_per_step,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature, loss_type=settings.loss_type, beta=settings.beta,
        epsilon=settings.epsilon, epsilon_high=settings.epsilon_high, delta=settings.delta,
        learning_rate=settings.lr, **trl_overrides,
    )
    if settings.beta > 0 and not Path(model.config._name_or_path or "/nonexistent").is_dir():
        # TRL loads its reference model with from_pretrained(name_or_path): give it a local copy
        folder = tempfile.mkdtemp(prefix="trl-ref-")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model.config._name_or_path = folder
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    return GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                       processing_class=tokenizer)


def trl_inputs(batch: ScoredBatch, pad_id: int) -> dict:
    """Our scored batch in the layout TRL's ``_compute_loss`` takes (prompts repeated G times)."""
    r = batch.rollouts
    prompt_ids, prompt_mask = left_pad([p.tolist() for p in r.prompt_ids for _ in range(r.group_size)], pad_id)
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": r.completion_ids, "completion_mask": r.completion_mask.long(),
        "advantages": batch.advantages, "num_items_in_batch": r.completion_mask.sum(),
    }
    if batch.old_logps is not None:
        inputs["old_per_token_logps"] = batch.old_logps
    if batch.ref_logps is not None:
        inputs["ref_per_token_logps"] = batch.ref_logps
    return inputs


def trl_gradients(trl_trainer, batch: ScoredBatch, pad_id: int) -> dict[str, torch.Tensor]:
    """Gradients of TRL's loss on ``batch`` (one accumulation step, training mode)."""
    model = trl_trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    trl_trainer.current_gradient_accumulation_steps = 1
    loss = trl_trainer._compute_loss(model, trl_inputs(batch, pad_id))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def our_gradients(trainer, batch: ScoredBatch) -> dict[str, torch.Tensor]:
    trainer.model.zero_grad(set_to_none=True)
    trainer.compute_gradients(batch)
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    return grads


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise AssertionError(f"different parameters got gradients: {sorted(a.keys() ^ b.keys())[:5]}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def clone_model(model: PreTrainedModel) -> PreTrainedModel:
    """A deep copy (TRL patches the forward of the model it is given)."""
    return copy.deepcopy(model)
