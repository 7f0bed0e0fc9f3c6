"""Stallers in a real swarm: `grpo-coordinator serve` and ``--nodes`` `grpo-node join` processes on
loopback (the demo's tiny run), the last ``--stallers`` of them hostile.

The hostile nodes run tests/swarm_join_node.py with ``--behaviour`` (default ``hang_up_lead``: it
hangs up in every attempt and leads the retry into small groups, with more attempts than the honest
nodes; tests/swarm_hostile.py) from the first round on, until the honest nodes have done
``--rounds`` rounds. Then the coordinator's log says which rounds published nothing, who sat out of
each round and why (the stall rule, protocol/stalls.py: single probes, findings, group probes), and
``grpo-audit verify`` replays it.

    python bench/join_stallers.py --nodes 5 --stallers 2 --rounds 30
    python bench/join_stallers.py --nodes 3 --stallers 1 --rounds 12
    python bench/join_stallers.py --nodes 5 --stallers 2 --rounds 30 --sit-out-limit 0   # no memory of breakers

One JSON line: ``failed_rounds``, ``first_published_after_failures`` (the failed rounds before the
first round that published with the stallers sitting out), ``benched`` (per round: who sat out, as
``honest``/``staller`` with the rule's reason, shortened), ``honest_found`` (honest nodes the rule
found), ``honest_averaging_s`` (the honest nodes' averaging time in the rounds they averaged: median,
mean, how many over 5 s), ``audit_ok``, ``wall_s``; ``ok`` when the honest nodes finished, no honest node was found, the
audit passed, and, if rounds failed often enough to start an incident, a round published with every
staller sitting out and after it at most two rounds failed per window. Runs differ: with five nodes the
averaging's own retry rule often leaves the breakers out and the rounds publish (slowly) anyway.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from grpo_swarm.node.swarm.demo import LocalSwarm, demo_config_text  # noqa: E402
from grpo_swarm.protocol.identity import Identity  # noqa: E402
from grpo_swarm.protocol.log import read_log  # noqa: E402
from grpo_swarm.protocol.stalls import DEFAULT_WINDOW_ROUNDS, MIN_FAILED_ROUNDS  # noqa: E402


def log(msg: str) -> None:
    print(f"[join_stallers] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--stallers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30, help="rounds the honest nodes do")
    ap.add_argument("--behaviour", default="hang_up_lead")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds for the honest nodes' rounds")
    ap.add_argument("--sit-out-limit", type=int, default=None,
                    help="the run's swarm.sit_out_limit (default: the run config's; 0: nobody sits out for breaking)")
    ap.add_argument("--workdir", default=None, help="keep the run here (default: a temporary folder)")
    args = ap.parse_args(argv)
    if not 1 <= args.stallers < args.nodes:
        ap.error("--stallers must be at least 1 and fewer than --nodes")
    honest = list(range(args.nodes - args.stallers))
    hostile = list(range(len(honest), args.nodes))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="join_stallers-"))
    program = [sys.executable, str(ROOT / "tests" / "swarm_join_node.py"), args.behaviour, "0", ""]
    started = time.monotonic()
    config = demo_config_text()
    if args.sit_out_limit is not None:
        config = config.replace("[swarm]\n", f"[swarm]\nsit_out_limit = {args.sit_out_limit}\n", 1)
    with LocalSwarm(work, nodes=args.nodes, config_text=config) as swarm:
        swarm.start_coordinator()
        for i in honest:
            swarm.start_node(i, rounds=args.rounds)
        for i in hostile:
            swarm.start_node(i, program=program)
        deadline = time.monotonic() + args.timeout
        while any(swarm.nodes[i].poll() is None for i in honest) and time.monotonic() < deadline:
            time.sleep(1.0)
        finished = all(swarm.nodes[i].poll() == 0 for i in honest)
        log(f"honest nodes finished: {finished} after {time.monotonic() - started:.0f} s")
        swarm.stop()
        averaging = sorted(r["averaging_s"] for i in honest for r in swarm.records(i) if r.get("averaged"))
        audit = swarm.audit(report=False)
        entries = list(read_log(work / "coordinator" / "protocol.sqlite"))

    stallers = {Identity.load(swarm.workdir(i) / "node.key").node_id for i in hostile}
    closes = {e.payload["round"]: e.payload for e in entries if e.kind == "round_closed"}
    produced = {e.payload["round"] for e in entries if e.kind == "snapshot_published" and "round" in e.payload}
    rounds = sorted(r for r in closes if r + 1 in closes)  # a round can publish until the next one closes
    def holders(r: int) -> int:
        return len(closes[r]["participants"]) - len(closes[r].get("benched", {}))

    failed = [r for r in rounds if r not in produced and holders(r) >= 2]
    benched = {r: [("staller" if n in stallers else "honest", why[:60])
                   for n, why in closes[r].get("benched", {}).items()] for r in rounds}
    honest_found = sorted({n for r in rounds for n, why in closes[r].get("benched", {}).items()
                           if n not in stallers and "found" in why and "held a ticket" in why})
    clean = [r for r in rounds if r in produced and stallers <= set(closes[r].get("benched", {}))]
    first = clean[0] if clean else None
    later = [r for r in failed if first is not None and r > first]
    window = DEFAULT_WINDOW_ROUNDS
    bounded = all(sum(s <= r < s + window for r in later) <= MIN_FAILED_ROUNDS
                  for s in range(first or 0, max(rounds, default=0) + 1))
    out = {"nodes": args.nodes, "stallers": args.stallers, "behaviour": args.behaviour, "rounds_closed": len(rounds),
           "failed_rounds": failed, "published_rounds": len([r for r in rounds if r in produced]),
           "first_published_after_failures": None if first is None else len([r for r in failed if r < first]),
           "first_clean_round": first, "benched": {str(r): b for r, b in benched.items() if b},
           "honest_found": len(honest_found), "audit_ok": bool(audit.audit_ok), "audit_problem": audit.audit_problem,
           "honest_averaging_s": {"median": averaging[len(averaging) // 2] if averaging else None,
                                  "mean": round(sum(averaging) / len(averaging), 2) if averaging else None,
                                  "over_5s": sum(a > 5.0 for a in averaging), "rounds": len(averaging)},
           "sit_out_limit": args.sit_out_limit, "honest_finished": finished, "wall_s": round(time.monotonic() - started, 1), "workdir": str(work)}
    # (no incident at all is fine too: in rounds of five or more the averaging itself leaves a breaker out
    # of the retry, and the round publishes)
    incident = len(failed) >= MIN_FAILED_ROUNDS
    out["ok"] = bool(finished and not honest_found and audit.audit_ok and bounded
                     and (first is not None or not incident))
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
