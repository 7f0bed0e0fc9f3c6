"""hivemind's ``AveragingData`` messages encoded and decoded without protobuf's copies.

Gradient parts are nearly all of the swarm's traffic. Through the protobuf runtime a part is copied
about six times on each side (``tobytes``, the ``Tensor`` constructor, the ``AveragingData``
constructor's merge — a serialise and a parse —, ``SerializeToString``; on receipt the parse and
every read of ``tensor_part.buffer``), about 8 ms per 4 MiB part on this machine's CPU. Here a
message is encoded by one ``join`` of a small header and the values' buffer (the only copy), and
decoded by reading the header and taking a ``memoryview`` of the values inside the received bytes
(no copy).

The bytes are protobuf's own encoding of ``averaging.proto``'s ``AveragingData`` and
``runtime.proto``'s ``Tensor`` — the same as ``SerializeToString`` writes (tests compare them). The
decoder is strict: each field at most once, with its declared wire type, no unknown fields, no
bytes left over; it never raises (hivemind's stream reader calls it): a message it cannot read has
``malformed`` set to what was wrong, and the averager accuses its sender.

:class:`WireAveragingData` is what hivemind's P2P layer expects of a message class: built with no
arguments, filled by ``ParseFromString`` and written with ``SerializeToString``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hivemind.proto import runtime_pb2

_DOUBLE = struct.Struct("<d")
# (field number << 3) | wire type: 0 varint, 1 fixed64, 2 length-delimited
_VARINT, _FIXED64, _LEN = 0, 1, 2
MAX_DTYPE_CHARS = 64
MAX_DIMS = 8


class WireError(ValueError):
    """Bytes that are not a well-formed message."""


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # protobuf's int32/int64 negatives: ten bytes, two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise WireError("a varint runs past the end of its message")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise WireError("a varint longer than ten bytes")


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _fields(data: memoryview, pos: int, end: int, allowed: dict[int, int], what: str):
    """(field, value, start) for each field of the message in data[pos:end]: a varint's int, a
    fixed64's 8 bytes, a length-delimited field's (start, stop). Checks what the docstring says."""
    seen: set[int] = set()
    while pos < end:
        key, pos = _read_varint(data, pos, end)
        field, wire_type = key >> 3, key & 7
        if field not in allowed:
            raise WireError(f"{what} has unknown field {field}")
        if wire_type != allowed[field]:
            raise WireError(f"{what} field {field} has wire type {wire_type}, expected {allowed[field]}")
        if field in seen:
            raise WireError(f"{what} field {field} appears twice")
        seen.add(field)
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos, end)
            yield field, value
        elif wire_type == _FIXED64:
            if pos + 8 > end:
                raise WireError(f"{what} field {field} runs past the end")
            yield field, data[pos: pos + 8]
            pos += 8
        else:
            length, pos = _read_varint(data, pos, end)
            if length > end - pos:
                raise WireError(f"{what} field {field} declares {length} bytes, {end - pos} are left")
            yield field, (pos, pos + length)
            pos += length


def _int32(value: int) -> int:
    if value >= 1 << 63:
        value -= 1 << 64
    if not -(1 << 31) <= value < 1 << 31:
        raise WireError(f"{value} is out of range for an int32")
    return value


@dataclass(slots=True)
class WireTensor:
    """``runtime.proto``'s ``Tensor``: ``buffer`` is a read-only view into the message's bytes (or the
    values to send: anything with the buffer protocol)."""

    buffer: memoryview | bytes
    size: tuple[int, ...] = ()
    dtype: str = ""
    compression: int = 0
    requires_grad: bool = False
    chunks: int = 0

    def framing(self) -> tuple[bytes, bytes]:
        """The encoding around the buffer's bytes: (the buffer's key and length, the other fields)."""
        out = [_key(1, _LEN), _varint(len(self.buffer))]
        tail = []
        if self.size:
            packed = b"".join(_varint(d) for d in self.size)
            tail += [_key(2, _LEN), _varint(len(packed)), packed]
        if self.requires_grad:
            tail += [_key(3, _VARINT), b"\x01"]
        if self.dtype:
            encoded = self.dtype.encode()
            tail += [_key(4, _LEN), _varint(len(encoded)), encoded]
        if self.compression:
            tail += [_key(5, _VARINT), _varint(self.compression)]
        if self.chunks:
            tail += [_key(6, _VARINT), _varint(self.chunks)]
        return b"".join(out), b"".join(tail)

    def byte_size(self) -> int:
        head, tail = self.framing()
        return len(head) + len(self.buffer) + len(tail)

    def to_protobuf(self) -> runtime_pb2.Tensor:
        """A protobuf copy (for hivemind's own decoders, e.g. 8-bit codes)."""
        return runtime_pb2.Tensor(buffer=bytes(self.buffer), size=list(self.size), dtype=self.dtype,
                                  compression=self.compression, requires_grad=self.requires_grad, chunks=self.chunks)

    @classmethod
    def from_protobuf(cls, tp: runtime_pb2.Tensor) -> WireTensor:
        return cls(buffer=tp.buffer, size=tuple(tp.size), dtype=tp.dtype, compression=tp.compression,
                   requires_grad=tp.requires_grad, chunks=tp.chunks)

    @classmethod
    def parse(cls, data: memoryview, pos: int, end: int) -> WireTensor:
        out = cls(buffer=data[pos:pos])
        for field, value in _fields(data, pos, end, {1: _LEN, 2: _LEN, 3: _VARINT, 4: _LEN, 5: _VARINT, 6: _VARINT},
                                    "tensor_part"):
            if field == 1:
                out.buffer = data[value[0]: value[1]]
            elif field == 2:
                dims, at = [], value[0]
                while at < value[1]:
                    d, at = _read_varint(data, at, value[1])
                    if d >= 1 << 32:
                        raise WireError(f"tensor_part size {d} is out of range for a uint32")
                    dims.append(d)
                    if len(dims) > MAX_DIMS:
                        raise WireError(f"tensor_part has more than {MAX_DIMS} dimensions")
                out.size = tuple(dims)
            elif field == 3:
                if value > 1:
                    raise WireError(f"tensor_part requires_grad is {value}, not a bool")
                out.requires_grad = bool(value)
            elif field == 4:
                if value[1] - value[0] > MAX_DTYPE_CHARS:
                    raise WireError(f"tensor_part dtype is longer than {MAX_DTYPE_CHARS} bytes")
                try:
                    out.dtype = bytes(data[value[0]: value[1]]).decode()
                except UnicodeDecodeError:
                    raise WireError("tensor_part dtype is not UTF-8") from None
            elif field == 5:
                out.compression = _int32(value)
            else:
                out.chunks = _int32(value)
        return out


class WireAveragingData:
    """``averaging.proto``'s ``AveragingData`` (see the module docstring). Unset fields read as
    protobuf's defaults; ``tensor_part`` is None when absent; ``malformed`` says why a received
    message could not be read (None when it could)."""

    __slots__ = ("code", "group_id", "peer_id", "weight", "tensor_part", "malformed", "_encoded")

    def __init__(self, code: int = 0, group_id: bytes = b"", peer_id: bytes = b"", weight: float = 0.0,
                 tensor_part: WireTensor | None = None):
        self.code, self.group_id, self.peer_id, self.weight = int(code), bytes(group_id), bytes(peer_id), float(weight)
        self.tensor_part = tensor_part
        self.malformed: str | None = None
        self._encoded: bytes | None = None

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf method hivemind's P2P calls
        """The encoded message, built once (a reducer sends the same average to every sender)."""
        if self._encoded is None:
            head = []
            if self.code:
                head += [_key(1, _VARINT), _varint(self.code)]
            if self.group_id:
                head += [_key(2, _LEN), _varint(len(self.group_id)), self.group_id]
            if self.peer_id:
                head += [_key(3, _LEN), _varint(len(self.peer_id)), self.peer_id]
            parts: list = [b"".join(head)]
            if self.tensor_part is not None:
                t_head, t_tail = self.tensor_part.framing()
                inner = len(t_head) + len(self.tensor_part.buffer) + len(t_tail)
                parts += [_key(4, _LEN) + _varint(inner) + t_head, self.tensor_part.buffer, t_tail]
            if self.weight:
                parts.append(_key(5, _FIXED64) + _DOUBLE.pack(self.weight))
            self._encoded = b"".join(parts)
        return self._encoded

    def encoded(self) -> WireAveragingData:
        """This message, its bytes built now (e.g. in a worker thread, ahead of the sending)."""
        self.SerializeToString()
        return self

    def ParseFromString(self, data: bytes) -> None:  # noqa: N802 - the protobuf method hivemind's P2P calls
        """Read ``data``, keeping views into it; never raises (see ``malformed``)."""
        self.__init__()
        view = memoryview(data)
        try:
            for field, value in _fields(view, 0, len(view), {1: _VARINT, 2: _LEN, 3: _LEN, 4: _LEN, 5: _FIXED64},
                                        "AveragingData"):
                if field == 1:
                    self.code = _int32(value)
                elif field == 2:
                    self.group_id = bytes(view[value[0]: value[1]])
                elif field == 3:
                    self.peer_id = bytes(view[value[0]: value[1]])
                elif field == 4:
                    self.tensor_part = WireTensor.parse(view, value[0], value[1])
                else:
                    self.weight = _DOUBLE.unpack(value)[0]
        except WireError as e:
            self.__init__()
            self.malformed = str(e)

    def __repr__(self) -> str:
        size = None if self.tensor_part is None else len(self.tensor_part.buffer)
        return (f"WireAveragingData(code={self.code}, group_id={self.group_id.hex()[:16]}, weight={self.weight}, "
                f"tensor_part_bytes={size}, malformed={self.malformed!r})")
