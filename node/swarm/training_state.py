"""What a swarm version is: the policy's weights *and* its optimizer state (AdamW moments and
step counts, the LR schedule's position), in one safetensors file whose state-dict hash is what
peers report and the coordinator publishes; a node uploads it in canonical form straight from the
live tensors (:func:`version_file`).

Every honest peer applies the same averaged gradient with the same optimizer state, so all of
them compute bit-identical versions; a peer that loads a published version (it joined late, was
left out of a round, or lost a vote) takes the moments too, so its next step is the others' step.
Optimizer tensors live under ``optimizer/`` keys; model loaders skip them
(:func:`model_weights`). Version 0 (the coordinator's initial snapshot) has none: a fresh AdamW.
"""

from __future__ import annotations

from typing import Mapping

import torch

from grpo_swarm.protocol.version_file import CODE_OF_TORCH_NAME, Entry, VersionFileWriter

OPTIMIZER_PREFIX = "optimizer/"
_MOMENTS = ("exp_avg", "exp_avg_sq", "step")


def model_weights(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own tensors of a snapshot (optimizer state left out)."""
    return {k: v for k, v in tensors.items() if not k.startswith(OPTIMIZER_PREFIX)}


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list,
                   scheduler=None) -> dict[str, torch.Tensor]:
    """Weights + optimizer state as contiguous CPU tensors (what a version file holds): the live
    ones, not copies (tied weights share storage)."""
    def live(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().contiguous()  # (a GPU tensor is copied anyway)

    out = {k: live(v) for k, v in model.state_dict().items()}
    for i, p in enumerate(params):
        state = optimizer.state.get(p) or {}
        for name in _MOMENTS:
            if name in state:
                t = state[name]
                t = t if torch.is_tensor(t) else torch.tensor(float(t))
                out[f"{OPTIMIZER_PREFIX}{i}/{name}"] = live(t)
    if scheduler is not None:
        out[f"{OPTIMIZER_PREFIX}scheduler_last_epoch"] = torch.tensor(int(scheduler.last_epoch), dtype=torch.int64)
    return out


def version_file(state: Mapping[str, torch.Tensor]) -> VersionFileWriter:
    """The canonical version file of ``state`` (:mod:`grpo_swarm.protocol.version_file`), read from
    the tensors where they are: nothing is copied or written until its chunks are taken. Tied
    weights need no copy (their bytes appear under each name). The tensors must not change while
    the writer is in use."""
    tensors = []
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        code = CODE_OF_TORCH_NAME.get(str(t.dtype))
        if code is None:
            raise ValueError(f"{name}: a version file cannot hold {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        tensors.append((Entry(name, code, tuple(t.shape), t.numel() * t.element_size()), memoryview(raw)))
    return VersionFileWriter(tensors)


def load_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list,
                        tensors: Mapping[str, torch.Tensor], scheduler=None) -> None:
    """Load a version file's tensors: the weights (strict), and the optimizer state it carries —
    none means a fresh optimizer (version 0)."""
    model.load_state_dict(model_weights(tensors), strict=True)
    optimizer.state.clear()
    for i, p in enumerate(params):
        state = {}
        for name in _MOMENTS:
            t = tensors.get(f"{OPTIMIZER_PREFIX}{i}/{name}")
            if t is None:
                continue
            expected = () if name == "step" else tuple(p.shape)
            if tuple(t.shape) != expected or not torch.is_floating_point(t):
                raise ValueError(f"version file: {OPTIMIZER_PREFIX}{i}/{name} has shape {tuple(t.shape)} and dtype "
                                 f"{t.dtype}, expected {expected} floating point")
            state[name] = t.to(p.device).clone() if name != "step" else t.clone()
        if state:
            optimizer.state[p] = state
    if scheduler is not None:
        last = tensors.get(f"{OPTIMIZER_PREFIX}scheduler_last_epoch")
        scheduler.last_epoch = int(last) if last is not None else 0
        for group, lr in zip(optimizer.param_groups, scheduler.get_lr() if last is not None else scheduler.base_lrs):
            group["lr"] = lr
