"""Per-token log-probabilities of completions under a model, with the prompt computed once per group.

A GRPO batch holds G completions of each prompt. The reference implementation runs
``[prompt | completion]`` through the model for every completion, so each prompt is processed G
times, and pads every row to the longest prompt and completion of the batch. Here:

1. each prompt (minus its last token) runs once, producing a KV cache with autograd history;
2. the cache is repeated G times (``repeat_interleave`` is differentiable: the prompt's gradient is
   the sum over its completions, as in the full computation);
3. ``[last prompt token | completion[:-1]]`` runs on top of it, trimmed to the longest completion
   of the micro-batch, and the logits at those positions score the completion tokens.

Right padding of completions needs no attention mask: causal attention never lets a real token see
the padding after it. Only completion logits are computed (no lm_head over prompts).

Llama-family models take :func:`fast_forward.shared_prefix_forward`; others take the same steps
through transformers' own forward and ``DynamicCache`` (:func:`_hf_shared_prefix_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from . import fast_forward
from .rollout import cache_kwarg, left_pad


@dataclass
class TokenScores:
    logps: torch.Tensor  # [N, C] log π(token) after temperature; carries grad when the model does
    entropy: torch.Tensor | None  # [N, C] detached entropy of the full distribution


class _VocabLogprobs(torch.autograd.Function):
    """log p(index) and entropy from vocabulary-major logits ``[V, M]`` with one [V, M] buffer.

    Two passes over the logits: their column maxima, then, chunk by chunk of ``CHUNK`` vocabulary rows
    (2 MB at SmolLM2's M = 1,024 tokens, so each chunk is still in cache for the next kernel), the
    unnormalised ``e = exp(logits − max)`` written into the one new buffer, its sums and the entropy's
    ``Σ e·logits`` accumulated into cache-resident [CHUNK, M] blocks. ``e`` and its column sums are kept for
    the backward of log p(index), ``g·(onehot − e / Σe)``, computed in place on ``e`` — no second exp, no
    normalising pass, no zero-filled gather gradient. (At SmolLM2's 49,152 × 1,024 logits every full pass is
    200 MB: separate max / subtract / exp / sum / divide / entropy kernels made nine of them; measured on
    those logits, the entropy alone took 141 ms as one product and sum per 8,192-row chunk, 22 ms
    accumulated per 512-row chunk.) Working on ``W @ hᵀ`` ([V, M], contiguous) keeps every vocabulary
    reduction a sum of rows.
    """

    CHUNK = 512  # vocabulary rows per chunk (SmolLM2: 512 x 1,024 fp32 = 2 MB)

    @staticmethod
    def forward(ctx, logits_t: torch.Tensor, index: torch.Tensor):
        top = logits_t.amax(dim=0)
        unnormalised = torch.empty_like(logits_t)
        chunk = min(_VocabLogprobs.CHUNK, logits_t.size(0))
        sums = logits_t.new_zeros(chunk, logits_t.size(1))  # Σ e, then Σ e·logits: one sum each at the end
        weighted = torch.zeros_like(sums)
        for l_chunk, e_chunk in zip(logits_t.split(chunk), unnormalised.split(chunk)):
            torch.sub(l_chunk, top, out=e_chunk).exp_()
            rows = e_chunk.size(0)
            sums[:rows].add_(e_chunk)
            weighted[:rows].addcmul_(e_chunk, l_chunk)
        total = sums.sum(dim=0)
        lse = top + total.log()
        entropy = lse - weighted.sum(dim=0) / total
        logps = logits_t.gather(0, index.unsqueeze(0)).squeeze(0) - lse
        ctx.save_for_backward(unnormalised, total, index)
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor, grad_entropy: torch.Tensor):
        unnormalised, total, index = ctx.saved_tensors
        grad = unnormalised.mul_((-grad_logps / total).unsqueeze(0))  # used once: reuse its memory
        grad.scatter_add_(0, index.unsqueeze(0), grad_logps.unsqueeze(0))
        return grad, None


def token_logprobs(logits: torch.Tensor, index: torch.Tensor, with_entropy: bool = False):
    """``log_softmax(logits)[..., index]`` (with grad) and optionally the detached entropy, for
    token-major logits ``[..., V]`` (the transformers fallback); same kernel as :func:`lm_head_logprobs`."""
    vocab = logits.shape[-1]
    logps, entropy = _VocabLogprobs.apply(logits.float().reshape(-1, vocab).t(), index.reshape(-1))
    return logps.view(index.shape), entropy.view(index.shape) if with_entropy else None


def lm_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, temperature: float = 1.0):
    """Per-token log-probs (with grad) and entropies (detached) of ``index`` [N, C] from hidden states."""
    n, c, h = hidden.shape
    logits_t = torch.mm(weight, hidden.reshape(n * c, h).t()).float()
    if temperature != 1.0:
        logits_t = logits_t / temperature
    logps, entropy = _VocabLogprobs.apply(logits_t, index.reshape(n * c))
    return logps.view(n, c), entropy.view(n, c)


def completion_logprobs(
    model: PreTrainedModel,
    prompt_ids: list[torch.Tensor],
    completion_ids: torch.Tensor,
    group_size: int,
    temperature: float = 1.0,
    pad_token_id: int = 0,
    with_entropy: bool = False,
) -> TokenScores:
    """Score ``completion_ids`` [len(prompt_ids) * G, C] (right-padded) given their prompts."""
    device = model.device
    n, width = completion_ids.shape
    if n != len(prompt_ids) * group_size:
        raise ValueError(f"{n} completions for {len(prompt_ids)} prompts x G={group_size}")
    prefixes = [p[:-1].tolist() for p in prompt_ids]
    last = torch.stack([p[-1] for p in prompt_ids]).to(device)
    completion_ids = completion_ids.to(device)
    inputs = torch.cat([last.repeat_interleave(group_size)[:, None], completion_ids[:, :-1]], dim=1)
    prefix_ids, prefix_mask = (t.to(device) for t in left_pad(prefixes, pad_token_id))
    if fast_forward.supports(model):
        hidden = fast_forward.shared_prefix_forward(model, prefix_ids, prefix_mask, inputs, group_size)
        logps, entropy = lm_head_logprobs(hidden, model.lm_head.weight, completion_ids, temperature)
        return TokenScores(logps=logps, entropy=entropy if with_entropy else None)
    logits = _hf_shared_prefix_logits(model, prefix_ids, prefix_mask, inputs, group_size)
    if temperature != 1.0:
        logits = logits / temperature
    logps, entropy = token_logprobs(logits, completion_ids, with_entropy)
    return TokenScores(logps=logps, entropy=entropy)


def _hf_shared_prefix_logits(model, prefix_ids, prefix_mask, inputs, group_size: int) -> torch.Tensor:
    """The same computation through transformers' forward and DynamicCache (any architecture)."""
    n, width = inputs.shape
    device = inputs.device
    cache_arg = cache_kwarg(model)
    if prefix_ids.size(1) > 0:
        positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions, use_cache=True,
              logits_to_keep=1, **{cache_arg: cache})
        cache.batch_repeat_interleave(group_size)
        attn = torch.cat([prefix_mask.repeat_interleave(group_size, dim=0), prefix_mask.new_ones((n, width))], dim=1)
        start = prefix_mask.sum(-1).repeat_interleave(group_size)
    else:
        cache, attn, start = None, None, torch.zeros(n, dtype=torch.long, device=device)
    positions = start[:, None] + torch.arange(width, device=device)[None, :]
    out = model(input_ids=inputs, attention_mask=attn, position_ids=positions, use_cache=cache is not None,
                **({cache_arg: cache} if cache is not None else {}))
    return out.logits
