"""Proof of sampling: the Gumbel noise every completion must be sampled with, as a pure function of
the run and the completion's identity (the node cannot choose it), and its reference implementation.

A node samples completion ``member`` of its assigned prompt ``prompt`` in round ``round`` of run
``run_seed`` by the Gumbel-max rule: at completion position ``t`` (0 for the first generated token)
the token is ``argmax_i (lp_t[i] + g_t[i])``, where ``lp_t`` are the log-probabilities of the
processed distribution (temperature, then top-k, then top-p; ``node.rollout.processed_logprobs``)
and ``g_t[i]`` is the noise below. Ties go to the lowest index. The completion is therefore fixed
by the policy and the key: best-of-n, copied, edited or typed-in completions are tokens that are
not the argmax at some position, which the spot-check finds (``verify.Verifier``).

The noise, specified with unsigned 32-bit integer operations only (so CPU, CUDA and another
implementation draw the same bits; ``torch.rand`` differs between CPU and CUDA)::

    fmix(x)   = x ^= x >> 16;  x = x * 0x7feb352d mod 2^32;
                x ^= x >> 15;  x = x * 0x846ca68b mod 2^32;  x ^= x >> 16      (lowbias32)
    key       = SHA-256("grpo-swarm/v1/sampling-noise\\n" || u64(run_seed) || u32(len(node_id))
                        || node_id (UTF-8) || u64(round) || u64(prompt) || u32(member))
    k0, k1    = the key's first two big-endian u32 words
    s(t)      = fmix(fmix(k0 ^ t) ^ k1)                          position seed, t < 2^32
    x(t, i)   = fmix(s(t) ^ (i * 0x9e3779b9 mod 2^32))            i = token id
    u(t, i)   = ((x >> 9) + 0.5) / 2^23                           in (0, 1), exact in binary32
    g(t, i)   = -ln(-ln(u))                                       in [-2.82, 16.64]

(``u(...)`` integers are big-endian; ``node_id`` is the hex node id of the signing key, "" for a
single-node run.) Only ``g``'s logarithms are floating point: implementations may differ there
by a few ulps, which the verifier's tolerance absorbs. :data:`TEST_VECTORS` lists keys, seeds,
23-bit draws and ``g`` values another implementation can check against (tests/test_sampling_noise.py
checks this module and the torch implementation, ``node.noise``, against them).

The spot-check's tolerance: with recomputed log-probabilities ``lp'``, position ``t`` passes when
``max_i (lp'_t[i] + g_t[i]) - (lp'_t[tok] + g_t[tok]) <= sampling_tolerance`` (the *shortfall*).
An honest node's shortfall is 0 up to the numerical difference between its sampling pass and the
verifier's forward pass; a forged token's shortfall is the gap between the perturbed scores of the
argmax and of the token chosen.

Measured (bench/sampling_check.py, bench/RESULTS.md; fp32, CPU): 0 honest rejections in 1,000
SmolLM2-135M completions (31,980 tokens) and 1,000 tiny-model ones (14,466), every sampled token the
recomputed argmax (max honest shortfall 0); at the default tolerance 0.05 a forged runner-up token
is detected at 97.3 % of SmolLM2 positions (95.2 % on the tiny model), a random other token at 100 %.
"""

from __future__ import annotations

import hashlib
import math
import struct

NOISE_DOMAIN = b"grpo-swarm/v1/sampling-noise\n"
GOLDEN = 0x9E3779B9
M1, M2 = 0x7FEB352D, 0x846CA68B
MASK32 = 0xFFFFFFFF
U23 = 1 << 23


def fmix(x: int) -> int:
    """lowbias32: a bijection of u32 with full avalanche."""
    x &= MASK32
    x ^= x >> 16
    x = (x * M1) & MASK32
    x ^= x >> 15
    x = (x * M2) & MASK32
    x ^= x >> 16
    return x


def row_key(run_seed: int, node_id: str, round_index: int, prompt_index: int, member: int) -> tuple[int, int]:
    """(k0, k1): the noise key of one completion."""
    nid = node_id.encode("utf-8")
    h = hashlib.sha256(NOISE_DOMAIN + struct.pack(">QI", run_seed, len(nid)) + nid
                       + struct.pack(">QQI", round_index, prompt_index, member)).digest()
    return struct.unpack(">II", h[:8])


def position_seed(key: tuple[int, int], t: int) -> int:
    k0, k1 = key
    return fmix(fmix(k0 ^ t) ^ k1)


def draw23(seed: int, token: int) -> int:
    """The 23-bit draw of token ``token`` under a position seed (23 bits: ``draw + 0.5`` is exact in
    binary32, so ``u`` is never rounded up to 1)."""
    return fmix(seed ^ ((token * GOLDEN) & MASK32)) >> 9


def gumbel(seed: int, token: int) -> float:
    """g = -ln(-ln(u)) in binary64 (the reference; binary32 implementations differ by a few ulps)."""
    u = (draw23(seed, token) + 0.5) / U23
    return -math.log(-math.log(u))


# Checked by tests/test_sampling_noise.py against this module and node.noise (torch, float32).
# (run_seed, node_id, round, prompt, member) -> (k0, k1); position t -> s(t); token i -> draw23, g.
TEST_VECTORS = [
    {"run_seed": 0, "node_id": "", "round": 0, "prompt": 0, "member": 0,
     "k0": 0x8D0EF36E, "k1": 0xB6FB9AE9, "t": 0, "s": 0x4B16CBEC,
     "tokens": {0: (0x72F91C, 2.231827), 1: (0x2F93FA, 0.010395), 2: (0x303292, 0.023553),
                151: (0x0240CC, -1.396174), 49151: (0x366E2B, 0.156527)}},
    {"run_seed": 7, "node_id": "", "round": 3, "prompt": 12, "member": 5,
     "k0": 0xCF4855D9, "k1": 0xA2E63CAB, "t": 63, "s": 0x3CA1FC97,
     "tokens": {0: (0x511EA2, 0.785033), 1: (0x374ECA, 0.175405), 2: (0x030F45, -1.317407),
                151: (0x7D769E, 3.911197), 49151: (0x708A59, 2.050133)}},
    {"run_seed": 2**64 - 1, "node_id": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
     "round": 2**63 - 1, "prompt": 7472, "member": 15,
     "k0": 0x75B78782, "k1": 0x52E9679D, "t": 2**32 - 1, "s": 0xBD9610CE,
     "tokens": {0: (0x3A6BF0, 0.242908), 1: (0x5824E8, 0.986025), 2: (0x10715E, -0.718883),
                151: (0x33291A, 0.086581), 49151: (0x015038, -1.521577)}},
]
