"""Our gradients equal TRL 1.16 GRPOTrainer's on identical batches, for every loss type (≤ 1e-5)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
pytest.importorskip("trl")

from trl_compare import SharedSettings, clone_model, make_trl_trainer, max_abs_diff, our_gradients, trl_gradients  # noqa: E402

from grpo_swarm.node import grpo  # noqa: E402
from grpo_swarm.node.config import TrainConfig  # noqa: E402
from grpo_swarm.node.models import build_tiny_model  # noqa: E402
from grpo_swarm.node.rewards import build_reward_functions  # noqa: E402
from grpo_swarm.node.trainer import GRPOTrainer, ScoredBatch  # noqa: E402

PROMPTS = ["3+4=", "12*3-5=", "7="]
TOL = 1e-5


def our_trainer(model, tokenizer, s: SharedSettings) -> GRPOTrainer:
    cfg = TrainConfig.model_validate({
        "grpo": {"group_size": s.group_size, "prompts_per_step": len(PROMPTS),
                 "max_completion_length": s.max_completion_length, "temperature": s.temperature,
                 "loss_type": s.loss_type, "beta": s.beta, "epsilon": s.epsilon,
                 "epsilon_high": s.epsilon_high, "delta": s.delta, "use_behaviour_correction": False},
        "optim": {"groups_per_microbatch": 2},  # exercise accumulation over micro-batches
    })
    return GRPOTrainer(model, tokenizer, cfg, build_reward_functions([{"name": "arithmetic_accuracy"}]),
                       ref_model=clone_model(model) if s.beta > 0 else None)


@pytest.fixture(scope="module")
def setup():
    loaded = build_tiny_model(seed=3)
    tok = loaded.tokenizer
    s = SharedSettings(group_size=4, prompts_per_step=len(PROMPTS), max_completion_length=12, temperature=0.7)
    ours = our_trainer(loaded.model, tok, s)
    texts, rollouts = ours.rollout([_example(i, p) for i, p in enumerate(PROMPTS)], seed=11)
    # make lengths vary: cut some completions short with an EOS so padding is exercised
    for row, cut in ((0, 3), (5, 1), (9, 7)):
        rollouts.completion_ids[row, cut] = tok.eos_token_id
        rollouts.completion_ids[row, cut + 1:] = tok.pad_token_id
        rollouts.completion_mask[row, cut + 1:] = 0
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (rollouts.num_completions,), generator=g).float()
    mask = rollouts.completion_mask
    current = ours.frozen_logprobs(loaded.model, ScoredBatch(rollouts, None, rewards, rewards))
    noise = lambda scale: (torch.randn(mask.shape, generator=g) * scale) * mask  # noqa: E731
    return {"loaded": loaded, "rollouts": rollouts, "rewards": rewards, "current": current, "noise": noise}


def _example(i, prompt):
    from grpo_swarm.node.data import PromptExample
    return PromptExample(index=i, prompt=prompt, columns={"answer": "0"})


def make_batch(setup, s: SharedSettings, old_shift: float, ref_shift: float) -> ScoredBatch:
    r, rewards = setup["rollouts"], setup["rewards"]
    adv = grpo.group_advantages(rewards, r.group_size, "group")
    weights = grpo.sequence_token_weights(r.completion_mask, s.loss_type, s.max_completion_length)
    old = setup["current"] + setup["noise"](old_shift) if old_shift else None
    ref = setup["current"] + setup["noise"](ref_shift) if s.beta > 0 else None
    return ScoredBatch(rollouts=r, rewards=None, advantages=adv, seq_weights=weights, old_logps=old, ref_logps=ref)


CASES = [
    *[dict(loss_type=lt) for lt in grpo.LOSS_TYPES],
    *[dict(loss_type=lt, old_shift=0.3) for lt in grpo.LOSS_TYPES],  # μ > 1 / stale: ratios leave the clip range
    dict(loss_type="grpo", old_shift=0.5, epsilon_high=0.28, delta=1.5),
    dict(loss_type="dapo", old_shift=0.5, beta=0.04),
    dict(loss_type="grpo", beta=0.1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gradients_match_trl(setup, case):
    case = dict(case)
    old_shift = case.pop("old_shift", 0.0)
    s = SharedSettings(group_size=4, prompts_per_step=len(PROMPTS), max_completion_length=12, temperature=0.7,
                       **case)
    loaded = setup["loaded"]
    ours = our_trainer(clone_model(loaded.model), loaded.tokenizer, s)
    theirs = make_trl_trainer(clone_model(loaded.model), loaded.tokenizer, s, PROMPTS,
                              reward_funcs=lambda prompts, completions, **kw: [0.0] * len(prompts))
    batch = make_batch(setup, s, old_shift, 0.2)
    ours_g = our_gradients(ours, batch)
    trl_g = trl_gradients(theirs, batch, loaded.tokenizer.pad_token_id)
    scale = max(float(v.abs().max()) for v in trl_g.values())
    assert scale > 1e-4, "degenerate batch: TRL's gradient is ~0"
    assert max_abs_diff(ours_g, trl_g) <= TOL
