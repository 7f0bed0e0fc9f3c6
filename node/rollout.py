"""Grouped rollouts: G sampled completions per prompt, with the sampler's own log-probabilities.

:class:`RolloutBatch` is what every generation backend returns; :class:`RolloutBackend` is the
interface (``generate(prompt_ids, group_size, params, seed)``). :class:`TransformersBackend` is the
CPU/GPU backend on plain transformers models:

* **prefix sharing** — each prompt is prefilled once and its KV cache repeated G times, where
  ``model.generate(num_return_sequences=G)`` prefills it G times;
* all groups decode together in one batch, and finished rows leave the batch (no compute on padding);
* behaviour log-probabilities are those of the distribution actually sampled from (after
  temperature, top-k and top-p), as vLLM's ``processed_logprobs`` reports them.

The vLLM backend (GPU only) lives in :mod:`grpo_swarm.node.rollout_vllm` behind the same interface.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from . import fast_forward
from .noise import KeyedNoise, group_keys, keys_tensor


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for GRPO sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class RolloutBatch:
    """G completions for each of B prompts, flattened group-major (row = group * G + k)."""

    prompt_ids: list[torch.Tensor]  # B 1-D LongTensors, no padding
    completion_ids: torch.Tensor  # [B*G, C] LongTensor, right-padded with pad_id
    completion_mask: torch.Tensor  # [B*G, C] float32, 1 on real tokens (EOS included)
    behaviour_logps: torch.Tensor  # [B*G, C] float32 log-prob of each token under the sampler, 0 on padding
    truncated: torch.Tensor  # [B*G] bool: hit max_new_tokens without EOS
    group_size: int
    policy_version: int = 0
    timings: dict = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_completions(self) -> int:
        return self.completion_ids.size(0)

    def completion_lists(self) -> list[list[int]]:
        lengths = self.completion_mask.sum(dim=1).long().tolist()
        return [row[:n] for row, n in zip(self.completion_ids.tolist(), lengths)]

    def validate(self) -> None:
        """Shape and value checks, so a bad backend fails here rather than deep in the loss."""
        n, c = self.completion_ids.shape
        if n != self.num_groups * self.group_size:
            raise ValueError(f"{n} completions for {self.num_groups} prompts x G={self.group_size}")
        for name in ("completion_mask", "behaviour_logps"):
            if tuple(getattr(self, name).shape) != (n, c):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {(n, c)}")
        if not torch.isfinite(self.behaviour_logps).all():
            raise ValueError("behaviour log-probabilities contain NaN or inf")


class RolloutBackend(Protocol):
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], group_size: int, params: SamplingParams, seed: int,
        noise_keys: Sequence[tuple[int, int]] | None = None,
    ) -> RolloutBatch: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None: ...


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the distribution sampled from: temperature, then top-k, then top-p."""
    logits = logits.float()
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def sample_tokens(logps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One token per row from log-probabilities [B, V]: the Gumbel-max trick, argmax(log p + g).

    Exactly categorical sampling (P(argmax = i) = p_i) in two kernels given the noise; the noise is
    the run's keyed noise (:class:`.noise.KeyedNoise`), so the token is a function of the policy and
    the completion's identity that a verifier can recompute. Tokens with probability 0
    (log p = -inf) are never chosen; ties go to the lowest index.
    """
    return (logps + noise).argmax(dim=-1)


def seed_noise_keys(seed: int, num_prompts: int, group_size: int) -> list[tuple[int, int]]:
    """Noise keys for sampling outside a swarm: the run's keyed noise with ``seed`` as the run seed,
    no node id, round 0 and prompt = position in the batch."""
    return group_keys(seed & (2**64 - 1), "", 0, range(num_prompts), group_size)


def eos_and_pad_ids(model: PreTrainedModel, tokenizer) -> tuple[list[int], int]:
    """EOS ids (the tokenizer's first, then the model's ``generation_config`` ones) and the pad id."""
    gen_eos = model.generation_config.eos_token_id
    gen_eos = [] if gen_eos is None else list(gen_eos) if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    eos = [tokenizer.eos_token_id] + [t for t in gen_eos if t != tokenizer.eos_token_id]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return eos, pad_id


def cache_kwarg(model: PreTrainedModel) -> str:
    """Name of the KV-cache argument of ``model.forward`` (transformers 5.24 renamed it to ``cache``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(ids [B, L], attention_mask [B, L])``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


SINGLE_THREAD_DECODE_FLOPS = 64e6


def decode_threads(parameters: int, rows: int, device) -> int | None:
    """Intra-op threads for decoding ``rows`` sequences with a model of ``parameters`` weights: 1 when a
    decode step is too little work to split.

    A decode step of a small model is ~30 kernels of microseconds each; with several threads every
    parallel kernel pays a fork/join on top (measured on the tiny model, 2 cores, interleaved in one
    process: 28.6 ms per generation on 1 thread against 31.9 ms on 2). Below
    ``SINGLE_THREAD_DECODE_FLOPS`` of matmul work per step (2 · parameters · rows; the tiny model:
    8 MFLOP, SmolLM2-135M: 4.3 GFLOP) decoding runs on one thread; None = leave the setting alone.
    """
    if torch.device(device).type != "cpu":
        return None
    return 1 if 2 * parameters * rows < SINGLE_THREAD_DECODE_FLOPS else None


@contextmanager
def intra_op_threads(threads: int | None):
    """Run the block with ``threads`` torch intra-op threads (None: unchanged), restoring them after."""
    before = torch.get_num_threads()
    if threads is None or threads >= before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _matmul_precision_knobs() -> list[tuple[object, str, object]]:
    """(object, attribute, the value that means IEEE float32) for the matmul precision settings this
    torch has: the per-backend ``fp32_precision`` (torch >= 2.9; mixing it with the legacy API makes
    torch refuse to read either), else the legacy CUDA TF32 switch."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return [(torch.backends.cuda.matmul, "fp32_precision", "ieee"),
                (torch.backends.mkldnn.matmul, "fp32_precision", "ieee")]
    return [(torch.backends.cuda.matmul, "allow_tf32", False)]


@contextmanager
def full_precision():
    """Run the block in float32 arithmetic whatever the caller set: autocast off (a node's
    ``model.dtype`` bfloat16/float16 applies to its training passes only) and float32 matmuls without
    TF32 or bf16 shortcuts. Sampling must: the verifier recomputes the log-probs and the keyed-noise
    argmax in float32, within 0.01 / 0.001 nats (max / mean) and 0.05 nats of shortfall, and bf16
    sampling misses that on every SmolLM2 completion (bench/RESULTS.md, session 36)."""
    knobs = _matmul_precision_knobs()
    saved = [getattr(obj, name) for obj, name, _ in knobs]
    for obj, name, exact in knobs:
        setattr(obj, name, exact)
    try:
        with ExitStack() as stack:
            for kind in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(kind, enabled=False))
            yield
    finally:
        for (obj, name, _), value in zip(knobs, saved):
            setattr(obj, name, value)


class HFDecoder:
    """Sampling through the model's own transformers forward and DynamicCache (any architecture)."""

    def __init__(self, model: PreTrainedModel):
        self.model, self.cache_arg = model, cache_kwarg(model)

    def start(self, ids, attn, group_size: int, capacity: int) -> torch.Tensor:
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_arg: self.cache})
        self.cache.batch_repeat_interleave(group_size)
        self.attn = attn.repeat_interleave(group_size, dim=0)
        self.next_pos = positions[:, -1:].repeat_interleave(group_size, dim=0) + 1
        return out.logits[:, -1].repeat_interleave(group_size, dim=0)

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.attn, self.next_pos = self.attn[rows], self.next_pos[rows]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.attn = torch.cat([self.attn, self.attn.new_ones((self.attn.size(0), 1))], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.attn, position_ids=self.next_pos,
                         use_cache=True, **{self.cache_arg: self.cache})
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1]


class FastDecoder:
    """Sampling through :mod:`fast_forward` (Llama-family models): static KV cache, fused projections."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.weights = fast_forward.LayerWeights.for_sampling(model)

    def start(self, ids, attn, group_size: int, capacity: int) -> torch.Tensor:
        logits, self.cache = fast_forward.prefill(self.model, self.weights, ids, attn, capacity)
        self.cache.repeat(group_size)
        self.next_pos = attn.sum(-1).repeat_interleave(group_size)
        return logits.repeat_interleave(group_size, dim=0)

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.select(rows)
        self.next_pos = self.next_pos[rows]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = fast_forward.decode_step(self.model, self.weights, tokens, self.next_pos, self.cache)
        self.next_pos = self.next_pos + 1
        return logits


class TransformersBackend:
    """Sampling with a transformers causal LM: prefix-shared prefill, batched KV-cached decoding."""

    def __init__(self, model: PreTrainedModel, eos_token_ids: Sequence[int], pad_token_id: int):
        if not eos_token_ids:
            raise ValueError("at least one EOS token id is needed to end completions")
        self.model = model
        self.num_parameters = sum(p.numel() for p in model.parameters())  # once: walking the modules costs
        self.eos = torch.as_tensor(list(eos_token_ids), dtype=torch.long)
        self.pad_id = pad_token_id

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=False)

    def _sample(self, prompt_ids, group_size: int, params: SamplingParams, keys: torch.Tensor, fast: bool):
        """The decode loop: tokens [N, L] and their log-probs [N, L] (valid up to each row's first EOS),
        and the number of steps taken. ``keys``: each row's noise key, int32 [N, 2]."""
        model, device = self.model, self.model.device
        ids, attn = (t.to(device) for t in left_pad(prompt_ids, self.pad_id))
        decoder = (FastDecoder if fast else HFDecoder)(model)
        logits = decoder.start(ids, attn, group_size, capacity=ids.size(1) + params.max_new_tokens)

        n, max_new = logits.size(0), params.max_new_tokens
        tokens = torch.full((n, max_new), self.pad_id, dtype=torch.long, device=device)
        logps = torch.zeros((n, max_new), dtype=torch.float32, device=device)
        noise = KeyedNoise(keys, logits.size(-1), max_new)
        active = None  # rows in the decoder's batch, in its order; None = all rows, in order
        done = torch.zeros(n, dtype=torch.bool, device=device)  # per batch row: has sampled an EOS
        eos = self.eos.to(device)
        is_eos = (lambda tok: tok == eos[0]) if eos.numel() == 1 else (lambda tok: torch.isin(tok, eos))
        steps = 0
        # Per step only what sampling needs; rows that finished keep decoding and writing (ignored:
        # everything after a row's first EOS is masked by the caller) until the batch is compacted.
        for t in range(max_new):
            step_logps = processed_logprobs(logits, params)
            tok = sample_tokens(step_logps, noise.at(t, active))
            tok_logps = step_logps.gather(1, tok[:, None]).squeeze(1)
            if active is None:
                tokens[:, t], logps[:, t] = tok, tok_logps
            else:
                tokens[active, t], logps[active, t] = tok, tok_logps
            done |= is_eos(tok)
            steps = t + 1
            n_done = int(done.sum())
            if steps == max_new or n_done == done.numel():
                break
            if n_done >= 0.25 * done.numel():  # compact: drop finished rows from the batch
                keep = torch.nonzero(~done).squeeze(1)
                decoder.keep(keep)
                active = keep if active is None else active[keep]
                tok, done = tok[keep], done[keep]
            logits = decoder.step(tok)  # a finished row's next tokens are masked out at the end
        return tokens, logps, steps

    @torch.no_grad()
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], group_size: int, params: SamplingParams, seed: int,
        noise_keys: Sequence[tuple[int, int]] | None = None,
    ) -> RolloutBatch:
        """Sample ``group_size`` completions per prompt. ``noise_keys``: each row's key (group-major,
        :func:`.noise.group_keys`), which fixes its completion; default: keys derived from ``seed``."""
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        model, device = self.model, self.model.device
        if noise_keys is None:
            noise_keys = seed_noise_keys(seed, len(prompt_ids), group_size)
        if len(noise_keys) != len(prompt_ids) * group_size:
            raise ValueError(f"{len(noise_keys)} noise keys for {len(prompt_ids)} prompts x G={group_size}")
        keys = keys_tensor(noise_keys, device)
        fast = fast_forward.supports(model)
        switch_mode = model.training and not fast  # the fast path has no dropout: no mode to switch
        if switch_mode:  # (model.train() walks every module: ~0.6 ms on the tiny model, per call)
            model.eval()
        try:
            with intra_op_threads(decode_threads(self.num_parameters, len(prompt_ids) * group_size, device)):
                tokens, logps, steps = self._sample(prompt_ids, group_size, params, keys, fast)
        finally:
            if switch_mode:
                model.train()
        eos = self.eos.to(device)
        is_eos = torch.isin(tokens[:, :steps], eos)
        finished = is_eos.any(dim=1)
        lengths = torch.where(finished, is_eos.int().argmax(dim=1) + 1, steps)
        width = int(lengths.max())
        keep_mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
        mask = keep_mask.float()
        tokens = tokens[:, :width].masked_fill(~keep_mask, self.pad_id)
        batch = RolloutBatch(
            prompt_ids=[torch.as_tensor(list(p), dtype=torch.long) for p in prompt_ids],
            completion_ids=tokens.cpu(),
            completion_mask=mask.cpu(),
            behaviour_logps=(logps[:, :width] * mask).cpu(),
            truncated=(~finished).cpu(),
            group_size=group_size,
        )
        batch.validate()
        return batch
