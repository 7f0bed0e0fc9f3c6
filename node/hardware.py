"""What this machine can hold: probe the device's free memory and size the training micro-batch.

``probe(device)`` reads free memory from ``torch.cuda.mem_get_info`` on a GPU and from psutil's
available memory on a CPU. ``fit_groups_per_microbatch`` picks the largest number of prompt groups
per micro-batch whose activations fit in a fraction of what is left after the weights, gradients,
AdamW moments and the reference model. The micro-batch changes memory use only, never the
gradient (the loss is normalised over the whole step), so a node may pick its own.

The activation model is an estimate per token and layer — the residual stream, attention
projections and MLP intermediates kept for the backward pass — plus the vocabulary log-softmax
of the rows being scored; it errs on the large side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

USABLE_FRACTION = 0.6  # of the free memory left after the fixed costs; the rest is slack for the allocator


@dataclass(frozen=True)
class Hardware:
    device: str  # "cpu" or "cuda:N"
    name: str
    total_bytes: int
    free_bytes: int
    cpu_count: int


def probe(device: str = "auto") -> Hardware:
    """The device a node would train on, with its free memory now."""
    import psutil

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cpus = psutil.cpu_count(logical=True) or 1
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda was asked for, but torch sees no CUDA device (a CPU build of torch, "
                               "or no driver): use --device cpu")
        index = torch.device(device).index or 0
        free, total = torch.cuda.mem_get_info(index)
        return Hardware(f"cuda:{index}", torch.cuda.get_device_name(index), int(total), int(free), cpus)
    mem = psutil.virtual_memory()
    return Hardware("cpu", "cpu", int(mem.total), int(mem.available), cpus)


def activation_bytes_per_token(model: torch.nn.Module, dtype_bytes: int) -> int:
    """Estimated bytes kept per trained token for the backward pass."""
    c = model.config
    layers, hidden = int(c.num_hidden_layers), int(c.hidden_size)
    inter = int(getattr(c, "intermediate_size", 4 * hidden))
    heads = int(getattr(c, "num_attention_heads", 1))
    kv_heads = int(getattr(c, "num_key_value_heads", heads) or heads)
    head_dim = int(getattr(c, "head_dim", None) or hidden // heads)
    # per layer: norms and residuals (~4 h), q/k/v/o (~h + 3 kv), gate/up/act/down input (~4 i)
    per_layer = 4 * hidden + hidden + 3 * kv_heads * head_dim + 4 * inter
    return layers * per_layer * dtype_bytes + int(c.vocab_size) * 4  # + one float32 row of log-softmax


def fixed_bytes(model: torch.nn.Module, ref_model: torch.nn.Module | None) -> int:
    """Weights + gradients + AdamW's two moments (float32) + the reference model's weights."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ref = sum(p.numel() * p.element_size() for p in ref_model.parameters()) if ref_model is not None else 0
    return params + trainable * (4 + 8) + ref


def fit_groups_per_microbatch(model: torch.nn.Module, ref_model: torch.nn.Module | None, *, free_bytes: int,
                              group_size: int, tokens_per_sequence: int, max_groups: int, dtype_bytes: int = 4
                              ) -> int:
    """The largest number of groups (1..max_groups) whose activations fit; raises MemoryError when
    not even one group fits, naming what to change."""
    budget = (free_bytes - fixed_bytes(model, ref_model)) * USABLE_FRACTION
    per_group = activation_bytes_per_token(model, dtype_bytes) * group_size * tokens_per_sequence
    groups = int(budget // per_group) if budget > 0 else 0
    if groups < 1:
        need = fixed_bytes(model, ref_model) + per_group / USABLE_FRACTION
        raise MemoryError(f"one group of {group_size} x {tokens_per_sequence} tokens needs about "
                          f"{need / 2**30:.1f} GiB, {free_bytes / 2**30:.1f} GiB is free: use a smaller "
                          "model or completion length, or another device")
    return min(groups, max_groups)
