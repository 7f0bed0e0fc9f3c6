"""``grpo-coordinator``: the coordinator's command line.

* ``init [PATH]`` writes the commented example run config (default ``run.toml``); refuses to
  overwrite an existing file unless ``--force``.
* ``check-config PATH`` validates a run config and prints a summary; exit 2 with the field named
  on error. Reward functions are resolved too (``--no-resolve-rewards`` skips that; it imports torch).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from .config import ConfigError, load_run_config, resolve_rewards, template_text

app = typer.Typer(help="grpo-swarm coordinator: run configs (the gRPC service comes next).", no_args_is_help=True,
                  pretty_exceptions_enable=False)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True, highlight=False)


@app.callback()
def main() -> None:
    """grpo-swarm coordinator."""


@app.command()
def init(
    path: Path = typer.Argument(Path("run.toml"), help="where to write the example run config"),
    force: bool = typer.Option(False, "--force", "-f", help="overwrite an existing file"),
) -> None:
    """Write a commented example run config."""
    if path.exists() and not force:
        err.print(f"[red]refusing to overwrite[/red] {path} (use --force)")
        raise typer.Exit(1)
    if path.exists() and not path.is_file():
        err.print(f"[red]not a file:[/red] {path}")
        raise typer.Exit(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(template_text())
    err.print(f"wrote {path}; edit it, then: grpo-coordinator check-config {path}")


@app.command("check-config")
def check_config(
    path: Path = typer.Argument(..., help="run config (TOML)"),
    resolve: bool = typer.Option(True, "--resolve-rewards/--no-resolve-rewards",
                                 help="also import every reward function (and check its args)"),
) -> None:
    """Validate a run config and print a summary (exit 2 naming the field on error)."""
    try:
        cfg = load_run_config(path)
        if resolve:
            resolve_rewards(cfg, str(path))
    except ConfigError as exc:
        err.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2)
    g, s = cfg.grpo, cfg.swarm
    eps = f"ε={g.epsilon:g}" + (f" ε_high={g.epsilon_high:g}" if g.epsilon_high is not None else "")
    data = f"{cfg.data.dataset} [{cfg.data.split}]" + (f" first {cfg.data.size}" if cfg.data.size else "")
    lines = [
        f"run        {cfg.run.id} (seed {cfg.run.seed})",
        f"model      {cfg.model.name}" + (f"@{cfg.model.revision}" if cfg.model.revision else "")
        + f" ({cfg.model.dtype})",
        f"data       {data}",
        "rewards    " + ", ".join(f"{r.weight:g}×{r.name}" for r in cfg.rewards),
        f"grpo       G={g.group_size} loss={g.loss_type} {eps}"
        + (f" δ={g.delta:g}" if g.delta is not None else "") + f" β={g.beta:g} lr={cfg.optim.lr:g}"
        + f" max_completion={g.max_completion_length} T={g.temperature:g}",
        f"swarm      {s.prompts_per_round} prompts/node/round, {s.samples_per_round} samples/round,"
        f" η={s.max_staleness}, spot-check p={s.spot_check_rate:g}, min peers {s.min_peers},"
        f" averaging timeouts {s.matchmaking_timeout_s:g}s/{s.averaging_timeout_s:g}s",
        f"{path}: OK",
    ]
    for line in lines:
        out.print(line, markup=False)


if __name__ == "__main__":  # pragma: no cover
    app()
