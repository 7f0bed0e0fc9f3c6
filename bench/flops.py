"""FLOP counting for the GRPO benchmark, and a measured matmul peak to turn FLOP/s into utilisation.

The model is counted the usual way (Kaplan et al.; PaLM appendix B, attention included):

* the transformer body costs ``2 × N`` FLOPs per token forward, ``6 × N`` forward + backward, where ``N`` is
  the number of **non-embedding** parameters (input embedding excluded, and the LM-head weight excluded
  too when it is not tied: it is counted separately);
* the LM head costs ``2 × hidden × vocab`` per row of logits forward, ``6 ×`` that forward + backward;
* attention costs ``4 × heads × head_dim`` per (query, key) pair and layer forward (``QKᵀ`` and ``AV``),
  ``12 ×`` forward + backward — PaLM's ``12·L·H·Q·T`` per token, with T the keys a query actually sees
  (causal, padding excluded), not the full sequence;
* a prompt token whose last layer only has to supply keys and values (the completions attend to them; nothing
  reads that token's output) is counted without that layer's q/o projections and MLP
  (``ModelDims.kv_only_skipped_params``).

So ``flops = mult × (N × body − skipped × kv_only + hidden × vocab × head_rows + 2 × heads·head_dim × pairs)``
with ``mult`` = 2 (forward only: generation, frozen reference passes) or 6 (training). Not counted: norms /
activations / softmax / sampling, the optimizer, and the forward that gradient checkpointing recomputes in the
backward (TRL's default) — so these are *useful* FLOPs, and a utilisation computed from them is a lower bound
on how busy the hardware was.

Which tokens count is the caller's choice; :func:`grouped_counts` and :func:`trl_processed_counts` are the two
used by ``bench/grpo_vs_trl.py`` (see there).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class ModelDims:
    non_embedding_params: int
    hidden: int
    vocab: int
    intermediate: int | None = None
    layers: int = 1
    attention_width: int = 0  # heads × head_dim: the width of QKᵀ and AV for one (query, key) pair
    kv_only_skipped_params: int = 0  # last-layer weights a keys/values-only token skips: q, o, MLP

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelDims":
        """Dimensions of a transformers causal LM (shared parameters are counted once)."""
        seen: set[int] = set()
        total = 0
        for p in model.parameters():  # parameters() already deduplicates tied weights; ids make sure
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        embedding = model.get_input_embeddings().weight
        excluded = embedding.numel()
        head = model.get_output_embeddings()
        if head is not None and head.weight is not embedding:
            excluded += head.weight.numel()
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden, inter = int(embedding.shape[1]), getattr(cfg, "intermediate_size", None)
        width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads)
        return cls(non_embedding_params=total - excluded, hidden=hidden, vocab=int(embedding.shape[0]),
                   intermediate=inter, layers=cfg.num_hidden_layers, attention_width=width,
                   kv_only_skipped_params=2 * hidden * width + 3 * hidden * (inter or 4 * hidden))


@dataclass(frozen=True)
class TokenCounts:
    """Tokens through the transformer body, rows through the LM head and attended (query, key) pairs summed
    over layers (one phase of one step); ``kv_only`` of the body tokens need only keys/values in the last layer."""

    body: int
    head: int
    pairs: int = 0
    kv_only: int = 0

    def __add__(self, other: "TokenCounts") -> "TokenCounts":
        return TokenCounts(self.body + other.body, self.head + other.head, self.pairs + other.pairs,
                           self.kv_only + other.kv_only)

    def flops(self, dims: ModelDims, mult: int) -> float:
        return float(mult) * (dims.non_embedding_params * self.body - dims.kv_only_skipped_params * self.kv_only
                              + dims.hidden * dims.vocab * self.head + 2 * dims.attention_width * self.pairs)


def causal_pairs(queries: int, keys_before: int = 0) -> int:
    """(query, key) pairs of ``queries`` consecutive tokens attending causally after ``keys_before`` keys."""
    return queries * keys_before + queries * (queries + 1) // 2


def forward_flops(dims: ModelDims, counts: TokenCounts) -> float:
    return counts.flops(dims, 2)


def train_flops(dims: ModelDims, counts: TokenCounts) -> float:
    return counts.flops(dims, 6)


def grouped_counts(prompt_lengths: Sequence[int], completion_lengths: Sequence[int],
                   group_size: int, layers: int) -> dict[str, TokenCounts]:
    """Non-padding tokens of a grouped step, each prompt processed once per group (our trainer's layout).

    ``prompt_lengths``: one per group (B); ``completion_lengths``: one per completion (B × G, group-major).

    * ``train`` — the scoring forward + backward: each prompt's prefix ``p[:-1]`` once (keys/values only in
      the last layer), then ``[p[-1] | c[:-1]]`` for each completion (``len(c)`` tokens, attending to the
      prefix and causally to each other); logits for every completion token.
    * ``generate`` — sampling: each prompt prefilled once (``len(p)`` tokens, one row of logits per prompt),
      then every completion token but the last is fed back (``len(c) - 1`` tokens, one row of logits each,
      attending to everything before it).
    * ``frozen`` — a no-grad forward over the same tokens as ``train`` (π_ref when β > 0).
    """
    if len(completion_lengths) != len(prompt_lengths) * group_size:
        raise ValueError(f"{len(completion_lengths)} completions for {len(prompt_lengths)} prompts x G={group_size}")
    prefix = [p - 1 for p in prompt_lengths]
    per_group = [completion_lengths[i * group_size:(i + 1) * group_size] for i in range(len(prompt_lengths))]
    c_sum = int(sum(completion_lengths))
    fed_back = int(sum(max(0, c - 1) for c in completion_lengths))
    train_pairs = (layers - 1) * sum(causal_pairs(q) for q in prefix) + layers * sum(
        causal_pairs(c, q) for q, cs in zip(prefix, per_group) for c in cs)
    gen_pairs = layers * (sum(causal_pairs(p) for p in prompt_lengths) + sum(
        causal_pairs(max(0, c - 1), p) for p, cs in zip(prompt_lengths, per_group) for c in cs))
    train = TokenCounts(body=sum(prefix) + c_sum, head=c_sum, pairs=train_pairs, kv_only=sum(prefix))
    return {"train": train, "frozen": train,
            "generate": TokenCounts(body=int(sum(prompt_lengths)) + fed_back, head=len(prompt_lengths) + fed_back,
                                    pairs=gen_pairs)}


def trl_processed_counts(num_rows: int, prompt_width: int, completion_width: int, compact_head: bool,
                         layers: int) -> dict[str, TokenCounts]:
    """The tokens TRL's GRPOTrainer (transformers generation, no vLLM) actually runs, padding included.

    Every completion row carries its own copy of the prompt, left-padded to ``prompt_width`` (P); completions are
    right-padded to ``completion_width`` (C, the longest completion). Attention runs over every position of a
    row, padding included (masked, not skipped).

    * ``generate`` — ``model.generate`` on the B rows: prefill B × P, then B × (C − 1) decode tokens (finished rows
      keep decoding padding until every row is done); one row of logits per row per generated position: B × C.
    * ``train`` — one forward + backward over ``[prompt | completion]``: B × (P + C) tokens. TRL's fused LM head
      projects only the scored positions on CUDA/XPU with Triton (``compact_head``: B × C, completion positions);
      elsewhere (CPU) it projects every position: B × (P + C − 1).
    * ``frozen`` — a no-grad forward of the same shape (π_ref when β > 0).
    """
    b, p, c = num_rows, prompt_width, completion_width
    train = TokenCounts(body=b * (p + c), head=b * c if compact_head else b * (p + c - 1),
                        pairs=layers * b * causal_pairs(p + c))
    return {"train": train, "frozen": train,
            "generate": TokenCounts(body=b * p + b * max(0, c - 1), head=b * c,
                                    pairs=layers * b * (causal_pairs(p) + causal_pairs(max(0, c - 1), p)))}


@dataclass(frozen=True)
class MatmulPeak:
    """What one fp32 matmul shape reaches on this machine, two ways."""

    sustained: float  # FLOPs of back-to-back runs / their total wall time (>= ``seconds``): the peak used
    best: float  # the fastest single run (a burst: ~30 % above the sustained rate on the 2-core machine)


def matmul_peak(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                seconds: float = 1.0, min_reps: int = 5) -> MatmulPeak:
    """``torch.mm([m, k], [k, n])`` (2·m·k·n FLOPs) run back to back for ``seconds``.

    The sustained rate is what a training step, which also runs matmuls back to back for seconds, can be
    compared with; the best single run is reported beside it. Measured on the 2-core machine over 10 s:
    best 166-172 GFLOP/s, 90th percentile 150-166, median 124-131 (the CPU's speed moves from run to run).
    """
    dev = torch.device(device)
    a = torch.randn(m, k, dtype=dtype, device=dev)
    b = torch.randn(k, n, dtype=dtype, device=dev)
    out = torch.empty(m, n, dtype=dtype, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.mm(a, b, out=out)  # warm up
    sync()
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    flops = 2.0 * m * k * n
    return MatmulPeak(sustained=flops * reps / (time.perf_counter() - start), best=flops / best)
