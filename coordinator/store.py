"""The coordinator's own SQLite file (``<data-dir>/coordinator.sqlite``): what is not in the protocol log.

* ``salts`` — the secret spot-check salt of each round, written (durably) before its commitment
  is logged, so a restarted coordinator can still reveal it;
* ``nodes`` — each node's latest heartbeat: policy version, hardware, throughput, last seen (wall
  clock: for operators, and to seed :mod:`.liveness` after a restart), the libp2p multiaddrs it
  announces (JSON list; what :meth:`CoordinatorStore.multiaddrs` hands out), and whether it said
  goodbye since (``left``: a restart does not count it as live, ``status`` shows it).

Parameter-hash reports are not kept here: they decide publication, so they are protocol log
entries (``hash_reported``), and a restart rebuilds them from the log
(:mod:`grpo_swarm.protocol.publication`). An older file's ``reports`` table is dropped.

The protocol log (:mod:`grpo_swarm.protocol.log`) stays the record of everything that was
accepted; this file only holds operational state. WAL, ``synchronous=FULL``; one connection used
under the caller's lock (``check_same_thread=False``), plus read-only opens for ``status``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from grpo_swarm.protocol import grpo_swarm_pb2 as pb

_SCHEMA = """
CREATE TABLE IF NOT EXISTS salts (round INTEGER PRIMARY KEY, salt BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    registered_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    version INTEGER,
    completions_per_s REAL NOT NULL DEFAULT 0,
    tokens_per_s REAL NOT NULL DEFAULT 0,
    hardware BLOB,
    multiaddrs TEXT,
    left INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS nodes_last_seen ON nodes(last_seen_ms);
DROP TABLE IF EXISTS reports;
"""


@dataclass(frozen=True)
class NodeRow:
    node_id: str
    public_key: bytes
    registered_ms: int
    last_seen_ms: int
    version: int | None
    completions_per_s: float
    tokens_per_s: float
    hardware: pb.HardwareSummary
    multiaddrs: tuple[str, ...] = ()
    left: bool = False  # said goodbye and not seen since


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class CoordinatorStore:
    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"no coordinator state at {self.path}")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                       check_same_thread=False)
        else:
            self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            if "multiaddrs" not in self._columns():  # a file from before the swarm's rendezvous
                self._db.execute("ALTER TABLE nodes ADD COLUMN multiaddrs TEXT")
            if "left" not in self._columns():  # a file from before goodbyes
                self._db.execute("ALTER TABLE nodes ADD COLUMN left INTEGER NOT NULL DEFAULT 0")

    def _columns(self) -> set[str]:
        return {row[1] for row in self._db.execute("PRAGMA table_info(nodes)")}

    def close(self) -> None:
        self._db.close()

    # -- salts
    def put_salt(self, round_index: int, salt: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO salts(round, salt) VALUES (?, ?)", (round_index, bytes(salt)))

    def salts(self) -> dict[int, bytes]:
        return {r: bytes(s) for r, s in self._db.execute("SELECT round, salt FROM salts")}

    # -- nodes
    def node_registered(self, node_id: str, public_key: bytes, hardware: pb.HardwareSummary | None) -> None:
        now = _now_ms()
        self._db.execute(
            "INSERT INTO nodes(node_id, public_key, registered_ms, last_seen_ms, hardware) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(node_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms, left = 0, "
            "hardware = coalesce(excluded.hardware, nodes.hardware)",
            (node_id, bytes(public_key), now, now, hardware.SerializeToString() if hardware is not None else None))

    def heartbeat(self, node_id: str, version: int, completions_per_s: float, tokens_per_s: float,
                  hardware: pb.HardwareSummary | None, *, leaving: bool = False) -> None:
        """The node's latest report; ``leaving``: its goodbye (``left`` until it is seen again)."""
        self._db.execute(
            "UPDATE nodes SET last_seen_ms = ?, version = ?, completions_per_s = ?, tokens_per_s = ?, "
            "hardware = coalesce(?, hardware), left = ? WHERE node_id = ?",
            (_now_ms(), version, completions_per_s, tokens_per_s,
             hardware.SerializeToString() if hardware is not None else None, int(leaving), node_id))

    def set_multiaddrs(self, node_id: str, multiaddrs: list[str]) -> None:
        """Replace the node's announced addresses (already checked by the caller)."""
        self._db.execute("UPDATE nodes SET multiaddrs = ? WHERE node_id = ?",
                         (json.dumps(list(multiaddrs)) if multiaddrs else None, node_id))

    def multiaddrs(self, node_ids: Sequence[str], *, limit: int = 32) -> list[tuple[str, list[str]]]:
        """(node id, multiaddrs) of the first ``limit`` of ``node_ids`` (in their order) that announced
        addresses."""
        out: list[tuple[str, list[str]]] = []
        ids = list(dict.fromkeys(node_ids))
        for i in range(0, len(ids), 256):  # (SQLite caps the parameters of one statement)
            chunk = ids[i:i + 256]
            addrs = dict(self._db.execute(
                f"SELECT node_id, multiaddrs FROM nodes WHERE multiaddrs IS NOT NULL AND node_id IN "
                f"({','.join('?' * len(chunk))})", chunk))
            for node_id in chunk:
                if node_id in addrs:
                    out.append((node_id, json.loads(addrs[node_id])))
                    if len(out) >= limit:
                        return out
        return out

    def last_seen(self, since_ms: int) -> list[tuple[str, int]]:
        """(node id, wall-clock last seen ms) of the nodes seen at or after ``since_ms`` that did not say
        goodbye since."""
        return list(self._db.execute("SELECT node_id, last_seen_ms FROM nodes WHERE last_seen_ms >= ? AND left = 0",
                                     (since_ms,)))

    def nodes(self) -> list[NodeRow]:
        rows = []
        columns = self._columns()  # a read-only open of an older file may lack the newer ones
        for r in self._db.execute("SELECT node_id, public_key, registered_ms, last_seen_ms, version, "
                                  "completions_per_s, tokens_per_s, hardware, "
                                  + ("multiaddrs" if "multiaddrs" in columns else "NULL") + ", "
                                  + ("left" if "left" in columns else "0") + " FROM nodes ORDER BY registered_ms"):
            hw = pb.HardwareSummary()
            if r[7]:
                hw.ParseFromString(r[7])
            rows.append(NodeRow(r[0], bytes(r[1]), r[2], r[3], r[4], r[5], r[6], hw,
                                tuple(json.loads(r[8])) if r[8] else (), bool(r[9])))
        return rows
