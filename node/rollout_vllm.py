"""vLLM generation backend (GPU only), behind the same interface as :class:`~.rollout.TransformersBackend`.

``VLLMBackend.generate(prompt_ids, group_size, params, seed)`` returns a :class:`~.rollout.RolloutBatch`
and ``load_weights(state_dict)`` pushes the current policy into the running engine.

vLLM is an optional extra (``pip install 'grpo-swarm[vllm]'``): it needs a GPU and pins its own CUDA
build of torch, so it is imported lazily, only when :class:`VLLMBackend` builds an engine.

Behaviour log-probabilities
    GRPO's behaviour correction needs the log-probability of each sampled token under the
    distribution it was actually drawn from (after temperature, top-k and top-p). vLLM reports that
    only when the engine is built with ``logprobs_mode="processed_logprobs"`` (vLLM >= 0.10.2; the
    default ``raw_logprobs`` ignores temperature and truncation). :class:`VLLMBackend` sets it when it
    builds the ``LLM`` itself; an ``LLM`` passed in must have been built with it (a warning is issued
    when the engine says otherwise). Each token's log-prob is requested with ``logprobs=0``: vLLM
    then returns exactly the sampled token's entry.

Seeds
    Prompt ``i`` gets its own ``SamplingParams`` with ``seed + i * G``; vLLM gives the ``k``-th of its
    ``n = G`` completions ``seed + i * G + k``, so every completion of a step has a distinct seed.

Weight updates
    ``load_weights`` calls ``LLM.apply_model(fn)`` (vLLM >= 0.10; it runs ``fn`` on the model in every
    worker), with ``fn`` calling vLLM's own ``model.load_weights`` (which takes Hugging Face parameter
    names), then resets the prefix cache (its KV entries were computed with the old weights). Older
    engines without ``apply_model`` fall back to
    ``llm.llm_engine.model_executor.driver_worker.model_runner.model``. When it builds the engine,
    the backend sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (unless already set) so the engine runs in
    this process and ``apply_model`` hands the tensors over by reference; with multiprocessing on,
    vLLM pickles the function and the weights to the engine process, which needs
    ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` and copies every tensor.

SamplingParams without vLLM
    The backend builds its sampling parameters through :meth:`VLLMBackend.sampling_params`. When vLLM
    is not importable but an ``LLM``-like object was passed in (the unit tests' fake), it uses
    :class:`SamplingParamsStandIn`, a plain dataclass with the same field names, so the fake can
    record what a real engine would have received.

What is tested, what is not
    ``tests/test_rollout_vllm.py`` tests :func:`outputs_to_rollout_batch` (the conversion of vLLM's
    output objects into a batch) and ``generate``/``load_weights`` against a FAKE engine that only
    mimics vLLM's output objects. Nothing here has been run against a real vLLM engine: building the
    ``LLM``, the ``processed_logprobs`` mode, seeding, stop tokens, ``apply_model`` weight loading and
    the prefix-cache reset are UNTESTED in this repository (no GPU in CI).
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from .rollout import RolloutBatch, SamplingParams

VLLM_INSTALL_HINT = "the vllm backend needs a GPU and `pip install 'grpo-swarm[vllm]'`"
PROCESSED_LOGPROBS = "processed_logprobs"


@dataclass
class SamplingParamsStandIn:
    """Same field names as ``vllm.SamplingParams``; used only when vLLM is not importable (tests)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = 16
    logprobs: int | None = None
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    detokenize: bool = True


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"{VLLM_INSTALL_HINT} ({exc})") from exc
    return vllm


def _load_weights_into(weights: list[tuple[str, torch.Tensor]], model) -> None:
    """Runs inside a vLLM worker (module level, so it pickles when the engine is in another process)."""
    model.load_weights(weights)


class VLLMBackend:
    """Grouped sampling with a vLLM engine: one request per prompt with ``n = group_size``."""

    def __init__(
        self,
        model_path_or_llm: Any,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        gpu_memory_utilization: float = 0.5,
        dtype: str = "bfloat16",
        enable_prefix_caching: bool = True,
        **llm_kwargs,
    ):
        if not eos_token_ids:
            raise ValueError("at least one EOS token id is needed to end completions")
        self.eos = [int(t) for t in eos_token_ids]
        self.pad_id = int(pad_token_id)
        if isinstance(model_path_or_llm, (str, os.PathLike)):
            vllm = _import_vllm()
            # In-process engine: apply_model then passes the weights by reference (see module docstring).
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            llm_kwargs.setdefault("logprobs_mode", PROCESSED_LOGPROBS)
            # We send token ids and read token ids: no tokenizer needed in the engine.
            llm_kwargs.setdefault("skip_tokenizer_init", True)
            self.llm = vllm.LLM(
                model=str(model_path_or_llm), gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                enable_prefix_caching=enable_prefix_caching, **llm_kwargs,
            )
            self._params_cls = vllm.SamplingParams
        else:
            if llm_kwargs:
                raise TypeError(f"engine options {sorted(llm_kwargs)} given with an already-built LLM")
            self.llm = model_path_or_llm
            try:
                self._params_cls = _import_vllm().SamplingParams
            except ImportError:
                self._params_cls = SamplingParamsStandIn  # an injected stand-in engine (tests)
            self._warn_if_raw_logprobs()

    def _warn_if_raw_logprobs(self) -> None:
        mode = getattr(getattr(getattr(self.llm, "llm_engine", None), "model_config", None), "logprobs_mode", None)
        if mode is not None and str(getattr(mode, "value", mode)) != PROCESSED_LOGPROBS:
            warnings.warn(
                f"the vLLM engine reports logprobs_mode={mode!r}: behaviour log-probs will ignore temperature, "
                f"top-k and top-p; build the LLM with logprobs_mode={PROCESSED_LOGPROBS!r}", stacklevel=3,
            )

    def sampling_params(self, params: SamplingParams, group_size: int, seed: int, prompt_index: int = 0):
        """The per-prompt vLLM ``SamplingParams`` (``SamplingParamsStandIn`` when vLLM is absent)."""
        return self._params_cls(
            n=group_size,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            logprobs=0,  # the sampled token's own log-prob only
            seed=seed + prompt_index * group_size,
            stop_token_ids=list(self.eos),
            detokenize=False,
        )

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], group_size: int, params: SamplingParams, seed: int,
        noise_keys: Sequence[tuple[int, int]] | None = None,
    ) -> RolloutBatch:
        if noise_keys is not None:
            # vLLM's sampler draws its own noise; swarm proofs need the run's keyed noise
            raise NotImplementedError("the vLLM backend cannot sample with the run's keyed noise (proof of sampling) "
                                      "yet: swarm nodes sample with --backend transformers")
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        # TokensPrompt is a TypedDict: a plain dict with the same key is the same thing.
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_ids]
        per_prompt = [self.sampling_params(params, group_size, seed, i) for i in range(len(prompts))]
        outputs = self.llm.generate(prompts, per_prompt, use_tqdm=False)
        return outputs_to_rollout_batch(outputs, prompt_ids, group_size, self.pad_id, eos_token_ids=self.eos)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        weights = [(name, t.detach()) for name, t in state_dict.items()]
        if hasattr(self.llm, "apply_model"):  # vLLM >= 0.10 (V1 engine)
            self.llm.apply_model(functools.partial(_load_weights_into, weights))
        else:  # classic path of older in-process engines
            self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights


def outputs_to_rollout_batch(
    request_outputs: Sequence[Any],
    prompt_ids: Sequence[Sequence[int]],
    group_size: int,
    pad_token_id: int,
    eos_token_ids: Iterable[int] = (),
) -> RolloutBatch:
    """Convert vLLM ``RequestOutput``s (one per prompt, in prompt order) into a group-major batch.

    Each request's ``outputs`` holds ``group_size`` ``CompletionOutput``s with ``token_ids``,
    ``logprobs`` (per position, a dict token id -> ``Logprob(logprob=...)`` containing the sampled
    token) and ``finish_reason``. Every returned token is a real token (the EOS that ended a
    ``"stop"`` completion included); ``truncated`` is ``finish_reason == "length"`` unless the last
    token is one of ``eos_token_ids`` (an EOS sampled exactly at the length limit counts as finished,
    as in :class:`~.rollout.TransformersBackend`).
    """
    if len(request_outputs) != len(prompt_ids):
        raise ValueError(f"{len(request_outputs)} vLLM outputs for {len(prompt_ids)} prompts")
    eos = {int(t) for t in eos_token_ids}
    rows: list[tuple[list[int], list[float], bool]] = []
    for i, (request, prompt) in enumerate(zip(request_outputs, prompt_ids)):
        sent = getattr(request, "prompt_token_ids", None)
        if sent is not None and list(sent) != [int(t) for t in prompt]:
            raise ValueError(f"vLLM output {i} belongs to another prompt (outputs out of order?)")
        completions = sorted(request.outputs, key=lambda c: getattr(c, "index", 0))
        if len(completions) != group_size:
            raise ValueError(f"prompt {i}: {len(completions)} completions, expected G={group_size}")
        for completion in completions:
            ids = [int(t) for t in completion.token_ids]
            if completion.logprobs is None:
                raise ValueError("vLLM returned no log-probabilities: SamplingParams(logprobs=0) is required")
            if len(completion.logprobs) != len(ids):
                raise ValueError(f"prompt {i}: {len(ids)} tokens but {len(completion.logprobs)} log-prob entries")
            logps = []
            for t, (tok, entry) in enumerate(zip(ids, completion.logprobs)):
                if tok not in entry:
                    raise ValueError(f"prompt {i}, position {t}: no log-prob for the sampled token {tok}")
                logps.append(float(entry[tok].logprob))
            reason = completion.finish_reason
            if reason not in ("stop", "length"):
                raise ValueError(f"prompt {i}: completion finished with {reason!r} (expected 'stop' or 'length')")
            truncated = reason == "length" and not (ids and ids[-1] in eos)
            rows.append((ids, logps, truncated))

    n = len(rows)
    width = max(1, max(len(ids) for ids, _, _ in rows))
    completion_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.float32)
    behaviour = torch.zeros((n, width), dtype=torch.float32)
    for r, (ids, logps, _) in enumerate(rows):
        if ids:
            completion_ids[r, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            mask[r, : len(ids)] = 1.0
            behaviour[r, : len(ids)] = torch.as_tensor(logps, dtype=torch.float32)
    batch = RolloutBatch(
        prompt_ids=[torch.as_tensor([int(t) for t in p], dtype=torch.long) for p in prompt_ids],
        completion_ids=completion_ids,
        completion_mask=mask,
        behaviour_logps=behaviour,
        truncated=torch.tensor([t for _, _, t in rows], dtype=torch.bool),
        group_size=group_size,
    )
    batch.validate()
    return batch
