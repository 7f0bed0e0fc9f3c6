"""Node-side glue between GRPO training and the protocol.

* :func:`proofs_from_batch` — a scored GRPO batch (:class:`~.trainer.ScoredBatch`) → one signed
  :class:`RewardProof` per completion, raw token ids and behaviour log-probabilities included.
* The callables :class:`grpo_swarm.protocol.verify.Verifier` is given (the protocol package itself
  imports no model code): :func:`make_reward_recomputer` (node.rewards on the proof's text and the
  dataset row), :func:`make_decoder` (token ids → text, as the trainer decodes),
  :func:`make_prompt_hasher` (dataset row → rendered prompt hash) and :func:`make_logprob_fn` (the
  spot-check: one prefill pass of prompt + completion under the claimed policy version, the
  sampler's own temperature / top-k / top-p processing).
* Snapshots: :func:`state_dict_sha256`, :func:`save_snapshot`, :func:`snapshot_loader` (a policy
  version's weights by their hash, for spot-checks of stale proofs).
* :func:`audit_hooks` — the ``grpo_swarm.audit_hooks`` entry point ``grpo-audit`` uses to replay a
  run's checks (dataset, rewards, tokenizer from the ``run_started`` entry; ``--model`` for
  spot-checks).
"""

from __future__ import annotations

import copy
import hashlib
import math
import numbers
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from grpo_swarm.protocol.run_spec import AuditHooks
from grpo_swarm.protocol.identity import Identity
from grpo_swarm.protocol.proofs import RewardProof, build_reward_proof, group_id_for, prompt_hash, sign_proof
from grpo_swarm.protocol.identity import node_id_from_public_key
from grpo_swarm.protocol.sampling_noise import row_key
from grpo_swarm.protocol import version_file
from grpo_swarm.protocol.verify import Recomputed, SpotCheckUnavailable, normalise_reward_specs, reward_spec_id

from .data import PromptExample, load_dataset_spec, render_prompt
from .noise import completion_noise, shortfalls
from .swarm.training_state import model_weights
from .rewards import BUILTIN_REWARDS, RewardFunction, build_reward_functions
from .rollout import SamplingParams, full_precision, processed_logprobs
from .trainer import ScoredBatch

__all__ = [
    "audit_hooks",
    "load_tokenizer",
    "make_decoder",
    "make_logprob_fn",
    "make_prompt_hasher",
    "make_reward_recomputer",
    "proofs_from_batch",
    "reward_specs_of",
    "save_snapshot",
    "snapshot_loader",
    "spec_id_of",
    "state_dict_sha256",
]


# ---- reward specs --------------------------------------------------------------------------------
def reward_specs_of(rewards: Sequence[Any]) -> list[dict]:
    """``cfg.rewards`` (pydantic RewardSettings) or ``[{"name", "weight", "args"}]`` → plain specs."""
    plain = [r.model_dump() if hasattr(r, "model_dump") else dict(r) for r in rewards]
    return normalise_reward_specs(plain)


def spec_id_of(rewards: Sequence[Any]) -> str:
    """The ``reward_spec_id`` proofs carry for these reward settings."""
    return reward_spec_id(reward_specs_of(rewards))


# ---- proofs --------------------------------------------------------------------------------------
def proofs_from_batch(
    batch: ScoredBatch,
    examples: Sequence[PromptExample],
    prompt_texts: Sequence[str],
    identity: Identity,
    *,
    run_id: str,
    snapshot_sha256: bytes,
    round_index: int,
    first_sequence: int,
    reward_spec_id: str,
    policy_version: int | None = None,
    time_ms: int | None = None,
) -> list[RewardProof]:
    """One signed proof per completion of ``batch`` (group-major, as the batch), sequences
    ``first_sequence, first_sequence + 1, ...``. ``examples`` / ``prompt_texts`` are what
    :meth:`GRPOTrainer.rollout` was given / returned; ``policy_version`` defaults to the rollouts'."""
    r = batch.rollouts
    g = r.group_size
    if len(examples) != r.num_groups or len(prompt_texts) != r.num_groups:
        raise ValueError(f"{len(examples)} examples / {len(prompt_texts)} prompt texts for {r.num_groups} groups")
    if len(batch.completions) != r.num_completions:
        raise ValueError("the batch has no decoded completions (ScoredBatch.completions)")
    version = r.policy_version if policy_version is None else policy_version
    ids = r.completion_lists()
    logps = r.behaviour_logps.tolist()
    per_function = batch.rewards.per_function.tolist()
    totals = batch.rewards.total.tolist()
    advantages = batch.advantages.tolist()
    names = batch.rewards.names
    node_id = identity.node_id
    proofs = []
    for gi, (ex, text) in enumerate(zip(examples, prompt_texts)):
        p_hash = prompt_hash(text)
        gid = group_id_for(node_id, round_index, ex.index)
        for k in range(g):
            i = gi * g + k
            n = len(ids[i])
            rewards = [(name, None if math.isnan(v) else v) for name, v in zip(names, per_function[i])]
            proof = build_reward_proof(
                run_id=run_id, policy_version=version, snapshot_sha256=snapshot_sha256, round_index=round_index,
                prompt_index=ex.index, prompt_sha256=p_hash, group_id=gid, group_size=g, completion_index=k,
                completion_token_ids=ids[i], completion_text=batch.completions[i],
                behaviour_logprobs=logps[i][:n], rewards=rewards, reward_total=totals[i],
                reward_spec_id=reward_spec_id, advantage=advantages[i], sequence=first_sequence + i,
                time_ms=time_ms, node_public_key=identity.public_key_bytes,
            )
            proofs.append(sign_proof(proof, identity))
    return proofs


# ---- verifier callables --------------------------------------------------------------------------
def _index_examples(examples: Sequence[PromptExample]) -> dict[int, PromptExample]:
    by_index = {ex.index: ex for ex in examples}
    if len(by_index) != len(examples):
        raise ValueError("dataset examples have duplicate indices")
    return by_index


def _renderer(tokenizer, use_chat_template: bool | None) -> Callable[[PromptExample], str]:
    if tokenizer is None:
        return lambda ex: render_prompt(None, ex, use_chat_template=False)
    return lambda ex: render_prompt(tokenizer, ex, use_chat_template)


def make_reward_recomputer(
    reward_functions: Sequence[RewardFunction],
    examples: Sequence[PromptExample],
    *,
    tokenizer=None,
    use_chat_template: bool | None = None,
) -> Callable[[RewardProof], dict[str, float | None]]:
    """``recompute(proof) -> {name: value or None}``: every reward function called, as the trainer
    calls it, on the proof's completion text and token ids, the dataset row's columns and its
    rendered prompt (plain text when no tokenizer is given; the built-in rewards ignore it)."""
    by_index = _index_examples(examples)
    render = _renderer(tokenizer, use_chat_template)
    rendered: dict[int, str] = {}
    functions = list(reward_functions)

    def recompute(proof: RewardProof) -> dict[str, float | None]:
        ex = by_index.get(proof.prompt_index)
        if ex is None:
            raise KeyError(f"prompt {proof.prompt_index} is not in the dataset")
        prompt = rendered.get(ex.index)
        if prompt is None:
            prompt = rendered[ex.index] = render(ex)
        ids = proof.completion_token_ids[:] or [0] * proof.num_completion_tokens  # [:]: a list, at C level
        text = proof.completion_text
        out: dict[str, float | None] = {}
        for rf in functions:
            kwargs = {"prompts": [prompt], "completions": [text],
                      "completion_ids": [ids], **{k: [v] for k, v in ex.columns.items()}}
            values = rf.fn(**kwargs)
            if not isinstance(values, (list, tuple)) or len(values) != 1:
                raise ValueError(f"reward function {rf.name!r} did not return one value")
            v = values[0]
            if v is None:
                out[rf.name] = None
                continue
            if type(v) is not float and type(v) is not int and not isinstance(v, numbers.Real):
                raise ValueError(f"reward function {rf.name!r} returned {type(v).__name__}")
            v = float(v)
            out[rf.name] = None if v != v else v
        return out

    return recompute


def make_decoder(tokenizer) -> Callable[[Sequence[int]], str]:
    """Token ids → completion text exactly as :meth:`GRPOTrainer.score` decodes them
    (``tokenizer.batch_decode(ids, skip_special_tokens=True)``, one sequence at a time).

    For a plain tokenizers-backed tokenizer (``decode`` / ``_decode`` not overridden, no clean-up of
    tokenization spaces) that wrapper only calls ``backend_tokenizer.decode(ids,
    skip_special_tokens=True)``; the decoder then calls the backend itself (3-4x faster) after
    checking on probe sequences that both give the same strings. Any other tokenizer is called
    through ``decode``."""

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    backend = _plain_backend(tokenizer)
    if backend is None:
        return decode
    backend_decode = backend.decode

    def fast_decode(ids: Sequence[int]) -> str:
        return backend_decode(list(ids), skip_special_tokens=True)

    n = len(tokenizer)
    specials = list(tokenizer.all_special_ids)
    probes = [[], specials, list(range(min(n, 512))), list(range(max(0, n - 64), n))[::-1],
              [i for s in specials for i in (s, 7 % n, s)]]
    try:
        same = all(fast_decode(p) == decode(p) for p in probes)
    except Exception:  # noqa: BLE001 - anything unexpected: keep the tokenizer's own path
        same = False
    return fast_decode if same else decode


def _plain_backend(tokenizer):
    """The tokenizers.Tokenizer behind ``tokenizer`` when its ``decode`` is exactly the backend's."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    cls = type(tokenizer)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    if (cls.decode is not PreTrainedTokenizerBase.decode or cls._decode is not PreTrainedTokenizerFast._decode
            or cls.batch_decode is not PreTrainedTokenizerBase.batch_decode):
        return None
    if any(name in vars(tokenizer) for name in ("decode", "_decode", "batch_decode")):
        return None  # patched on the instance
    if getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None  # the wrapper post-processes the text (or warns and does not): not the backend's string
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or backend is not getattr(tokenizer, "backend_tokenizer", None):
        return None
    return backend


def make_prompt_hasher(tokenizer, examples: Sequence[PromptExample],
                       use_chat_template: bool | None = None) -> Callable[[int], bytes]:
    """Dataset index → SHA-256 of its rendered prompt (what a proof's ``prompt_sha256`` must be)."""
    by_index = _index_examples(examples)
    render = _renderer(tokenizer, use_chat_template)
    cache: dict[int, bytes] = {}

    def prompt_sha256(index: int) -> bytes:
        if index not in cache:
            ex = by_index.get(index)
            if ex is None:
                return b""
            cache[index] = prompt_hash(render(ex))
        return cache[index]

    return prompt_sha256


ModelSource = Any  # a PreTrainedModel, or a callable (version, snapshot_sha256) -> PreTrainedModel


def make_logprob_fn(
    model: ModelSource,
    tokenizer,
    examples: Sequence[PromptExample],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    use_chat_template: bool | None = None,
    run_seed: int | None = None,
) -> Callable[[RewardProof], Recomputed]:
    """The spot-check: ``logprob_fn(proof)`` → per-token log-probabilities of the proof's completion
    under the policy, as the sampler computed them (temperature, then top-k, then top-p:
    :func:`rollout.processed_logprobs`), from **one prefill pass** over prompt + completion; with
    ``run_seed``, also each position's sampling shortfall under the run's keyed noise
    (:func:`.noise.shortfalls`: 0 where the token is the argmax the sampler must have drawn).

    ``model`` is the policy, or ``model(version, snapshot_sha256)`` returning the weights of the
    proof's claimed version (:func:`snapshot_loader`), which raises SpotCheckUnavailable when it has
    none. Prompts are rendered and tokenised as the trainer does."""
    by_index = _index_examples(examples)
    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k)
    prompt_ids: dict[int, list[int]] = {}

    def model_for(proof: RewardProof):
        if callable(model) and not isinstance(model, torch.nn.Module):
            return model(proof.policy.version, bytes(proof.policy.sha256))
        return model

    @torch.no_grad()
    def logprob_fn(proof: RewardProof) -> list[float]:
        ex = by_index.get(proof.prompt_index)
        if ex is None:
            raise KeyError(f"prompt {proof.prompt_index} is not in the dataset")
        if ex.index not in prompt_ids:
            text = render_prompt(tokenizer, ex, use_chat_template)
            prompt_ids[ex.index] = tokenizer(text, add_special_tokens=False).input_ids
        prompt = prompt_ids[ex.index]
        completion = list(proof.completion_token_ids)
        m = model_for(proof)
        was_training = m.training
        m.eval()
        n = len(completion)
        try:
            ids = torch.tensor([prompt + completion], dtype=torch.long, device=m.device)
            with full_precision():  # float32 like the sampler, whatever the caller's autocast or matmul settings
                try:  # the LM head only where it scores a completion token (positions P-1 .. P+n-2)
                    logits = m(input_ids=ids, logits_to_keep=n + 1).logits[0, :-1]
                except TypeError:  # a model without logits_to_keep
                    logits = m(input_ids=ids).logits[0, len(prompt) - 1 : -1]
                logps = processed_logprobs(logits, params)
        finally:
            if was_training:
                m.train()
        target = torch.tensor(completion, dtype=torch.long, device=logps.device)
        chosen = logps.gather(1, target[:, None]).squeeze(1).float().cpu().tolist()
        if run_seed is None:
            return Recomputed(chosen)
        key = row_key(run_seed, node_id_from_public_key(proof.node_public_key), proof.round_index, proof.prompt_index,
                      proof.completion_index)
        g = completion_noise(key, n, logps.size(-1), logps.device)
        return Recomputed(chosen, shortfalls(logps, g, target).cpu().tolist())

    return logprob_fn


# ---- snapshots -----------------------------------------------------------------------------------
def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 of a state dict in a canonical form: for each tensor, by name ascending,
    ``u32(len(name)) || name || u32(len(dtype)) || dtype || u32(ndim) || u64(dim)... || raw bytes``
    (contiguous, native little-endian). Tied weights are hashed under each name."""
    h = hashlib.sha256(version_file.DOMAIN)
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(version_file.tensor_prefix(name, str(t.dtype), t.shape))
        if t.numel():  # the tensor's own bytes, not a copy (0-dim: one element)
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.digest()


def save_snapshot(model, directory: str | os.PathLike) -> bytes:
    """Save the model's weights as ``<directory>/<sha256 hex>.safetensors``; returns the hash."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    sha = state_dict_sha256(state)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{sha.hex()}.safetensors"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(state, str(tmp))
        os.replace(tmp, path)
    return sha


def snapshot_loader(base_model, directory: str | os.PathLike | None = None, *, keep: int = 2,
                    known: Mapping[bytes, Any] | None = None) -> Callable[[int, bytes], Any]:
    """``load(version, sha256)`` → a model holding exactly those weights: one of ``known``
    ({sha256: model}, looked up at each call), ``base_model`` if its weights (when the loader was
    made) have that hash, else
    ``<directory>/<hex>.safetensors`` loaded into a copy of ``base_model`` (its content hash
    checked; the ``keep`` most recent copies are cached). SpotCheckUnavailable if none matches."""
    from safetensors.torch import load_file

    known = known if known is not None else {}  # read live: versions may be added later
    base_sha = state_dict_sha256(base_model.state_dict())
    cache: OrderedDict[bytes, Any] = OrderedDict()

    def load(version: int, sha256: bytes):
        if sha256 in known:
            return known[sha256]
        if sha256 == base_sha:
            return base_model
        if sha256 in cache:
            cache.move_to_end(sha256)
            return cache[sha256]
        path = Path(directory) / f"{sha256.hex()}.safetensors" if directory is not None else None
        if path is None or not path.is_file():
            raise SpotCheckUnavailable(f"no snapshot of version {version} ({sha256.hex()[:12]}...)")
        state = load_file(str(path))
        if state_dict_sha256(state) != sha256:
            raise SpotCheckUnavailable(f"snapshot file {path.name} does not hash to its name")
        m = copy.deepcopy(base_model)
        m.load_state_dict(model_weights(state), strict=True)  # a swarm version also carries optimizer state
        m.eval()
        cache[sha256] = m
        while len(cache) > keep:
            cache.popitem(last=False)
        return m

    return load


# ---- audit hooks ---------------------------------------------------------------------------------
def policy_checks_sampling(run: Mapping[str, Any]) -> bool:
    """Whether a run's verifier checks sampling (its policy has a ``sampling_tolerance``)."""
    return (run.get("policy") or {}).get("sampling_tolerance") is not None and "run_seed" in run

def load_tokenizer(spec: str):
    """The tokenizer of a model spec without loading its weights where that is possible."""
    from .models import build_char_tokenizer, gguf_cache_dir, smollm2_gguf_path

    if spec == "tiny" or spec.startswith("tiny:"):
        return build_char_tokenizer()
    from transformers import AutoTokenizer

    if spec == "smollm2" or spec.endswith(".gguf"):
        path = smollm2_gguf_path() if spec == "smollm2" else Path(spec).expanduser()
        cache = gguf_cache_dir(path)
        # from the dequantised cache when it is there, else from the GGUF file's own metadata (a few
        # seconds: no weights are dequantised, ~15 s more)
        tok = (AutoTokenizer.from_pretrained(cache, local_files_only=True)
               if (cache / "tokenizer_config.json").is_file() else
               AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    return AutoTokenizer.from_pretrained(spec, local_files_only=True)


def audit_hooks(run: Mapping[str, Any], *, model: str | None = None, snapshots: str | None = None,
                allow_plugin_rewards: bool = False) -> AuditHooks:
    """Build the verifier callables for a logged run (the ``grpo_swarm.audit_hooks`` entry point).

    ``run`` is the ``run_started`` payload; its ``"node"`` object names the dataset
    (``{"spec", "split", "seed", "size"}``), the model spec (for the tokenizer), the sampling
    settings and ``use_chat_template``. Reward functions are the policy's ``reward_specs``; only
    built-ins unless ``allow_plugin_rewards`` (a log must not make the auditor import code).
    ``model`` (a model spec) enables the spot-checks; ``snapshots`` is a folder of
    :func:`save_snapshot` files for versions other than the model's own weights."""
    from .models import load_model

    notes: list[str] = []
    node = dict(run.get("node") or {})
    specs = list((run.get("policy") or {}).get("reward_specs") or [])
    hooks = AuditHooks(notes=notes)
    ds = node.get("dataset")
    if not isinstance(ds, Mapping) or "spec" not in ds:
        notes.append("run_started names no dataset: rewards, prompt hashes and spot-checks not replayed")
        return hooks
    examples = load_dataset_spec(str(ds["spec"]), split=str(ds.get("split", "train")), seed=int(ds.get("seed", 0)),
                                 size=int(ds.get("size", 10000)))
    unknown = [s.get("name") for s in specs if s.get("name") not in BUILTIN_REWARDS]
    if unknown and not allow_plugin_rewards:
        notes.append(f"rewards {unknown} are plugins: pass --allow-plugin-rewards to import them")
    else:
        hooks.reward_recomputer = make_reward_recomputer(build_reward_functions(specs), examples)
    use_chat = node.get("use_chat_template")
    model_spec = node.get("model")
    tokenizer = None
    if model_spec:
        try:
            tokenizer = load_tokenizer(str(model_spec))
        except Exception as e:  # noqa: BLE001 - report, replay the rest
            notes.append(f"tokenizer of {model_spec!r} unavailable ({type(e).__name__}: {e}): decoding and prompt "
                         "hashes not replayed")
    if tokenizer is not None:
        hooks.decode_fn = make_decoder(tokenizer)
        hooks.prompt_sha256_fn = make_prompt_hasher(tokenizer, examples, use_chat)
    if model is not None:
        loaded = load_model(model)
        sampling = dict(node.get("sampling") or {})
        source = snapshot_loader(loaded.model, snapshots)
        hooks.logprob_fn = make_logprob_fn(
            source, loaded.tokenizer, examples, temperature=float(sampling.get("temperature", 1.0)),
            top_p=float(sampling.get("top_p", 1.0)), top_k=int(sampling.get("top_k", 0)), use_chat_template=use_chat,
            run_seed=int(run["run_seed"]) if policy_checks_sampling(run) else None)
    return hooks
