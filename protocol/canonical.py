"""Canonical signing bytes for protobuf messages — grpo-swarm canonical encoding, version 1.

Protobuf's wire format is not canonical (field order, packed or unpacked repeats, default values,
unknown fields and map order all vary between implementations), so signatures in grpo-swarm are
computed over the bytes defined here, derived from the message's *values* and its schema. This
docstring is the specification; other implementations must produce identical bytes.

Notation: ``u32(n)`` is n as 4-byte big-endian unsigned, ``u64(n)`` 8-byte big-endian unsigned,
``i64(n)`` 8-byte big-endian two's complement, ``||`` concatenation.

Top level::

    canonical(M, exclude) = b"grpo-swarm/v1/" || NAME || b"\\n" || body(M, exclude)

where NAME is the message type's short name in ASCII (e.g. ``RewardProof``; all names in package
``grpo_swarm.v1`` are unique). The tag separates domains: bytes signed for one message type can
never verify as another type, and never as anything libp2p signs with the same key.

::

    body(M, exclude) = entry(f1) || entry(f2) || ...

over *all* fields declared in M's schema, in ascending field-number order, except the fields
named in ``exclude`` (top level only; it names the signature field, e.g. ``"signature"``).
Unknown fields are not encoded: parsers of signed messages must reject messages that carry any.
Unset fields are encoded too, with their default value (see presence below)::

    entry(f) = u32(field number) || content(f)

``content(f)``:

* repeated field (not a map): ``u32(count) || value(item_1) || ... || value(item_count)``
  in the message's order;
* map field: ``u32(count)`` then, for each entry sorted by ``value(key)`` bytewise ascending,
  ``value(key) || value(val)``;
* singular field with explicit presence (message-typed fields, oneof members, proto3
  ``optional``): ``0x00`` if unset, else ``0x01 || value(v)``;
* other singular field (plain proto3 scalar): ``value(v)``; an unset field has its default value
  (0, false, empty string/bytes, first enum value) and is encoded exactly like that value.

``value(v)`` by field type:

========================================================  =========================================
int32, int64, sint32, sint64, sfixed32, sfixed64, enum    ``i64(v)`` (8 bytes)
uint32, uint64, fixed32, fixed64                          ``u64(v)`` (8 bytes)
bool                                                      1 byte, 0x00 or 0x01
double                                                    IEEE-754 binary64, big-endian (8 bytes)
float                                                     IEEE-754 binary32, big-endian (4 bytes)
string                                                    ``u32(len) || UTF-8 bytes``
bytes                                                     ``u32(len) || raw bytes``
message (and group)                                       ``u32(len(body)) || body(m, ())``
========================================================  =========================================

Floating point: ``-0.0`` is encoded as ``+0.0``; NaN cannot be encoded (rejected with
``ProtocolError(MALFORMED)``); infinities are encoded as IEEE values (higher layers, e.g. proof
validation, reject them where they make no sense). Lengths and counts above 2**32 - 1 are rejected
(``OVERSIZED``). Nesting deeper than :data:`MAX_DEPTH` is rejected (``MALFORMED``).

Example: a ``PolicySnapshotRef{version: 7, sha256: <32 bytes S>}`` encodes as
``b"grpo-swarm/v1/PolicySnapshotRef\\n" || u32(1) || u64(7) || u32(2) || u32(32) || S``.
"""

from __future__ import annotations

import math
import struct
from typing import Iterable

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from .errors import ProtocolError, ReasonCode

DOMAIN_PREFIX = b"grpo-swarm/v1/"
MAX_DEPTH = 32
_U32_MAX = 2**32 - 1

_SIGNED = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_ENUM,
}
_UNSIGNED = {
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
}
_MESSAGE = {FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP}


def domain_tag(descriptor: Descriptor) -> bytes:
    """``b"grpo-swarm/v1/<MessageName>\\n"`` for a message descriptor."""
    return DOMAIN_PREFIX + descriptor.name.encode("ascii") + b"\n"


def canonical_bytes(message: Message, *, exclude: str | Iterable[str] = ()) -> bytes:
    """The canonical signing bytes of ``message`` (see the module docstring), without ``exclude``.

    Raises :class:`ProtocolError` (MALFORMED or OVERSIZED) if the message has no canonical
    encoding (NaN values, over-long fields, excessive nesting); TypeError/ValueError on misuse.
    """
    if not isinstance(message, Message):
        raise TypeError(f"canonical_bytes needs a protobuf message, got {type(message).__name__}")
    names = {exclude} if isinstance(exclude, str) else set(exclude)
    desc = message.DESCRIPTOR
    unknown = names - set(desc.fields_by_name)
    if unknown:
        raise ValueError(f"{desc.full_name} has no field(s) {sorted(unknown)} to exclude")
    out = bytearray(domain_tag(desc))
    _body(message, names, out, 0)
    return bytes(out)


# ---------------------------------------------------------------------------------------------
def _u32(n: int, what: str) -> bytes:
    if n > _U32_MAX:
        raise ProtocolError(ReasonCode.OVERSIZED, f"{what}: length {n} exceeds 2**32-1")
    return struct.pack(">I", n)


def is_repeated_field(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)
    if flag is not None:  # protobuf >= 6 (``label`` is deprecated and later removed)
        return bool(flag)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _is_map(field: FieldDescriptor) -> bool:
    mt = field.message_type
    return mt is not None and mt.GetOptions().map_entry


def _body(message: Message, exclude: set[str], out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ProtocolError(ReasonCode.MALFORMED, f"message nesting deeper than {MAX_DEPTH}")
    desc = message.DESCRIPTOR
    for field in sorted(desc.fields, key=lambda f: f.number):
        if field.name in exclude:
            continue
        out += struct.pack(">I", field.number)
        where = f"{desc.name}.{field.name}"
        value = getattr(message, field.name)
        if _is_map(field):
            key_f = field.message_type.fields_by_name["key"]
            val_f = field.message_type.fields_by_name["value"]
            entries = []
            for k in value:
                kb = bytearray()
                _value(key_f, k, kb, depth, where)
                vb = bytearray()
                _value(val_f, value[k], vb, depth, where)
                entries.append((bytes(kb), bytes(vb)))
            entries.sort(key=lambda e: e[0])
            out += _u32(len(entries), where)
            for kb, vb in entries:
                out += kb
                out += vb
        elif is_repeated_field(field):
            out += _u32(len(value), where)
            if field.type == FieldDescriptor.TYPE_FLOAT or field.type == FieldDescriptor.TYPE_DOUBLE:
                fmt = "f" if field.type == FieldDescriptor.TYPE_FLOAT else "d"
                out += struct.pack(f">{len(value)}{fmt}", *(_finite_or_inf(v, where) for v in value))
            else:
                for item in value:
                    _value(field, item, out, depth, where)
        elif field.has_presence:
            if message.HasField(field.name):
                out += b"\x01"
                _value(field, value, out, depth, where)
            else:
                out += b"\x00"
        else:
            _value(field, value, out, depth, where)


def _finite_or_inf(v: float, where: str) -> float:
    if math.isnan(v):
        raise ProtocolError(ReasonCode.MALFORMED, f"{where}: NaN has no canonical encoding")
    return v + 0.0  # -0.0 + 0.0 == +0.0


def _value(field: FieldDescriptor, v, out: bytearray, depth: int, where: str) -> None:
    t = field.type
    if t in _SIGNED:
        out += struct.pack(">q", v)
    elif t in _UNSIGNED:
        out += struct.pack(">Q", v)
    elif t == FieldDescriptor.TYPE_BOOL:
        out += b"\x01" if v else b"\x00"
    elif t == FieldDescriptor.TYPE_DOUBLE:
        out += struct.pack(">d", _finite_or_inf(v, where))
    elif t == FieldDescriptor.TYPE_FLOAT:
        out += struct.pack(">f", _finite_or_inf(v, where))
    elif t == FieldDescriptor.TYPE_STRING:
        try:
            b = v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ProtocolError(ReasonCode.MALFORMED, f"{where}: string is not valid Unicode ({e})") from None
        out += _u32(len(b), where)
        out += b
    elif t == FieldDescriptor.TYPE_BYTES:
        out += _u32(len(v), where)
        out += v
    elif t in _MESSAGE:
        sub = bytearray()
        _body(v, set(), sub, depth + 1)
        out += _u32(len(sub), where)
        out += sub
    else:  # pragma: no cover - every protobuf type is handled above
        raise ProtocolError(ReasonCode.MALFORMED, f"{where}: unsupported field type {t}")
