"""Secret random projections of gradient shares: the arithmetic of the share audit.

A group's flattened gradient is split into shares, one per reducer, each a list of hivemind parts
(:class:`ShareLayout`, read from the all-reduce's own partition). For share ``j`` and a seed, the
projection is ``r_d[e] = U[e mod ROW, d] * V[row(e), d]`` for ``d < SKETCH_DIMS``: every part is
padded to whole rows of ``ROW`` values, ``U`` (ROW x dims) is shared by the share's rows and ``V``
(rows x dims) weights each row. A sketch ``R x`` is then one (rows x ROW) @ (ROW x dims) product
per contiguous span — memory-bound, about one read of the gradient — and, being linear, the sketch
of a weighted average is the weighted average of the sketches.

**Sampled rows.** With an audit fraction ``f < 1`` the seed also picks, for every share, a secret
random subset of its rows — each row with probability ``f``, rows of small parts (at most
``ALWAYS_AUDITED_ROWS`` rows: norms, biases, a tensor's short last part) always — and the projection
weights only those (``V`` is zero elsewhere, so the sketch stays linear and only the sampled rows are
read). A reducer that alters ``m`` rows of its average, not knowing the seed, escapes one audit with
probability about ``(1 - f)^m``.

``U`` and ``V`` are uniform on [-sqrt(3), sqrt(3)) from SHAKE-256 of the seed (``U`` from 24-bit
integers, ``V`` — one weight per row and dimension, 16 per 1,024 values — from 8-bit ones: a quarter
of the bytes to hash, and a row weight needs no finer steps), so every platform draws the same
values; unit variance, so ``E[(r.x)^2] = |x|^2``. The products are
computed in float32 and summed over rows in float64; different machines may differ in the last
bits, which :func:`share_tolerance` covers.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

ROW = 1024
SKETCH_DIMS = 16
ALWAYS_AUDITED_ROWS = 8  # parts of at most this many rows are sketched whole at any audit fraction
MIN_AUDIT_FRACTION = 2.0 ** -10
DEFAULT_AUDIT_FRACTION = 0.25  # the trade-off: README, "What the averaging checks"
HALF_BLOCK_ROWS = 128  # float16 rows converted at a time: 512 KiB of float32, within a core's L2
Z = 8.0  # tolerance in units of the worst-case error's norm (honest residuals stay far below it)
JL_FACTOR = 5.0  # a sketch larger than JL_FACTOR * sqrt(dims) * committed norm cannot be honest
RHO_SKETCH = 2.0 ** -16  # float32 products, summation order, accumulation (relative to the norms)
RHO_FP16 = 2.0 ** -11  # fp16 rounding, relative (normal numbers)
FP16_ABS = 2.0 ** -25  # fp16 rounding, absolute (subnormal numbers)
_SEED_DOMAIN = b"grpo-swarm/v1/share-projection\n"
FP16_MIN, FP16_MAX = float(torch.finfo(torch.float16).min), float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class Span:
    """``numel`` consecutive values of tensor ``tensor_index`` from ``start``, whose first value
    opens row ``row_offset`` of the share."""

    tensor_index: int
    start: int
    numel: int
    row_offset: int


@dataclass(frozen=True)
class ShareLayout:
    """Per share: its parts (one Span each, in part order), its contiguous spans (parts merged where
    rows stay aligned) and its number of rows."""

    parts: tuple[tuple[Span, ...], ...]
    spans: tuple[tuple[Span, ...], ...]
    rows: tuple[int, ...]

    @classmethod
    def from_partition(cls, part_sizes_by_share: Sequence[Sequence[int]], parts_by_tensor: Sequence[int]
                       ) -> ShareLayout:
        """The layout of hivemind's partition: ``part_sizes_by_share[j]`` the sizes of share j's parts
        (shares in peer order, parts in order); ``parts_by_tensor[t]`` how many parts tensor t was cut into."""
        tensor_of_part = [t for t, n in enumerate(parts_by_tensor) for _ in range(n)]
        if len(tensor_of_part) != sum(len(s) for s in part_sizes_by_share):
            raise ValueError("the parts of the shares do not add up to the parts of the tensors")
        parts, spans, rows = [], [], []
        index, offset_in_tensor, previous_tensor = 0, 0, -1
        for sizes in part_sizes_by_share:
            share_parts, share_spans, row = [], [], 0
            for numel in sizes:
                t = tensor_of_part[index]
                if t != previous_tensor:
                    offset_in_tensor, previous_tensor = 0, t
                part = Span(t, offset_in_tensor, int(numel), row)
                share_parts.append(part)
                last = share_spans[-1] if share_spans else None
                if (last is not None and last.tensor_index == t and last.start + last.numel == part.start
                        and last.numel % ROW == 0):
                    share_spans[-1] = Span(t, last.start, last.numel + part.numel, last.row_offset)
                else:
                    share_spans.append(part)
                row += -(-int(numel) // ROW)
                offset_in_tensor += int(numel)
                index += 1
            parts.append(tuple(share_parts))
            spans.append(tuple(share_spans))
            rows.append(row)
        return cls(tuple(parts), tuple(spans), tuple(rows))

    @property
    def num_shares(self) -> int:
        return len(self.rows)

    def numel(self, share: int) -> int:
        return sum(p.numel for p in self.parts[share])


def _uniform(seed: bytes, label: bytes, count: int) -> torch.Tensor:
    """``count`` float32 values uniform on [-sqrt(3), sqrt(3)), the same on every platform."""
    raw = hashlib.shake_256(seed + label).digest(4 * count)
    ints = np.frombuffer(raw, dtype="<i4") >> 8  # 24-bit signed integers: exact in float32
    return torch.from_numpy((ints.astype(np.float32) * np.float32(math.sqrt(3.0) / 2 ** 23)).copy())


def _uniform8(seed: bytes, label: bytes, count: int) -> torch.Tensor:
    """``count`` float32 values uniform on the 256 midpoints of [-sqrt(3), sqrt(3)) (variance 1 - 2^-16),
    from one byte each, the same on every platform."""
    ints = np.frombuffer(hashlib.shake_256(seed + label).digest(count), dtype=np.int8).astype(np.float32)
    return torch.from_numpy((ints + np.float32(0.5)) * np.float32(math.sqrt(3.0) / 128))


def check_audit_fraction(fraction) -> float:
    """``fraction`` as a float in [MIN_AUDIT_FRACTION, 1]; ValueError naming it otherwise."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
            math.isfinite(fraction) and MIN_AUDIT_FRACTION <= fraction <= 1.0):
        raise ValueError(f"the audit fraction must be a number in [{MIN_AUDIT_FRACTION}, 1], got {fraction!r}")
    return float(fraction)


def sampled_rows(seed: bytes, rows: int, fraction: float, always: Iterable[tuple[int, int]] = ()) -> np.ndarray | None:
    """The sorted rows (int64) of a share that the audit reads: each with probability ``fraction``,
    from 32-bit draws of SHAKE-256(seed), plus the ``(first row, count)`` ranges in ``always``.
    None: all of them (``fraction`` 1)."""
    if fraction >= 1.0:
        return None
    draws = np.frombuffer(hashlib.shake_256(seed + b"S").digest(4 * rows), dtype="<u4")
    keep = draws < np.uint32(min(int(fraction * 2 ** 32), 2 ** 32 - 1))
    for first, count in always:
        keep[first: first + count] = True
    return np.flatnonzero(keep).astype(np.int64)


@dataclass(frozen=True)
class Projection:
    """The secret projection of one share: ``U`` (ROW x dims), ``V`` (rows x dims) and the rows it reads
    (``sampled``, sorted; None: all)."""

    U: torch.Tensor
    V: torch.Tensor
    sampled: np.ndarray | None = None

    @classmethod
    def draw(cls, seed: bytes, share: int, rows: int, dims: int = SKETCH_DIMS, *, fraction: float = 1.0,
             always: Iterable[tuple[int, int]] = ()) -> Projection:
        """The projection of share ``share`` (``rows`` rows) for ``seed``; with ``fraction`` < 1 it
        reads only the rows :func:`sampled_rows` picks (``always``: row ranges it reads anyway)."""
        base = hashlib.sha256(_SEED_DOMAIN + seed + share.to_bytes(4, "big")).digest()
        return cls(_uniform(base, b"U", ROW * dims).view(ROW, dims), _uniform8(base, b"V", rows * dims).view(rows, dims),
                   sampled_rows(base, rows, check_audit_fraction(fraction), always))

    @property
    def dims(self) -> int:
        return self.U.shape[1]

    def block(self, values: torch.Tensor, row_offset: int, through_fp16: bool = False) -> torch.Tensor:
        """The sketch (float64, dims) of ``values`` (1-D float32, or float16: the exact float32 values
        of those) laid out from row ``row_offset``; with sampled rows only those are read (as one span
        of :func:`_sketch_sampled_share`). ``through_fp16``: of float32 values as hivemind's
        Float16Compression delivers them (clamped, rounded to float16), rounded in cache-sized blocks,
        so a sender need not keep what it sent."""
        x = values.detach().reshape(-1).contiguous()
        n = x.shape[0]
        if self.sampled is not None:
            return torch.from_numpy(_sketch_sampled_share([Span(0, 0, n, row_offset)], [x], self, through_fp16))
        # torch's single-thread sgemm runs this (rows x ROW) @ (ROW x dims) product ~1.4x faster than
        # numpy's OpenBLAS (bench/averaging.py --micro); the row weights are summed in float64
        v = self.V.numpy()
        full = n // ROW
        out = np.zeros(self.dims, dtype=np.float64)
        rows = x[: full * ROW].view(full, ROW)
        if full:
            products = (_products_in_blocks(rows, self.U, through_fp16) if x.dtype == torch.float16 or through_fp16
                        else rows @ self.U).numpy()
            out += np.einsum("rd,rd->d", products, v[row_offset: row_offset + full], dtype=np.float64)
        if n > full * ROW:
            tail = x[full * ROW:].float()
            if through_fp16:
                tail = _round_through_fp16(tail.clone(), torch.empty(tail.shape, dtype=torch.float16))
            out += (tail @ self.U[: n - full * ROW]).numpy().astype(np.float64) * v[row_offset + full]
        return torch.from_numpy(out)


def always_audited(layout: ShareLayout, share: int) -> list[tuple[int, int]]:
    """The (first row, count) ranges of share ``share``'s parts of at most ALWAYS_AUDITED_ROWS rows."""
    ranges = []
    for part in layout.parts[share]:
        rows = -(-part.numel // ROW)
        if rows <= ALWAYS_AUDITED_ROWS:
            ranges.append((part.row_offset, rows))
    return ranges


_scratches = threading.local()


def _scratch(dtype: torch.dtype) -> torch.Tensor:
    """This thread's HALF_BLOCK_ROWS x ROW block of ``dtype``, reused: a fresh 512 KiB block per part
    is fresh pages from the kernel each time (a part's sketch is a few hundred microseconds)."""
    key = str(dtype)
    block = getattr(_scratches, key, None)
    if block is None:
        block = torch.empty(HALF_BLOCK_ROWS, ROW, dtype=dtype)
        setattr(_scratches, key, block)
    return block


def _round_through_fp16(block: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """``block`` (float32) in place as Float16Compression delivers it: clamped to float16's range
    (else values past it would become inf), rounded to float16 and back."""
    block.clamp_(FP16_MIN, FP16_MAX)
    half.copy_(block)
    return block.copy_(half)


def _products_in_blocks(rows: torch.Tensor, U: torch.Tensor, through_fp16: bool = False) -> torch.Tensor:
    """``rows.float() @ U`` for float16 ``rows`` (or float32 ones rounded through float16), converted
    a block of rows at a time into a scratch that stays in cache: float16 memory is read at 2 bytes
    a value instead of written and re-read at 4 (1.2x faster alone, bench/RESULTS.md; more when
    peers share the memory bus)."""
    products = torch.empty(rows.shape[0], U.shape[1])
    scratch = _scratch(torch.float32)
    half = _scratch(torch.float16) if through_fp16 and rows.dtype != torch.float16 else None
    for r in range(0, rows.shape[0], HALF_BLOCK_ROWS):
        block = scratch[: min(HALF_BLOCK_ROWS, rows.shape[0] - r)]
        block.copy_(rows[r: r + block.shape[0]])
        if half is not None:
            _round_through_fp16(block, half[: block.shape[0]])
        torch.mm(block, U, out=products[r: r + block.shape[0]])
    return products


def sketch_share(layout: ShareLayout, share: int, flat_tensors: Sequence[torch.Tensor], proj: Projection,
                 through_fp16: bool = False) -> np.ndarray:
    """The sketch of share ``share`` of ``flat_tensors`` (1-D float32 views of the averaged tensors;
    ``through_fp16``: as Float16Compression delivers them, :meth:`Projection.block`)."""
    if proj.sampled is not None:
        return _sketch_sampled_share(layout.spans[share], flat_tensors, proj, through_fp16)
    total = torch.zeros(proj.dims, dtype=torch.float64)
    for span in layout.spans[share]:
        total += proj.block(flat_tensors[span.tensor_index][span.start: span.start + span.numel], span.row_offset,
                            through_fp16)
    return total.numpy()


def _sketch_sampled_share(spans: Sequence[Span], flat_tensors: Sequence[torch.Tensor], proj: Projection,
                          through_fp16: bool) -> np.ndarray:
    """:func:`sketch_share` with sampled rows, the whole share at once: the sampled rows of every span
    are gathered into one cache-sized scratch block after another (one product per block, not per
    span), short last rows into one zero-padded block, and the row weights applied in one sum. A
    share has ~100 spans (a tensor's parts merge into one, small tensors are spans of their own), and
    per-span calls cost more than their arithmetic on small spans; in a round each call that releases
    the GIL also waits to take it back."""
    sampled, U = proj.sampled, proj.U
    offsets = np.fromiter((s.row_offset for s in spans), dtype=np.int64, count=len(spans))
    full_rows = np.fromiter((s.numel // ROW for s in spans), dtype=np.int64, count=len(spans))
    lo = np.searchsorted(sampled, offsets)
    hi = np.searchsorted(sampled, offsets + full_rows)
    tail_sampled = np.searchsorted(sampled, offsets + full_rows + 1) > hi
    picked_rows = sampled[np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])] if len(spans) else sampled[:0]
    products = torch.empty(picked_rows.shape[0], U.shape[1])
    scratch = _scratch(torch.float32)
    half = _scratch(torch.float16)
    fill = done = 0
    half_filled = False

    def flush():
        nonlocal fill, done, half_filled
        if fill:
            if half_filled:
                scratch[:fill].copy_(half[:fill])
            elif through_fp16:
                _round_through_fp16(scratch[:fill], half[:fill])
            torch.mm(scratch[:fill], U, out=products[done: done + fill])
            done, fill = done + fill, 0

    tails: list[tuple[torch.Tensor, int]] = []
    for i, span in enumerate(spans):
        x = flat_tensors[span.tensor_index][span.start: span.start + span.numel]
        full = int(full_rows[i])
        if tail_sampled[i]:
            tails.append((x[full * ROW:], span.row_offset + full))
        if hi[i] == lo[i]:
            continue
        rows = x[: full * ROW].view(full, ROW)
        picked = torch.from_numpy(sampled[lo[i]: hi[i]] - span.row_offset)
        is_half = rows.dtype == torch.float16
        if fill and is_half != half_filled:
            flush()
        half_filled = is_half
        start = 0
        while start < picked.shape[0]:
            n = min(HALF_BLOCK_ROWS - fill, picked.shape[0] - start)
            torch.index_select(rows, 0, picked[start: start + n], out=(half if is_half else scratch)[fill: fill + n])
            fill, start = fill + n, start + n
            if fill == HALF_BLOCK_ROWS:
                flush()
    flush()
    v = proj.V.numpy()
    out = np.einsum("rd,rd->d", products.numpy(), v[picked_rows], dtype=np.float64)
    for first in range(0, len(tails), HALF_BLOCK_ROWS):
        batch = tails[first: first + HALF_BLOCK_ROWS]
        block = scratch[: len(batch)].zero_()
        for row, (tail, _) in zip(block, batch):
            row[: tail.shape[0]].copy_(tail)  # (float16 tails convert here)
        if through_fp16:
            _round_through_fp16(block, half[: len(batch)])
        tail_products = (block @ U).numpy()
        out += np.einsum("rd,rd->d", tail_products, v[[r for _, r in batch]], dtype=np.float64)
    return out


def sketch_parts(layout: ShareLayout, share: int, parts: Sequence[torch.Tensor], proj: Projection) -> np.ndarray:
    """The sketch of share ``share`` given as its parts (1-D float32, in part order): what a reducer
    received from one sender. Each part opens a row of its own, so parts are sketched one by one."""
    if len(parts) != len(layout.parts[share]):
        raise ValueError(f"share {share} has {len(layout.parts[share])} parts, got {len(parts)}")
    total = torch.zeros(proj.dims, dtype=torch.float64)
    for span, part in zip(layout.parts[share], parts):
        total += proj.block(part.reshape(-1), span.row_offset)
    return total.numpy()


def share_tolerance(out_norm: float, weights: Sequence[float], input_norms: Sequence[float], numel: int, *,
                    fp16_output: bool) -> float:
    """The largest honest |residual| of any one sketch dimension of a share: ``Z`` times the norm of
    the worst rounding — the average's fp16 compression when averages travel in fp16, and float32
    sums everywhere (senders sketch exactly the values their reducer added up, so their own
    compression adds nothing). Against a projection drawn after the average was fixed, an error
    vector ``e`` shows as roughly N(0, |e|^2) per dimension, so honest residuals stay far below this."""
    total = sum(weights)
    inputs = sum(w * n for w, n in zip(weights, input_norms)) / total if total else 0.0
    tolerance = RHO_SKETCH * (out_norm + inputs)
    if fp16_output:
        tolerance += RHO_FP16 * out_norm + FP16_ABS * math.sqrt(numel)
    return Z * tolerance


def sketch_tolerance(norm: float) -> float:
    """The largest honest gap between two sketches of the same values (float32 sums in another order)."""
    return Z * RHO_SKETCH * norm + 1e-30


def share_residual(out_sketch: np.ndarray, in_sketches: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sketch(average) - weighted mean of the senders' sketches (zero up to rounding for an honest reducer)."""
    total = float(sum(weights))
    mean = sum(float(w) * np.asarray(s, dtype=np.float64) for w, s in zip(weights, in_sketches)) / total
    return np.asarray(out_sketch, dtype=np.float64) - mean


def plausible(sketch: np.ndarray, committed_norm: float) -> bool:
    """Whether a sketch could come from values with norm <= ``committed_norm`` (a Johnson–Lindenstrauss
    bound: honest sketches have E|s|^2 = dims * |x|^2; ``JL_FACTOR`` leaves a wide margin)."""
    s = np.asarray(sketch, dtype=np.float64)
    if s.shape != (SKETCH_DIMS,) or not np.all(np.isfinite(s)):
        return False
    return float(np.linalg.norm(s)) <= plausible_norm(committed_norm)


def plausible_norm(committed_norm: float) -> float:
    """The largest (Euclidean) norm :func:`plausible` lets a sketch of such values have."""
    return JL_FACTOR * math.sqrt(SKETCH_DIMS) * committed_norm * (1 + 1e-6) + 1e-30


def flat_views(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().reshape(-1) for t in tensors]
