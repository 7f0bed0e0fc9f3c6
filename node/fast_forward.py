"""A lean forward pass for Llama-family decoders (Llama, Qwen2, SmolLM2, Mistral without sliding window).

transformers' generic forward spends most of a small model's time outside the matmuls: building
4-D masks, cache objects, output dataclasses, kwarg plumbing and per-module hooks. GRPO calls the
model thousands of times with the same simple shapes, so this module runs the same weights with
the same maths directly:

* one layer is :func:`attention_inputs` + attention + :func:`finish_layer` on fused q|k|v and
  gate|up projections (:class:`LayerWeights`), shared by sampling and training;
* :func:`prefill` / :func:`decode_step` — sampling with a preallocated KV cache
  (:class:`StaticKVCache`), the fused weights built once per generation call (norm scales folded in);
  the decode step runs on [B, hidden] rows with the heads as views (:func:`rows_linear`);
* :func:`shared_prefix_forward` — the training forward with gradients (the fused weights are
  concatenated inside the graph): each prompt runs once, its keys/values are repeated for the G
  completions of its group (differentiable), completions attend to them causally. Prompt and
  completion tokens travel as one stream of token rows with no prompt padding, so every projection,
  norm and MLP is one kernel per layer; only attention works per group. Its gradients match the
  transformers forward (tests/test_fast_forward.py).

Anything this module does not support (other architectures, sliding windows, ALiBi, ...) falls back
to the transformers path: :func:`supports` says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

SUPPORTED_TYPES = {"llama", "qwen2", "mistral"}


def supports(model: PreTrainedModel) -> bool:
    cfg = model.config
    if cfg.model_type not in SUPPORTED_TYPES:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", cfg.model_type == "mistral"):
        return False
    if getattr(cfg, "pretraining_tp", 1) != 1 or getattr(cfg, "mlp_bias", False):
        return False
    if getattr(cfg, "attention_dropout", 0.0):  # this forward has no dropout
        return False
    act = getattr(cfg, "hidden_act", "silu")
    return act == "silu" and hasattr(model.model, "rotary_emb")


@dataclass(frozen=True)
class Dims:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float

    @classmethod
    def of(cls, model: PreTrainedModel) -> "Dims":
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, cfg.rms_norm_eps)


SKINNY_ROWS = 64  # up to this many rows (decoding), project as weight @ x.T


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, as ``weight @ x.T`` for skinny inputs.

    Measured on CPU (MKL, fp32, 2 threads): for the few rows of decoding, ``weight @ x.T`` is 1.4-2.7x
    faster than ``F.linear`` (e.g. 16 x 576 -> 49152 vocab: 25 ms vs 46 ms); its result is a transposed
    view, which the element-wise kernels after it read with a stride, so for training inputs (hundreds
    of rows) the plain row-major product is used.
    """
    flat = x.reshape(-1, x.shape[-1])
    if flat.size(0) > SKINNY_ROWS:
        out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
        return out.view(*x.shape[:-1], weight.shape[0])
    out = torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias[:, None], weight, flat.t())
    return out.t().view(*x.shape[:-1], weight.shape[0])


def add_projected(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``residual + F.linear(x, weight)`` in one ``addmm`` (the sum is the GEMM's accumulator).

    Measured (2 threads): 1024 x 576 -> 576 6.7 → 4.7 ms against an add of :func:`project`'s
    transposed result; 32 rows of the tiny model 15 → 10 µs; 16 rows of SmolLM2 about the same.
    """
    flat = x.reshape(-1, x.shape[-1])
    return torch.addmm(residual.reshape(-1, residual.shape[-1]), flat, weight.t()).view(residual.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """HF Llama's RMSNorm: normalise in fp32, cast back, then scale (``F.rms_norm`` for fp32; with
    gradients, :class:`_RMSNorm`'s single-node backward). ``weight=None``: no scale (it was folded into
    the next projection, :meth:`LayerWeights.for_sampling`)."""
    if x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
        if weight is not None and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _RMSNorm.apply(x, weight, eps)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return h if weight is None else weight * h


class _RMSNorm(torch.autograd.Function):
    """fp32 RMSNorm with a hand-written backward: one autograd node instead of the six (pow, mean, add,
    rsqrt, mul, mul) that ``F.rms_norm`` decomposes into on CPU, and 8 kernels instead of ~12
    (measured on SmolLM2's [1024 x 576] activations, forward + backward: 5.0 → 3.6-4.9 ms).

    y = x·r·w with r = rsqrt(mean(x²) + eps):  dw = Σ g·x·r,  dx = r·(g·w − x̂·mean(g·w·x̂)),  x̂ = x·r.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return x * rstd * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd
        grad_w = grad * weight
        dot = (grad_w * x_hat).mean(-1, keepdim=True)
        grad_x = torch.addcmul(grad_w, x_hat, dot, value=-1.0).mul_(rstd)
        grad_weight = (grad * x_hat).reshape(-1, x.shape[-1]).sum(0)
        return grad_x, grad_weight, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention scores will have: autocast's when it is on, else the activations'."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool "may attend" → 0 / -inf bias (SDPA's fast CPU path; measured ~4x faster than a bool mask)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def left_padded_causal_mask(key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, L, L] for left-padded rows: causal, padding keys hidden.

    Padded query rows would see no key at all (NaN), so every position may always see itself.
    """
    length = key_valid.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=key_valid.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=key_valid.device)
    return additive_mask(((causal[None] & key_valid[:, None, :]) | eye[None])[:, None], dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE in HF's half-split layout: x·cos + rotate_half(x)·sin, as x·cos + roll(x)·(±sin).

    ``signed_sin`` is sin with its first half negated (:func:`rope`), so rotate_half(x)·sin — a slice,
    a negation and a concatenation — becomes one roll: same values, fewer kernels.
    """
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), signed_sin)


def signed(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rope(model: PreTrainedModel, x: torch.Tensor, positions: torch.Tensor):
    """cos and signed sin [B, 1, T, d] for :func:`rotate`."""
    cos, sin = model.model.rotary_emb(x, positions)
    return cos.unsqueeze(1), signed(sin).unsqueeze(1)


# ------------------------------------------------------------------------------------------ layers


@dataclass
class LayerWeights:
    """One decoder layer's weights, q|k|v and gate|up concatenated: one matmul each instead of three and two.

    Built with ``torch.cat`` (:meth:`of`): with autograd on, the concatenation is part of the graph and
    gradients flow back to the separate parameters (training: the backward then also runs one matmul per
    fused weight for the input gradient, instead of three or two plus their sum); under ``no_grad`` it is a
    plain copy of the current weights (sampling: :meth:`for_sampling` also folds the RMSNorm scales into
    the projections that follow them).
    """

    input_norm: torch.Tensor | None  # None: folded into qkv
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    post_norm: torch.Tensor | None  # None: folded into gate_up
    gate_up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def of(cls, model: PreTrainedModel) -> list["LayerWeights"]:
        layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]) if a.q_proj.bias is not None else None
            layers.append(cls(
                layer.input_layernorm.weight, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), bias,
                a.o_proj.weight, layer.post_attention_layernorm.weight,
                torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight,
            ))
        return layers

    @classmethod
    @torch.no_grad()
    def for_sampling(cls, model: PreTrainedModel) -> list["LayerWeights"]:
        """A no-grad copy with each norm's scale folded into the next projection: (x̂·w) Wᵀ = x̂ (W·w)ᵀ,
        one kernel less per norm and decode step (the same maths, rounded differently: ~1e-7 relative)."""
        layers = cls.of(model)
        for w in layers:
            w.qkv.mul_(w.input_norm)
            w.gate_up.mul_(w.post_norm)
            w.input_norm = w.post_norm = None
        return layers


def attention_inputs(w: LayerWeights, dims: Dims, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, heads, T, d], k and v [B, kv_heads, T, d] of ``x`` [B, T, H], RoPE applied to q and k.

    head_dim stays contiguous (the projection is made contiguous before the head split): SDPA's CPU
    flash kernel needs that — a strided last dimension, as :func:`project`'s transposed result has,
    falls back to the math kernel (measured on SmolLM2's training step: 4-7 % slower). q and k are
    rotated together, in one set of kernels.
    """
    b, t, _ = x.shape
    h = rms_norm(x, w.input_norm, dims.eps)
    heads = project(h, w.qkv, w.qkv_bias).contiguous().view(b, t, dims.heads + 2 * dims.kv_heads, dims.head_dim)
    qk, v = heads.transpose(1, 2).split([dims.heads + dims.kv_heads, dims.kv_heads], dim=1)  # backward: one cat
    q, k = rotate(qk, cos, sin).split([dims.heads, dims.kv_heads], dim=1)
    return q, k, v


def finish_layer(w: LayerWeights, dims: Dims, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Output projection and residual, then the SwiGLU MLP and its residual; ``attn`` is [B, heads, T, d]."""
    b, t, _ = x.shape
    return finish_rows(w, dims, x, attn.transpose(1, 2).reshape(b, t, dims.heads * dims.head_dim))


def finish_rows(w: LayerWeights, dims: Dims, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """:func:`finish_layer` on token rows: ``x`` [..., H] and ``attn`` [..., heads · d] with the same leading shape."""
    x = add_projected(x, attn, w.out)
    return add_projected(x, swiglu(project(rms_norm(x, w.post_norm, dims.eps), w.gate_up)), w.down)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of a fused ``[..., gate | up]`` projection, the gradient written into one buffer.

    Autograd of ``chunk`` + ``silu`` + ``*`` builds the two halves of the input gradient separately and
    concatenates them (one more pass over the [tokens, 2 x intermediate] gradient per layer); here
    each half is written in place into one tensor.
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        grad_gate, grad_up = out.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` (last dimension), with a one-buffer backward."""
    if torch.is_grad_enabled() and gate_up.requires_grad:
        return _SwiGLU.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ------------------------------------------------------------------------------------------ sampling


class StaticKVCache:
    """Preallocated keys/values [B, kv_heads, capacity, head_dim] per layer, plus key validity."""

    def __init__(self, layers: int, batch: int, dims: Dims, capacity: int, dtype, device):
        self.dims = dims
        shape = (batch, dims.kv_heads, capacity, dims.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.bias = torch.full((batch, capacity), float("-inf"), dtype=dtype, device=device)  # 0 = valid key
        self.length = 0
        self.rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # set by prefill

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (in that order): finished sequences leave the batch."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.bias = self.bias.index_select(0, rows)

    def repeat(self, times: int) -> None:
        self.k = [t.repeat_interleave(times, dim=0) for t in self.k]
        self.v = [t.repeat_interleave(times, dim=0) for t in self.v]
        self.bias = self.bias.repeat_interleave(times, dim=0)


def _sampling_layers(model, weights: list[LayerWeights], dims: Dims, x, positions, cache: StaticKVCache, mask):
    """Run all layers on ``x`` [B, T, H], writing keys/values at cache[length : length+T]."""
    start, stop = cache.length, cache.length + x.size(1)
    cos, sin = (tab[positions].unsqueeze(1) for tab in cache.rope_table)
    gqa = dims.kv_heads != dims.heads
    for w, keys, values in zip(weights, cache.k, cache.v):
        q, k, v = attention_inputs(w, dims, x, cos, sin)
        keys[:, :, start:stop] = k
        values[:, :, start:stop] = v
        attn = F.scaled_dot_product_attention(q, keys[:, :, :stop], values[:, :, :stop], attn_mask=mask,
                                              enable_gqa=gqa)
        x = finish_layer(w, dims, x, attn)
    return rms_norm(x, model.model.norm.weight, dims.eps)


@torch.no_grad()
def prefill(model, weights: list[LayerWeights], ids: torch.Tensor, attn: torch.Tensor,
            capacity: int) -> tuple[torch.Tensor, StaticKVCache]:
    """Left-padded prompts ``ids`` [B, P] → last-position logits [B, V] and a cache of ``capacity``."""
    dims = Dims.of(model)
    b, p = ids.shape
    x = model.model.embed_tokens(ids)
    cache = StaticKVCache(len(weights), b, dims, capacity, compute_dtype(x), ids.device)
    cache.bias[:, :p].masked_fill_(attn.bool(), 0.0)
    cache.bias[:, p:] = 0.0  # generated positions are all valid keys; a step only sees those before it
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    cos_t, sin_t = model.model.rotary_emb(x, torch.arange(capacity, device=x.device)[None])
    cache.rope_table = (cos_t[0], signed(sin_t[0]))  # cos/sin of every position the cache can hold
    h = _sampling_layers(model, weights, dims, x, positions, cache, left_padded_causal_mask(attn.bool(), cache.bias.dtype))
    cache.length = p
    return project(h[:, -1], model.lm_head.weight), cache


LARGE_WEIGHT = 1 << 18  # elements: from here on, few-row products run as weight @ x.T


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + x @ weight.T + bias`` for a few rows ``x`` [B, in] (decoding).

    Small weights: one ``addmm`` with the bias or the residual as its accumulator (the tiny model's
    32-row products: 15 → 10 µs). Large weights: ``weight @ x.T`` (SmolLM2's 16-row decode step is
    16 % slower the other way round, measured); the result is then a transposed view.
    """
    if weight.numel() < LARGE_WEIGHT:
        acc = bias if residual is None else residual if bias is None else residual + bias
        return torch.mm(x, weight.t()) if acc is None else torch.addmm(acc, x, weight.t())
    out = (torch.mm(weight, x.t()) if bias is None else torch.addmm(bias[:, None], weight, x.t())).t()
    return out if residual is None else residual + out


@torch.no_grad()
def decode_step(model, weights: list[LayerWeights], tokens: torch.Tensor, positions: torch.Tensor,
                cache: StaticKVCache) -> torch.Tensor:
    """One token per row [B] at ``positions`` [B] → logits [B, V]; the cache grows by one.

    The same layers as :func:`_sampling_layers` on one position, with activations kept as [B, hidden]
    rows: with a single position [B, T, heads, d] and [B, heads, T, d] are the same memory, so the
    heads are views with no transposes, and each projection is one ``mm``/``addmm`` on 2-D operands
    (the residual adds inside ``addmm``). A small model's decode step is mostly per-kernel and Python
    overhead, so this is the loop sampling spends its time in (tests/test_fast_forward.py checks it
    against transformers' forward).
    """
    dims, pos = cache.dims, cache.length
    b, nq, nkv, d = tokens.size(0), dims.heads, dims.kv_heads, dims.head_dim
    mask = cache.bias[:, None, None, : pos + 1]
    cos, sin = (tab[positions].view(b, 1, 1, d) for tab in cache.rope_table)
    x = F.embedding(tokens, model.model.embed_tokens.weight)
    gqa = nkv != nq
    for w, keys, values in zip(weights, cache.k, cache.v):
        heads = rows_linear(rms_norm(x, w.input_norm, dims.eps), w.qkv, w.qkv_bias).contiguous()
        heads = heads.view(b, nq + 2 * nkv, 1, d)
        qk = rotate(heads[:, : nq + nkv], cos, sin)
        keys[:, :, pos : pos + 1] = qk[:, nq:]
        values[:, :, pos : pos + 1] = heads[:, nq + nkv :]
        attn = F.scaled_dot_product_attention(qk[:, :nq], keys[:, :, : pos + 1], values[:, :, : pos + 1],
                                              attn_mask=mask, enable_gqa=gqa)
        x = rows_linear(attn.reshape(b, nq * d), w.out, residual=x)
        x = rows_linear(swiglu(rows_linear(rms_norm(x, w.post_norm, dims.eps), w.gate_up)), w.down, residual=x)
    cache.length += 1
    return project(rms_norm(x, model.model.norm.weight, dims.eps), model.lm_head.weight)


# ------------------------------------------------------------------------------------------ training


def prefix_sharing_pays(prefix_len: int, width: int, group_size: int) -> bool:
    """Share the prefix unless repeating it adds under a quarter more tokens than the completions.

    Sharing saves (G-1)·P tokens per group but runs attention per group (the prefix's, then the
    completions'), plus the concatenations around it; for a 3-token arithmetic prompt those extra
    kernel launches cost more than the tokens saved.
    """
    return (group_size - 1) * prefix_len > 0.25 * group_size * width


def shared_prefix_forward(
    model: PreTrainedModel,
    prefix_ids: torch.Tensor,
    prefix_mask: torch.Tensor,
    inputs: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """Hidden states [N, C, H] of ``inputs`` [N = B*G, C] that follow left-padded prefixes [B, P].

    Row ``n`` continues prefix ``n // G``. Prefix keys/values are computed once per prefix and
    repeated (differentiably) for the G rows of its group (:func:`_packed_prefix_forward`), unless the
    prefixes are so short that one pass over ``[prefix | inputs]`` rows is cheaper
    (:func:`prefix_sharing_pays`). Returns final-norm hidden states.
    """
    dims = Dims.of(model)
    valid = prefix_mask.bool()
    weights = LayerWeights.of(model)
    if prefix_ids.size(1) == 0 or prefix_sharing_pays(prefix_ids.size(1), inputs.size(1), group_size):
        return _packed_prefix_forward(model, dims, weights, prefix_ids[valid], valid.sum(-1).tolist(), inputs,
                                      group_size)
    # short prompts: one pass over [prefix | inputs] rows costs fewer ops than sharing the prefix
    p, (n, c), device = prefix_ids.size(1), inputs.shape, inputs.device
    full = model.model.embed_tokens(torch.cat([prefix_ids.repeat_interleave(group_size, 0), inputs], dim=1))
    keys = torch.cat([valid.repeat_interleave(group_size, 0), torch.ones(n, c, dtype=torch.bool, device=device)], 1)
    prefix_pos = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
    input_pos = prefix_mask.sum(-1, keepdim=True).repeat_interleave(group_size, 0) + torch.arange(c, device=device)
    positions = torch.cat([prefix_pos.repeat_interleave(group_size, 0), input_pos], dim=1)
    mask = left_padded_causal_mask(keys, compute_dtype(full))
    cos, sin = rope(model, full, positions)
    for w in weights:
        q, k, v = attention_inputs(w, dims, full, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=dims.kv_heads != dims.heads)
        full = finish_layer(w, dims, full, attn)
    return rms_norm(full[:, p:], model.model.norm.weight, dims.eps)


def _packed_prefix_forward(model, dims: Dims, weights: list[LayerWeights], prefix_tokens: torch.Tensor,
                           lengths: list[int], inputs: torch.Tensor, group_size: int) -> torch.Tensor:
    """:func:`shared_prefix_forward` on one stream of token rows, no padding in the prompts.

    The rows are each prompt's prefix tokens (``lengths[i]`` of them, packed: ``prefix_tokens``), then the
    N·C completion rows. Everything but attention treats a token the same wherever it sits, so each
    projection, norm and MLP runs once on all rows — no padded prompt position is computed, and each weight
    gradient is one product. Attention runs per group: a prefix attends to itself causally, the group's G
    completions to that prefix (its keys/values repeated, differentiably) and causally to themselves.
    """
    n, c = inputs.shape
    device = inputs.device
    rows, nq, nkv, d = [*lengths, n * c], dims.heads, dims.kv_heads, dims.head_dim
    gqa = nkv != nq
    x = model.model.embed_tokens(torch.cat([prefix_tokens, inputs.reshape(-1)]))
    lengths_t = torch.tensor(lengths, device=device)
    positions = torch.cat([torch.arange(length, device=device) for length in lengths] + [
        (lengths_t.repeat_interleave(group_size)[:, None] + torch.arange(c, device=device)).reshape(-1)])
    cos, sin = rope(model, x, positions[None])
    cos, sin = cos.view(-1, 1, d), sin.view(-1, 1, d)
    causal, dtype = torch.ones(c, c, dtype=torch.bool, device=device).tril(), compute_dtype(x)
    masks = {length: additive_mask(torch.cat([causal.new_ones(c, length), causal], dim=1), dtype)
             for length in set(lengths)}  # [C, length + C]: the whole prefix, then causal
    last = len(weights) - 1
    for i, w in enumerate(weights):
        # split(), not slicing: a split's backward is one cat, a slice's a zero-filled full-size gradient
        qk, v = project(rms_norm(x, w.input_norm, dims.eps), w.qkv, w.qkv_bias).view(-1, nq + 2 * nkv, d).split(
            [nq + nkv, nkv], dim=1)
        q, k = rotate(qk, cos, sin).split([nq, nkv], dim=1)
        qs, ks, vs = q.split(rows), k.split(rows), v.split(rows)
        prefix_out, completion_out = [], []
        groups = zip(lengths, *(_heads_of_rows(t[-1], n, c).split(group_size) for t in (qs, ks, vs)), qs, ks, vs)
        for length, qc, kc, vc, qp, kp, vp in groups:
            qp, kp, vp = (_heads_of_rows(t, 1, length) for t in (qp, kp, vp))
            keys = torch.cat([kp.expand(group_size, -1, -1, -1), kc], dim=2)
            values = torch.cat([vp.expand(group_size, -1, -1, -1), vc], dim=2)
            completion_out.append(F.scaled_dot_product_attention(qc, keys, values, attn_mask=masks[length],
                                                                 enable_gqa=gqa))
            if i < last and length:  # after the last layer's keys/values nothing reads a prefix row
                prefix_out.append(F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=gqa))
        attn = torch.cat([_rows_of_heads(a) for a in prefix_out + completion_out])
        x = finish_rows(w, dims, x if i < last else x.split(rows)[-1], attn)
    return rms_norm(x, model.model.norm.weight, dims.eps).view(n, c, -1)


def _heads_of_rows(rows: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Token rows [batch · length, heads, d] → [batch, heads, length, d] (a view, head_dim contiguous)."""
    return rows.view(batch, length, *rows.shape[1:]).transpose(1, 2)


def _rows_of_heads(attn: torch.Tensor) -> torch.Tensor:
    """Attention output [B, heads, T, d] → token rows [B · T, heads · d] (a copy: SDPA's output is laid out
    [B, heads, T, d])."""
    b, h, t, d = attn.shape
    return attn.transpose(1, 2).reshape(b * t, h * d)
