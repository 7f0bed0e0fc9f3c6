"""The live view of ``grpo-node join``: one line per round (``--quiet``) or a rich table that
keeps the last rounds, and ``swarm.jsonl`` with every :class:`~.join.RoundRecord`."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

COLUMNS = ("round", "version", "reward", "accepted", "averaged", "peers", "excluded", "lag", "sent", "uploaded", "s",
           "slowest", "note")


def _row(r) -> list[str]:
    reward = "-" if r.reward_mean is None else f"{r.reward_mean:.3f}"
    return [str(r.round), str(r.version), reward, f"{r.accepted}/{r.samples}", "yes" if r.averaged else "no",
            str(r.peers), ",".join(k[:8] for k in r.excluded) or "-", str(r.lag), _mb(r.bytes_sent),
            _mb(r.upload_bytes) if r.upload_bytes else "-", f"{r.seconds:.1f}",
            _slowest(r.phases), _note(r)[:60]]


def _note(r) -> str:
    return f"restarted DHT + averager ({r.restarted}); {r.note}" if r.restarted else r.note


def _slowest(phases: dict) -> str:
    """The step the round spent most time in, e.g. ``sample:41.2`` (``-`` before any)."""
    if not phases:
        return "-"
    name = max(phases, key=phases.get)
    return f"{name}:{phases[name]:.1f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


class RoundView:
    """Shows rounds as they finish and appends them to ``<workdir>/swarm.jsonl``."""

    def __init__(self, workdir: Path, *, quiet: bool = False, keep: int = 12, console: Console | None = None):
        self.path = Path(workdir) / "swarm.jsonl"
        self.quiet, self.console = quiet, console or Console(stderr=True)
        self.rows: deque = deque(maxlen=keep)
        self.live = None if quiet else Live(self._table(), console=self.console, refresh_per_second=4)

    def __enter__(self) -> RoundView:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def _table(self) -> Table:
        table = Table(title="grpo-swarm node", expand=False)
        for c in COLUMNS:
            table.add_column(c)
        for r in self.rows:
            table.add_row(*_row(r))
        return table

    def __call__(self, record) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_json()) + "\n")
        self.rows.append(record)
        if self.live is not None:
            self.live.update(self._table())
        else:
            self.console.print(" ".join(f"{c}={v}" for c, v in zip(COLUMNS, _row(record))))
