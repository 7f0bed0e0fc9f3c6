"""GRPO mathematics as pure tensor functions: no models, no I/O.

Everything the trainer (and later the swarm's verifier) needs to turn rewards and log-probabilities
into a loss:

* :func:`group_advantages` — group-relative advantages (DeepSeekMath §4.1.2), scaled by the group's
  sample std (TRL's default, + 1e-4), the batch std, or not at all (Dr. GRPO).
* :func:`behaviour_importance_weights` — AReaL's decoupled-PPO weight π_old / π_behaviour for rollouts
  sampled by an older (stale) policy or a different sampler, truncated or masked at a cap.
* :func:`per_token_objective` — the clipped surrogate with ε_low/ε_high, INTELLECT-2's two-sided cap δ,
  the k3 KL estimator to a frozen reference weighted by β (optionally times the ratio: the unbiased
  reverse-KL gradient of DeepSeek-V3.2, as TRL 1.16 does by default).
* :func:`sequence_token_weights` — how each loss type (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``)
  normalises per-token losses over the *whole step's* batch, so splitting a batch into micro-batches
  never changes the gradient.
* :func:`step_metrics` — reward / clipping / KL / entropy / length / effective-sample-size figures.

The formulas follow TRL 1.16's ``GRPOTrainer._compute_loss`` so that gradients agree to 1e-5
(``tests/test_trl_parity.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
AdvantageScale = Literal["group", "batch", "none"]
ImportanceMode = Literal["truncate", "mask"]

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_EPS = 1e-4  # TRL adds this to the std before dividing


def group_advantages(rewards: torch.Tensor, group_size: int, scale: AdvantageScale = "group") -> torch.Tensor:
    """Group-normalised advantages for a flat ``[num_groups * group_size]`` reward vector.

    ``A_i = (r_i - mean(group)) / (std + 1e-4)`` where std is the *sample* std (Bessel-corrected, as
    TRL does) of the group (``scale="group"``), of the whole batch (``"batch"``), or 1 (``"none"``).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"non-finite rewards at indices {bad}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        std = std.expand_as(grouped).flatten()
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros(())
    else:
        raise ValueError(f"unknown advantage scale {scale!r}; expected group, batch or none")
    return centred / (std + STD_EPS)


def zero_std_group_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (they carry no learning signal)."""
    grouped = rewards.view(-1, group_size)
    return float((grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean())


def behaviour_importance_weights(
    old_logps: torch.Tensor,
    behaviour_logps: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
    mode: ImportanceMode = "truncate",
) -> torch.Tensor:
    """Per-token π_old / π_behaviour (AReaL decoupled PPO), detached.

    ``truncate`` clamps the weight to ``[0, cap]`` (truncated IS); ``mask`` zeroes tokens whose weight
    leaves ``[1/cap, cap]`` (they are too off-policy to learn from). Padding positions get weight 0.
    """
    if cap <= 0:
        raise ValueError(f"importance-weight cap must be positive, got {cap}")
    weight = torch.exp((old_logps - behaviour_logps).detach())
    if mode == "truncate":
        weight = weight.clamp(max=cap)
    elif mode == "mask":
        weight = torch.where((weight > cap) | (weight < 1.0 / cap), torch.zeros_like(weight), weight)
    else:
        raise ValueError(f"unknown importance-weight mode {mode!r}; expected truncate or mask")
    return weight * mask


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ || π_ref), per token: exp(r) - r - 1 with r = ref - logp."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


@dataclass(frozen=True)
class ClipSettings:
    """The clipping hyper-parameters of the surrogate objective."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None  # INTELLECT-2 two-sided cap on the ratio (applies to negative advantages)
    beta: float = 0.0  # KL weight; 0 means no reference model at all
    # multiply the KL term by the (differentiable) ratio π_θ/π_old: the unbiased reverse-KL gradient of
    # DeepSeek-V3.2, TRL 1.16's default (``use_bias_correction_kl``)
    kl_bias_correction: bool = True


@dataclass
class TokenObjective:
    """Per-token loss and the intermediate quantities the metrics need."""

    loss: torch.Tensor  # [N, T], to be weighted by mask and sequence weights
    ratio: torch.Tensor  # [N, T] detached π_θ / π_old
    kl: torch.Tensor | None  # [N, T] detached k3 KL, when β > 0


def per_token_objective(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    clip: ClipSettings,
    ref_logps: torch.Tensor | None = None,
    importance_weights: torch.Tensor | None = None,
) -> TokenObjective:
    """The GRPO clipped surrogate per token (DeepSeekMath eq. 3, TRL's token-level form).

    ``old_logps=None`` means the rollouts come from the current policy (μ = 1): π_old is the detached
    current policy, so the ratio is exactly 1 in value and only its gradient matters.
    """
    if old_logps is None:
        old_logps = logps.detach()
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - clip.epsilon_low, 1 + clip.epsilon_high)
    capped = torch.clamp(ratio, max=clip.delta) if clip.delta is not None else ratio
    loss = -torch.min(capped * adv, clipped * adv)
    if importance_weights is not None:
        loss = loss * importance_weights
    kl = None
    if clip.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs reference log-probabilities")
        kl_full = k3_kl(logps, ref_logps)
        kl_term = kl_full * ratio if clip.kl_bias_correction else kl_full
        loss = loss + clip.beta * kl_term
        kl = kl_full.detach()
    return TokenObjective(loss=loss, ratio=ratio.detach(), kl=kl)


def sequence_token_weights(mask: torch.Tensor, loss_type: LossType, max_completion_length: int) -> torch.Tensor:
    """Weight of each token of sequence ``i`` in the step loss, for the whole batch ``mask`` [N, T].

    The step loss is ``sum_{i,t} loss[i,t] * mask[i,t] * w[i]``:

    * ``grpo``: w_i = 1 / (|o_i| · N) — mean over a sequence's tokens, then over sequences;
    * ``bnpo`` and ``dapo``: w_i = 1 / Σ|o| — mean over all tokens of the batch;
    * ``dr_grpo``: w_i = 1 / (N · L_max) — a constant, removing the length bias.
    """
    n = mask.size(0)
    lengths = mask.sum(dim=1).clamp(min=1.0)
    if loss_type == "grpo":
        return 1.0 / (lengths * n)
    if loss_type in ("bnpo", "dapo"):
        return torch.full((n,), 1.0, dtype=mask.dtype) / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return torch.full((n,), 1.0 / (n * max_completion_length), dtype=mask.dtype)
    raise ValueError(f"unknown loss type {loss_type!r}; expected one of {LOSS_TYPES}")


def weighted_loss(token_loss: torch.Tensor, mask: torch.Tensor, seq_weights: torch.Tensor) -> torch.Tensor:
    """``sum loss * mask * w`` — the contribution of a (micro-)batch to the step loss."""
    return (token_loss * mask * seq_weights.unsqueeze(1)).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    total = mask.sum()
    return float((values * mask).sum() / total) if total > 0 else 0.0


def clip_fractions(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: ClipSettings) -> dict:
    """Fractions of tokens where the low / high clip (and the δ cap) is active, as TRL counts them."""
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    low = ((ratio < 1 - clip.epsilon_low) & (adv < 0)).float()
    high = ((ratio > 1 + clip.epsilon_high) & (adv > 0)).float()
    out = {"clip_low": masked_mean(low, mask), "clip_high": masked_mean(high, mask)}
    if clip.delta is not None:
        out["clip_delta"] = masked_mean((ratio > clip.delta).float(), mask)
    return out


def effective_sample_size(importance_weights: torch.Tensor, mask: torch.Tensor) -> float:
    """Kish's ESS of the token importance weights, as a fraction of the token count: (Σw)² / (n Σw²)."""
    w = importance_weights[mask.bool()]
    if w.numel() == 0 or float((w * w).sum()) == 0.0:
        return 0.0
    return float(w.sum() ** 2 / (w.numel() * (w * w).sum()))


def reward_metrics(rewards: torch.Tensor, group_size: int) -> dict:
    return {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "zero_std_groups": zero_std_group_fraction(rewards, group_size),
    }


def length_metrics(mask: torch.Tensor, truncated: torch.Tensor) -> dict:
    lengths = mask.sum(dim=1).float()
    return {
        "completion_len_mean": float(lengths.mean()),
        "completion_len_max": float(lengths.max()),
        "truncated_fraction": float(truncated.float().mean()),
    }
