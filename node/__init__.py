"""grpo_swarm.node: everything one peer runs: models, data, rollouts, rewards, GRPO math, trainer, CLI."""
