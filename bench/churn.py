"""Volunteers come and go: a real swarm on loopback (`grpo-coordinator serve` and ``--nodes``
`grpo-node join` processes, the demo's tiny run) first left alone for ``--seconds``, then churned for
as long: every ``--every`` seconds one node, chosen at random, is

- ``kill``ed: SIGKILL to its whole process group (node, DHT and averager processes, p2pd), and started
  again ``--down`` seconds later with the same key and work directory (a crash, a reboot);
- ``leave``: a Ctrl-C (SIGINT to its process group); it says goodbye to the coordinator and exits,
  and is started again ``--down`` seconds after it exited (a volunteer who stops and comes back);
- ``freeze``d: SIGSTOP to its process group, SIGCONT ``--freeze`` seconds later (a laptop that sleeps);
- ``coordinator``: not a node: the coordinator is stopped (SIGTERM) and started again on its port
  ``--down`` seconds later, resuming the run from its directory (a host's reboot or upgrade).

Never more than one node (or the coordinator) is down or asleep at a time, so a quorum always exists.

    python bench/churn.py                                   # 4 nodes, 120 s calm, 120 s churned
    python bench/churn.py --nodes 3 --seconds 90 --actions freeze
    python bench/churn.py --actions kill,freeze,coordinator
    python bench/churn.py --nodes 3 --actions leave --heartbeat 10   # at the default heartbeat interval

``--heartbeat S`` sets the run's ``swarm.heartbeat_interval_s`` (the demo's 2 s by default): the
coordinator counts a silent node as gone after 3 of them, which is what a crash costs the open round.

One JSON line: ``versions_per_min`` calm and churned and their ratio (``churn_ratio``); per event, the
seconds until the node averaged again (``back_s``: from its restart or SIGCONT to the end of the first round it began
afterwards and averaged in); for a ``kill``, how long the swarm went without a new version after it (``held_s``)
and what the node's goodbye watcher did (``goodbye``: ``said``, ``silent`` when it died in a pair holding its round's saved batch,
``none`` with ``GRPO_SWARM_GOODBYE_WATCHER=0``) and, for a ``leave``, its exit code and how long it took to exit after the Ctrl-C (``exit_s``); ``longest_gap_s``, the longest the swarm went without a new version while churned;
``hash_splits``, versions for which two nodes' records hold different parameter hashes (none expected:
every honest peer holds the same bytes); ``tracebacks`` in the logs; ``audit_ok``. ``ok`` when the audit
passed, no version split, every event's node averaged again within ``--back-within`` seconds, every
node that left exited 0, and the swarm kept publishing while churned.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

from grpo_swarm.node.swarm.demo import LocalSwarm, demo_config_text

ACTIONS = ("kill", "freeze", "coordinator", "leave")
DEFAULT_ACTIONS = ("kill", "freeze")


def log(msg: str) -> None:
    print(f"[churn {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def versions_seen(swarm: LocalSwarm, nodes: int) -> dict[int, float]:
    """Each version held by any node, with when a node first held it (the end of that round)."""
    first: dict[int, float] = {}
    for i in range(nodes):
        for r in swarm.records(i):
            v, t = r.get("held_version"), r.get("ended")
            if v is not None and t is not None and (v not in first or t < first[v]):
                first[v] = t
    return first


def hash_splits(swarm: LocalSwarm, nodes: int) -> dict[int, int]:
    """Versions whose records (over all nodes) hold more than one parameter hash: version -> hashes."""
    hashes: dict[int, set[str]] = {}
    for i in range(nodes):
        for r in swarm.records(i):
            if r.get("held_version") is not None and r.get("sha256"):
                hashes.setdefault(r["held_version"], set()).add(r["sha256"])
    return {v: len(h) for v, h in sorted(hashes.items()) if len(h) > 1}


def first_averaged_after(swarm: LocalSwarm, i: int, t: float) -> float | None:
    """When node ``i``'s first round begun after ``t`` that it averaged in ended (a round it was in when
    it froze ends just after it wakes, and does not count)."""
    ends = [r["ended"] for r in swarm.records(i)
            if r.get("averaged") and r.get("ended") is not None and r["ended"] - r.get("seconds", 0.0) >= t]
    return min(ends) if ends else None


def goodbye_said(node_log: Path, offset: int) -> str:
    """What the killed node's goodbye watcher did (node/swarm/goodbye_watcher.py), from its log line:
    ``said``, ``silent`` (a node of a pair holding its round's saved batch), ``failed`` or ``none`` (no line: off)."""
    text = node_log.read_text(errors="replace")[offset:] if node_log.exists() else ""
    for marker, what in (("told the coordinator", "said"), ("saved batch", "silent"), ("could not tell", "failed")):
        if "goodbye watcher" in text and marker in text:
            return what
    return "none"


def per_min(versions: dict[int, float], start: float, end: float) -> float:
    return round(60.0 * sum(start <= t < end for t in versions.values()) / max(end - start, 1e-9), 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=120.0, help="length of the calm phase and of the churned one")
    ap.add_argument("--every", type=float, default=20.0, help="seconds between churn events")
    ap.add_argument("--down", type=float, default=5.0, help="seconds a killed node stays down")
    ap.add_argument("--freeze", type=float, default=10.0, help="seconds a frozen node sleeps")
    ap.add_argument("--actions", default=",".join(DEFAULT_ACTIONS), help=f"some of {','.join(ACTIONS)}, taken in turn")
    ap.add_argument("--back-within", type=float, default=60.0,
                    help="an event's node must average again within this many seconds of coming back")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heartbeat", type=float, default=None,
                    help="the run's swarm.heartbeat_interval_s (default: the demo's)")
    ap.add_argument("--workdir", default=None, help="keep the run here (default: a temporary folder)")
    ap.add_argument("--prefork", action="store_true",
                    help="fork restarted nodes from the prefork launcher (default: exec'd, importing torch and "
                         "transformers as a real node's restart does)")
    args = ap.parse_args(argv)
    actions = [a for a in args.actions.split(",") if a]
    if not actions or not set(actions) <= set(ACTIONS):
        ap.error(f"--actions must be some of {ACTIONS}")
    if args.nodes < 3:
        ap.error("--nodes must be at least 3 (one node away must leave a pair)")
    if args.every <= max(args.down, args.freeze):
        ap.error("--every must be longer than --down and --freeze (one node away at a time)")
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="churn-"))
    started = time.time()
    events: list[dict] = []
    config = demo_config_text()
    if args.heartbeat is not None:
        config = re.sub(r"(?m)^heartbeat_interval_s = .*$", f"heartbeat_interval_s = {args.heartbeat}", config)
    with LocalSwarm(work, nodes=args.nodes, config_text=config,
                    env={"GRPO_SWARM_PREFORK": "1" if args.prefork else "0"}) as swarm:
        address = swarm.start_coordinator()
        for i in range(args.nodes):
            swarm.start_node(i)
        log(f"coordinator on {address}, {args.nodes} nodes starting (run in {work})")
        deadline = time.monotonic() + 180
        while not versions_seen(swarm, args.nodes):
            if time.monotonic() > deadline:
                raise SystemExit(f"no version within 180 s: see {work / 'logs'}")
            time.sleep(1.0)
        calm_start = time.time()
        log(f"first version; calm for {args.seconds:.0f} s")
        time.sleep(args.seconds)
        churn_start = time.time()
        k = 0
        while time.time() < churn_start + args.seconds:
            i, action = rng.randrange(args.nodes), actions[k % len(actions)]
            k += 1
            event = {"node": i, "action": action, "at_s": round(time.time() - churn_start, 1)}
            if action == "coordinator":
                event.pop("node")
                port = int(address.rsplit(":", 1)[1])
                swarm.stop_coordinator()
                time.sleep(args.down)
                swarm.start_coordinator(port=port)
            elif action in ("kill", "leave"):
                if action == "kill":
                    node_log = swarm.logs / f"node{i}.log"
                    logged = node_log.stat().st_size if node_log.exists() else 0
                    event["killed_at"] = time.time()
                    swarm.kill_node(i)
                else:
                    signalled = time.monotonic()
                    swarm.signal_node(i, signal.SIGINT)
                    event["exit_code"] = swarm.nodes[i].wait(timeout=60)
                    event["exit_s"] = round(time.monotonic() - signalled, 2)
                time.sleep(args.down)
                if action == "kill":
                    event["goodbye"] = goodbye_said(node_log, logged)
                swarm.start_node(i)
            else:
                swarm.signal_node(i, signal.SIGSTOP)
                time.sleep(args.freeze)
                swarm.signal_node(i, signal.SIGCONT)
            event["back_at"] = time.time()
            events.append(event)
            log(action if action == "coordinator" else f"{action} node {i}")
            time.sleep(max(0.0, args.every - (args.freeze if action == "freeze" else args.down)))
        churn_end = time.time()
        time.sleep(min(args.back_within, 30.0))  # the last event's node gets time to come back
        versions = versions_seen(swarm, args.nodes)
        for e in events:  # (after a coordinator restart: the first node to average again)
            nodes = [e["node"]] if "node" in e else range(args.nodes)
            ends = [t for t in (first_averaged_after(swarm, i, e["back_at"]) for i in nodes) if t is not None]
            e["back_s"] = round(min(ends) - e["back_at"], 1) if ends else None
            e.pop("back_at")
            if "killed_at" in e:  # how long the others went without a new version after the kill
                after = [t for t in versions.values() if t > e["killed_at"]]
                e["held_s"] = round(min(after) - e.pop("killed_at"), 1) if after else None
        splits = hash_splits(swarm, args.nodes)
        exited = {i: p.returncode for i, p in swarm.nodes.items() if p.poll() is not None}
    audit = swarm.audit(report=False)
    tracebacks = {p.name: p.read_text(errors="replace").count("Traceback") for p in sorted(swarm.logs.glob("*.log"))}
    churned = sorted(t for t in versions.values() if churn_start <= t < churn_end)
    edges = [churn_start, *churned, churn_end]
    calm = per_min(versions, calm_start, churn_start)
    churn = per_min(versions, churn_start, churn_end)
    out = {
        "nodes": args.nodes, "seconds": args.seconds, "every_s": args.every, "down_s": args.down,
        "freeze_s": args.freeze, "seed": args.seed, "heartbeat_s": args.heartbeat,
        "versions_per_min": {"calm": calm, "churned": churn},
        "churn_ratio": round(churn / calm, 3) if calm else None,
        "longest_gap_s": round(max(b - a for a, b in zip(edges, edges[1:])), 1),
        "events": events,
        "hash_splits": splits,
        "nodes_exited": exited,
        "tracebacks": {k: v for k, v in tracebacks.items() if v},
        "audit_ok": audit.audit_ok,
        "audit_problem": audit.audit_problem,
        "wall_s": round(time.time() - started, 1),
        "workdir": str(work),
    }
    out["ok"] = bool(audit.audit_ok and not splits and not exited and churned
                     and all(e.get("exit_code", 0) == 0 for e in events)
                     and all(e["back_s"] is not None and e["back_s"] <= args.back_within for e in events))
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
