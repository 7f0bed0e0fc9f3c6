"""``grpo-audit report``: per-node tables (CSV, Markdown), a JSON summary and PNG plots of an
:class:`~.audit.AuditResult`."""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path

from .audit import AuditResult


NODE_COLUMNS = ("node_id", "accepted_groups", "accepted_samples", "rejected_total", "rejected_by_reason",
                "failed_checks", "mean_reward", "mean_staleness", "max_staleness", "benched_rounds", "banned")


def node_rows(result: AuditResult) -> list[dict]:
    rows = []
    for node_id in sorted(result.nodes):
        s = result.nodes[node_id]
        rows.append({
            "node_id": node_id,
            "accepted_groups": s.accepted_groups,
            "accepted_samples": s.accepted_samples,
            "rejected_total": sum(s.rejected.values()),
            "rejected_by_reason": ";".join(f"{k}={v}" for k, v in sorted(s.rejected.items())),
            "failed_checks": s.failed_checks,
            "mean_reward": None if s.mean_reward is None else round(s.mean_reward, 6),
            "mean_staleness": round(statistics.fmean(s.staleness), 4) if s.staleness else None,
            "max_staleness": max(s.staleness) if s.staleness else None,
            "benched_rounds": s.benched_rounds,
            "banned": s.banned,
        })
    return rows


def write_report(result: AuditResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``nodes.csv``, ``nodes.md``, ``summary.json`` and three PNG plots; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = node_rows(result)
    paths = {}
    paths["nodes.csv"] = out / "nodes.csv"
    with open(paths["nodes.csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=NODE_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    paths["nodes.md"] = out / "nodes.md"
    lines = ["| " + " | ".join(NODE_COLUMNS) + " |", "|" + "---|" * len(NODE_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join("" if row[c] is None else str(row[c]) for c in NODE_COLUMNS) + " |")
    paths["nodes.md"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["summary.json"] = out / "summary.json"
    paths["summary.json"].write_text(json.dumps({**result.summary(), "nodes": rows}, indent=2) + "\n", encoding="utf-8")
    paths.update(_plots(result, out))
    return paths


def _plots(result: AuditResult, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    paths = {}
    by_version: dict[int, list[float]] = defaultdict(list)
    for s in result.samples:
        by_version[s.version].append(s.reward)
    fig, ax = plt.subplots(figsize=(6, 4))
    if by_version:
        vs = sorted(by_version)
        ax.plot(vs, [statistics.fmean(by_version[v]) for v in vs], marker="o")
    ax.set(xlabel="policy version", ylabel="mean reward (accepted samples)", title="Reward by policy version")
    ax.grid(alpha=0.3)
    paths["reward_by_version.png"] = out / "reward_by_version.png"
    fig.tight_layout()
    fig.savefig(paths["reward_by_version.png"], dpi=100)
    plt.close(fig)

    rows = node_rows(result)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4))
    if rows:
        names = [r["node_id"][:8] for r in rows]
        ax.bar(names, [r["accepted_samples"] for r in rows], label="accepted")
        ax.bar(names, [r["rejected_total"] for r in rows], bottom=[r["accepted_samples"] for r in rows],
               label="rejected")
        ax.legend()
        ax.tick_params(axis="x", rotation=45)
    ax.set(xlabel="node", ylabel="samples", title="Contributions per node")
    paths["contributions_per_node.png"] = out / "contributions_per_node.png"
    fig.tight_layout()
    fig.savefig(paths["contributions_per_node.png"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    stale = [s.staleness for s in result.samples]
    if stale:
        ax.hist(stale, bins=range(0, max(stale) + 2), align="left", rwidth=0.8)
    ax.set(xlabel="staleness (current version - sampling version)", ylabel="accepted samples",
           title="Staleness of accepted samples")
    paths["staleness_hist.png"] = out / "staleness_hist.png"
    fig.tight_layout()
    fig.savefig(paths["staleness_hist.png"], dpi=100)
    plt.close(fig)
    return paths
