"""``grpo-coordinator status``: a run's state read from a coordinator's data directory.

Reads the protocol log and ``coordinator.sqlite`` read-only (SQLite WAL lets it run beside a
serving coordinator): current version and round, and per node its registration, last heartbeat
(and whether it said goodbye since), policy version and lag, throughput, the number of libp2p
multiaddrs it announces, whether it is
banned (``node_banned`` / ``node_unbanned``; reports against it by round participants), the rounds
the stall rule sat it out (``benched`` of ``round_closed``; the last closed round's reason), accepted
samples and rejected proofs by reason code.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from grpo_swarm.protocol.log import (
    NODE_BANNED,
    NODE_REGISTERED,
    NODE_UNBANNED,
    PEER_REPORTED,
    PROOFS_ACCEPTED,
    PROOFS_REJECTED,
    ROUND_CLOSED,
    RUN_STARTED,
    SNAPSHOT_PUBLISHED,
    LogError,
    ProtocolLog,
)

from .core import LOG_FILE, STORE_FILE
from .store import CoordinatorStore


class StatusError(Exception):
    pass


def read_status(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    log_path = data_dir / LOG_FILE
    if not log_path.is_file():
        raise StatusError(f"no protocol log at {log_path}: is {data_dir} a coordinator data directory?")
    run: dict = {"run_id": None, "version": None, "round": 0, "entries": 0, "max_staleness": 0}
    nodes: dict[str, dict] = defaultdict(lambda: {"accepted_samples": 0, "accepted_groups": 0,
                                                  "rejected": Counter(), "banned": False, "reported": 0,
                                                  "sat_out": 0})
    rejected_total: Counter = Counter()
    accepted_total = 0
    round_samples = 0
    last_benched: dict = {}  # the last closed round's: who sits it out, and why
    try:
        log = ProtocolLog(log_path, create=False, readonly=True)
    except LogError as e:
        raise StatusError(str(e)) from None
    try:
        for e in log.entries():
            run["entries"] += 1
            p = e.payload
            if e.kind == RUN_STARTED:
                run.update(run_id=p.get("run_id"), max_staleness=p.get("max_staleness", 0),
                           group_size=p.get("group_size"), prompts_per_round=p.get("prompts_per_round"))
            elif e.kind == NODE_REGISTERED:
                nodes[p["node_id"]]
            elif e.kind == SNAPSHOT_PUBLISHED:
                run["version"] = p["version"]
            elif e.kind == PROOFS_ACCEPTED:
                n = len(p["proofs"])
                nodes[p["node_id"]]["accepted_samples"] += n
                nodes[p["node_id"]]["accepted_groups"] += 1
                accepted_total += n
                round_samples += n
            elif e.kind == PROOFS_REJECTED:
                ev = p.get("evidence") or {}
                n = len(ev["proofs"]) if isinstance(ev.get("proofs"), list) else 1
                nodes[p.get("node_id") or "(unknown)"]["rejected"][p["code"]] += n
                rejected_total[p["code"]] += n
            elif e.kind == ROUND_CLOSED:
                run["round"] = p["round"] + 1
                round_samples = 0
                last_benched = p.get("benched") or {}
                for n in last_benched:
                    nodes[n]["sat_out"] += 1
            elif e.kind == NODE_BANNED:
                nodes[p["node_id"]]["banned"] = True
            elif e.kind == NODE_UNBANNED:
                nodes[p["node_id"]]["banned"] = False
            elif e.kind == PEER_REPORTED:
                nodes[p["peer_node_id"]]["reported"] += 1
    except LogError as e:
        raise StatusError(f"{log_path}: {e}") from None
    finally:
        log.close()
    now = time.time_ns() // 1_000_000
    heartbeats = {}
    store_path = data_dir / STORE_FILE
    if store_path.is_file():
        store = CoordinatorStore(store_path, readonly=True)
        try:
            heartbeats = {r.node_id: r for r in store.nodes()}
        finally:
            store.close()
    rows = []
    for node_id, s in nodes.items():
        hb = heartbeats.get(node_id)
        version = hb.version if hb is not None else None
        lag = run["version"] - version if version is not None and run["version"] is not None else None
        rows.append({
            "node_id": node_id, "banned": s["banned"],
            "version": version, "lag": lag,
            "stale": lag is not None and lag > run["max_staleness"],
            "last_seen_s": round((now - hb.last_seen_ms) / 1000, 1) if hb is not None else None,
            "left": hb is not None and hb.left,
            "completions_per_s": hb.completions_per_s if hb is not None else None,
            "accelerator": (hb.hardware.accelerator or "cpu") if hb is not None else None,
            "multiaddrs": len(hb.multiaddrs) if hb is not None else 0, "reported": s["reported"],
            "sat_out": s["sat_out"], "sits_out": last_benched.get(node_id, ""),
            "accepted_groups": s["accepted_groups"], "accepted_samples": s["accepted_samples"],
            "rejected": dict(s["rejected"]),
        })
    run["round_samples"] = round_samples
    return {"run": run, "nodes": rows, "accepted_samples": accepted_total, "rejected": dict(rejected_total)}


def render_status(report: dict, console: Console) -> None:
    run = report["run"]
    console.print(f"run {run['run_id']}  version {run['version']}  round {run['round']} "
                  f"({run['round_samples']} samples so far)  η={run['max_staleness']}  log entries {run['entries']}",
                  markup=False)
    rej = ", ".join(f"{k} {v}" for k, v in sorted(report["rejected"].items())) or "none"
    console.print(f"accepted samples {report['accepted_samples']}; rejected proofs: {rej}", markup=False)
    table = Table("node", "version", "lag", "last seen", "compl/s", "device", "addrs", "accepted", "rejected by reason")
    for r in report["nodes"]:
        lag = "-" if r["lag"] is None else f"{r['lag']}{' STALE' if r['stale'] else ''}"
        table.add_row(
            r["node_id"][:16] + (" (banned)" if r["banned"] else "")
            + (f" (reported {r['reported']}x)" if r["reported"] else "")
            + (f" (sat out {r['sat_out']} round(s){', now' if r['sits_out'] else ''})" if r["sat_out"] else ""),
            "-" if r["version"] is None else str(r["version"]), lag,
            "-" if r["last_seen_s"] is None else f"{r['last_seen_s']:g}s ago" + (" (left)" if r["left"] else ""),
            "-" if r["completions_per_s"] is None else f"{r['completions_per_s']:.1f}",
            r["accelerator"] or "-", str(r["multiaddrs"]), str(r["accepted_samples"]),
            ", ".join(f"{k} {v}" for k, v in sorted(r["rejected"].items())) or "-")
    console.print(table)
