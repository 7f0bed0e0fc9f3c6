"""Side-by-side with TRL's GRPOTrainer: build it offline on our model and compare gradients.

Used by ``bench/grpo_vs_trl.py`` (max_abs_grad_diff) and ``tests/test_trl_parity.py``. TRL is the
reference implementation, so this module is the only place that imports it.
"""

from __future__ import annotations

import copy
import time
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


# ----------------------------------------------------------------------------------------------
# Driving TRL one optimisation step at a time (for the throughput benchmark)
# ----------------------------------------------------------------------------------------------


@dataclass
class TRLStepResult:
    """What one :meth:`TRLStepper.step` did (times in seconds, token counts as TRL processed them)."""

    loss: float
    grad_norm: float | None
    lr: float
    time_step: float  # the whole optimisation step
    time_generate_score: float  # TRL's _generate_and_score_completions (generation, rewards, advantages)
    num_completions: int
    completions_per_prompt: dict[tuple[int, ...], int]  # completions TRL generated per distinct prompt (token ids)
    prompt_lengths: list[int]  # real prompt tokens of each completion row (group-major, before TRL's shuffle)
    completion_lengths: list[int]  # real completion tokens of each row (EOS included)
    padded_prompt_width: int  # P_max: prompts are left-padded to it for every completion
    padded_completion_width: int  # C_max: completions are right-padded to it
    max_abs_advantage: float
    reward_mean: float

    @property
    def time_train(self) -> float:
        """Everything but generation and scoring: loss forward/backward, clipping, optimizer and scheduler step."""
        return self.time_step - self.time_generate_score


class TRLStepper:
    """Drive a TRL ``GRPOTrainer`` one full optimisation step at a time, set up once as ``Trainer.train()`` does.

    ``__init__`` reproduces the setup of ``Trainer.train()`` / ``_inner_training_loop`` (transformers 5.x):
    activation (gradient) checkpointing enabled from ``args.activation_checkpointing(_kwargs)`` exactly as train()
    enables it (TRL's default ``gradient_checkpointing=True``; no kwargs → ``use_reentrant=False``), special tokens
    aligned, a fresh ``TrainerState``, ``_prepare_for_training`` (create the optimizer, ``accelerator.prepare``, create
    the scheduler for ``max_steps``), the loss accumulators, ``model.zero_grad()`` and the ``on_train_begin`` /
    ``on_epoch_begin`` callbacks.

    :meth:`step` is one iteration of ``_run_epoch``'s outer loop with ``gradient_accumulation_steps == 1``: the rows
    arrive as TRL's ``RepeatSampler`` + identity collator deliver them (each prompt row repeated G times in a row),
    ``training_step`` runs (``_prepare_inputs`` generates and scores — with ``steps_per_generation == 1`` it
    regenerates every step — then loss and backward), then gradient clipping, ``optimizer.step()``,
    ``lr_scheduler.step()``, ``model.zero_grad()``, ``global_step += 1`` and the step callbacks / log check.

    The only addition is a timer around the instance's ``_generate_and_score_completions`` (it records how long
    generation + scoring took and the shapes TRL processed); it does not change what runs.
    """

    def __init__(self, trainer, max_steps: int):
        from transformers.trainer_callback import ExportableState, TrainerState
        from transformers.trainer_utils import align_special_tokens

        t, args = trainer, trainer.args
        if args.gradient_accumulation_steps != 1 or args.steps_per_generation != 1 or t.num_iterations != 1:
            raise ValueError(
                "TRLStepper drives gradient_accumulation_steps = steps_per_generation = num_iterations = 1")
        self.trainer = t
        self.max_steps = max_steps
        self.group_size = t.num_generations
        t.is_in_train = True
        if args.activation_checkpointing:  # as Trainer.train()
            gc_kwargs = dict(args.activation_checkpointing_kwargs or {})
            every_n_layers = gc_kwargs.pop("every_n_layers", 1)
            offload = gc_kwargs.pop("offload", False)
            t.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=gc_kwargs or None, every_n_layers=every_n_layers, offload=offload)
        align_special_tokens(t.model, t.processing_class)
        # _inner_training_loop
        t.accelerator.free_memory()
        t.state = TrainerState(stateful_callbacks=[
            cb for cb in t.callback_handler.callbacks + [t.control] if isinstance(cb, ExportableState)])
        t.state.is_hyper_param_search = False
        t.state.train_batch_size = t._train_batch_size
        t.state.compute_steps(args, max_steps)
        t.state.init_training_references(t, max_steps, 1, None)
        self.model, _ = t._prepare_for_training(max_steps, None, None)
        self.start_time = time.time()
        t._initial_num_input_tokens_seen = t.state.num_input_tokens_seen
        t._initial_global_step = t.state.global_step
        t._tr_loss = torch.tensor(0.0, device=args.device)
        t._total_loss_scalar = 0.0
        t._globalstep_last_logged = t.state.global_step
        self.model.zero_grad()
        t.control = t.callback_handler.on_train_begin(args, t.state, t.control)
        t.control = t.callback_handler.on_epoch_begin(args, t.state, t.control)
        self._steps_in_epoch = max_steps
        self._last_generation: dict | None = None
        original = t._generate_and_score_completions

        def timed_generate_and_score(inputs):
            t0 = time.perf_counter()
            out = original(inputs)
            elapsed = time.perf_counter() - t0
            self._last_generation = {"time": elapsed, "inputs": inputs, "out": out}
            return out

        t._generate_and_score_completions = timed_generate_and_score

    @property
    def global_step(self) -> int:
        return self.trainer.state.global_step

    def step(self, prompt_rows: list[dict]) -> TRLStepResult:
        """One optimisation step on ``prompt_rows`` (dicts with ``prompt`` and the reward columns)."""
        t, args, model = self.trainer, self.trainer.args, self.model
        if self.global_step >= self.max_steps:
            raise RuntimeError(f"TRLStepper was set up for max_steps={self.max_steps}")
        batch = [dict(row) for row in prompt_rows for _ in range(self.group_size)]  # RepeatSampler order
        t0 = time.perf_counter()
        self._last_generation = None
        step = self.global_step  # gradient_accumulation_steps == 1: micro-step index == global step
        t.current_gradient_accumulation_steps = 1
        t.accelerator.gradient_state._set_sync_gradients(True)
        t.control = t.callback_handler.on_step_begin(args, t.state, t.control)
        loss = t.training_step(model, batch, None)
        if args.logging_nan_inf_filter and (torch.isnan(loss) or torch.isinf(loss)):
            t._tr_loss += t._tr_loss / (1 + t.state.global_step - t._globalstep_last_logged)
        else:
            t._tr_loss += loss
        t.current_flos += float(t.floating_point_ops(batch))
        t._track_num_input_tokens(batch)
        grad_norm = None
        if args.max_grad_norm > 0:
            grad_norm = t._clip_grad_norm(model)
        grad_norm = t._get_grad_norm(model, grad_norm=grad_norm)
        t.control = t.callback_handler.on_pre_optimizer_step(args, t.state, t.control)
        t.optimizer.step()
        t.control = t.callback_handler.on_optimizer_step(args, t.state, t.control)
        lr = t._get_learning_rate()
        if not t.accelerator.optimizer_step_was_skipped:
            t.lr_scheduler.step()
        model.zero_grad()
        t.state.global_step += 1
        t.state.epoch = (step + 1) / self._steps_in_epoch
        t.control = t.callback_handler.on_step_end(args, t.state, t.control)
        t._maybe_log_save_evaluate(t._tr_loss, grad_norm, model, None, 0, None, self.start_time, learning_rate=lr)
        elapsed = time.perf_counter() - t0
        gen = self._last_generation
        if gen is None:
            raise RuntimeError("TRL did not generate in this step (steps_per_generation / buffering misconfigured?)")
        return self._result(float(loss), grad_norm, lr, elapsed, gen)

    def _result(self, loss, grad_norm, lr, elapsed, gen) -> TRLStepResult:
        out = gen["out"]
        prompt_mask, completion_mask = out["prompt_mask"].cpu(), out["completion_mask"].cpu()
        prompt_ids = out["prompt_ids"].cpu()
        keys = [tuple(ids[m.bool()].tolist()) for ids, m in zip(prompt_ids, prompt_mask)]
        per_prompt: dict[tuple, int] = {}
        for k in keys:
            per_prompt[k] = per_prompt.get(k, 0) + 1
        adv = out["advantages"].detach().float().cpu()
        rewards = [x for x in self.trainer._metrics["train"].get("reward", [])]
        return TRLStepResult(
            loss=loss, grad_norm=None if grad_norm is None else float(grad_norm), lr=float(lr),
            time_step=elapsed, time_generate_score=gen["time"], num_completions=int(prompt_ids.size(0)),
            completions_per_prompt=per_prompt,
            prompt_lengths=prompt_mask.sum(1).tolist(), completion_lengths=completion_mask.sum(1).tolist(),
            padded_prompt_width=int(prompt_ids.size(1)), padded_completion_width=int(completion_mask.size(1)),
            max_abs_advantage=float(adv.abs().max()) if adv.numel() else 0.0,
            reward_mean=float(rewards[-1]) if rewards else float("nan"),
        )

    def close(self) -> None:
        """End training as ``_finalize_training`` does for the callbacks (closes TRL's progress bar)."""
        t = self.trainer
        t.control = t.callback_handler.on_epoch_end(t.args, t.state, t.control)
        t.control = t.callback_handler.on_train_end(t.args, t.state, t.control)
        t.is_in_train = False

    def prompt_token_ids(self, prompts: list) -> list[list[int]]:
        """The token ids TRL feeds the model for ``prompts`` (text or chat messages)."""
        ids, _, _ = self.trainer._tokenize_prompts(prompts)
        return [list(map(int, x)) for x in ids]
