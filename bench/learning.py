"""How fast the embedded CPU demo learns: mean reward over time for the tiny model on arithmetic.

    HF_HUB_OFFLINE=1 python bench/learning.py [--steps 300] [--threads 2] [--set KEY=VALUE ...]

Runs the embedded demo config (``node/configs/arithmetic-demo.toml``) and prints one JSON line:
the mean reward of the first 10 steps, the first step (and wall-clock second) at which the
10-step moving average reaches 0.8, and the mean of the last 10 steps. Target: from ≤ 0.1 to
≥ 0.8 within 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from grpo_swarm.node.config import load_config  # noqa: E402
from grpo_swarm.node.training_run import run_training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="learning-")
    cfg = load_config(None, [f"run.steps={args.steps}", f"run.threads={args.threads}",
                             f"run.output_dir='{out}'", *args.overrides])
    rewards, times = [], []
    start = time.perf_counter()

    def on_step(m: dict) -> None:
        rewards.append(m["reward_mean"])
        times.append(time.perf_counter() - start)
        if m["step"] % 25 == 0:
            print(f"step {m['step']}: reward {m['reward_mean']:.3f} ({times[-1]:.1f} s)", file=sys.stderr)

    run_training(cfg, on_step=on_step)
    reached = next((i for i in range(9, len(rewards)) if sum(rewards[i - 9:i + 1]) / 10 >= args.target), None)
    print(json.dumps({
        "model": cfg.model.name, "dataset": cfg.data.dataset, "threads": args.threads,
        "first10_reward_mean": sum(rewards[:10]) / 10,
        "target": args.target,
        "step_reaching_target": None if reached is None else reached + 1,
        "seconds_to_target": None if reached is None else times[reached],
        "last10_reward_mean": sum(rewards[-10:]) / 10,
        "steps": len(rewards), "total_seconds": times[-1],
        "config": {"group_size": cfg.grpo.group_size, "prompts_per_step": cfg.grpo.prompts_per_step,
                   "lr": cfg.optim.lr, "loss_type": cfg.grpo.loss_type},
    }))


if __name__ == "__main__":
    main()
