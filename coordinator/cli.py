"""``grpo-coordinator``: the coordinator's command line.

* ``init [PATH]`` writes the commented example run config (default ``run.toml``); refuses to
  overwrite an existing file unless ``--force``.
* ``check-config PATH`` validates a run config and prints a summary; exit 2 with the field named
  on error. Reward functions are resolved too (``--no-resolve-rewards`` skips that; it imports torch).
* ``serve --config run.toml --data-dir DIR`` runs the gRPC service (:mod:`.service`) until
  SIGINT/SIGTERM; a second start on the same DIR resumes the run from its protocol log.
* ``status --data-dir DIR`` prints the run, nodes (version, staleness, last seen, throughput,
  announced addresses, banned) and accepted/rejected counts by reason, read from DIR's files
  (works while serving or not).
* ``ban NODE_ID --reason TEXT -d DIR [--address HOST:PORT]`` and ``unban NODE_ID -d DIR`` act on a
  *running* coordinator through its Admin method, signed with DIR's ``coordinator.key`` (the only
  key the coordinator accepts for it), so its in-memory state and its log change together. Exit 0
  done, 1 refused or unreachable (the status and the coordinator's message are printed), 2 when
  the key cannot be read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from .config import ConfigError, load_run_config, resolve_rewards, template_text

app = typer.Typer(help="grpo-swarm coordinator: run configs, the gRPC service, status.", no_args_is_help=True,
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



@app.command()
def serve(
    config: Path = typer.Option(..., "--config", "-c", help="run config (TOML)"),
    data_dir: Path = typer.Option(..., "--data-dir", "-d", help="key, protocol log, state and snapshots"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)"),
    port: int = typer.Option(7450, help="gRPC port (0 = any free port)"),
    tls_cert: Optional[Path] = typer.Option(None, help="TLS certificate chain (PEM); needs --tls-key"),
    tls_key: Optional[Path] = typer.Option(None, help="TLS private key (PEM)"),
    metrics_port: Optional[int] = typer.Option(None, help="serve Prometheus /metrics on this port"),
    keep_snapshots: int = typer.Option(3, min=1, help="snapshot versions kept on disk (at least η + 1)"),
    spot_check: bool = typer.Option(True, "--spot-check/--no-spot-check",
                                    help="load the model to re-check log-probabilities of sampled proofs"),
    rate: float = typer.Option(20.0, help="requests per second allowed per node key (0 = unlimited)"),
    burst: int = typer.Option(100, help="request burst allowed per node key"),
    upload_idle_s: float = typer.Option(120.0, min=1.0, help="cancel an upload stream that sent nothing for this long"),
    stream_idle_s: float = typer.Option(60.0, min=1.0, help="cancel a download or log stream whose client took "
                                                           "nothing for this long"),
    newcomer_entries: float = typer.Option(256.0, min=0.0, help="log entries an hour (and at once) that keys without "
                                                                "verified work from one network (an IPv4 address, an "
                                                                "IPv6 /48) may cause: registrations, assignments, "
                                                                "groups, reports (0: no limit)"),
    limit_loopback: bool = typer.Option(False, "--limit-loopback", help="charge loopback clients too (e.g. behind "
                                                                       "a local reverse proxy)"),
    stream_min_rate: float = typer.Option(128.0, min=0.0, help="KiB/s: cancel a download or log stream whose client "
                                                              "took less than this over --stream-idle-s (0: no minimum)"),
    port_file: Optional[Path] = typer.Option(None, help="write the bound port here once serving"),
) -> None:
    """Run the coordinator's gRPC service (resumes the run found in --data-dir)."""
    import signal
    import threading

    from .core import Coordinator, LogError, SnapshotError, model_setup
    from .service import ServerLimits, start_server

    if (tls_cert is None) != (tls_key is None):
        err.print("[red]--tls-cert and --tls-key go together[/red]")
        raise typer.Exit(2)
    try:
        cfg = load_run_config(config)
        resolve_rewards(cfg, str(config))
    except ConfigError as exc:
        err.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2)
    tls = None
    if tls_cert is not None:
        try:
            tls = (tls_key.read_bytes(), tls_cert.read_bytes())
        except OSError as exc:
            err.print(f"[red]cannot read TLS files:[/red] {exc}")
            raise typer.Exit(2)
    try:
        coordinator = Coordinator(cfg, data_dir, setup=model_setup(cfg, spot_check=spot_check),
                                  keep_snapshots=keep_snapshots)
    except (ConfigError, LogError, SnapshotError, OSError) as exc:
        err.print(f"[red]cannot start:[/red] {exc}")
        raise typer.Exit(1)
    limits = ServerLimits(rate_per_s=rate, burst=burst, upload_idle_s=upload_idle_s, stream_idle_s=stream_idle_s,
                          stream_min_rate=stream_min_rate * 1024, newcomer_burst=int(newcomer_entries),
                          newcomer_entries_per_hour=newcomer_entries, limit_loopback=limit_loopback)
    server, bound, _ = start_server(coordinator, host, port, limits=limits, tls=tls)
    if metrics_port is not None:
        mport = coordinator.metrics.serve_http(metrics_port, addr=host)
        err.print(f"metrics on http://{host}:{mport}/metrics")
    st = coordinator.state
    err.print(f"serving run {cfg.run.id} on {host}:{bound} (version {st.current_version}, round {st.current_round}, "
              f"{len(st.keys)} nodes; coordinator key {coordinator.identity.public_key_bytes.hex()})")
    if port_file is not None:
        port_file.write_text(str(bound))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    coordinator.close()
    err.print("stopped")


@app.command()
def status(
    data_dir: Path = typer.Option(..., "--data-dir", "-d", help="the coordinator's data directory"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of tables"),
) -> None:
    """Print nodes, versions, staleness and accepted/rejected counts by reason."""
    import json

    from .status import StatusError, read_status, render_status

    try:
        report = read_status(data_dir)
    except StatusError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1)
    if as_json:
        out.print(json.dumps(report, sort_keys=True), markup=False)
    else:
        render_status(report, out if out.is_terminal else Console(width=200, highlight=False))


def _admin(action: int, node_id: str, reason: str, data_dir: Path, address: str, tls_ca: Optional[Path],
           timeout: float) -> None:
    from grpo_swarm.protocol.client import CoordinatorClient, CoordinatorError
    from grpo_swarm.protocol.identity import Identity, IdentityError

    from .core import KEY_FILE

    try:
        identity = Identity.load(data_dir / KEY_FILE)
        roots = tls_ca.read_bytes() if tls_ca is not None else None
    except (IdentityError, OSError) as exc:
        err.print(f"[red]cannot read the coordinator's key:[/red] {exc}")
        raise typer.Exit(2)
    with CoordinatorClient(address, identity, coordinator_key=identity.public_key_bytes, root_certificates=roots,
                           timeout_s=timeout, retries=2, retry_deadline_s=timeout) as client:
        try:
            reply = client.admin(action, node_id, reason)
        except CoordinatorError as exc:
            err.print(f"[red]{exc.code}:[/red] {escape(exc.detail)}")
            raise typer.Exit(1)
    out.print(f"{reply.detail} (log entry {reply.log_index})", markup=False)


_ADDRESS = typer.Option("127.0.0.1:7450", "--address", "-a", help="the running coordinator's HOST:PORT")
_DATA_DIR = typer.Option(..., "--data-dir", "-d", help="the coordinator's data directory (its coordinator.key "
                                                       "signs the request)")
_TLS_CA = typer.Option(None, "--tls-ca", help="CA certificate (PEM) of a coordinator served with TLS")
_TIMEOUT = typer.Option(30.0, "--timeout", help="seconds to wait for the coordinator")


@app.command()
def ban(
    node_id: str = typer.Argument(..., help="the node id (32 hex digits) to ban"),
    reason: str = typer.Option(..., "--reason", "-r", help="why (logged; at most 256 characters)"),
    data_dir: Path = _DATA_DIR,
    address: str = _ADDRESS,
    tls_ca: Optional[Path] = _TLS_CA,
    timeout: float = _TIMEOUT,
) -> None:
    """Ban a node on the running coordinator (logged node_banned; its requests are refused from now on)."""
    from grpo_swarm.protocol import grpo_swarm_pb2 as pb

    _admin(pb.ADMIN_BAN, node_id, reason, data_dir, address, tls_ca, timeout)


@app.command()
def unban(
    node_id: str = typer.Argument(..., help="the banned node id to readmit"),
    reason: str = typer.Option("", "--reason", "-r", help="why (logged; at most 256 characters)"),
    data_dir: Path = _DATA_DIR,
    address: str = _ADDRESS,
    tls_ca: Optional[Path] = _TLS_CA,
    timeout: float = _TIMEOUT,
) -> None:
    """Lift a node's ban on the running coordinator (logged node_unbanned; reports against it so far
    no longer count)."""
    from grpo_swarm.protocol import grpo_swarm_pb2 as pb

    _admin(pb.ADMIN_UNBAN, node_id, reason, data_dir, address, tls_ca, timeout)


if __name__ == "__main__":  # pragma: no cover
    app()
