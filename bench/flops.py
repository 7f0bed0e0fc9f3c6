"""FLOP counting for the GRPO benchmark, and a measured matmul peak to turn FLOP/s into utilisation.

The model is counted the usual way (Kaplan et al. / PaLM appendix B), without attention's
sequence-length term:

* the transformer body costs ``2 × N`` FLOPs per token forward, ``6 × N`` forward + backward, where ``N`` is
  the number of **non-embedding** parameters (input embedding excluded, and the LM-head weight excluded
  too when it is not tied: it is counted separately);
* the LM head costs ``2 × hidden × vocab`` per row of logits forward, ``6 ×`` that forward + backward.

So ``flops = mult × (N × body_tokens + hidden × vocab × head_rows)`` with ``mult`` = 2 (forward only:
generation, frozen reference passes) or 6 (training). Not counted: attention scores (``QKᵀ`` and ``AV``,
small at these lengths), norms / activations / softmax / sampling, the optimizer, and the forward that
gradient checkpointing recomputes in the backward (TRL's default) — so these are *useful* FLOPs, and a
utilisation computed from them is a lower bound on how busy the hardware was.

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
        return cls(non_embedding_params=total - excluded, hidden=int(embedding.shape[1]),
                   vocab=int(embedding.shape[0]), intermediate=getattr(cfg, "intermediate_size", None))


@dataclass(frozen=True)
class TokenCounts:
    """Tokens through the transformer body and rows through the LM head (one phase of one step)."""

    body: int
    head: int

    def __add__(self, other: "TokenCounts") -> "TokenCounts":
        return TokenCounts(self.body + other.body, self.head + other.head)

    def flops(self, dims: ModelDims, mult: int) -> float:
        return float(mult) * (dims.non_embedding_params * self.body + dims.hidden * dims.vocab * self.head)


def forward_flops(dims: ModelDims, counts: TokenCounts) -> float:
    return counts.flops(dims, 2)


def train_flops(dims: ModelDims, counts: TokenCounts) -> float:
    return counts.flops(dims, 6)


def grouped_counts(prompt_lengths: Sequence[int], completion_lengths: Sequence[int],
                   group_size: int) -> dict[str, TokenCounts]:
    """Non-padding tokens of a grouped step, each prompt processed once per group (our trainer's layout).

    ``prompt_lengths``: one per group (B); ``completion_lengths``: one per completion (B × G, group-major).

    * ``train`` — the scoring forward + backward: each prompt's prefix ``p[:-1]`` once, then
      ``[p[-1] | c[:-1]]`` for each completion (``len(c)`` tokens); logits for every completion token.
    * ``generate`` — sampling: each prompt prefilled once (``len(p)`` tokens, one row of logits per prompt),
      then every completion token but the last is fed back (``len(c) - 1`` tokens, one row of logits each).
    * ``frozen`` — a no-grad forward over the same tokens as ``train`` (π_ref when β > 0).
    """
    if len(completion_lengths) != len(prompt_lengths) * group_size:
        raise ValueError(f"{len(completion_lengths)} completions for {len(prompt_lengths)} prompts x G={group_size}")
    p_sum, c_sum = int(sum(prompt_lengths)), int(sum(completion_lengths))
    n_prompts = len(prompt_lengths)
    fed_back = int(sum(max(0, c - 1) for c in completion_lengths))
    train = TokenCounts(body=p_sum - n_prompts + c_sum, head=c_sum)
    return {"train": train, "frozen": train,
            "generate": TokenCounts(body=p_sum + fed_back, head=n_prompts + fed_back)}


def trl_processed_counts(num_rows: int, prompt_width: int, completion_width: int,
                         compact_head: bool) -> dict[str, TokenCounts]:
    """The tokens TRL's GRPOTrainer (transformers generation, no vLLM) actually runs, padding included.

    Every completion row carries its own copy of the prompt, left-padded to ``prompt_width`` (P); completions are
    right-padded to ``completion_width`` (C, the longest completion).

    * ``generate`` — ``model.generate`` on the B rows: prefill B × P, then B × (C − 1) decode tokens (finished rows
      keep decoding padding until every row is done); one row of logits per row per generated position: B × C.
    * ``train`` — one forward + backward over ``[prompt | completion]``: B × (P + C) tokens. TRL's fused LM head
      projects only the scored positions on CUDA/XPU with Triton (``compact_head``: B × C, completion positions);
      elsewhere (CPU) it projects every position: B × (P + C − 1).
    * ``frozen`` — a no-grad forward of the same shape (π_ref when β > 0).
    """
    b, p, c = num_rows, prompt_width, completion_width
    train = TokenCounts(body=b * (p + c), head=b * c if compact_head else b * (p + c - 1))
    return {"train": train, "frozen": train,
            "generate": TokenCounts(body=b * p + b * max(0, c - 1), head=b * c)}


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
