"""Verified averaging in groups larger than three: N real peer processes, the last K of them hostile.

The averaging tests (tests/test_swarm_averaging.py) play their hostile rounds with three peers, the
most a 2-core test run affords; the rules that pick who is left out of a retry (first-failure
pointers, the namers a verdict needs, the strict majority an attempt needs) are unit-tested for
more. This bench plays the same peer script (tests/swarm_peer.py, tests/swarm_hostile.py) with
``--peers`` processes: an honest round, then one round per behaviour with the last ``--hostile`` peers
(default 1) hostile, all doing the same.
For each round it checks that every honest peer averaged, all of them hold the same bytes, and
those equal the honest peers' ticket-weighted mean (the hostile peers left out) or, where the
behaviour only lies about something the others ignore (a claimed weight), everyone's mean.

    python bench/hostile_groups.py --peers 5
    python bench/hostile_groups.py --peers 7 --behaviours nan,wrong_average,hang_up
    python bench/hostile_groups.py --peers 5 --hostile 2 --behaviours hang_up_lead

One JSON line: per round the outcome, the attempts, the seconds and why each hostile peer was left
out; ``all_ok`` when every round came out as it should.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))

from swarm_world import small_grads  # noqa: E402

from grpo_swarm.node.swarm.averaging import tensors_sha256  # noqa: E402
from grpo_swarm.protocol.identity import Identity  # noqa: E402

# the averaging tests' timings (tests/test_swarm_averaging.py TIMING)
TIMING = dict(min_matchmaking_time=2.0, request_timeout=1.0, matchmaking_timeout=15.0, sender_timeout=3.0,
              reducer_timeout=6.0, allreduce_timeout=12.0, max_attempts=3)
# behaviour -> (the averager it runs on, the hostile peer's attempts); the hostile peer is left out of
# the round's result in each
BEHAVIOURS = {
    "forged_ticket": ("small_none", 1),
    "over_bound": ("small_none", 1),
    "nan": ("small_none", 2),
    "inf_fp16": ("small_fp16", 2),
    "shape1": ("small_none", 2),
    "norm_lie": ("small_none", 2),
    "wrong_average": ("small_none", 2),
    "wrong_average_fp16": ("small_fp16", 2),
    "withhold_sketch": ("small_none", 2),
    "withhold_reveal": ("small_none", 2),
    # small parts: with more reducers the shares of small_none's 1,024-value parts are one part
    # long, and a staller sending "its first part, then nothing" would stall only some of them
    "stall_always": ("small_drip", 3),
    "hang_up": ("small_none", 3),
    "not_in_group": ("small_none", 3),
    "claimed_weight": ("small_none", 2),  # honest parts: it stays in, its claim ignored
    # hangs up in every attempt and leads a group as soon as one member joins it (tests/swarm_hostile.py)
    "hang_up_lead": ("small_none", 6),
}
DEFAULT = ("forged_ticket,nan,inf_fp16,wrong_average,wrong_average_fp16,withhold_sketch,withhold_reveal,stall_always,"
           "hang_up,not_in_group")
# behaviours whose hostile peer may stay among the contributors, with a correct result: a lie about its
# weight is ignored, and a reducing behaviour changes nothing when the partition gave it no share
# (with many peers and small tensors hivemind leaves some peers without one)
MAY_STAY = {"claimed_weight", "wrong_average", "wrong_average_fp16"}


def plan_for(behaviours: list[str], peers: int, hostile: int = 1) -> list[dict]:
    everyone = list(range(peers))
    rounds = [dict(round=0, kind="small", participants=everyone, averager="small_none", behaviour={})]
    for name in behaviours:
        averager, _ = BEHAVIOURS[name]
        wire = "wrong_average" if name.startswith("wrong_average") else name
        rounds.append(dict(round=len(rounds), kind="small", participants=everyone, averager=averager,
                           behaviour={str(p): wire for p in range(peers - hostile, peers)}, name=name))
    return rounds


def weighted(grads_by_peer: list[list[torch.Tensor]], weights: list[float]) -> list[torch.Tensor]:
    total = sum(weights)
    return [sum(w * g[k].double() for w, g in zip(weights, grads_by_peer)) / total for k in range(len(grads_by_peer[0]))]


def outcome(work: Path, rnd: dict, peers: int, weights: list[int], peer_ids: list[str], hostile: int = 1) -> dict:
    """The round's result as the honest peers' files show it. It came out as it should when the honest
    peers that averaged hold the same bytes, equal to the ticket-weighted mean of the final attempt's
    contributors, no hostile peer is among them (unless its behaviour could not change the result:
    ``MAY_STAY``), and at most one honest peer per hostile one went out with it for one word against
    another (BROKE_WITH, UNCORROBORATED: the documented cost of a peer that frames one groupmate)."""
    from safetensors.torch import load_file

    r, bad = rnd["round"], set(range(peers - hostile, peers))
    name = rnd.get("name", "honest")
    honest = list(range(peers)) if name == "honest" else list(range(peers - hostile))
    reps = {}
    for p in honest:
        path = work / f"r{r}-p{p}.json"
        reps[p] = json.loads(path.read_text()) if path.exists() else {"ok": False, "error": "no report", "attempts": []}
    averaged = [p for p in honest if reps[p]["ok"]]
    out = {"round": r, "averaged": len(averaged), "honest": len(honest),
           "seconds": round(max(rep.get("seconds", 0.0) for rep in reps.values()), 2),
           "attempts": max(len(rep.get("attempts", [])) for rep in reps.values())}
    left_out = {p: (reps[p].get("error") or "")[:120] for p in honest if not reps[p]["ok"]}
    if left_out:
        out["honest_left_out"] = left_out
    if not averaged:
        return out | {"ok": False}
    shas = {reps[p]["sha256"] for p in averaged}
    data = load_file(str(work / f"r{r}-p{averaged[0]}.safetensors"))
    avg = [data[f"avg.{k}"] for k in range(sum(1 for key in data if key.startswith("avg.")))]
    out["same_bytes"] = len(shas) == 1 and tensors_sha256(avg) in shas
    index = {pid: i for i, pid in enumerate(peer_ids)}
    contributors = sorted(index[pid] for pid in reps[averaged[0]]["attempts"][-1]["weights"])
    expected = weighted([small_grads(r, p) for p in contributors], [weights[p] for p in contributors])
    scale = max(float(x.abs().max()) for x in expected)
    out["max_rel_err"] = max(float((a.double() - e).abs().max()) for a, e in zip(avg, expected)) / scale
    tolerance = 2e-3 if rnd["averager"] == "small_fp16" else 1e-6
    one_word = all(why.startswith(("this node was excluded: BROKE_WITH", "this node was excluded: UNCORROBORATED"))
                   for why in left_out.values())
    hostile_in = bad & set(contributors) if name != "honest" else set()
    out["ok"] = out["same_bytes"] and out["max_rel_err"] <= tolerance \
        and len(left_out) <= (0 if name == "honest" else hostile) \
        and one_word and set(contributors) - hostile_in == set(averaged) and (not hostile_in or name in MAY_STAY)
    if name != "honest":
        last = reps[averaged[0]]["attempts"][-1]
        out["hostile"] = {}
        for h in sorted(bad):
            why = [att["excluded"].get(peer_ids[h]) for att in reps[averaged[0]]["attempts"]]
            named = next((w.split(":")[0] for w in reversed(why) if w), None)
            out["hostile"][str(h)] = ("contributed" if h in hostile_in else named
                                      or ("absent from the last group" if peer_ids[h] not in last["members"] else None))
    return out


def run(peers: int, behaviours: list[str], timeout_s: float, keep: str | None, hostile_peers: int = 1) -> dict:
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="hostile-groups-"))
    work.mkdir(parents=True, exist_ok=True)
    plan = plan_for(behaviours, peers, hostile_peers)
    nodes = [Identity.generate() for _ in range(peers)]
    weights = [3 + 2 * i for i in range(peers)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    started = time.monotonic()
    try:
        for i, node in enumerate(nodes):
            node.save(work / f"node{i}.key")
            hostile = i >= peers - hostile_peers
            peer_plan = [dict(rnd, max_attempts=BEHAVIOURS[rnd["name"]][1] if hostile and "name" in rnd
                              else TIMING["max_attempts"]) for rnd in plan]
            cfg = dict(index=i, workdir=str(work), key_path=str(work / f"node{i}.key"),
                       coordinator_seed=bytes(range(32)).hex(), node_keys=[n.public_key_bytes.hex() for n in nodes],
                       role="hostile" if hostile else "honest", timing=TIMING, plan=peer_plan, small_weights=weights)
            (work / f"peer{i}.json").write_text(json.dumps(cfg))
            log = open(work / f"peer{i}.log", "wb")
            procs.append(subprocess.Popen([sys.executable, str(TESTS / "swarm_peer.py"), str(work / f"peer{i}.json")],
                                          stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        honest = range(peers - hostile_peers)
        while not all((work / f"finished-p{i}").exists() for i in honest):
            if time.monotonic() - started > timeout_s:
                break
            if any(procs[i].poll() not in (None, 0) for i in honest):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 9)
                except ProcessLookupError:
                    pass
            p.wait()
    peer_ids = [n.peer_id_base58 for n in nodes]
    rounds = {rnd.get("name", "honest"): outcome(work, rnd, peers, weights, peer_ids, hostile_peers) for rnd in plan}
    return {"bench": "hostile_groups", "peers": peers, "hostile": hostile_peers,
            "seconds": round(time.monotonic() - started, 1),
            "all_ok": all(r["ok"] for r in rounds.values()), "rounds": rounds, "workdir": str(work)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=5, help="peer processes, at least 3")
    ap.add_argument("--hostile", type=int, default=1, help="how many of them (the last ones) are hostile; "
                    "fewer than half of the peers")
    ap.add_argument("--behaviours", default=DEFAULT, help=f"comma-separated, of: {', '.join(BEHAVIOURS)}")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    ap.add_argument("--workdir", default=None, help="keep the peers' files here (default: a temporary folder)")
    args = ap.parse_args()
    names = [b for b in args.behaviours.split(",") if b]
    unknown = [b for b in names if b not in BEHAVIOURS]
    if unknown or args.peers < 3:
        ap.error(f"unknown behaviours {unknown}" if unknown else "--peers must be at least 3")
    if not 1 <= args.hostile < args.peers / 2:
        ap.error("--hostile must be at least 1 and fewer than half of --peers")
    print(json.dumps(run(args.peers, names, args.timeout, args.workdir, args.hostile)))


if __name__ == "__main__":
    main()
