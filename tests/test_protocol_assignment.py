"""grpo_swarm.protocol.assignment: deterministic, verifiable prompt assignment."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_swarm.protocol.assignment import ASSIGN_DOMAIN, assign_prompts, assignment_seed, is_assigned

NODE = "56475aa75463474c0285df5dbf2bcab7"
# assign_prompts(1234, NODE, 5, 1000, 8): pinned so that every implementation agrees
GOLDEN = [340, 861, 938, 624, 563, 114, 319, 91]


def test_golden_vector_and_spec():
    assert assign_prompts(1234, NODE, 5, 1000, 8) == GOLDEN
    seed = hashlib.sha256(
        ASSIGN_DOMAIN + struct.pack(">Q", 1234) + struct.pack(">I", 32) + NODE.encode() + struct.pack(">QQ", 5, 1000)
    ).digest()
    assert assignment_seed(1234, NODE, 5, 1000) == seed
    # first draw: j = 0 + uniform(1000) from word(0) (no rejection is practically certain here)
    w0 = int.from_bytes(hashlib.sha256(seed + struct.pack(">Q", 0)).digest()[:8], "big")
    assert GOLDEN[0] == w0 % 1000


def test_deterministic_across_processes():
    code = (
        "from grpo_swarm.protocol.assignment import assign_prompts;"
        f"print(assign_prompts(1234, {NODE!r}, 5, 1000, 8))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == str(GOLDEN)


def test_distinct_in_range_and_prefix_stable():
    full = assign_prompts(7, NODE, 0, 50, 50)
    assert sorted(full) == list(range(50))  # count == size: a permutation
    for k in (0, 1, 10, 49):
        assert assign_prompts(7, NODE, 0, 50, k) == full[:k]  # a larger count only appends
    assert assign_prompts(7, NODE, 0, 1, 1) == [0]


def test_depends_on_every_input():
    base = assign_prompts(7, NODE, 0, 10_000, 16)
    assert assign_prompts(8, NODE, 0, 10_000, 16) != base
    assert assign_prompts(7, NODE[:-1] + "0", 0, 10_000, 16) != base
    assert assign_prompts(7, NODE, 1, 10_000, 16) != base
    assert assign_prompts(7, NODE, 0, 10_001, 16) != base


def test_spread_is_uniform():
    n, count, rounds = 20, 5, 2000
    hits = Counter()
    for r in range(rounds):
        hits.update(assign_prompts(99, NODE, r, n, count))
    expected = rounds * count / n  # 500
    chi2 = sum((hits[i] - expected) ** 2 / expected for i in range(n))
    assert chi2 < 50, (chi2, hits)  # 19 dof: p(chi2 > 50) ~ 1e-4
    # different nodes in the same round get (mostly) different prompts
    nodes = [hashlib.sha256(bytes([i])).hexdigest()[:32] for i in range(20)]
    firsts = {assign_prompts(99, nd, 0, 7473, 8)[0] for nd in nodes}
    assert len(firsts) >= 18


def test_is_assigned():
    for i in range(1000):
        assert is_assigned(1234, NODE, 5, 1000, 8, i) == (i in GOLDEN)
    other_round = assign_prompts(1234, NODE, 6, 1000, 8)
    assert [is_assigned(1234, NODE, 6, 1000, 8, i) for i in GOLDEN] == [i in other_round for i in GOLDEN]


@pytest.mark.parametrize(
    "args, match",
    [
        ((-1, NODE, 0, 10, 1), "run_seed"),
        ((2**64, NODE, 0, 10, 1), "run_seed"),
        ((0, NODE, -1, 10, 1), "round_index"),
        ((0, NODE, 0, 0, 0), "dataset_size"),
        ((0, NODE, 0, 10, 11), "count"),
        ((0, NODE, 0, 10, -1), "count"),
        ((0, "", 0, 10, 1), "node_id"),
    ],
)
def test_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        assign_prompts(*args)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    node=st.text(min_size=1, max_size=40),
    rnd=st.integers(0, 2**64 - 1),
    size=st.integers(1, 10**12),
    data=st.data(),
)
def test_fuzz_valid_output(seed, node, rnd, size, data):
    count = data.draw(st.integers(0, min(size, 64)))
    out = assign_prompts(seed, node, rnd, size, count)
    assert len(out) == count == len(set(out))
    assert all(0 <= i < size for i in out)
