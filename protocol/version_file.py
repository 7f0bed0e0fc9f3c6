"""The bytes of a version file, and its state-dict hash computed from those bytes as they stream.

A version file is a safetensors file. Its *canonical* form is a pure function of the state it holds:
tensors in ascending name order, their data contiguous in that order, a compact JSON header
(``{"name":{"dtype":..,"shape":[..],"data_offsets":[b,e]},...}``, no ``__metadata__``) padded with
spaces to a multiple of 8 bytes. A node uploads its version in this form straight from its live
tensors (:class:`VersionFileWriter`: no file written, no second read), and the coordinator, fed the
upload's bytes in order, computes the state-dict hash as they arrive (:class:`StreamingStateHash`)
instead of reading the whole file again afterwards. A non-canonical file is still a valid upload:
the hasher then says so and the coordinator hashes the file the slow way.

The state-dict hash (``node.proving.state_dict_sha256`` computes it from tensors) frames each
tensor, by name ascending, as ``u32(len(name)) || name || u32(len(dtype)) || dtype || u32(ndim) ||
u64(dim)... || raw little-endian bytes``, after the domain line ``DOMAIN``; ``dtype`` is torch's name
(``torch.float32``). :func:`tensor_prefix` is that framing, shared by both.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

DOMAIN = b"grpo-swarm/v1/state-dict\n"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header

# safetensors dtype code -> (torch's dtype name, bytes per value)
DTYPES = {
    "F64": ("torch.float64", 8), "F32": ("torch.float32", 4), "F16": ("torch.float16", 2),
    "BF16": ("torch.bfloat16", 2), "I64": ("torch.int64", 8), "I32": ("torch.int32", 4),
    "I16": ("torch.int16", 2), "I8": ("torch.int8", 1), "U8": ("torch.uint8", 1), "BOOL": ("torch.bool", 1),
}
CODE_OF_TORCH_NAME = {name: code for code, (name, _) in DTYPES.items()}


def tensor_prefix(name: str, torch_dtype: str, shape: Sequence[int]) -> bytes:
    """What the state-dict hash takes before a tensor's raw bytes."""
    n, d = name.encode(), torch_dtype.encode()
    return (struct.pack(">I", len(n)) + n + struct.pack(">I", len(d)) + d
            + struct.pack(f">I{len(shape)}Q", len(shape), *shape))


@dataclass(frozen=True)
class Entry:
    """One tensor of a version file: name, safetensors dtype code, shape, and its size in bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def canonical_header(entries: Sequence[Entry]) -> bytes:
    """The first bytes of the canonical file holding ``entries`` (in ascending name order): the
    8-byte little-endian header length, then the padded JSON header."""
    names = [e.name for e in entries]
    if names != sorted(names) or len(set(names)) != len(names):
        raise ValueError("a canonical version file lists each tensor once, by name ascending")
    header, offset = {}, 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class VersionFileWriter:
    """The canonical file of tensors given as ``(entry, raw bytes)`` pairs, produced from the bytes
    where they are: its size, its SHA-256 and its chunks, without writing it anywhere."""

    def __init__(self, tensors: Sequence[tuple[Entry, memoryview]]):
        tensors = sorted(tensors, key=lambda t: t[0].name)
        for entry, data in tensors:
            if data.nbytes != entry.nbytes:
                raise ValueError(f"{entry.name}: {data.nbytes} bytes given, the entry says {entry.nbytes}")
        self.header = canonical_header([e for e, _ in tensors])
        self._data = [memoryview(d).cast("B") for _, d in tensors]
        self.total_bytes = len(self.header) + sum(d.nbytes for d in self._data)

    def pieces(self) -> Iterator[memoryview]:
        yield memoryview(self.header)
        yield from (d for d in self._data if d.nbytes)

    def sha256(self) -> bytes:
        h = hashlib.sha256()
        for piece in self.pieces():
            h.update(piece)
        return h.digest()

    def chunk_pieces(self, chunk_size: int) -> Iterator[tuple[int, list[memoryview]]]:
        """(offset, views) per ``chunk_size`` piece of the file (the last may be shorter): views of
        the header and the tensors' own bytes, which together make the chunk — nothing copied yet."""
        views, filled, offset = [], 0, 0
        for piece in self.pieces():
            while piece.nbytes:
                take = min(piece.nbytes, chunk_size - filled)
                views.append(piece[:take])
                filled, piece = filled + take, piece[take:]
                if filled == chunk_size:
                    yield offset, views
                    views, filled, offset = [], 0, offset + chunk_size
        if filled:
            yield offset, views

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) pieces of the file in ``chunk_size`` steps."""
        for offset, views in self.chunk_pieces(chunk_size):
            yield offset, b"".join(views)


class NotCanonical(Exception):
    """The bytes fed are not a canonical version file (the reason says where it differs)."""


class StreamingStateHash:
    """The state-dict hash of a canonical version file, computed from its bytes fed in order, in
    pieces of any size. :meth:`result` gives it once every byte is in, or raises NotCanonical when
    the file is not canonical (or not a version file at all): the caller then hashes it otherwise."""

    def __init__(self):
        self._head = bytearray()
        self._header_len: int | None = None
        self._plan: list[tuple[bytes, int]] | None = None  # (prefix, nbytes) per tensor, in file order
        self._index, self._left = 0, 0
        self._hash = hashlib.sha256(DOMAIN)
        self.failure: str | None = None

    def update(self, data) -> None:
        if self.failure is not None:
            return
        view = memoryview(data).cast("B")
        try:
            if self._plan is None:
                view = self._read_header(view)
            if self._plan is not None and view.nbytes:
                self._feed(view)
        except NotCanonical as e:
            self.failure = str(e)
        except Exception as e:  # noqa: BLE001 - whatever the bytes make the parsing raise: not canonical
            self.failure = f"the header does not parse: {type(e).__name__}"

    def result(self) -> bytes:
        if self.failure is None and (self._plan is None or self._index < len(self._plan) or self._left):
            self.failure = "the file ended early"
        if self.failure is not None:
            raise NotCanonical(self.failure)
        return self._hash.digest()

    def _read_header(self, view: memoryview) -> memoryview:
        need = 8 if self._header_len is None else 8 + self._header_len
        take = min(view.nbytes, need - len(self._head))
        self._head += view[:take]
        view = view[take:]
        if self._header_len is None and len(self._head) == 8:
            self._header_len = struct.unpack("<Q", self._head)[0]
            if not 0 < self._header_len <= MAX_HEADER_BYTES:
                raise NotCanonical(f"a header of {self._header_len} bytes")
            return self._read_header(view)
        if self._header_len is not None and len(self._head) == 8 + self._header_len:
            self._plan = self._parse(bytes(self._head))
            self._start_tensor()
        return view

    @staticmethod
    def _parse(head: bytes) -> list[tuple[bytes, int]]:
        try:
            header = json.loads(head[8:].decode())
        except (UnicodeDecodeError, ValueError):
            raise NotCanonical("the header is not JSON") from None
        if not isinstance(header, dict) or "__metadata__" in header:
            raise NotCanonical("the header is not a plain tensor table")
        entries, plan = [], []
        for name, info in header.items():
            try:
                code, shape = info["dtype"], tuple(int(d) for d in info["shape"])
                torch_name, width = DTYPES[code]
            except (KeyError, TypeError, ValueError):
                raise NotCanonical(f"tensor {name!r}: no known dtype and shape") from None
            if any(d < 0 for d in shape):
                raise NotCanonical(f"tensor {name!r}: a negative dimension")
            count = 1
            for d in shape:
                count *= d
            entries.append(Entry(name, code, shape, count * width))
            plan.append((tensor_prefix(name, torch_name, shape), count * width))
        try:
            expected = canonical_header(entries)
        except ValueError as e:
            raise NotCanonical(str(e)) from None
        if expected != head:  # same tensors, but offsets, spacing or order differ from the canonical form
            raise NotCanonical("the header is not in canonical form")
        return plan

    def _start_tensor(self) -> None:
        while self._index < len(self._plan):
            prefix, nbytes = self._plan[self._index]
            self._hash.update(prefix)
            if nbytes:
                self._left = nbytes
                return
            self._index += 1

    def _feed(self, view: memoryview) -> None:
        while view.nbytes:
            if self._index >= len(self._plan):
                raise NotCanonical("bytes after the last tensor")
            take = min(view.nbytes, self._left)
            self._hash.update(view[:take])
            view, self._left = view[take:], self._left - take
            if not self._left:
                self._index += 1
                self._start_tensor()
