"""Gradient parts on the wire: the compressions the verified averaging accepts, and their bytes.

hivemind's serialisation of a part (``NoCompression``: float32, ``Float16Compression``,
``Uniform8BitQuantization``), encoded and decoded without its intermediate copies: a part's exact
byte length for a number of values (:func:`wire_bytes`, checked before anything is decoded), what
averages travel in (:func:`output_compression`), sums of squares a sender cannot round away
(:func:`sum_of_squares`), decoding into place and measuring (:func:`decode_into`), and the rounding
slack each compression needs in norm checks (:data:`NORM_TOLERANCE`). PowerSGD and the
quantile/blockwise 8-bit codecs are refused: their results are not weighted means of the senders'
values, which the checks and the audit need.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
)
from hivemind.proto import runtime_pb2

from .wire import WireTensor

# relative slack on norm checks: the sender's float32 norm vs the reducer's float64 sum of parts
# (no compression), plus fp16 rounding of every element (2^-11 relative) where averages travel in
# fp16. 8-bit parts never exceed the norm of what they encode (each code is its bucket's mean).
NORM_TOLERANCE = {NoCompression: 1e-4, Float16Compression: 2e-3, Uniform8BitQuantization: 2e-3}
SUPPORTED_COMPRESSION = tuple(NORM_TOLERANCE)
CODEBOOK = 256  # Uniform8BitQuantization: int64 codebook size, 256 float32 codes, one uint8 per value
SQUARES_ROW = 4096  # values per float32 partial sum of squares (the partial sums are added in float64)


def wire_bytes(compression: CompressionBase, numel: int) -> int:
    """The exact byte length of ``numel`` values in ``compression``'s serialisation."""
    if isinstance(compression, Uniform8BitQuantization):
        return 8 + 4 * CODEBOOK + numel
    return numel * (2 if isinstance(compression, Float16Compression) else 4)


def output_compression(compression: CompressionBase) -> CompressionBase:
    """What reducers send averages in: the parts' compression, except that averages of 8-bit parts
    travel in fp16 — its rounding is a bounded fraction of each value, which the share audit's
    tolerance needs (an 8-bit code's error depends on the values only the reducer saw)."""
    return Float16Compression() if isinstance(compression, Uniform8BitQuantization) else compression


# decoded parts are read-only views of the received bytes (never written: reducers add them into
# their own accumulator); torch warns once that it cannot mark such tensors read-only
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def float16_view(tp: WireTensor | runtime_pb2.Tensor) -> torch.Tensor:
    """A checked fp16 part's values as a float16 view of its bytes (no copy)."""
    return torch.from_numpy(np.frombuffer(tp.buffer, dtype=np.float16))


def decode_values(tp: WireTensor | runtime_pb2.Tensor, compression: CompressionBase) -> torch.Tensor:
    """The float32 values of a checked serialised part (1-D): hivemind's format, decoded without its
    intermediate copies (fp32: a view of the bytes; fp16: one conversion)."""
    if isinstance(compression, NoCompression):
        return torch.from_numpy(np.frombuffer(tp.buffer, dtype=np.float32))
    if isinstance(compression, Float16Compression):
        return float16_view(tp).float()
    return deserialize_torch_tensor(tp.to_protobuf() if isinstance(tp, WireTensor) else tp).reshape(-1)


def sum_of_squares(values: torch.Tensor) -> float:
    """The sum of squares of 1-D float32 ``values`` in two torch calls (each torch call from a worker
    thread waits for the GIL anew): the float32 norms of rows of SQUARES_ROW values, squared and added
    in float64. One float32 dot over a whole part would let a sender's crafted values (a few large ones,
    then many small ones) vanish in rounding: up to 4e-4 of the squares in a 16 MiB part, past the
    bounds' tolerance; rows keep that below 1e-6. Row norms, not row dots: ``linalg.vecdot`` writes
    every product to a temporary as large as the values (fresh pages: 14× a dot's time on a large
    tensor), the norm reads them once. NaN/inf (or squares past float32) come out non-finite."""
    full = values.numel() - values.numel() % SQUARES_ROW
    squares = 0.0
    if full:
        rows = values[:full].reshape(-1, SQUARES_ROW)  # (a view of contiguous values)
        norms = torch.linalg.vector_norm(rows, dim=1).numpy().astype(np.float64)
        squares = float(np.dot(norms, norms))
    if full < values.numel():
        tail = values[full:]
        squares += float(torch.dot(tail, tail))
    return squares


def decode_into(tp: WireTensor | runtime_pb2.Tensor, compression: CompressionBase, dst: torch.Tensor) -> float:
    """Decode a checked serialised part straight into ``dst`` (1-D float32, as many values) and return
    the sum of squares of the decoded values. Whole-part operations: each torch call a worker thread
    makes waits for the GIL again, which the averager's busy event loop holds up to the switch
    interval, so a part measured chunk by chunk waited far longer than it computed (bench/RESULTS.md)."""
    if isinstance(compression, NoCompression):  # the bytes are the values: measure them, then copy them in
        src = decode_values(tp, compression)
        squares = sum_of_squares(src)
        dst.copy_(src)
        return squares
    dst.copy_(float16_view(tp) if isinstance(compression, Float16Compression) else decode_values(tp, compression))
    return sum_of_squares(dst)


def encode_values(values: torch.Tensor, compression: CompressionBase) -> WireTensor:
    """hivemind's serialisation of a float32 part (the same bytes as ``compression.compress``), its
    buffer a view of the values (fp32) or of one converted copy (fp16): never written afterwards."""
    values = values.detach().reshape(-1).contiguous()
    if isinstance(compression, NoCompression):
        return WireTensor(memoryview(values.numpy()).cast("B"), tuple(values.shape), "float32",
                          compression.compression_type)
    if isinstance(compression, Float16Compression):
        # converting first, then clamping the fp16 values, gives hivemind's clamp-then-convert bytes
        # (values past FP16_MAX round to it or to inf, which the clamp takes back to FP16_MAX)
        half = values.to(torch.float16).clamp_(Float16Compression.FP16_MIN, Float16Compression.FP16_MAX)
        return WireTensor(memoryview(half.numpy()).cast("B"), tuple(values.shape), "float32",
                          compression.compression_type)
    return WireTensor.from_protobuf(compression.compress(values, CompressionInfo.from_tensor(values), False))


def check_compression(compression: CompressionBase) -> None:
    if type(compression) not in SUPPORTED_COMPRESSION:
        raise ValueError(f"compression must be one of {[c.__name__ for c in SUPPORTED_COMPRESSION]}, got "
                         f"{type(compression).__name__} (PowerSGD and quantile/blockwise 8-bit are not verified)")
