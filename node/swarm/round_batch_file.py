"""A round's accepted batch on disk, so that a node restarted after its round closed still averages it.

Between SubmitProofs and the averaging a node holds the only copy of what its gradient rests on:
the accepted groups' completions, behaviour log-probs, rewards and advantages. A node killed then
(out of memory, a reboot) used to come back with its final ticket and nothing to average:
its verified work was lost, and in a pair the partner could not average alone either. The batch is
written once its groups are accepted (safetensors for the tensors, JSON for the rest: nothing here
is unpickled) and removed once the round's averaging has ended, whatever its outcome, or once the
node told the coordinator it is leaving (a Ctrl-C: its groupmates then go on without it). A restarted
node that finds it, with the coordinator still on that round's version and holding this node's
final ticket, computes the same gradient and joins the round's averaging (:meth:`.join.SwarmPeer.round`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..rewards import RewardResult
from ..rollout import RolloutBatch
from ..trainer import ScoredBatch

log = logging.getLogger(__name__)

FILE_NAME = "round_batch.safetensors"
FORMAT = "grpo-swarm/round-batch/v1"


@dataclass
class SavedRound:
    round_index: int
    version: int  # the policy version the round's gradient is taken at
    batch: ScoredBatch


def save_round_batch(path: Path, round_index: int, version: int, batch: ScoredBatch) -> None:
    """Write ``batch`` (accepted groups only) atomically: a kill mid-write leaves the old file or none."""
    r, rw = batch.rollouts, batch.rewards
    tensors = {"completion_ids": r.completion_ids, "completion_mask": r.completion_mask,
               "behaviour_logps": r.behaviour_logps, "truncated": r.truncated,
               "rewards_per_function": rw.per_function, "rewards_total": rw.total,
               "advantages": batch.advantages, "seq_weights": batch.seq_weights}
    tensors |= {f"prompt_ids.{i}": p for i, p in enumerate(r.prompt_ids)}
    meta = {"format": FORMAT, "round_index": round_index, "version": version, "group_size": r.group_size,
            "policy_version": r.policy_version, "num_prompts": len(r.prompt_ids), "reward_names": list(rw.names),
            "completions": list(batch.completions)}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"round": json.dumps(meta)})
    os.replace(tmp, path)


def load_round_batch(path: Path) -> SavedRound | None:
    """The saved round, or None when there is none; a file that does not read as one is removed
    (logged): it was torn or is not ours, and the round is then lost as before."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["round"])
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, not {FORMAT!r}")
            t = {k: f.get_tensor(k) for k in f.keys()}
        prompts = [t[f"prompt_ids.{i}"] for i in range(int(meta["num_prompts"]))]
        rollouts = RolloutBatch(prompt_ids=prompts, completion_ids=t["completion_ids"],
                                completion_mask=t["completion_mask"], behaviour_logps=t["behaviour_logps"],
                                truncated=t["truncated"], group_size=int(meta["group_size"]),
                                policy_version=int(meta["policy_version"]))
        rows = rollouts.completion_ids.size(0)
        if rows != len(prompts) * rollouts.group_size or t["advantages"].shape != (rows,):
            raise ValueError(f"{rows} completions for {len(prompts)} prompts of {rollouts.group_size}")
        batch = ScoredBatch(rollouts=rollouts,
                            rewards=RewardResult(t["rewards_per_function"], t["rewards_total"],
                                                 [str(n) for n in meta["reward_names"]]),
                            advantages=t["advantages"], seq_weights=t["seq_weights"],
                            completions=[str(c) for c in meta["completions"]])
        return SavedRound(int(meta["round_index"]), int(meta["version"]), batch)
    except Exception as e:  # noqa: BLE001 - whatever is wrong with it, the round cannot be resumed
        log.warning("removing %s: it does not read as a saved round (%s: %s)", path, type(e).__name__, e)
        drop_round_batch(path)
        return None


def drop_round_batch(path: Path) -> None:
    path.unlink(missing_ok=True)
