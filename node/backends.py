"""Choosing the generation backend from the configuration."""

from __future__ import annotations

from pathlib import Path

from .rollout import RolloutBackend, TransformersBackend, eos_and_pad_ids


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
    return VLLMBackend(str(source), eos, pad_id, dtype=cfg.model.dtype, seed=cfg.run.seed)
