"""One GRPO step: rollout → rewards → advantages → μ × (compute gradients → apply gradients).

Computing gradients (:meth:`GRPOTrainer.compute_gradients`, which leaves them in ``param.grad``)
and applying them (:meth:`GRPOTrainer.apply_gradients`: clip, AdamW, version + 1) are separate
calls, so the swarm can average gradients with other peers between the two.

The loss is normalised over the whole step (see :func:`grpo.sequence_token_weights`), so the
micro-batch size (``optim.groups_per_microbatch``) changes memory use, never the gradient.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import PreTrainedModel

from . import grpo
from .config import TrainConfig
from .data import PromptExample, render_prompt
from .logprobs import completion_logprobs
from .rewards import RewardFunction, RewardResult, compute_rewards
from .backends import make_backend
from .rollout import RolloutBackend, RolloutBatch, SamplingParams, eos_and_pad_ids, full_precision


class NonFiniteLossError(FloatingPointError):
    """The loss or a gradient became NaN/inf; the update was not applied."""


@dataclass
class ScoredBatch:
    """A rollout batch with its rewards and advantages: everything a gradient computation needs."""

    rollouts: RolloutBatch
    rewards: RewardResult
    advantages: torch.Tensor  # [N]
    seq_weights: torch.Tensor  # [N] per-token weight of each sequence in the step loss
    old_logps: torch.Tensor | None = None  # [N, C] π_old when μ > 1 (else the detached current policy)
    ref_logps: torch.Tensor | None = None  # [N, C] when β > 0
    completions: list[str] = field(default_factory=list)

    def select_groups(self, groups: Sequence[int], loss_type: str, max_completion_length: int) -> ScoredBatch:
        """The batch of only ``groups`` (e.g. the ones the coordinator accepted), with the step's
        per-token weights recomputed for the smaller batch (what a swarm peer's gradient rests on)."""
        r, g = self.rollouts, self.rollouts.group_size
        rows = torch.tensor([gi * g + k for gi in groups for k in range(g)], dtype=torch.long)
        mask = r.completion_mask[rows]
        sub = RolloutBatch(
            prompt_ids=[r.prompt_ids[gi] for gi in groups], completion_ids=r.completion_ids[rows], completion_mask=mask,
            behaviour_logps=r.behaviour_logps[rows], truncated=r.truncated[rows], group_size=g,
            policy_version=r.policy_version, timings=dict(r.timings))
        rewards = RewardResult(self.rewards.per_function[rows], self.rewards.total[rows], list(self.rewards.names))
        return ScoredBatch(
            rollouts=sub, rewards=rewards, advantages=self.advantages[rows],
            seq_weights=grpo.sequence_token_weights(mask, loss_type, max_completion_length),
            old_logps=None if self.old_logps is None else self.old_logps[rows],
            ref_logps=None if self.ref_logps is None else self.ref_logps[rows],
            completions=[self.completions[i] for i in rows.tolist()] if self.completions else [])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def clip_settings(cfg: TrainConfig) -> grpo.ClipSettings:
    g = cfg.grpo
    return grpo.ClipSettings(epsilon_low=g.epsilon, epsilon_high=g.eps_high, delta=g.delta, beta=g.beta,
                             kl_bias_correction=g.kl_bias_correction)


def sampling_params(cfg: TrainConfig) -> SamplingParams:
    g = cfg.grpo
    return SamplingParams(max_new_tokens=g.max_completion_length, temperature=g.temperature, top_p=g.top_p,
                          top_k=g.top_k)


def microbatches(num_groups: int, group_size: int, groups_per_microbatch: int):
    """Row slices of whole groups: prompts are shared within a group, so groups are never split."""
    for start in range(0, num_groups, groups_per_microbatch):
        stop = min(num_groups, start + groups_per_microbatch)
        yield start, stop, slice(start * group_size, stop * group_size)


def trim_width(mask: torch.Tensor) -> int:
    return max(1, int(mask.sum(dim=1).max()))


class GRPOTrainer:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        cfg: TrainConfig,
        reward_functions: Sequence[RewardFunction],
        backend: RolloutBackend | None = None,
        ref_model: PreTrainedModel | None = None,
    ):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.reward_functions = list(reward_functions)
        self.device = model.device
        _, self.pad_id = eos_and_pad_ids(model, tokenizer)
        self.backend = backend or make_backend(cfg, model, tokenizer)
        if ref_model is model:
            raise ValueError("ref_model must be a separate copy of the policy (it is frozen)")
        if cfg.grpo.beta > 0 and ref_model is None:
            ref_model = copy.deepcopy(model)
        self.ref_model = ref_model
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
        self.clip = clip_settings(cfg)
        self.params = sampling_params(cfg)
        self.trainable = [p for p in model.parameters() if p.requires_grad]  # walking the modules costs ~0.5 ms
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=cfg.optim.lr,
            betas=cfg.optim.adam_betas, weight_decay=cfg.optim.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: cfg.optim.lr_factor(s))
        self.version = 0  # number of optimizer steps taken: the policy version
        self.step_count = 0
        self._autocast = (
            torch.autocast(self.device.type, dtype=getattr(torch, cfg.model.dtype))
            if cfg.model.dtype != "float32" else None
        )

    # ---------------------------------------------------------------- sampling and scoring
    def encode_prompts(self, examples: Sequence[PromptExample]) -> tuple[list[str], list[list[int]]]:
        texts = [render_prompt(self.tokenizer, ex, self.cfg.data.use_chat_template) for ex in examples]
        ids = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        limit = self.cfg.data.max_prompt_length
        for ex, seq in zip(examples, ids):
            if not seq:
                raise ValueError(f"prompt of example {ex.index} encodes to no tokens")
            if len(seq) > limit:
                raise ValueError(f"prompt of example {ex.index} has {len(seq)} tokens > data.max_prompt_length={limit}")
        return texts, ids

    def rollout(self, examples: Sequence[PromptExample], seed: int,
                noise_keys: Sequence[tuple[int, int]] | None = None) -> tuple[list[str], RolloutBatch]:
        """Sample the groups of ``examples``; ``noise_keys`` (one per completion, group-major) fix the
        completions a swarm node must produce (:mod:`.noise`), else they derive from ``seed``."""
        texts, ids = self.encode_prompts(examples)
        kw = {} if noise_keys is None else {"noise_keys": noise_keys}
        sync = getattr(self.backend, "sync_weights", None)
        if sync is not None:  # an engine with its own copy of the policy (vLLM): give it the current weights
            sync(self.model)
        with full_precision():  # (not model.dtype: the verifier's spot-check recomputes in float32)
            batch = self.backend.generate(ids, self.cfg.grpo.group_size, self.params, seed, **kw)
        batch.policy_version = self.version
        return texts, batch

    def score(self, examples: Sequence[PromptExample], prompt_texts: list[str], rollouts: RolloutBatch) -> ScoredBatch:
        g = rollouts.group_size
        completion_ids = rollouts.completion_lists()
        completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = [t for t in prompt_texts for _ in range(g)]
        names = sorted({k for ex in examples for k in ex.columns})
        columns = {k: [ex.columns.get(k) for ex in examples for _ in range(g)] for k in names}
        rewards = compute_rewards(self.reward_functions, prompts, completions, columns, completion_ids)
        advantages = grpo.group_advantages(rewards.total, g, self.cfg.grpo.scale_rewards)
        weights = grpo.sequence_token_weights(rollouts.completion_mask, self.cfg.grpo.loss_type,
                                              self.cfg.grpo.max_completion_length)
        return ScoredBatch(rollouts=rollouts, rewards=rewards, advantages=advantages, seq_weights=weights,
                           completions=completions)

    @torch.no_grad()
    def frozen_logprobs(self, model: PreTrainedModel, batch: ScoredBatch) -> torch.Tensor:
        """Log-probs of the batch's completions under ``model`` without gradients (π_ref or π_old)."""
        r = batch.rollouts
        out = torch.zeros_like(r.behaviour_logps)
        for g0, g1, rows in microbatches(r.num_groups, r.group_size, self.cfg.optim.groups_per_microbatch):
            width = trim_width(r.completion_mask[rows])
            with self._amp():
                scores = completion_logprobs(model, r.prompt_ids[g0:g1], r.completion_ids[rows, :width], r.group_size,
                                             self.cfg.grpo.temperature, self.pad_id)
            out[rows, :width] = scores.logps.float().cpu()
        return out * r.completion_mask

    def prepare(self, batch: ScoredBatch) -> ScoredBatch:
        if self.ref_model is not None and self.cfg.grpo.beta > 0:
            batch.ref_logps = self.frozen_logprobs(self.ref_model, batch)
        if self.cfg.grpo.num_iterations > 1:
            batch.old_logps = self.frozen_logprobs(self.model, batch)
        return batch

    # ---------------------------------------------------------------- gradients
    def compute_gradients(self, batch: ScoredBatch) -> dict:
        """Backpropagate the step loss of ``batch`` into ``param.grad`` (accumulating); no update."""
        r, cfg = batch.rollouts, self.cfg
        if not self.model.training:
            self.model.train()
        totals = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_low": 0.0, "clip_high": 0.0, "tokens": 0.0}
        is_weights_all = []
        for g0, g1, rows in microbatches(r.num_groups, r.group_size, cfg.optim.groups_per_microbatch):
            width = trim_width(r.completion_mask[rows])
            mask = r.completion_mask[rows, :width].to(self.device)
            with self._amp():
                scores = completion_logprobs(self.model, r.prompt_ids[g0:g1], r.completion_ids[rows, :width],
                                             r.group_size, cfg.grpo.temperature, self.pad_id, with_entropy=True)
            logps = scores.logps.float()
            old = batch.old_logps[rows, :width].to(self.device) if batch.old_logps is not None else None
            ref = batch.ref_logps[rows, :width].to(self.device) if batch.ref_logps is not None else None
            weights = None
            if cfg.grpo.use_behaviour_correction:
                old_for_is = old if old is not None else logps.detach()
                weights = grpo.behaviour_importance_weights(
                    old_for_is, r.behaviour_logps[rows, :width].to(self.device), mask,
                    cfg.grpo.importance_cap, cfg.grpo.importance_mode)
                is_weights_all.append((weights.cpu(), mask.cpu()))
            adv = batch.advantages[rows].to(self.device)
            objective = grpo.per_token_objective(logps, old, adv, self.clip, ref_logps=ref, importance_weights=weights)
            loss = grpo.weighted_loss(objective.loss, mask, batch.seq_weights[rows].to(self.device))
            if not torch.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(_nonfinite_culprit(logps, old, ref, adv, mask, groups=(g0, g1)))
            loss.backward()
            n_tok = float(mask.sum())
            totals["loss"] += float(loss.detach())
            totals["tokens"] += n_tok
            totals["entropy"] += float((scores.entropy * mask).sum())
            if objective.kl is not None:
                totals["kl"] += float((objective.kl * mask).sum())
            fr = grpo.clip_fractions(objective.ratio, adv, mask, self.clip)
            totals["clip_low"] += fr["clip_low"] * n_tok
            totals["clip_high"] += fr["clip_high"] * n_tok
        n_tok = max(totals.pop("tokens"), 1.0)
        metrics = {"loss": totals["loss"], **{k: totals[k] / n_tok for k in ("kl", "entropy", "clip_low", "clip_high")}}
        if is_weights_all:
            w = torch.cat([_pad_to(w, r.completion_mask.size(1)) for w, _ in is_weights_all])
            m = torch.cat([_pad_to(m, r.completion_mask.size(1)) for _, m in is_weights_all])
            metrics["ess"] = grpo.effective_sample_size(w, m)
        return metrics

    def apply_gradients(self) -> dict:
        """Clip the accumulated gradients, take an AdamW step, bump the policy version."""
        norm = clip_gradients([p.grad for p in self.trainable if p.grad is not None], self.cfg.optim.max_grad_norm)
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"gradient norm is {float(norm)} at version {self.version}; update skipped")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        return {"grad_norm": float(norm), "lr": self.scheduler.get_last_lr()[0]}

    # ---------------------------------------------------------------- the whole step
    def step(self, examples: Sequence[PromptExample]) -> dict:
        t0 = time.perf_counter()
        texts, rollouts = self.rollout(examples, seed=self.cfg.run.seed * 1_000_003 + self.step_count)
        t1 = time.perf_counter()
        batch = self.prepare(self.score(examples, texts, rollouts))
        t2 = time.perf_counter()
        metrics: dict = {}
        for _ in range(self.cfg.grpo.num_iterations):
            metrics.update(self.compute_gradients(batch))
            metrics.update(self.apply_gradients())
        t3 = time.perf_counter()
        self.step_count += 1
        metrics.update(grpo.reward_metrics(batch.rewards.total, rollouts.group_size))
        for i, name in enumerate(batch.rewards.names):
            metrics[f"reward/{name}"] = float(torch.nanmean(batch.rewards.per_function[:, i]))
        metrics.update(grpo.length_metrics(rollouts.completion_mask, rollouts.truncated))
        metrics.update({
            "step": self.step_count, "version": self.version, "time_generate": t1 - t0,
            "time_score": t2 - t1, "time_train": t3 - t2,
            "completions_per_s": rollouts.num_completions / (t3 - t0),
        })
        return metrics

    def _amp(self):
        return self._autocast if self._autocast is not None else nullcontext()


def clip_gradients(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale ``grads`` in place to a total L2 norm of at most ``max_norm``; returns the norm before.

    ``torch.nn.utils.clip_grad_norm_``'s arithmetic (the same coefficient, ``max_norm / (norm + 1e-6)``), minus
    its multiply by 1.0 when the norm is within bounds — a full read and write of every gradient (~40 ms per
    step for SmolLM2-135M on the 2-core CPU). A NaN/inf norm leaves the gradients as they are (the caller
    refuses the update).
    """
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)
    return norm


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.size(1)))


def _nonfinite_culprit(logps, old, ref, adv, mask, groups) -> str:
    where = f"groups {groups[0]}..{groups[1] - 1}"
    for name, t in (("policy log-probabilities", logps), ("old log-probabilities", old),
                    ("reference log-probabilities", ref), ("advantages", adv)):
        if t is not None and not torch.isfinite(t if t.dim() == 1 else t * mask).all():
            return f"non-finite loss in {where}: {name} contain NaN/inf (model weights may have diverged)"
    return f"non-finite loss in {where}: the loss overflowed (check lr, beta and the reward scale)"
