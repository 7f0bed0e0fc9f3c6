"""vLLM generation backend (GPU only), behind the same interface as :class:`~.rollout.TransformersBackend`.

``VLLMBackend.generate(prompt_ids, group_size, params, seed, noise_keys=None)`` returns a
:class:`~.rollout.RolloutBatch`; ``load_weights(state_dict)`` pushes a policy into the running engine
and ``sync_weights(model)`` does so only when the model's parameters changed since the last push.

vLLM is an optional extra (``pip install 'grpo-swarm[vllm]'``): it needs a GPU and pins its own CUDA
build of torch, so it is imported lazily, only when :class:`VLLMBackend` builds an engine.

Sampling: the run's keyed noise (proof of sampling)
    Every completion is sampled as the transformers backend samples it: at position ``t`` the token
    is ``argmax(processed log-probs + keyed Gumbel noise)`` with the completion's row key
    (``noise_keys``, group-major; default :func:`~.rollout.seed_noise_keys` of ``seed``, as the
    transformers backend). vLLM's own RNG is not used: the engine is built with
    :class:`~.vllm_keyed_sampling.KeyedNoiseLogitsProcessor`, each completion is its own request
    (``n=1``: every completion has its own key; prefix caching shares the prompt's KV blocks) whose
    ``SamplingParams.extra_args`` carry the key and our temperature / top-k / top-p, and the engine
    itself samples greedily (temperature 0) from the processor's forced logits.

Behaviour log-probabilities
    The processed log-prob of each chosen token, recorded by the processor in this process
    (:func:`~.vllm_keyed_sampling.take_behaviour_logprobs`). The engine's reported logprobs would be
    those of the forced one-hot row (0) and are not requested. The engine must therefore run in this
    process: the backend sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (unless already set) when it builds
    the engine; an ``LLM`` passed in must have been built in-process with the processor, else
    ``generate`` raises (missing records). It also sets ``VLLM_USE_V2_MODEL_RUNNER=0`` (the newest
    vLLM's model runner V2 has another logits-processor interface) and, where the engine has the
    option, ``async_scheduling=False`` (the processor reads each request's position from its output
    ids list, which must be exact at every step).

Weight updates
    ``load_weights`` calls ``LLM.apply_model(fn)`` (vLLM >= 0.10; it runs ``fn`` on the model in every
    worker), with ``fn`` calling vLLM's own ``model.load_weights`` (which takes Hugging Face parameter
    names), then resets the prefix cache (its KV entries were computed with the old weights). Older
    engines without ``apply_model`` fall back to
    ``llm.llm_engine.model_executor.driver_worker.model_runner.model``. In-process, ``apply_model``
    hands the tensors over by reference. The trainer calls ``sync_weights(model)`` before each
    rollout: the engine holds its own copy of the policy, which an optimizer step or a snapshot load
    does not touch.

SamplingParams without vLLM
    The backend builds its sampling parameters through :meth:`VLLMBackend.sampling_params`. When vLLM
    is not importable but an ``LLM``-like object was passed in (the unit tests' fake), it uses
    :class:`SamplingParamsStandIn`, a plain dataclass with the same field names, so the fake can
    record what a real engine would have received.

What is tested, what is not
    ``tests/test_rollout_vllm.py`` tests the conversion of vLLM's output objects into a batch and
    ``generate``/``load_weights``/``sync_weights`` against a FAKE engine that only mimics vLLM's
    output objects; ``tests/test_vllm_keyed_sampling.py`` runs ``generate`` on a FAKE engine that
    drives the logits processor through vLLM's batch protocol on a tiny transformers model and checks
    that the completions and behaviour log-probs equal ``TransformersBackend``'s for the same keys and
    pass the verifier's spot-check. Nothing here has been run against a real vLLM engine: building
    the ``LLM`` with the processor (and the model-runner / async-scheduling settings above), the
    processor inside the engine, stop tokens, ``apply_model`` weight loading, the prefix-cache reset,
    and whether the engine's logits (bf16 or fp32) stay within the verifier's tolerances are UNTESTED in this repository (no GPU, no vLLM on the machines it was built on).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from . import vllm_keyed_sampling as keyed
from .rollout import RolloutBatch, SamplingParams, seed_noise_keys

VLLM_INSTALL_HINT = "the vllm backend needs a GPU and `pip install 'grpo-swarm[vllm]'`"


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
    extra_args: dict[str, Any] | None = None


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"{VLLM_INSTALL_HINT} ({exc})") from exc
    return vllm


def _engine_args_cls():
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs


def vllm_importable() -> bool:
    try:
        _import_vllm()
    except ImportError:
        return False
    return True


def _load_weights_into(weights: list[tuple[str, torch.Tensor]], model) -> None:
    """Runs inside a vLLM worker (module level, so it pickles when the engine is in another process)."""
    model.load_weights(weights)


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of ``model`` is written in place (optimizer step,
    ``load_state_dict``) or replaced: torch's per-tensor version counters, with the tensors' ids."""
    return tuple((name, id(t), t._version) for name, t in model.state_dict(keep_vars=True).items())


class VLLMBackend:
    """Grouped sampling with a vLLM engine under the run's keyed noise: one request per completion."""

    def __init__(
        self,
        model_path_or_llm: Any,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        gpu_memory_utilization: float = 0.5,
        # float32: the verifier recomputes log-probs and the keyed argmax in float32 (rollout.full_precision);
        # a bf16 engine would fail its spot-checks (untested on a GPU here)
        dtype: str = "float32",
        enable_prefix_caching: bool = True,
        **llm_kwargs,
    ):
        if not eos_token_ids:
            raise ValueError("at least one EOS token id is needed to end completions")
        self.eos = [int(t) for t in eos_token_ids]
        self.pad_id = int(pad_token_id)
        self._pushed: tuple | None = None  # weights_fingerprint of the policy last pushed
        if isinstance(model_path_or_llm, (str, os.PathLike)):
            vllm = _import_vllm()
            # In-process engine: the processor's records and apply_model's tensors stay in this process.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            # Newest vLLM defaults to model runner V2, whose logits-processor interface is another one.
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
            if "async_scheduling" in {f.name for f in dataclasses.fields(_engine_args_cls())}:
                # the processor reads positions from the output ids list: keep it exact at every step
                llm_kwargs.setdefault("async_scheduling", False)
            processors = list(llm_kwargs.pop("logits_processors", None) or [])
            # We send token ids and read token ids: no tokenizer needed in the engine.
            llm_kwargs.setdefault("skip_tokenizer_init", True)
            self.llm = vllm.LLM(
                model=str(model_path_or_llm), gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                enable_prefix_caching=enable_prefix_caching,
                logits_processors=processors + [keyed.KeyedNoiseLogitsProcessor], **llm_kwargs,
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

    def sampling_params(self, params: SamplingParams, key: tuple[int, int], record_id: str):
        """One completion's vLLM ``SamplingParams`` (``SamplingParamsStandIn`` when vLLM is absent):
        greedy for the engine, our sampling and the noise key in ``extra_args`` for the processor."""
        return self._params_cls(
            n=1,
            temperature=0.0,  # the processor leaves one finite logit: greedy picks exactly that token
            max_tokens=params.max_new_tokens,
            stop_token_ids=list(self.eos),
            detokenize=False,
            extra_args=keyed.keyed_request_args(key, params, record_id),
        )

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], group_size: int, params: SamplingParams, seed: int,
        noise_keys: Sequence[tuple[int, int]] | None = None,
    ) -> RolloutBatch:
        """Sample ``group_size`` completions per prompt. ``noise_keys``: each row's key (group-major,
        :func:`.noise.group_keys`), which fixes its completion; default: keys derived from ``seed``."""
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        if noise_keys is None:
            noise_keys = seed_noise_keys(seed, len(prompt_ids), group_size)
        if len(noise_keys) != len(prompt_ids) * group_size:
            raise ValueError(f"{len(noise_keys)} noise keys for {len(prompt_ids)} prompts x G={group_size}")
        # TokensPrompt is a TypedDict: a plain dict with the same key is the same thing.
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_ids for _ in range(group_size)]
        call = uuid.uuid4().hex  # record ids unique across calls and engines in this process
        records = [f"{call}-{r}" for r in range(len(prompts))]
        per_row = [self.sampling_params(params, key, rec) for key, rec in zip(noise_keys, records)]
        try:
            outputs = self.llm.generate(prompts, per_row, use_tqdm=False)
            completions = read_completions(outputs, prompts)
            logps = keyed.take_behaviour_logprobs(records, [len(ids) for ids, _ in completions])
        finally:
            keyed.discard(records)
        return completions_to_rollout_batch(completions, logps, prompt_ids, group_size, self.pad_id,
                                            eos_token_ids=self.eos)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        weights = [(name, t.detach()) for name, t in state_dict.items()]
        if hasattr(self.llm, "apply_model"):  # vLLM >= 0.10 (V1 engine)
            self.llm.apply_model(functools.partial(_load_weights_into, weights))
        else:  # classic path of older in-process engines
            self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def sync_weights(self, model: torch.nn.Module) -> bool:
        """Push ``model``'s weights into the engine unless they are those pushed last; True if pushed."""
        fingerprint = weights_fingerprint(model)
        if fingerprint == self._pushed:
            return False
        self.load_weights(model.state_dict())
        self._pushed = fingerprint
        return True


def read_completions(request_outputs: Sequence[Any], prompts: Sequence[Any]) -> list[tuple[list[int], str]]:
    """``(token ids, finish_reason)`` of each vLLM ``RequestOutput`` (one request per completion, in
    the order sent; each with one ``CompletionOutput``)."""
    if len(request_outputs) != len(prompts):
        raise ValueError(f"{len(request_outputs)} vLLM outputs for {len(prompts)} requests")
    rows = []
    for i, (request, prompt) in enumerate(zip(request_outputs, prompts)):
        sent = getattr(request, "prompt_token_ids", None)
        if sent is not None and list(sent) != list(prompt["prompt_token_ids"]):
            raise ValueError(f"vLLM output {i} belongs to another prompt (outputs out of order?)")
        if len(request.outputs) != 1:
            raise ValueError(f"request {i}: {len(request.outputs)} completions, expected 1")
        (completion,) = request.outputs
        if completion.finish_reason not in ("stop", "length"):
            raise ValueError(f"request {i}: completion finished with {completion.finish_reason!r} "
                             "(expected 'stop' or 'length')")
        rows.append(([int(t) for t in completion.token_ids], completion.finish_reason))
    return rows


def completions_to_rollout_batch(
    completions: Sequence[tuple[Sequence[int], str]],
    behaviour_logps: Sequence[Sequence[float]],
    prompt_ids: Sequence[Sequence[int]],
    group_size: int,
    pad_token_id: int,
    eos_token_ids: Iterable[int] = (),
) -> RolloutBatch:
    """A group-major batch from each completion's ``(token ids, finish_reason)`` (row ``j * G + k`` is
    prompt ``j``'s ``k``-th) and its tokens' behaviour log-probs. Every returned token is a real token
    (the EOS that ended a ``"stop"`` completion included); ``truncated`` is ``finish_reason ==
    "length"`` unless the last token is one of ``eos_token_ids`` (an EOS sampled exactly at the
    length limit counts as finished, as in :class:`~.rollout.TransformersBackend`)."""
    n = len(prompt_ids) * group_size
    if len(completions) != n or len(behaviour_logps) != n:
        raise ValueError(f"{len(completions)} completions and {len(behaviour_logps)} log-prob rows "
                         f"for {len(prompt_ids)} prompts x G={group_size}")
    eos = {int(t) for t in eos_token_ids}
    width = max(1, max(len(ids) for ids, _ in completions))
    completion_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.float32)
    behaviour = torch.zeros((n, width), dtype=torch.float32)
    truncated = []
    for r, ((ids, reason), logps) in enumerate(zip(completions, behaviour_logps)):
        if len(logps) != len(ids):
            raise ValueError(f"completion {r}: {len(ids)} tokens but {len(logps)} log-probs")
        if ids:
            completion_ids[r, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
            mask[r, : len(ids)] = 1.0
            behaviour[r, : len(ids)] = torch.as_tensor(list(logps), dtype=torch.float32)
        truncated.append(reason == "length" and not (ids and ids[-1] in eos))
    batch = RolloutBatch(
        prompt_ids=[torch.as_tensor([int(t) for t in p], dtype=torch.long) for p in prompt_ids],
        completion_ids=completion_ids,
        completion_mask=mask,
        behaviour_logps=behaviour,
        truncated=torch.tensor(truncated, dtype=torch.bool),
        group_size=group_size,
    )
    batch.validate()
    return batch
