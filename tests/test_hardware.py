"""node/hardware.py: the free-memory probe and the micro-batch that fits it (tiny and SmolLM2-sized
models built from their configs, no weights loaded from anywhere)."""

from __future__ import annotations

import psutil
import pytest
import torch

from grpo_swarm.node.hardware import (
    activation_bytes_per_token,
    fit_groups_per_microbatch,
    fixed_bytes,
    probe,
)
from grpo_swarm.node.models import build_tiny_model


def test_probe_cpu_reports_available_memory():
    hw = probe("cpu")
    assert hw.device == "cpu" and hw.cpu_count >= 1
    assert 0 < hw.free_bytes <= hw.total_bytes == psutil.virtual_memory().total
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="--device cpu"):
            probe("cuda")
        assert probe("auto").device == "cpu"


def test_microbatch_grows_with_memory_and_refuses_what_cannot_fit():
    model = build_tiny_model(0).model
    fixed = fixed_bytes(model, None)
    per_token = activation_bytes_per_token(model, 4)
    assert fixed > sum(p.numel() for p in model.parameters()) * 16 - 1  # weights, grads, two moments
    per_group = per_token * 8 * 40
    fits = [fit_groups_per_microbatch(model, None, free_bytes=fixed + int(n * per_group / 0.6) + 1, group_size=8,
                                      tokens_per_sequence=40, max_groups=64) for n in (1, 2, 5, 20, 1000)]
    assert fits == [1, 2, 5, 20, 64]
    with pytest.raises(MemoryError, match="GiB is free"):
        fit_groups_per_microbatch(model, None, free_bytes=fixed, group_size=8, tokens_per_sequence=40, max_groups=8)
    # a reference model costs its weights
    assert fixed_bytes(model, model) == fixed + sum(p.numel() * 4 for p in model.parameters())
