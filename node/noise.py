"""The sampler's Gumbel noise in torch: :mod:`grpo_swarm.protocol.sampling_noise` (the spec, with its
reference implementation and test vectors) on tensors, for the decode loop and for the spot-check.

Unsigned 32-bit arithmetic is done on int32 tensors: multiplication wraps modulo 2^32 on CPU and
CUDA alike, and right shifts (arithmetic on int32) are masked to the bits a logical shift keeps.
Drawing the noise this way is cheaper than ``torch.rand`` on CPU (measured: 3.7 ms for the hash of
16 x 49,152 entries against 6.4 ms for ``torch.rand`` of the same shape; bench/RESULTS.md).
"""

from __future__ import annotations

from typing import Sequence

import torch

from grpo_swarm.protocol.sampling_noise import GOLDEN, M1, M2, MASK32, row_key

_M2_I32 = M2 - (1 << 32)  # 0x846ca68b as a signed int32
_tables: dict[tuple[int, str], torch.Tensor] = {}


def as_i32(value: int) -> int:
    """A u32 as the signed int32 with the same bits."""
    value &= MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


def fmix_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on an int32 tensor."""
    x ^= (x >> 16) & 0xFFFF
    x *= M1
    x ^= (x >> 15) & 0x1FFFF
    x *= _M2_I32
    x ^= (x >> 16) & 0xFFFF
    return x


def token_table(vocab: int, device) -> torch.Tensor:
    """``i * 0x9e3779b9 mod 2^32`` for every token id, int32 [V] (cached per device)."""
    key = (vocab, str(device))
    table = _tables.get(key)
    if table is None:
        i = torch.arange(vocab, dtype=torch.int64)
        table = ((i * GOLDEN) & MASK32)
        table = torch.where(table >= 1 << 31, table - (1 << 32), table).to(torch.int32).to(device)
        _tables[key] = table
    return table


def keys_tensor(keys: Sequence[tuple[int, int]], device) -> torch.Tensor:
    """Row keys (k0, k1) as int32 [rows, 2]."""
    return torch.tensor([[as_i32(k0), as_i32(k1)] for k0, k1 in keys], dtype=torch.int32, device=device)


def group_keys(run_seed: int, node_id: str, round_index: int, prompt_indices: Sequence[int],
               group_size: int) -> list[tuple[int, int]]:
    """Keys of the rows of a rollout batch (group-major: prompt j, member k -> row j * G + k)."""
    return [row_key(run_seed, node_id, round_index, p, k) for p in prompt_indices for k in range(group_size)]


def position_seeds(keys: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """s(t) for t = first .. first + count - 1 and each row: int32 [count, rows]."""
    return row_seeds(keys, torch.arange(first, first + count, dtype=torch.int64)[:, None])


def row_seeds(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """s(t) for each row at its own position ``positions[r]`` (rows of a batch at different steps,
    e.g. in a vLLM batch): int32 [rows], or any shape ``positions`` broadcasts with [rows] to."""
    t = positions.to(device=keys.device, dtype=torch.int64) & MASK32
    t = torch.where(t >= 1 << 31, t - (1 << 32), t).to(torch.int32)
    x = fmix_(keys[:, 0] ^ t)
    x ^= keys[:, 1]
    return fmix_(x)


def gumbel_from_seeds(seeds: torch.Tensor, vocab: int) -> torch.Tensor:
    """g for every token under each position seed: float32 [*seeds.shape, V]."""
    x = seeds[..., None] ^ token_table(vocab, seeds.device)
    x = fmix_(x)
    x >>= 9
    x &= 0x7FFFFF
    u = x.float()
    del x
    return u.add_(0.5).mul_(1.0 / (1 << 23)).log_().neg_().log_().neg_()


def completion_noise(key: tuple[int, int], length: int, vocab: int, device="cpu") -> torch.Tensor:
    """The noise of one completion's positions 0 .. length-1: float32 [length, V] (the spot-check)."""
    keys = keys_tensor([key], device)
    return gumbel_from_seeds(position_seeds(keys, 0, length)[:, 0], vocab)


def shortfalls(logps: torch.Tensor, noise: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per position, how far the chosen token's perturbed score is below the best one (0 when it is
    the argmax): ``max_i(lp[i] + g[i]) - (lp[tok] + g[tok])``, float32 [length]."""
    scores = logps.float() + noise
    chosen = scores.gather(1, tokens[:, None]).squeeze(1)
    return scores.max(dim=1).values - chosen


class KeyedNoise:
    """Noise for the decode loop: rows' keys fixed at the start, drawn for several steps at a time.

    ``at(step, active)`` gives [rows, V] for decode step ``step`` and the rows still in the batch
    (``active``: indices into the keys, or None for all). Drawing a [steps, rows, V] block at once
    saves kernels per step (the tiny model's decode step is mostly kernel overhead); when rows leave
    the batch the rest of the block is dropped and the next one drawn for the rows left.
    """

    def __init__(self, keys: torch.Tensor, vocab: int, steps: int, budget: int = 1 << 22):
        self.keys, self.vocab, self.steps, self.budget = keys, vocab, steps, budget
        self.block: torch.Tensor | None = None
        self.first = 0
        self.rows: torch.Tensor | None = None  # the active rows the block was drawn for

    def at(self, step: int, active: torch.Tensor | None) -> torch.Tensor:
        block = self.block
        if block is None or active is not self.rows or step - self.first >= block.size(0):
            keys = self.keys if active is None else self.keys[active]
            count = max(1, min(self.steps - step, self.budget // max(1, keys.size(0) * self.vocab)))
            self.block = block = gumbel_from_seeds(position_seeds(keys, step, count), self.vocab)
            self.first, self.rows = step, active
        return block[step - self.first]
