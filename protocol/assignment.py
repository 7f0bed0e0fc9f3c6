"""Deterministic prompt assignment: (run seed, node id, round) → prompt indices.

Any verifier recomputes a node's assignment, so a peer cannot choose easy prompts: a proof counts
only if its ``prompt_index`` is in ``assign_prompts(run_seed, node_id, round_index, N, count)``,
where ``node_id`` is derived from the proof's own public key (:func:`.identity.node_id_from_public_key`).

Specification (version 1). Notation as in :mod:`.canonical` (``u64`` = 8-byte big-endian, ``u32``
= 4-byte big-endian)::

    seed    = SHA-256(b"grpo-swarm/v1/assign\\n" || u64(run_seed) || u32(len(node)) || node
                      || u64(round_index) || u64(dataset_size))
    word(c) = first 8 bytes of SHA-256(seed || u64(c)) read as a big-endian unsigned integer

with ``node`` the UTF-8 bytes of the node id. A counter ``c`` starts at 0 and increases by one per
word drawn. ``uniform(m)`` (an integer in ``[0, m)`` without modulo bias) draws ``w = word(c)``
until ``w < 2**64 - (2**64 mod m)`` and returns ``w mod m``.

The indices are the first ``count`` positions of a Fisher–Yates shuffle of ``0 .. N-1``: start from
the identity permutation ``P``; for ``i = 0 .. count-1``: ``j = i + uniform(N - i)``, swap ``P[i]``
and ``P[j]``, output ``P[i]``. So the result is ``count`` distinct indices in draw order, uniformly
distributed over ordered samples without replacement. (Implementation keeps only the swapped
entries, O(count) memory.)

Constraints: ``0 <= run_seed < 2**64``, ``0 <= round_index < 2**64``, ``1 <= dataset_size < 2**64``,
``0 <= count <= dataset_size``; otherwise ValueError.
"""

from __future__ import annotations

import hashlib
import operator
import struct
from functools import lru_cache

ASSIGN_DOMAIN = b"grpo-swarm/v1/assign\n"
_U64 = 2**64


def _u64(name: str, value: int) -> bytes:
    value = operator.index(value)
    if not 0 <= value < _U64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return struct.pack(">Q", value)


def assignment_seed(run_seed: int, node_id: str, round_index: int, dataset_size: int) -> bytes:
    if not isinstance(node_id, str) or not node_id:
        raise ValueError("node_id must be a non-empty str")
    node = node_id.encode("utf-8")
    return hashlib.sha256(
        ASSIGN_DOMAIN
        + _u64("run_seed", run_seed)
        + struct.pack(">I", len(node))
        + node
        + _u64("round_index", round_index)
        + _u64("dataset_size", dataset_size)
    ).digest()


@lru_cache(maxsize=1024)
def _assign(run_seed: int, node_id: str, round_index: int, dataset_size: int, count: int) -> tuple[int, ...]:
    if dataset_size < 1:
        raise ValueError(f"dataset_size must be at least 1, got {dataset_size}")
    if not 0 <= count <= dataset_size:
        raise ValueError(f"count must be in [0, dataset_size={dataset_size}], got {count}")
    seed = assignment_seed(run_seed, node_id, round_index, dataset_size)
    counter = 0

    def uniform(m: int) -> int:
        nonlocal counter
        limit = _U64 - (_U64 % m)
        while True:
            w = int.from_bytes(hashlib.sha256(seed + struct.pack(">Q", counter)).digest()[:8], "big")
            counter += 1
            if w < limit:
                return w % m

    swapped: dict[int, int] = {}  # sparse permutation: position -> value where it differs
    out = []
    for i in range(count):
        j = i + uniform(dataset_size - i)
        vi, vj = swapped.get(i, i), swapped.get(j, j)
        swapped[i], swapped[j] = vj, vi
        out.append(vj)
    return tuple(out)


def assign_prompts(run_seed: int, node_id: str, round_index: int, dataset_size: int, count: int) -> list[int]:
    """The ``count`` distinct prompt indices in ``[0, dataset_size)`` assigned to ``node_id`` in
    ``round_index`` (see the module docstring for the exact algorithm)."""
    return list(
        _assign(
            operator.index(run_seed),
            node_id,
            operator.index(round_index),
            operator.index(dataset_size),
            operator.index(count),
        )
    )


def is_assigned(
    run_seed: int, node_id: str, round_index: int, dataset_size: int, count: int, prompt_index: int
) -> bool:
    """True iff ``prompt_index`` is among :func:`assign_prompts` for these arguments."""
    return operator.index(prompt_index) in assign_prompts(run_seed, node_id, round_index, dataset_size, count)
