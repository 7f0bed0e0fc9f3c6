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
from typing import Callable, Iterable

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
    special = _specialised(desc, frozenset(names))
    if special is not None:
        fast = special(message)
        if fast is not None:
            return fast
    out = bytearray(domain_tag(desc))
    _body(message, names, out, 0)
    return bytes(out)


def encoder_for(descriptor: Descriptor, exclude: str | Iterable[str] = ()) -> Callable[[Message], bytes]:
    """``enc(message)`` = ``canonical_bytes(message, exclude=exclude)``, with the argument checks and
    the lookups done once here (messages of another type go through :func:`canonical_bytes`)."""
    names = frozenset({exclude} if isinstance(exclude, str) else exclude)
    unknown = names - set(descriptor.fields_by_name)
    if unknown:
        raise ValueError(f"{descriptor.full_name} has no field(s) {sorted(unknown)} to exclude")
    special = _specialised(descriptor, names)
    tag = domain_tag(descriptor)

    def enc(message: Message) -> bytes:
        if getattr(message, "DESCRIPTOR", None) is not descriptor or not isinstance(message, Message):
            return canonical_bytes(message, exclude=names)
        if special is not None:
            fast = special(message)
            if fast is not None:
                return fast
        out = bytearray(tag)
        _body(message, names, out, 0)
        return bytes(out)

    return enc


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


# Each message type's encoding is compiled once into a plan: its fields in number order, each with
# its tag bytes and an encoder for its values. Same bytes as walking the descriptor every time
# (what the specification above describes), several times faster.
_ONE, _OPT, _REP, _REP_FLOAT, _REP_INT, _MAP = range(6)
_PLANS: dict = {}
_EMPTY: frozenset = frozenset()
_pack_q = struct.Struct(">q").pack
_pack_Q = struct.Struct(">Q").pack
_pack_I = struct.Struct(">I").pack


def _plan(desc: Descriptor, exclude: frozenset) -> list:
    key = (desc, exclude)
    plan = _PLANS.get(key)
    if plan is None:
        plan = []
        for field in sorted(desc.fields, key=lambda f: f.number):
            if field.name in exclude:
                continue
            where = f"{desc.name}.{field.name}"
            tag = _pack_I(field.number)
            if _is_map(field):
                key_f = field.message_type.fields_by_name["key"]
                val_f = field.message_type.fields_by_name["value"]
                plan.append((tag, field.name, _MAP, (_encoder(key_f, where), _encoder(val_f, where)), where))
            elif is_repeated_field(field):
                if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
                    fmt = "f" if field.type == FieldDescriptor.TYPE_FLOAT else "d"
                    plan.append((tag, field.name, _REP_FLOAT, fmt, where))
                elif field.type in _SIGNED or field.type in _UNSIGNED:
                    plan.append((tag, field.name, _REP_INT, "q" if field.type in _SIGNED else "Q", where))
                else:
                    plan.append((tag, field.name, _REP, _encoder(field, where), where))
            elif field.has_presence:
                plan.append((tag, field.name, _OPT, _encoder(field, where), where))
            else:
                plan.append((tag, field.name, _ONE, _encoder(field, where), where))
        _PLANS[key] = plan
    return plan


def _body(message: Message, exclude: set[str] | frozenset, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ProtocolError(ReasonCode.MALFORMED, f"message nesting deeper than {MAX_DEPTH}")
    for tag, name, kind, enc, where in _plan(message.DESCRIPTOR, frozenset(exclude)):
        out += tag
        value = getattr(message, name)
        if kind == _ONE:
            enc(value, out, depth)
        elif kind == _OPT:
            if message.HasField(name):
                out += b"\x01"
                enc(value, out, depth)
            else:
                out += b"\x00"
        elif kind == _REP_FLOAT:
            out += _u32(len(value), where)
            vals = [v + 0.0 for v in value]  # -0.0 + 0.0 == +0.0
            total = sum(vals)
            if total != total:  # a NaN somewhere (or +inf and -inf): find it the slow way
                vals = [_finite_or_inf(v, where) for v in value]
            out += struct.pack(f">{len(vals)}{enc}", *vals)
        elif kind == _REP_INT:
            out += _u32(len(value), where)
            out += struct.pack(f">{len(value)}{enc}", *value)
        elif kind == _REP:
            out += _u32(len(value), where)
            for item in value:
                enc(item, out, depth)
        else:  # map
            key_enc, val_enc = enc
            entries = []
            for k in value:
                kb = bytearray()
                key_enc(k, kb, depth)
                vb = bytearray()
                val_enc(value[k], vb, depth)
                entries.append((bytes(kb), bytes(vb)))
            entries.sort(key=lambda e: e[0])
            out += _u32(len(entries), where)
            for kb, vb in entries:
                out += kb
                out += vb


def _encoder(field: FieldDescriptor, where: str):
    """``enc(value, out, depth)`` appending ``value(v)`` of the module docstring's table."""
    t = field.type
    if t in _SIGNED:
        return lambda v, out, depth: out.extend(_pack_q(v))
    if t in _UNSIGNED:
        return lambda v, out, depth: out.extend(_pack_Q(v))
    if t == FieldDescriptor.TYPE_BOOL:
        return lambda v, out, depth: out.append(1 if v else 0)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return lambda v, out, depth: out.extend(struct.pack(">d", _finite_or_inf(v, where)))
    if t == FieldDescriptor.TYPE_FLOAT:
        return lambda v, out, depth: out.extend(struct.pack(">f", _finite_or_inf(v, where)))
    if t == FieldDescriptor.TYPE_STRING:
        def enc_str(v, out, depth):
            try:
                b = v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ProtocolError(ReasonCode.MALFORMED, f"{where}: string is not valid Unicode ({e})") from None
            out += _u32(len(b), where)
            out += b
        return enc_str
    if t == FieldDescriptor.TYPE_BYTES:
        def enc_bytes(v, out, depth):
            out += _u32(len(v), where)
            out += v
        return enc_bytes
    if t in _MESSAGE:
        def enc_msg(v, out, depth):
            sub = bytearray()
            _body(v, _EMPTY, sub, depth + 1)
            out += _u32(len(sub), where)
            out += sub
        return enc_msg
    raise ProtocolError(ReasonCode.MALFORMED, f"{where}: unsupported field type {t}")  # pragma: no cover


def _finite_or_inf(v: float, where: str) -> float:
    if math.isnan(v):
        raise ProtocolError(ReasonCode.MALFORMED, f"{where}: NaN has no canonical encoding")
    return v + 0.0  # -0.0 + 0.0 == +0.0


# ---- RewardProof without its signature, specialised ---------------------------------------------
# What every proof signature covers, so the verifier's hot path. The same bytes as the plan above,
# written out for RewardProof's schema: fixed-width runs of fields packed by one precompiled Struct
# each, tags included. Used only for a descriptor with exactly the layout below (else the generic
# encoder runs), and only for plain input: anything that could raise or needs care (a NaN or an
# inf - inf among the doubles and floats, an unencodable string, a length over 2**32 - 1) makes it
# return None and the generic encoder gives the bytes or the error. tests/test_protocol_fastpaths.py
# compares it with the reference algorithm.
_T = FieldDescriptor
_REWARD_PROOF_LAYOUT = {
    "grpo_swarm.v1.RewardProof": (
        (1, "run_id", _T.TYPE_STRING, False, False, None),
        (2, "node_public_key", _T.TYPE_BYTES, False, False, None),
        (3, "policy", _T.TYPE_MESSAGE, False, True, "grpo_swarm.v1.PolicySnapshotRef"),
        (4, "round_index", _T.TYPE_UINT64, False, False, None),
        (5, "prompt_index", _T.TYPE_UINT64, False, False, None),
        (6, "prompt_sha256", _T.TYPE_BYTES, False, False, None),
        (7, "group_id", _T.TYPE_STRING, False, False, None),
        (8, "group_size", _T.TYPE_UINT32, False, False, None),
        (9, "completion_index", _T.TYPE_UINT32, False, False, None),
        (10, "completion_token_ids_sha256", _T.TYPE_BYTES, False, False, None),
        (11, "completion_text", _T.TYPE_STRING, False, False, None),
        (12, "num_completion_tokens", _T.TYPE_UINT32, False, False, None),
        (13, "behaviour_logprobs_sha256", _T.TYPE_BYTES, False, False, None),
        (14, "behaviour_logprobs", _T.TYPE_FLOAT, True, False, None),
        (15, "completion_token_ids", _T.TYPE_UINT32, True, False, None),
        (16, "rewards", _T.TYPE_MESSAGE, True, False, "grpo_swarm.v1.RewardValue"),
        (17, "reward_total", _T.TYPE_DOUBLE, False, False, None),
        (18, "reward_spec_id", _T.TYPE_STRING, False, False, None),
        (19, "advantage", _T.TYPE_DOUBLE, False, False, None),
        (20, "sequence", _T.TYPE_UINT64, False, False, None),
        (21, "time_ms", _T.TYPE_INT64, False, False, None),
        (22, "signature", _T.TYPE_BYTES, False, False, None),
    ),
    "grpo_swarm.v1.PolicySnapshotRef": (
        (1, "version", _T.TYPE_UINT64, False, False, None),
        (2, "sha256", _T.TYPE_BYTES, False, False, None),
    ),
    "grpo_swarm.v1.RewardValue": (
        (1, "name", _T.TYPE_STRING, False, False, None),
        (2, "value", _T.TYPE_DOUBLE, False, False, None),
        (3, "applicable", _T.TYPE_BOOL, False, False, None),
    ),
}
_SPECIALISED: dict = {}


def _layout(desc: Descriptor) -> tuple:
    return tuple((f.number, f.name, f.type, is_repeated_field(f), bool(f.has_presence), f.message_type and
                  f.message_type.full_name) for f in sorted(desc.fields, key=lambda f: f.number))


def _specialised(desc: Descriptor, exclude: frozenset):
    """The specialised encoder for (message type, excluded fields), or None."""
    key = (desc, exclude)
    try:
        return _SPECIALISED[key]
    except KeyError:
        pass
    enc = None
    if desc.full_name == "grpo_swarm.v1.RewardProof" and exclude == frozenset({"signature"}):
        by_name = {f.name: f for f in desc.fields}
        if (_layout(desc) == _REWARD_PROOF_LAYOUT[desc.full_name]
                and all(_layout(by_name[n].message_type) == _REWARD_PROOF_LAYOUT[by_name[n].message_type.full_name]
                        for n in ("policy", "rewards"))):
            enc = _reward_proof_unsigned
    _SPECIALISED[key] = enc
    return enc


_RP_HEAD = DOMAIN_PREFIX + b"RewardProof\n" + _pack_I(1)  # domain tag, tag of field 1
_RP_NO_POLICY = _pack_I(3) + b"\x00"
_pk_II = struct.Struct(">II").pack  # tag, u32 length / count
_pk_policy = struct.Struct(">IBIIQII").pack  # tag 3, present, len(body), tag 1, version, tag 2, len(sha256)
_pk_4_6 = struct.Struct(">IQIQII").pack  # tag 4, round_index, tag 5, prompt_index, tag 6, len(prompt_sha256)
_pk_8_10 = struct.Struct(">IQIQII").pack  # tag 8, group_size, tag 9, completion_index, tag 10, len(hash)
_pk_12_13 = struct.Struct(">IQII").pack  # tag 12, num_completion_tokens, tag 13, len(hash)
_pk_rv_head = struct.Struct(">III").pack  # len(RewardValue body), tag 1, len(name)
_pk_rv_tail = struct.Struct(">IdI?").pack  # tag 2, value, tag 3, applicable
_pk_17_18 = struct.Struct(">IdII").pack  # tag 17, reward_total, tag 18, len(reward_spec_id)
_pk_19_21 = struct.Struct(">IdIQIq").pack  # tag 19, advantage, tag 20, sequence, tag 21, time_ms
_RV_FIXED = 4 + 4 + 4 + 8 + 4 + 1  # RewardValue body minus the name's bytes


def _reward_proof_unsigned(p) -> bytes | None:
    try:
        run_id = p.run_id.encode("utf-8")
        key = p.node_public_key
        gid = p.group_id.encode("utf-8")
        text = p.completion_text.encode("utf-8")
        spec = p.reward_spec_id.encode("utf-8")
        total = p.reward_total + 0.0  # -0.0 + 0.0 == +0.0
        adv = p.advantage + 0.0
        lps = p.behaviour_logprobs[:]  # a list (one pass over the repeated field)
        if 0.0 in lps:  # a -0.0 among them (or +0.0): normalise
            lps = [v + 0.0 for v in lps]
        check = total + adv + sum(lps)  # NaN iff some value is NaN (or +inf meets -inf)
        ids = p.completion_token_ids[:]
        rewards = p.rewards
        parts = [_RP_HEAD, _pack_I(len(run_id)), run_id, _pk_II(2, len(key)), key]
        if p.HasField("policy"):
            policy = p.policy
            sha = policy.sha256
            parts += (_pk_policy(3, 1, 20 + len(sha), 1, policy.version, 2, len(sha)), sha)
        else:
            parts.append(_RP_NO_POLICY)
        psha, tsha, lsha = p.prompt_sha256, p.completion_token_ids_sha256, p.behaviour_logprobs_sha256
        parts += (
            _pk_4_6(4, p.round_index, 5, p.prompt_index, 6, len(psha)), psha,
            _pk_II(7, len(gid)), gid,
            _pk_8_10(8, p.group_size, 9, p.completion_index, 10, len(tsha)), tsha,
            _pk_II(11, len(text)), text,
            _pk_12_13(12, p.num_completion_tokens, 13, len(lsha)), lsha,
            _pk_II(14, len(lps)), struct.pack(f">{len(lps)}f", *lps),
            _pk_II(15, len(ids)), struct.pack(f">{len(ids)}Q", *ids),
            _pk_II(16, len(rewards)),
        )
        for r in rewards:
            name = r.name.encode("utf-8")
            value = r.value + 0.0
            check += value
            parts += (_pk_rv_head(_RV_FIXED + len(name), 1, len(name)), name, _pk_rv_tail(2, value, 3, r.applicable))
        if check != check:
            return None
        parts += (_pk_17_18(17, total, 18, len(spec)), spec, _pk_19_21(19, adv, 20, p.sequence, 21, p.time_ms))
        return b"".join(parts)
    except (struct.error, UnicodeError, OverflowError, TypeError, ValueError):
        return None  # the generic encoder raises the specified error (or encodes what is unusual)
