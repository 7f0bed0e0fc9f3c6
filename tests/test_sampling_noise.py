"""The keyed sampling noise (proof of sampling): the spec's test vectors, the torch implementation
against the reference and an independent numpy one, the sampler's distribution, and the noise
check that tells a sampled token from a chosen one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grpo_swarm.node import noise
from grpo_swarm.node.rollout import sample_tokens
from grpo_swarm.protocol import sampling_noise as spec


@pytest.mark.parametrize("vec", spec.TEST_VECTORS, ids=lambda v: f"seed{v['run_seed']}-t{v['t']}")
def test_reference_matches_the_test_vectors(vec):
    key = spec.row_key(vec["run_seed"], vec["node_id"], vec["round"], vec["prompt"], vec["member"])
    assert key == (vec["k0"], vec["k1"])
    seed = spec.position_seed(key, vec["t"])
    assert seed == vec["s"]
    for token, (draw, g) in vec["tokens"].items():
        assert spec.draw23(seed, token) == draw
        assert spec.gumbel(seed, token) == pytest.approx(g, abs=1e-6)


def _numpy_fmix(x: np.ndarray) -> np.ndarray:
    """lowbias32 written again on uint32 arrays (wrapping arithmetic by type, logical shifts)."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


@pytest.mark.parametrize("vec", spec.TEST_VECTORS, ids=lambda v: f"seed{v['run_seed']}-t{v['t']}")
def test_torch_and_numpy_draw_the_same_bits(vec):
    """node.noise (int32 tensors, wrapping multiplies, masked shifts) and a numpy uint32 version give
    the reference's draws for a whole vocabulary at several positions; g agrees to float32 rounding."""
    vocab, t0, count = 49152, min(vec["t"], 2**32 - 3), 3
    key = (vec["k0"], vec["k1"])
    keys = noise.keys_tensor([key], "cpu")
    seeds = noise.position_seeds(keys, t0, count)[:, 0]
    g = noise.gumbel_from_seeds(seeds, vocab)
    tokens = np.arange(vocab, dtype=np.uint64)
    table = ((tokens * spec.GOLDEN) & 0xFFFFFFFF).astype(np.uint32)
    for j in range(count):
        s = spec.position_seed(key, t0 + j)
        assert (int(seeds[j]) & 0xFFFFFFFF) == s
        draws = _numpy_fmix(np.uint32(s) ^ table) >> np.uint32(9)
        u = (draws.astype(np.float64) + 0.5) / 2**23
        ref = -np.log(-np.log(u))
        assert np.abs(g[j].double().numpy() - ref).max() < 2e-5
        for token in (0, 1, 151, vocab - 1):
            assert int(draws[token]) == spec.draw23(s, token)


def test_keyed_sampling_draws_from_the_distribution():
    """Gumbel-max with the keyed noise samples each token with its probability (chi-square over
    200,000 rows with distinct keys) and never a token of probability 0."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    logps = probs.log().expand(200_000, -1).contiguous()
    keys = noise.keys_tensor(noise.group_keys(3, "node", 1, range(25_000), 8), "cpu")
    g = noise.gumbel_from_seeds(noise.position_seeds(keys, 5, 1)[0], len(probs))
    counts = torch.bincount(sample_tokens(logps, g), minlength=len(probs)).float()
    assert counts[-1] == 0
    expected = probs[:-1] * counts.sum()
    chi2 = float(((counts[:-1] - expected) ** 2 / expected).sum())
    assert chi2 < 18.5, (counts, chi2)  # 4 degrees of freedom: p < 0.001


def test_noise_is_finite_and_bounded():
    """u is never 0 or 1, so g is finite: at most -ln(-ln(1 - 2^-24)) ≈ 16.64, at least ≈ -2.82."""
    keys = noise.keys_tensor(noise.group_keys(0, "", 0, range(4), 4), "cpu")
    g = noise.gumbel_from_seeds(noise.position_seeds(keys, 0, 8), 49152)
    assert torch.isfinite(g).all() and g.max() < 16.65 and g.min() > -2.83


def test_keyed_noise_blocks_follow_the_batch():
    """Noise comes in blocks of several steps; when rows leave the batch the next block is drawn for
    the rows left, and each row keeps its own noise (a row's noise never depends on its batch)."""
    keys = noise.keys_tensor(noise.group_keys(1, "n", 2, range(2), 2), "cpu")
    source = noise.KeyedNoise(keys, vocab=5, steps=10, budget=40)
    first = source.at(0, None)
    assert first.shape == (4, 5) and source.block.shape == (2, 4, 5)
    assert torch.equal(source.at(1, None), source.block[1])
    at2 = source.at(2, None)
    assert source.first == 2
    active = torch.tensor([0, 2, 3])
    assert torch.equal(source.at(2, active), at2[active]) and source.first == 2
    alone = noise.KeyedNoise(keys[2:3], vocab=5, steps=10).at(3, None)
    assert torch.equal(source.at(3, active)[1], alone[0])


def test_shortfall_is_zero_for_the_sampled_token_and_positive_for_another():
    torch.manual_seed(0)
    logps = torch.log_softmax(torch.randn(16, 100), -1)
    g = noise.completion_noise(spec.row_key(1, "x", 0, 3, 1), 16, 100)
    sampled = sample_tokens(logps, g)
    assert noise.shortfalls(logps, g, sampled).abs().max() == 0
    other = (sampled + 1) % 100
    assert (noise.shortfalls(logps, g, other) > 0).all()
