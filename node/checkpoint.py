"""Checkpoints as safetensors: model weights, AdamW state and a JSON of the trainer's counters.

Layout of a checkpoint folder::

    model.safetensors       model weights (shared/tied tensors stored once)
    optimizer.safetensors   AdamW moments, keyed "<param name>.exp_avg" / ".exp_avg_sq" / ".step"
    trainer.json            step, policy version, sampler state, the config used

Nothing is pickled, so a checkpoint from an untrusted peer cannot run code when loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "trainer.json"


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for param, state in optimizer.state.items():
        name = names[id(param)]
        for key, value in state.items():
            out[f"{name}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return out


def load_optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict) -> None:
    by_name = dict(model.named_parameters())
    for key, value in tensors.items():
        name, field = key.rsplit(".", 1)
        if name not in by_name:
            raise ValueError(f"optimizer state for unknown parameter {name!r}")
        param = by_name[name]
        optimizer.state[param][field] = value.to(param.device) if field != "step" else value


def save_checkpoint(folder: Path, model, optimizer, state: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / MODEL_FILE))
    save_file(optimizer_tensors(model, optimizer), str(folder / OPTIM_FILE))
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    return folder


def load_checkpoint(folder: Path, model, optimizer=None) -> dict:
    folder = Path(folder)
    for name in (MODEL_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no {name}")
    missing, unexpected = load_model(model, str(folder / MODEL_FILE), strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {folder}: weights not in the model: {sorted(unexpected)[:5]}")
    if optimizer is not None and (folder / OPTIM_FILE).is_file():
        load_optimizer_tensors(model, optimizer, load_file(str(folder / OPTIM_FILE)))
    return json.loads((folder / STATE_FILE).read_text())
