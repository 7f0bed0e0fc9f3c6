"""A node's view of a swarm run: the single-node :class:`TrainConfig` and dataset that a
coordinator's run config (``RegisterResponse.run_config_json``) implies.

The run config's ``[data]``, ``[[rewards]]``, ``[grpo]`` and ``[optim]`` sections are the node's
own; ``swarm.prompts_per_round`` becomes ``grpo.prompts_per_step``; the model is loaded in float32
on CPU unless the node overrides ``model.dtype``/``model.device``. The dataset is loaded exactly as
the coordinator loads it (seed = run seed), so prompt indices and prompt hashes agree.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from pydantic import ValidationError

from .config import ConfigError, TrainConfig, _format_validation, apply_overrides
from .data import PromptExample, load_dataset_spec

DEFAULT_DATASET_SIZE = 10000


def train_config_from_run(run: Mapping[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """The node config of a run config dict (``--set``-style ``overrides`` applied last)."""
    data = dict(run["data"])
    data.pop("size", None)
    grpo = dict(run["grpo"])
    grpo["prompts_per_step"] = run["swarm"]["prompts_per_round"]
    doc = {
        "model": {"name": run["model"]["name"]},
        "data": data,
        "rewards": [dict(r) for r in run["rewards"]],
        "grpo": grpo,
        "optim": dict(run["optim"]),
        "run": {"seed": run["run"]["seed"] % (2**63)},
    }
    doc = apply_overrides(doc, list(overrides))
    try:
        return TrainConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, "run config")) from None


def run_examples(run: Mapping[str, Any]) -> list[PromptExample]:
    """The run's dataset as the coordinator loads it."""
    d = run["data"]
    return load_dataset_spec(d["dataset"], split=d["split"], seed=run["run"]["seed"],
                             size=d.get("size") or DEFAULT_DATASET_SIZE)
