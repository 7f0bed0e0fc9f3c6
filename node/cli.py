"""``grpo-node``: the node's command line (``train`` runs single-node GRPO, no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .config import ConfigError, load_config

app = typer.Typer(help="grpo-swarm node: GRPO training on this machine.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console(stderr=True, soft_wrap=True)


@app.callback()
def main() -> None:
    """grpo-swarm node."""


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML config; default: the embedded CPU demo"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override, e.g. --set grpo.lr=1e-5 (repeatable)"),
    model: Optional[str] = typer.Option(None, help="shortcut for --set model.name=..."),
    dataset: Optional[str] = typer.Option(None, help="shortcut for --set data.dataset=..."),
    steps: Optional[int] = typer.Option(None, help="shortcut for --set run.steps=..."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="shortcut for --set run.output_dir=..."),
    resume: Optional[Path] = typer.Option(None, help="resume from a checkpoint folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Train a policy with GRPO on this machine alone (no network)."""
    overrides = list(set_)
    for key, value in (("model.name", model), ("data.dataset", dataset), ("run.steps", steps),
                       ("run.output_dir", output_dir)):
        if value is not None:
            overrides.append(f"{key}={_toml_value(value)}")
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2)

    from .training_run import run_training  # heavy imports only when training

    progress = Progress(TextColumn("[bold]GRPO"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("reward {task.fields[reward]:.3f}"), TextColumn("{task.fields[rate]:.1f} compl/s"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=quiet)
    with progress:
        task = progress.add_task("train", total=cfg.run.steps, reward=0.0, rate=0.0)

        def on_step(m: dict) -> None:
            progress.update(task, completed=m["step"], reward=m["reward_mean"], rate=m["completions_per_s"])
            if quiet:
                console.print(f"step {m['step']}: reward {m['reward_mean']:.3f} loss {m['loss']:.4f}")

        try:
            result = run_training(cfg, on_step=on_step, resume=resume)
        except (ValueError, FileNotFoundError, RuntimeError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1)
    last = result.history[-1] if result.history else {}
    console.print(f"done: {len(result.history)} steps, final reward {last.get('reward_mean', float('nan')):.3f}; "
                  f"metrics in {result.output_dir / 'metrics.jsonl'}, weights in {result.output_dir / 'final'}")


def _toml_value(value) -> str:
    return str(value) if isinstance(value, int) else '"' + str(value).replace('"', '\\"') + '"'


if __name__ == "__main__":
    app()
