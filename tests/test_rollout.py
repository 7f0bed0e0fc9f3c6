"""The transformers rollout backend: what a RolloutBatch promises, on a real tiny model."""

import pytest
import torch

from grpo_swarm.node import rollout
from grpo_swarm.node.logprobs import completion_logprobs
from grpo_swarm.node.models import build_tiny_model
from grpo_swarm.node.rollout import SamplingParams, TransformersBackend, decode_threads, intra_op_threads

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
G = 4


def backend(seed: int = 3):
    loaded = build_tiny_model(seed)
    eos, pad = rollout.eos_and_pad_ids(loaded.model, loaded.tokenizer)
    return TransformersBackend(loaded.model, eos, pad), eos, pad


@pytest.mark.parametrize("fast", [True, False], ids=["fast-decoder", "transformers-decoder"])
def test_batch_masks_eos_truncation_and_behaviour_logprobs(fast, monkeypatch):
    """Masks end at the first EOS (included), rows without one are truncated at max_new_tokens, and the
    behaviour log-probs are those the model gives the sampled tokens (after temperature)."""
    b, eos, pad = backend()
    if not fast:
        monkeypatch.setattr(rollout.fast_forward, "supports", lambda model: False)
    params = SamplingParams(max_new_tokens=12, temperature=0.7)
    batch = b.generate(PROMPTS, G, params, seed=11)
    assert batch.completion_ids.shape[0] == len(PROMPTS) * G
    lengths = batch.completion_mask.sum(1).long()
    for row, n, trunc in zip(batch.completion_ids, lengths, batch.truncated):
        real = row[:n].tolist()
        assert all(t not in eos for t in real[:-1])
        assert trunc == (real[-1] not in eos) and (not trunc or n == params.max_new_tokens)
        assert (row[n:] == pad).all()
    prompts = [torch.tensor(p) for p in PROMPTS]
    width = batch.completion_ids.size(1)
    again = completion_logprobs(b.model, prompts, batch.completion_ids, G, params.temperature, pad).logps
    assert width > 1 and (again * batch.completion_mask - batch.behaviour_logps).abs().max() < 1e-4


def test_fast_and_transformers_decoders_sample_the_same_tokens(monkeypatch):
    """Same weights, seed and noise: the lean decoder and transformers' forward give the same rollout."""
    b, _, _ = backend()
    params = SamplingParams(max_new_tokens=10)
    fast = b.generate(PROMPTS, G, params, seed=5)
    monkeypatch.setattr(rollout.fast_forward, "supports", lambda model: False)
    slow = b.generate(PROMPTS, G, params, seed=5)
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    assert (fast.behaviour_logps - slow.behaviour_logps).abs().max() < 1e-4


def test_same_seed_same_rollout_other_seed_differs():
    b, _, _ = backend()
    params = SamplingParams(max_new_tokens=10)
    first, again, other = (b.generate(PROMPTS, G, params, seed=s) for s in (7, 7, 8))
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert not torch.equal(first.completion_ids, other.completion_ids)


def test_small_decoding_runs_on_one_thread_and_restores_the_setting():
    model = build_tiny_model(0).model
    params = sum(p.numel() for p in model.parameters())
    assert decode_threads(params, 32, "cpu") == 1  # 2 * 123k params * 32 rows: far below the threshold
    assert decode_threads(params, 10_000, "cpu") is None
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), intra_op_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
