"""The coordinator's stall rule (protocol/stalls.py) against stallers, simulated: how many rounds fail,
and whether an honest node is ever found.

No processes and no network: each round the rule says who sits out, the rest hold tickets, and the
round fails when a staller holds one and wants it to (always, or with probability ``p`` each time),
or, in the honest scenarios, at random (a glitch). Node ids are random, so no key's place in an
order matters. Scenarios (``--runs`` runs of ``--rounds`` rounds each, window ``--window``):

* ``one_staller_nN`` / ``one_staller_p60_nN``: one staller among N nodes, failing every round it holds
  a ticket in / 60 % of them;
* ``two_stallers_nN`` / ``two_stallers_p60_nN`` / ``two_stallers_p30_nN``: two colluding stallers;
* ``honest_glitch5_nN`` / ``honest_glitch15_nN``: no staller, 5 % / 15 % of rounds fail anyway.

    python bench/stall_rule.py
    python bench/stall_rule.py --runs 20 --rounds 320

One JSON line: per scenario the failed rounds (mean, min, max per run), the node-rounds sat out
(mean), ``honest_found`` (honest nodes found, summed over the runs) and ``first_publish`` (the first
round that published, mean over the runs: how long the search took).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from grpo_swarm.protocol.stalls import StallRule

SCENARIOS = {  # name -> (nodes, stallers, probability a staller fails a round it holds a ticket in, glitch rate)
    **{f"one_staller_n{n}": (n, 1, 1.0, 0.0) for n in (3, 5, 7)},
    **{f"one_staller_p60_n{n}": (n, 1, 0.6, 0.0) for n in (3, 5)},
    **{f"two_stallers_n{n}": (n, 2, 1.0, 0.0) for n in (5, 7)},
    **{f"two_stallers_p60_n{n}": (n, 2, 0.6, 0.0) for n in (5, 7)},
    **{f"two_stallers_p30_n{n}": (n, 2, 0.3, 0.0) for n in (5, 7)},
    **{f"honest_glitch{int(q * 100)}_n{n}": (n, 0, 0.0, q) for n in (3, 5) for q in (0.05, 0.15)},
}


def play(nodes: int, stallers: int, p: float, glitch: float, rounds: int, window: int, seed: int) -> dict:
    rng = random.Random(seed)
    members = [f"{rng.getrandbits(128):032x}" for _ in range(nodes)]
    bad = set(members[:stallers])
    rule = StallRule(window)
    failed, sat_out, first_publish = 0, 0, None
    for r in range(rounds):
        benched = rule.benched(r, {m: 1 / nodes for m in members})
        holders = [m for m in members if m not in benched]
        rule.round_closed(r, holders, benched)
        fails = len(holders) >= 2 and (
            (bool(bad & set(holders)) and rng.random() < p) or (not bad and rng.random() < glitch))
        if fails:
            failed += 1
        else:
            rule.published(r)
            first_publish = r if first_publish is None else first_publish
        sat_out += len(benched)
    return {"failed": failed, "sat_out": sat_out, "honest_found": len(set(rule.found) - bad),
            "stallers_found": len(set(rule.found) & bad), "first_publish": first_publish}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=160)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated names (default: all)")
    args = ap.parse_args(argv)
    names = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}")
    started = time.monotonic()
    out = {"runs": args.runs, "rounds": args.rounds, "window": args.window}
    for name in names:
        runs = [play(*SCENARIOS[name], args.rounds, args.window, seed) for seed in range(args.runs)]
        failed = [x["failed"] for x in runs]
        firsts = [x["first_publish"] for x in runs if x["first_publish"] is not None]
        out[name] = {"failed_mean": round(statistics.mean(failed), 1), "failed_min": min(failed),
                     "failed_max": max(failed), "sat_out_mean": round(statistics.mean(x["sat_out"] for x in runs), 1),
                     "honest_found": sum(x["honest_found"] for x in runs),
                     "stallers_found": sum(x["stallers_found"] for x in runs),
                     "first_publish_mean": round(statistics.mean(firsts), 1) if firsts else None}
    out["wall_s"] = round(time.monotonic() - started, 2)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
