"""``grpo-node``: the node's command line (``train`` runs single-node GRPO, no network; ``join``
takes part in a swarm run)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
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


def _stop_name(exc: BaseException) -> str:
    from .swarm.stop_signals import Terminated

    return "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"


@app.command()
def join(
    coordinator: str = typer.Option(..., "--coordinator", help="the run's coordinator, HOST:PORT"),
    identity: Optional[Path] = typer.Option(None, help="node key file (default ~/.grpo-swarm/node.key; created if absent)"),
    workdir: Path = typer.Option(Path("swarm-node"), help="snapshots and swarm.jsonl go here"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    backend: str = typer.Option("transformers", help="transformers | vllm (GPU, the vllm extra) | auto (vllm on CUDA "
                                                      "when it imports)"),
    host_maddr: list[str] = typer.Option(["/ip4/0.0.0.0/tcp/0"], "--host-maddr", help="libp2p listen address (repeatable)"),
    announce_maddr: list[str] = typer.Option([], "--announce-maddr", help="public address peers should dial (repeatable)"),
    initial_peer: list[str] = typer.Option([], "--initial-peer", help="extra DHT peer multiaddr (repeatable)"),
    client_mode: bool = typer.Option(False, "--client-mode", help="behind NAT: send gradients, accept no connections"),
    compression: str = typer.Option("none", help="averaging compression: none | fp16 | 8bit"),
    part_size: Optional[int] = typer.Option(None, help="averaging part size in bytes (default 1 MiB; 4 MiB on fast "
                                                       "links, where the CPU is the bottleneck)"),
    audit_fraction: Optional[float] = typer.Option(None, help="share of each reducer's rows the share audit reads "
                                                              "(2^-10..1, default 0.25; the group reads the "
                                                              "largest any member asks for)"),
    rounds: Optional[int] = typer.Option(None, help="stop after this many rounds"),
    set_: list[str] = typer.Option([], "--set", "-s", help="node-side override, e.g. --set run.threads=2"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="a line per round instead of the live table"),
) -> None:
    """Join a swarm run: sample, prove, average verified gradients with the other peers, step."""
    from grpo_swarm.protocol.identity import default_key_path

    from .swarm import instance_lock
    from .swarm.dht import check_transports
    from .swarm.join import (COMPRESSIONS, PART_SIZE_LIMITS, JoinOptions, NodeBanned, NodeSuperseded, SwarmPeer,
                             SwarmSideFailing)
    from .swarm.stop_signals import leave_on_sigterm
    from .swarm.share_sketch import DEFAULT_AUDIT_FRACTION, check_audit_fraction
    from .swarm.view import RoundView

    from .backends import resolve_backend

    try:  # both backends sample with the run's keyed noise; vllm needs its install and a GPU
        backend = resolve_backend(backend, device)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")  # escape: the hint's [vllm] is not markup
        raise typer.Exit(2)
    if compression not in COMPRESSIONS:
        console.print(f"[red]error:[/red] --compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
        raise typer.Exit(2)
    if part_size is not None and not PART_SIZE_LIMITS[0] <= part_size <= PART_SIZE_LIMITS[1]:
        console.print(f"[red]error:[/red] --part-size must be between {PART_SIZE_LIMITS[0]} and {PART_SIZE_LIMITS[1]} "
                      f"bytes, got {part_size}")
        raise typer.Exit(2)
    try:
        for given, what in ((host_maddr, "--host-maddr"), (announce_maddr, "--announce-maddr"),
                            (initial_peer, "--initial-peer")):
            check_transports(given, what)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    try:
        audit_fraction = check_audit_fraction(DEFAULT_AUDIT_FRACTION if audit_fraction is None else audit_fraction)
    except ValueError as exc:
        console.print(f"[red]error:[/red] --audit-fraction: {exc}")
        raise typer.Exit(2)
    overrides = ([f"model.backend={_toml_value(backend)}"] + list(set_)  # an explicit --set model.backend wins
                 + ([f"model.device={_toml_value(device)}"] if device != "auto" else []))
    opts = JoinOptions(coordinator=coordinator, identity_path=identity or default_key_path(), workdir=workdir,
                       overrides=overrides, host_maddrs=host_maddr, announce_maddrs=announce_maddr or None,
                       initial_peers=initial_peer, client_mode=client_mode, compression=compression,
                       part_size_bytes=part_size, audit_fraction=audit_fraction, rounds=rounds)
    from .swarm.container_init import become_init_if_pid1

    become_init_if_pid1()  # a container's entrypoint: PID 1 stays as an init that outlives the node
    workdir.mkdir(parents=True, exist_ok=True)
    node_lock = ExitStack()  # one running node per key and work directory, held until it leaves
    try:
        node_lock.enter_context(instance_lock.hold(opts.identity_path, workdir))
    except instance_lock.NodeAlreadyRunning as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2)
    leave_on_sigterm()
    with node_lock, RoundView(workdir, quiet=quiet, console=console) as view:
        try:
            peer = SwarmPeer(opts, on_round=view)
        except KeyboardInterrupt as exc:
            console.print(f"stopped while joining ({_stop_name(exc)})")
            raise typer.Exit(130)
        except Exception as exc:  # noqa: BLE001 - say what failed at start-up and stop
            console.print(f"[red]could not join:[/red] {type(exc).__name__}: {exc}")
            raise typer.Exit(1)
        console.print(f"node {peer.participant.node_id} joined run {peer.participant.run_id} at "
                      f"v{peer.participant.snapshot.version}; DHT {peer.maddrs[:1]}")
        refused = False  # banned or superseded: the coordinator would refuse its goodbye too
        try:
            peer.run()
        except KeyboardInterrupt as exc:
            console.print(f"leaving the swarm ({_stop_name(exc)})")
        except NodeBanned as exc:
            refused = True
            console.print(f"[red]banned:[/red] {escape(str(exc))}. Only the run's operator can lift a ban "
                          "(grpo-coordinator unban).")
            raise typer.Exit(1)
        except (SwarmSideFailing, NodeSuperseded) as exc:
            refused = isinstance(exc, NodeSuperseded)
            console.print(f"[red]stopped:[/red] {escape(str(exc))}")
            raise typer.Exit(1)
        finally:
            peer.close(leave=not refused)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/swarm-demo"), "--out", "-o", help="where the run, logs and report go"),
    nodes: int = typer.Option(3, min=1, max=8, help="node processes"),
    rounds: int = typer.Option(100, min=1, help="rounds each node takes part in"),
    timeout: float = typer.Option(600.0, help="give up after this many seconds"),
) -> None:
    """A whole swarm on this machine: a coordinator and N nodes on loopback (separate processes)
    train the embedded tiny-model run; then the audit of the log, the reward curve and per-node
    contributions."""
    from .swarm.demo import run_demo

    try:
        result = run_demo(out, nodes=nodes, rounds=rounds, timeout_s=timeout, echo=console.print)
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        raise typer.Exit(1)
    windows = result.reward_windows()
    if windows:
        span = lambda w: f"{w[2]:.3f} (v{w[0]}–{w[1]})"  # noqa: E731
        best = max(windows, key=lambda w: w[2])
        console.print(f"reward, mean over up to 10 versions: {span(windows[0])} -> {span(windows[-1])}; "
                      f"best {span(best)}")
    for name, records in result.rounds.items():
        console.print(f"{name}: {sum(r['accepted'] for r in records)} accepted samples, "
                      f"{sum(r['averaged'] for r in records)}/{len(records)} rounds averaged")
    console.print(f"grpo-audit verify: {'passed' if result.audit_ok else 'FAILED: ' + str(result.audit_problem)}")
    if result.report:
        console.print(f"report: {Path(result.report.get('reward_by_version.png', '')).parent}")
    if not result.audit_ok or any(result.node_exit_codes):
        raise typer.Exit(1)


def _toml_value(value) -> str:
    return str(value) if isinstance(value, int) else '"' + str(value).replace('"', '\\"') + '"'


if __name__ == "__main__":
    app()
