"""The lean Llama-family forward equals transformers' forward: logits, gradients, sampling path."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from grpo_swarm.node import fast_forward
from grpo_swarm.node.logprobs import _hf_shared_prefix_logits, completion_logprobs, token_logprobs
from grpo_swarm.node.models import build_tiny_model
from grpo_swarm.node.rollout import left_pad


def tiny_llama():
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


MODELS = {"qwen2": lambda: build_tiny_model(4).model, "llama": tiny_llama}
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
G = 3


@pytest.mark.parametrize("prompts", [PROMPTS, [[17], *PROMPTS]], ids=["prompts", "with-empty-prefix"])
@pytest.mark.parametrize("width", [5, 40], ids=["shared-prefix", "joint-pass"])
@pytest.mark.parametrize("name", MODELS)
def test_training_forward_matches_transformers(name, width, prompts):
    model = MODELS[name]()
    assert fast_forward.supports(model)
    assert fast_forward.prefix_sharing_pays(max(len(p) for p in prompts) - 1, width, G) == (width == 5)
    torch.manual_seed(1)
    completions = torch.randint(3, 40, (len(prompts) * G, width))
    prefixes, mask = left_pad([p[:-1] for p in prompts], 0)
    last = torch.tensor([p[-1] for p in prompts]).repeat_interleave(G)
    inputs = torch.cat([last[:, None], completions[:, :-1]], dim=1)

    ours = model.lm_head(fast_forward.shared_prefix_forward(model, prefixes, mask, inputs, G))
    ours.sum().backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    theirs = _hf_shared_prefix_logits(model, prefixes, mask, inputs, G)
    theirs.sum().backward()
    assert (ours - theirs).abs().max() < 1e-5
    for n, p in model.named_parameters():
        assert (g_ours[n] - p.grad).abs().max() < 1e-4 * max(1.0, float(p.grad.abs().max())), n


@pytest.mark.parametrize("name", MODELS)
def test_sampling_path_matches_full_forward(name):
    model = MODELS[name]().eval()
    ids, attn = left_pad(PROMPTS, 0)
    with torch.no_grad():
        fused = fast_forward.LayerWeights.for_sampling(model)
    logits, cache = fast_forward.prefill(model, fused, ids, attn, capacity=ids.size(1) + 2)
    nxt = torch.tensor([20, 21, 22])
    step = fast_forward.decode_step(model, fused, nxt, attn.sum(-1), cache)
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            full = model(torch.tensor([p + [int(nxt[i])]])).logits[0]
            assert (logits[i] - full[-2]).abs().max() < 1e-4
            assert (step[i] - full[-1]).abs().max() < 1e-4


def test_attention_dropout_takes_the_transformers_path():
    """The lean forward has no dropout: a model configured with attention dropout is not taken."""
    model = build_tiny_model(0).model
    assert fast_forward.supports(model)
    model.config.attention_dropout = 0.1
    assert not fast_forward.supports(model)


def test_unsupported_architecture_falls_back():
    model = build_tiny_model(0).model
    model.config.model_type = "gpt2-like"
    assert not fast_forward.supports(model)
    prompts = [torch.tensor(p) for p in PROMPTS]
    completions = torch.randint(3, 40, (len(PROMPTS) * G, 4))
    slow = completion_logprobs(model, prompts, completions, G).logps
    model.config.model_type = "qwen2"
    fast = completion_logprobs(model, prompts, completions, G).logps
    assert (slow - fast).abs().max() < 1e-5


@pytest.mark.parametrize("chunk", [512, 4], ids=["one-chunk", "partial-last-chunk"])
def test_token_logprobs_and_entropy(chunk, monkeypatch):
    from grpo_swarm.node.logprobs import _VocabLogprobs
    monkeypatch.setattr(_VocabLogprobs, "CHUNK", chunk)  # 11 vocabulary rows: chunks of 4, 4, 3
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 11) * 3
    index = torch.randint(0, 11, (3, 4))
    logps, entropy = token_logprobs(logits, index, with_entropy=True)
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(logps, ref.gather(-1, index[..., None])[..., 0], atol=1e-6)
    assert torch.allclose(entropy, torch.distributions.Categorical(logits=logits).entropy(), atol=1e-5)


def test_lm_head_logprobs_value_gradient_and_entropy():
    from grpo_swarm.node.logprobs import lm_head_logprobs
    torch.manual_seed(0)
    hidden = torch.randn(3, 4, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    index = torch.randint(0, 11, (3, 4))
    logps, entropy = lm_head_logprobs(hidden, weight, index, temperature=0.7)
    logits = (hidden @ weight.t()) / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, index[..., None])[..., 0]
    assert torch.allclose(logps, ref, atol=1e-5)
    assert torch.allclose(entropy, torch.distributions.Categorical(logits=logits).entropy(), atol=1e-5)
    upstream = torch.randn(3, 4)
    gh, gw = torch.autograd.grad((logps * upstream).sum(), (hidden, weight))
    rh, rw = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    assert torch.allclose(gh, rh, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)


def test_swiglu_gradient_is_exact():
    """The fused SwiGLU's one-buffer backward equals autograd's (double-precision gradcheck), and
    without gradients it is plain silu(gate) * up."""
    torch.manual_seed(0)
    gate_up = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast_forward.swiglu, (gate_up,))
    gate, up = gate_up.detach().chunk(2, dim=-1)
    with torch.no_grad():
        assert torch.equal(fast_forward.swiglu(gate_up), torch.nn.functional.silu(gate) * up)


def test_rms_norm_gradient_is_exact():
    """The hand-written RMSNorm backward passes a double-precision gradcheck, and its value is
    transformers' RMSNorm."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fast_forward._RMSNorm.apply(a, b, 1e-6), (x, w))
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * wf
    assert (fast_forward.rms_norm(xf, wf, 1e-6) - ref).abs().max() < 1e-6


@pytest.mark.parametrize("out_features", [8, 600], ids=["small-weight", "large-weight"])
def test_rows_linear_is_linear_plus_bias_plus_residual(out_features):
    """Both layouts of the decode products compute residual + x Wᵀ + b, with or without each term."""
    torch.manual_seed(0)
    x, w = torch.randn(5, 512), torch.randn(out_features, 512)
    b, r = torch.randn(out_features), torch.randn(5, out_features)
    assert (out_features * 512 >= fast_forward.LARGE_WEIGHT) == (out_features == 600)
    for bias in (None, b):
        for residual in (None, r):
            expected = torch.nn.functional.linear(x, w, bias) + (0 if residual is None else residual)
            got = fast_forward.rows_linear(x, w, bias, residual)
            assert (got - expected).abs().max() < 1e-4
