"""Proof of sampling on vLLM: a V1 logits processor that makes the engine draw every token by the
run's keyed Gumbel-max rule (:mod:`grpo_swarm.protocol.sampling_noise`), as
:class:`~.rollout.TransformersBackend` does, so the verifier's spot-check accepts vLLM completions.

A request opts in through ``SamplingParams.extra_args`` (:func:`keyed_request_args`: its row key
``(k0, k1)``, our temperature / top-k / top-p, and a record id) and is sent to the engine with
temperature 0. At every engine step, for each such request in the batch, :class:`KeyedNoiseLogitsProcessor`

* computes ``lp = rollout.processed_logprobs(row, params)`` (temperature, top-k, top-p, log-softmax:
  the same function as the transformers sampler and the verifier),
* picks ``tok = rollout.sample_tokens(lp, g_t)`` with ``g_t`` the key's noise at position
  ``t = len(output token ids so far)`` (0 for the first generated token),
* replaces the row by 0 at ``tok`` and -inf elsewhere, so the engine's greedy sampler picks ``tok``.

Requests without the key are left untouched.

Behaviour log-probabilities
    GRPO needs ``lp[tok]``, not what the engine would report (the log-prob of the forced one-hot
    row: 0). The processor records ``lp[tok]`` per (record id, position) in this process and the
    backend takes them after ``generate`` (:func:`take_behaviour_logprobs`). This needs the engine
    in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which ``VLLMBackend`` sets, tensor-parallel
    size 1); a missing record is an error, never a silent 0. Records are written by position, so a
    step sampled again (chunked prefill, preemption with recompute) overwrites its earlier entry.

The vLLM API used (``vllm.v1.sample.logits_processor``): ``LogitsProcessor.__init__(vllm_config,
device, is_pin_memory)``, ``is_argmax_invariant()``, ``update_state(batch_update)`` with
``batch_update.removed`` (indices), ``.added`` (``(index, params, [prompt ids,] output ids)``; the
output ids list is the request's live list) and ``.moved`` (``(a, b, UNIDIRECTIONAL | SWAP)``),
applied in that order, and ``apply(logits [num_requests, V])``. When vLLM is not importable the
class has no vLLM base (a shim), so this module imports and its tests run without vLLM.

What is tested, what is not
    tests/test_vllm_keyed_sampling.py drives the processor with a FAKE engine that mimics vLLM's
    batch protocol (requests added, moved, swapped and removed between steps, requests at different
    positions in one batch) on a tiny transformers model: greedy decoding of the forced logits gives
    token for token the completions and behaviour log-probs of ``TransformersBackend`` with the same
    keys, and the verifier's spot-check accepts them. vLLM cannot run on the machines this was built
    on: the processor inside a REAL vLLM engine is UNTESTED (loading it, the batch indices and
    output-id lists vLLM actually passes, async scheduling, speculative decoding (unsupported: one
    logits row per request is assumed), bf16 logits against the verifier's recomputation, and speed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .noise import gumbel_from_seeds, keys_tensor, row_seeds
from .rollout import SamplingParams, processed_logprobs, sample_tokens

try:  # vLLM's base class when vLLM is installed; the engine refuses processors that are not subclasses
    from vllm.v1.sample.logits_processor import LogitsProcessor as _Base
except ImportError:  # no vLLM (CPU machines, the tests): the same methods on a plain class
    _Base = object

EXTRA_ARGS_KEY = "grpo_swarm_keyed_noise"

# record id -> {position: behaviour log-prob}; filled from _pending when the backend takes them
_records: dict[str, dict[int, float]] = {}
# (record ids, positions, log-probs tensor) per apply: read back only at the end (no GPU sync per step)
_pending: list[tuple[list[str], list[int], torch.Tensor]] = []


def keyed_request_args(key: tuple[int, int], params: SamplingParams, record_id: str) -> dict[str, Any]:
    """``SamplingParams.extra_args`` for one completion sampled with noise key ``key`` under ``params``
    (plain JSON values: vLLM serialises extra_args with the request)."""
    return {EXTRA_ARGS_KEY: {"key": [int(key[0]), int(key[1])], "temperature": float(params.temperature),
                             "top_k": int(params.top_k), "top_p": float(params.top_p), "record": str(record_id)}}


@dataclass
class _Request:
    key: tuple[int, int]
    params: SamplingParams
    record: str
    output_ids: list[int]  # the engine's live list: its length is the position being sampled


def _request_of(params, output_ids) -> _Request | None:
    spec = (getattr(params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY)
    if spec is None:
        return None
    ours = SamplingParams(max_new_tokens=1, temperature=spec["temperature"], top_p=spec["top_p"], top_k=spec["top_k"])
    return _Request((int(spec["key"][0]), int(spec["key"][1])), ours, str(spec["record"]), output_ids)


class KeyedNoiseLogitsProcessor(_Base):
    """vLLM V1 logits processor: forces each keyed request's token to the keyed Gumbel-max draw."""

    def __init__(self, vllm_config=None, device=None, is_pin_memory: bool = False):
        self.device = torch.device(device) if device is not None else None
        self.requests: dict[int, _Request] = {}  # batch index -> keyed request

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return  # same batch, new tokens: positions are read from the live output lists
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for added in batch_update.added:
            # (index, params, output ids) before vLLM 0.11, (index, params, prompt ids, output ids) since
            index, params, output_ids = added[0], added[1], added[-1]
            request = _request_of(params, output_ids)
            if request is None:
                self.requests.pop(index, None)  # an unkeyed request replaced a keyed one
            else:
                self.requests[index] = request
        for a, b, direction in batch_update.moved:
            first, second = self.requests.pop(a, None), self.requests.pop(b, None)
            if getattr(direction, "name", direction) == "SWAP" and second is not None:
                self.requests[a] = second
            if first is not None:
                self.requests[b] = first

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            return logits
        by_params: dict[SamplingParams, list[int]] = {}
        for index, request in self.requests.items():
            by_params.setdefault(request.params, []).append(index)
        vocab, device = logits.size(-1), logits.device
        for params, indices in by_params.items():
            requests = [self.requests[i] for i in indices]
            rows = torch.tensor(indices, dtype=torch.long, device=device)
            positions = [len(r.output_ids) for r in requests]
            logps = processed_logprobs(logits[rows], params)
            seeds = row_seeds(keys_tensor([r.key for r in requests], device),
                              torch.tensor(positions, dtype=torch.int64, device=device))
            tok = sample_tokens(logps, gumbel_from_seeds(seeds, vocab))
            _pending.append(([r.record for r in requests], positions, logps.gather(1, tok[:, None]).squeeze(1)))
            forced = torch.full((len(indices), vocab), float("-inf"), dtype=logits.dtype, device=device)
            logits[rows] = forced.scatter_(1, tok[:, None], 0.0)
        return logits


def _flush() -> None:
    for records, positions, logps in _pending:
        for record, t, lp in zip(records, positions, logps.tolist()):
            _records.setdefault(record, {})[t] = lp
    _pending.clear()


def take_behaviour_logprobs(record_ids: Sequence[str], lengths: Sequence[int]) -> list[list[float]]:
    """The recorded log-prob of each of the ``lengths[i]`` tokens of completion ``record_ids[i]``
    (removed from the records). Raises RuntimeError when one is missing: the engine did not run
    :class:`KeyedNoiseLogitsProcessor` in this process."""
    _flush()
    out = []
    for record, n in zip(record_ids, lengths):
        got = _records.get(record, {})
        missing = [t for t in range(n) if t not in got]
        if missing:
            raise RuntimeError(
                f"no keyed-noise record for completion {record!r} at positions {missing[:5]}: the vLLM engine did not "
                "run KeyedNoiseLogitsProcessor in this process (build it with logits_processors=[KeyedNoiseLogitsProcessor] "
                "and VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        out.append([got[t] for t in range(n)])
    discard(record_ids)
    return out


def discard(record_ids: Sequence[str]) -> None:
    """Forget the records of these completions (after use, or after a failed generate)."""
    _flush()
    for record in record_ids:
        _records.pop(record, None)
