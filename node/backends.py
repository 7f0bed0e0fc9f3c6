"""Choosing the generation backend from the configuration."""

from __future__ import annotations

from pathlib import Path

import torch

from .rollout import RolloutBackend, TransformersBackend, eos_and_pad_ids

BACKENDS = ("transformers", "vllm", "auto")


def resolve_backend(requested: str, device: str = "auto") -> str:
    """``transformers`` or ``vllm`` for ``grpo-node join --backend requested --device device``; ``auto``
    is vllm on CUDA when vLLM imports, else transformers. Raises ValueError saying what is missing."""
    from .rollout_vllm import _import_vllm, vllm_importable

    if requested not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "transformers":
        return requested
    gpu = device != "cpu" and torch.cuda.is_available()
    if requested == "auto":
        return "vllm" if gpu and vllm_importable() else "transformers"
    if device == "cpu":
        raise ValueError("--backend vllm needs a GPU: use --device cuda or auto")
    try:
        _import_vllm()
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    return "vllm"


def make_backend(cfg, model, tokenizer) -> RolloutBackend:
    """``TransformersBackend`` unless ``cfg.model.backend == "vllm"``.

    EOS and pad ids come from :func:`rollout.eos_and_pad_ids`. The vLLM engine
    loads the policy from ``cfg.model.name`` when that is a local folder, else from a copy of
    ``model`` saved under ``<run.output_dir>/vllm-init`` (tiny models, GGUF files, hub ids).
    """
    eos, pad_id = eos_and_pad_ids(model, tokenizer)

    kind = cfg.model.backend
    if kind == "transformers":
        return TransformersBackend(model, eos, pad_id)
    if kind != "vllm":
        raise ValueError(f"model.backend must be 'transformers' or 'vllm', got {kind!r}")

    from .rollout_vllm import VLLMBackend, _import_vllm

    _import_vllm()  # fail before writing a copy of the model
    source = Path(cfg.model.name).expanduser()
    if not source.is_dir():
        source = Path(cfg.run.output_dir) / "vllm-init"
        model.save_pretrained(source)
    return VLLMBackend(str(source), eos, pad_id, seed=cfg.run.seed)  # (float32 whatever model.dtype says)
