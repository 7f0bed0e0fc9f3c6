"""Hand-computed checks of the pure GRPO functions: advantages, clipping, δ cap, k3 KL, IS weights."""

import math

import pytest
import torch

from grpo_swarm.node import grpo


def test_group_advantages_match_hand_computation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = grpo.group_advantages(rewards, 4, "group")
    # group 1: mean 0.5, sample std sqrt(1/3) -> (±0.5) / (0.57735 + 1e-4)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(adv[:4], torch.tensor([expected, -expected, -expected, expected]), atol=1e-6)
    # group 2: all equal -> zero advantage, no division by zero
    assert torch.equal(adv[4:], torch.zeros(4))


def test_batch_and_no_scaling():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])
    none = grpo.group_advantages(rewards, 2, "none")
    assert torch.allclose(none, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    batch = grpo.group_advantages(rewards, 2, "batch")
    assert torch.allclose(batch, none / (rewards.std() + 1e-4))


def test_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="do not split"):
        grpo.group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="non-finite rewards at indices \\[1\\]"):
        grpo.group_advantages(torch.tensor([0.0, float("nan")]), 2)


def test_zero_std_fraction():
    assert grpo.zero_std_group_fraction(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2) == 0.5


def _objective(logp, old, adv, **clip):
    return grpo.per_token_objective(torch.tensor([[logp]], requires_grad=True), torch.tensor([[old]]),
                                    torch.tensor([adv]), grpo.ClipSettings(**clip))


def test_clipping_positive_advantage_above_range_has_no_gradient():
    # ratio = e^0.5 = 1.65 > 1.2 with A > 0: the clipped term wins, loss = -1.2 * A, gradient 0
    logp = torch.tensor([[0.5]], requires_grad=True)
    obj = grpo.per_token_objective(logp, torch.tensor([[0.0]]), torch.tensor([2.0]), grpo.ClipSettings())
    assert obj.loss.item() == pytest.approx(-1.2 * 2.0)
    obj.loss.sum().backward()
    assert logp.grad.item() == 0.0


def test_clipping_uses_asymmetric_epsilons():
    # ratio e^0.22 = 1.246 is inside ε_high = 0.28, so the unclipped term counts: loss = -ratio*A
    obj = _objective(0.22, 0.0, 1.0, epsilon_low=0.2, epsilon_high=0.28)
    assert obj.loss.item() == pytest.approx(-math.exp(0.22), rel=1e-6)
    obj = _objective(0.22, 0.0, 1.0, epsilon_low=0.2, epsilon_high=0.2)
    assert obj.loss.item() == pytest.approx(-1.2, rel=1e-6)


def test_negative_advantage_is_not_clipped_above_but_delta_caps_it():
    # A < 0, ratio = e^1.5 = 4.48: plain PPO takes min(r*A, 1.2*A) = r*A (unbounded); δ = 2 caps it at 2*A
    plain = _objective(1.5, 0.0, -1.0)
    assert plain.loss.item() == pytest.approx(math.exp(1.5), rel=1e-6)
    capped = _objective(1.5, 0.0, -1.0, delta=2.0)
    assert capped.loss.item() == pytest.approx(2.0, rel=1e-6)


def test_k3_kl_hand_values():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    kl = grpo.k3_kl(logp, ref)
    assert kl[0].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1, rel=1e-6)
    assert kl[1].item() == 0.0
    obj = grpo.per_token_objective(torch.tensor([[-1.0]]), None, torch.tensor([0.0]), grpo.ClipSettings(beta=0.1, kl_bias_correction=False),
                                   ref_logps=torch.tensor([[-1.5]]))
    assert obj.loss.item() == pytest.approx(0.1 * (math.exp(-0.5) + 0.5 - 1), rel=1e-6)


def test_beta_without_reference_is_an_error():
    with pytest.raises(ValueError, match="reference"):
        grpo.per_token_objective(torch.zeros(1, 1), None, torch.zeros(1), grpo.ClipSettings(beta=0.1))


def test_importance_weights_truncate_and_mask():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    behaviour = torch.tensor([[0.0, -1.0, 1.0]])  # weights 1, e, 1/e
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    w = grpo.behaviour_importance_weights(old, behaviour, mask, cap=2.0, mode="truncate")
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, math.exp(-1)]]), atol=1e-6)
    w = grpo.behaviour_importance_weights(old, behaviour, mask, cap=2.0, mode="mask")
    assert torch.allclose(w, torch.tensor([[1.0, 0.0, 0.0]]))
    w = grpo.behaviour_importance_weights(old, behaviour, torch.tensor([[1.0, 0.0, 1.0]]), cap=5.0)
    assert w[0, 1].item() == 0.0


def test_importance_weights_scale_the_loss():
    logp = torch.tensor([[0.0]], requires_grad=True)
    obj = grpo.per_token_objective(logp, None, torch.tensor([1.0]), grpo.ClipSettings(),
                                   importance_weights=torch.tensor([[0.5]]))
    obj.loss.sum().backward()
    assert logp.grad.item() == pytest.approx(-0.5)


def test_sequence_weights_per_loss_type():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(grpo.sequence_token_weights(mask, "grpo", 4), torch.tensor([1 / 4, 1 / 8]))
    assert torch.allclose(grpo.sequence_token_weights(mask, "bnpo", 4), torch.tensor([1 / 6, 1 / 6]))
    assert torch.allclose(grpo.sequence_token_weights(mask, "dapo", 4), torch.tensor([1 / 6, 1 / 6]))
    assert torch.allclose(grpo.sequence_token_weights(mask, "dr_grpo", 8), torch.tensor([1 / 16, 1 / 16]))
    with pytest.raises(ValueError, match="unknown loss type"):
        grpo.sequence_token_weights(mask, "ppo", 4)


def test_grpo_weighted_loss_is_mean_of_sequence_means():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss = torch.tensor([[1.0, 3.0, 100.0], [3.0, 3.0, 3.0]])
    w = grpo.sequence_token_weights(mask, "grpo", 3)
    assert grpo.weighted_loss(loss, mask, w).item() == pytest.approx((2.0 + 3.0) / 2)


def test_microbatch_split_keeps_the_total():
    torch.manual_seed(0)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    loss = torch.randn(6, 5)
    for lt in grpo.LOSS_TYPES:
        w = grpo.sequence_token_weights(mask, lt, 5)
        whole = grpo.weighted_loss(loss, mask, w)
        parts = grpo.weighted_loss(loss[:2], mask[:2], w[:2]) + grpo.weighted_loss(loss[2:], mask[2:], w[2:])
        assert parts.item() == pytest.approx(whole.item(), rel=1e-5, abs=1e-7)


def test_clip_fractions_and_ess():
    ratio = torch.tensor([[0.5, 1.5, 1.0]])
    mask = torch.ones(1, 3)
    fr = grpo.clip_fractions(ratio, torch.tensor([-1.0]), mask, grpo.ClipSettings())
    assert fr["clip_low"] == pytest.approx(1 / 3) and fr["clip_high"] == 0.0
    assert grpo.effective_sample_size(torch.ones(2, 2), torch.ones(2, 2)) == pytest.approx(1.0)
    assert grpo.effective_sample_size(torch.tensor([[1.0, 0.0]]), torch.ones(1, 2)) == pytest.approx(0.5)


def test_kl_bias_correction_multiplies_by_the_ratio():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    obj = grpo.per_token_objective(logp, torch.tensor([[-1.2]]), torch.tensor([0.0]), grpo.ClipSettings(beta=1.0),
                                   ref_logps=torch.tensor([[-1.5]]))
    assert obj.loss.item() == pytest.approx(math.exp(0.2) * (math.exp(-0.5) + 0.5 - 1), rel=1e-6)
