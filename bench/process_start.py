"""Starting a local swarm: its coordinator and nodes exec'd (each imports torch and transformers)
against forked from the prefork launcher (node/swarm/prefork.py), alternated in one run.

    python bench/process_start.py                   # 3 nodes, 3 swarms of each kind
    python bench/process_start.py --nodes 2 --repeats 1   # smoke run

Each swarm is the demo's (`LocalSwarm`, tiny model, loopback). Timed from the coordinator's start:
``serving_s`` until it serves, ``joined_s`` until every node has said "joined run", ``averaged_s``
until every node has averaged a round. The forked kind's first swarm also starts the launcher
(``launcher_s``, not in the medians: a process starts it once, every later swarm reuses it).

Prints ONE JSON line: the medians of each kind, and ``speedup`` = exec'd / forked ``averaged_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def log(msg: str) -> None:
    print(f"[process_start] {msg}", file=sys.stderr, flush=True)


def one_swarm(work: Path, nodes: int, prefork: bool) -> dict[str, float]:
    from grpo_swarm.node.swarm.demo import LocalSwarm

    env = {"GRPO_SWARM_PREFORK": "1" if prefork else "0"}
    with LocalSwarm(work, nodes=nodes, env=env) as swarm:
        t0 = time.monotonic()
        swarm.start_coordinator()
        serving = time.monotonic() - t0
        for i in range(nodes):
            swarm.start_node(i)
        joined = averaged = None
        while averaged is None:
            if time.monotonic() - t0 > 300:
                raise RuntimeError(f"the swarm did not average within 300 s (logs in {swarm.logs})")
            if joined is None and all("joined run" in (swarm.logs / f"node{i}.log").read_text(errors="replace")
                                      for i in range(nodes)):
                joined = time.monotonic() - t0
            if joined is not None and all(any(r["averaged"] for r in swarm.records(i)) for i in range(nodes)):
                averaged = time.monotonic() - t0
            time.sleep(0.02)
    return dict(serving_s=serving, joined_s=joined, averaged_s=averaged)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="swarms of each kind, alternated")
    args = ap.parse_args(argv)

    from grpo_swarm.node.swarm.prefork import launcher_for

    work = Path(tempfile.mkdtemp(prefix="bench-process-start-"))
    try:
        t0 = time.monotonic()
        # the environment LocalSwarm gives its processes, so that its first swarm finds this launcher
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "GRPO_SWARM_PREFORK": "1"}
        if launcher_for(env) is None:
            raise RuntimeError("the prefork launcher did not start")
        launcher_s = time.monotonic() - t0
        runs: dict[str, list[dict]] = {"execd": [], "forked": []}
        for r in range(args.repeats):
            for kind in (("execd", "forked") if r % 2 == 0 else ("forked", "execd")):
                res = one_swarm(work / f"{kind}{r}", args.nodes, prefork=kind == "forked")
                log(f"{kind} {r}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
                runs[kind].append(res)
        med = {kind: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for kind, rs in runs.items()}
        print(json.dumps(dict(nodes=args.nodes, repeats=args.repeats, launcher_s=round(launcher_s, 3),
                              **{f"{kind}_{k}": round(v, 3) for kind, m in med.items() for k, v in m.items()},
                              speedup=round(med["execd"]["averaged_s"] / med["forked"]["averaged_s"], 3))))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
