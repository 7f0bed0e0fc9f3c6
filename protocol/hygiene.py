"""Request hygiene: what every message a peer sends must satisfy besides parsing.

* **No unknown fields**, at any depth. The .proto says parsers reject them: a field this schema
  does not know is a newer schema or garbage, and the signature over it could mean something
  else to another reader.
* **No unsigned 64-bit value above 2**63 - 1.** The coordinator keeps versions, indices, sizes and
  sequences in SQLite, whose INTEGER is a signed 64-bit number; a larger value would fail deep
  inside a handler (INTERNAL, or UNKNOWN in a stream) instead of being refused at the door. No
  honest peer sends one: versions, rounds and indices count up from 0, nonces are nanoseconds
  since 1970 (below 2**63 until the year 2262).

:func:`parse_request` parses a payload and checks both; :func:`check_uint64_range` checks a message
parsed elsewhere (an envelope, a proof batch). Both raise :class:`~.errors.ProtocolError`
(MALFORMED) naming the message and the field, which the coordinator answers with
INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from .canonical import is_repeated_field
from .errors import ProtocolError, ReasonCode
from .proofs import _parse

MAX_STORABLE_UINT64 = 2**63 - 1  # SQLite INTEGER is signed 64-bit
_UINT64_TYPES = frozenset({FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64})


def parse_request(cls: type[Message], data: bytes, what: str | None = None) -> Message:
    """Parse ``data`` as a ``cls``; ProtocolError(MALFORMED) if it does not parse, has unknown
    fields anywhere, or carries an unsigned 64-bit value SQLite cannot hold."""
    what = what or cls.DESCRIPTOR.name
    msg = _parse(cls, data, what)  # protobuf parse + unknown fields at every depth
    check_uint64_range(msg, what)
    return msg


def _contains_uint64(desc: Descriptor, seen: frozenset = frozenset()) -> bool:
    if desc.full_name in seen:  # a recursive message: its fields are looked at where it starts
        return False
    seen = seen | {desc.full_name}
    return any(f.type in _UINT64_TYPES or (f.message_type is not None and _contains_uint64(f.message_type, seen))
               for f in desc.fields)


@functools.cache
def _plan(desc: Descriptor) -> tuple[tuple, tuple]:
    """(uint64 fields, message fields that may hold one) of a message type, as (name, repeated[, map
    value field]) — so that a walk looks only where a uint64 can be (a proof's reward values and
    bytes are skipped)."""
    scalars, nested = [], []
    for f in desc.fields:
        if f.type in _UINT64_TYPES:
            scalars.append((f.name, is_repeated_field(f)))
        elif f.message_type is not None and _contains_uint64(f.message_type):
            entry = f.message_type if f.message_type.GetOptions().map_entry else None
            nested.append((f.name, is_repeated_field(f), entry))
    return tuple(scalars), tuple(nested)


def _too_big(where: str, value: int) -> ProtocolError:
    return ProtocolError(ReasonCode.MALFORMED, f"{where} = {value} is above 2**63-1 ({MAX_STORABLE_UINT64}), the "
                                               "largest integer the coordinator stores")


def _check_map(container, entry: Descriptor, where: str) -> None:
    key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
    for k in container:
        if key.type in _UINT64_TYPES and k > MAX_STORABLE_UINT64:
            raise _too_big(f"{where} key", k)
        v = container[k]
        if value.type in _UINT64_TYPES and v > MAX_STORABLE_UINT64:
            raise _too_big(f"{where}[{k!r}]", v)
        if value.message_type is not None:
            check_uint64_range(v, f"{where}[{k!r}]")


def check_uint64_range(msg: Message, where: str | None = None) -> None:
    """ProtocolError(MALFORMED) naming the first uint64/fixed64 field (at any depth, repeated
    elements and map entries included) whose value is above 2**63 - 1."""
    where = where or msg.DESCRIPTOR.name
    scalars, nested = _plan(msg.DESCRIPTOR)
    for name, repeated in scalars:
        value = getattr(msg, name)
        if repeated:
            if value and max(value) > MAX_STORABLE_UINT64:
                i = next(i for i, v in enumerate(value) if v > MAX_STORABLE_UINT64)
                raise _too_big(f"{where}.{name}[{i}]", value[i])
        elif value > MAX_STORABLE_UINT64:
            raise _too_big(f"{where}.{name}", value)
    for name, repeated, entry in nested:
        if entry is not None:
            _check_map(getattr(msg, name), entry, f"{where}.{name}")
        elif repeated:
            for i, item in enumerate(getattr(msg, name)):
                check_uint64_range(item, f"{where}.{name}[{i}]")
        elif msg.HasField(name):
            check_uint64_range(getattr(msg, name), f"{where}.{name}")
