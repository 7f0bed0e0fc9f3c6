"""``grpo-audit``: verify a protocol log and report on it.

* ``grpo-audit verify LOG`` — LOG is a SQLite log or its JSONL export. Checks the hash chain and
  every signature, then replays every verification that needs no model (rewards recomputed from
  the dataset, prompt hashes and decoding with the run's tokenizer, through the installed
  ``grpo_swarm.audit_hooks`` plugin); ``--model SPEC`` also replays the spot-checks. Exit status 0
  when every entry is sound, 1 naming the first bad entry, 2 when the log cannot be read.
* ``grpo-audit report LOG --out DIR`` — per-node table (``nodes.csv``, ``nodes.md``), ``summary.json``
  and PNG plots (reward by version, contributions per node, staleness histogram).
* ``grpo-audit export LOG OUT.jsonl`` / ``grpo-audit import IN.jsonl OUT.sqlite``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .audit import AuditResult, audit
from .report import write_report
from .run_spec import AuditHooks, load_hooks
from .log import LogError, ProtocolLog, RUN_STARTED, read_log

app = typer.Typer(help="grpo-swarm protocol log auditor.", no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def _run_payload(log: Path) -> dict | None:
    for entry in read_log(log):
        return entry.payload if entry.kind == RUN_STARTED else None
    return None


def _hooks(log: Path, model: Optional[str], snapshots: Optional[Path], hooks_spec: Optional[str], no_hooks: bool,
           allow_plugin_rewards: bool) -> AuditHooks:
    if no_hooks:
        return AuditHooks(notes=["--no-hooks: rewards, prompt hashes, decoding and spot-checks not replayed"])
    try:
        run = _run_payload(log)
    except LogError:
        run = None  # the audit itself reports the broken log
    if run is None:
        return AuditHooks()
    hooks = load_hooks(run, model=model, snapshots=str(snapshots) if snapshots else None, spec=hooks_spec,
                       allow_plugin_rewards=allow_plugin_rewards)
    if hooks is None:
        if model:
            raise typer.BadParameter("--model needs the grpo_swarm.audit_hooks plugin (pip install grpo-swarm)")
        return AuditHooks(notes=["no grpo_swarm.audit_hooks plugin installed: rewards, prompt hashes, decoding "
                                 "and spot-checks not replayed"])
    return hooks


def _signers(values: list[str]) -> list[bytes] | None:
    if not values:
        return None
    out = []
    for v in values:
        try:
            raw = bytes.fromhex(v)
        except ValueError:
            raise typer.BadParameter(f"--signer {v!r} is not hex") from None
        if len(raw) != 32:
            raise typer.BadParameter("--signer takes a 32-byte Ed25519 public key in hex")
        out.append(raw)
    return out


def _print_result(result: AuditResult, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result.summary(), sort_keys=True))
        return
    replayed = ", ".join(f"{k}={v}" for k, v in sorted(result.replayed.items())) or "nothing"
    typer.echo(f"{result.entries} entries; replayed: {replayed}")
    for k, v in sorted(result.skipped.items()):
        typer.echo(f"  not checked: {k} x{v}")
    for note in result.notes:
        typer.echo(f"  note: {note}")
    if result.ok:
        typer.echo("OK: chain, signatures and every replayed verification are sound")
    else:
        typer.echo(f"BAD {result.problem}")


@app.command()
def verify(
    log: Path = typer.Argument(..., help="SQLite log or JSONL export"),
    model: Optional[str] = typer.Option(None, help="model spec (tiny, smollm2, path): also replay the spot-checks"),
    snapshots: Optional[Path] = typer.Option(None, help="folder of <sha256>.safetensors policy snapshots"),
    signer: list[str] = typer.Option([], help="trusted coordinator key (hex); entry 0 must be signed by it"),
    hooks: Optional[str] = typer.Option(None, help="hooks factory 'package.module:function' (default: the plugin)"),
    no_hooks: bool = typer.Option(False, "--no-hooks", help="chain, signatures and model-free structure only"),
    allow_plugin_rewards: bool = typer.Option(False, help="import non-built-in reward functions the log names"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
) -> None:
    """Check the chain and every signature and replay the verifications; exit 1 at the first bad entry."""
    if not log.is_file():
        _err(f"error: {log} does not exist")
        raise typer.Exit(2)
    trusted = _signers(signer)
    try:
        h = _hooks(log, model, snapshots, hooks, no_hooks, allow_plugin_rewards)
    except typer.BadParameter:
        raise
    except Exception as e:  # noqa: BLE001 - a hook that cannot load is a usage problem, say which
        _err(f"error: cannot build the verification hooks: {type(e).__name__}: {e}")
        raise typer.Exit(2)
    result = audit(log, h, trusted_signers=trusted)
    _print_result(result, as_json)
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def report(
    log: Path = typer.Argument(..., help="SQLite log or JSONL export"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    model: Optional[str] = typer.Option(None, help="also replay spot-checks (see verify)"),
    snapshots: Optional[Path] = typer.Option(None),
    no_hooks: bool = typer.Option(False, "--no-hooks"),
) -> None:
    """Per-node table (accepted samples, rejections by reason, mean reward, staleness) and PNG plots."""
    if not log.is_file():
        _err(f"error: {log} does not exist")
        raise typer.Exit(2)
    h = _hooks(log, model, snapshots, None, no_hooks, False)
    result = audit(log, h)
    paths = write_report(result, out)
    _print_result(result, False)
    for name in sorted(paths):
        typer.echo(f"wrote {paths[name]}")
    raise typer.Exit(0 if result.ok else 1)


@app.command("export")
def export_(log: Path = typer.Argument(...), out: Path = typer.Argument(...)) -> None:
    """Export a SQLite log as JSON Lines."""
    try:
        with ProtocolLog(log, create=False, readonly=True) as db:
            n = db.export_jsonl(out)
    except LogError as e:
        _err(f"error: {e}")
        raise typer.Exit(2)
    typer.echo(f"exported {n} entries to {out}")


@app.command("import")
def import_(jsonl: Path = typer.Argument(...), out: Path = typer.Argument(...)) -> None:
    """Import a JSONL export into a new SQLite log (verifies the chain first)."""
    try:
        ProtocolLog.import_jsonl(jsonl, out).close()
    except LogError as e:
        _err(f"error: {e}")
        raise typer.Exit(1)
    typer.echo(f"imported into {out}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
