"""A DHT process killed while it answers calls, again and again: does the next one start?

hivemind's processes share ``multiprocessing`` locks with the process that forked them. A DHT process
holds MPFuture's update lock while it sends a result home; killed then, it left the lock held, and every
DHT process started after it wedged before saying it was ready (a node restarting its swarm side kills
its processes so). Each kind of lock runs in a fresh interpreter: hivemind's own, and
node/swarm/fork_locks.py's. Each start is given ``--start-limit`` seconds; hivemind's locks stop at their
first wedged start (every later one would wedge too). Prints one JSON line.

    python bench/child_kills.py --kills 40
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def trial(locks: str, kills: int, start_limit: float, seed: int) -> dict:
    """In this interpreter: start a DHT, keep two threads calling it, kill it at a random moment; repeat."""
    import random
    import threading

    import hivemind

    from grpo_swarm.node.swarm.child_calls import ChildSilent, result_while_alive, run_in_dht
    from grpo_swarm.node.swarm.dht import _peer_ids_in_dht
    from grpo_swarm.node.swarm.liveness import stop_swarm_side

    if locks == "ours":
        from grpo_swarm.node.swarm.fork_locks import install_fork_safe_locks

        install_fork_safe_locks()
    rng = random.Random(seed)
    started, answered, start_s = 0, 0, []
    for _ in range(kills + 1):
        dht = hivemind.DHT(start=False, host_maddrs=LOOPBACK)
        t0 = time.monotonic()
        dht.run_in_background(await_ready=False)  # (not start_child: it would install our locks)
        try:
            result_while_alive(dht._ready, alive=dht.is_alive, limit=start_limit, what="the DHT process")
        except ChildSilent:
            stop_swarm_side(None, dht)
            return dict(kills_before_a_wedged_start=started, calls_answered=answered, start_s=_median(start_s))
        start_s.append(time.monotonic() - t0)
        started += 1
        if started > kills:
            stop_swarm_side(None, dht)
            break
        stop = threading.Event()

        def calls():
            nonlocal answered
            while not stop.is_set():
                try:
                    run_in_dht(dht, _peer_ids_in_dht, limit=5.0)
                    answered += 1
                except Exception:  # noqa: BLE001 - the process is being killed
                    return

        threads = [threading.Thread(target=calls, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.05, 0.5))
        stop_swarm_side(None, dht)  # SIGKILL, then its p2p daemon
        stop.set()
        for t in threads:
            t.join(10.0)
    return dict(kills_before_a_wedged_start=None, kills=kills, calls_answered=answered, start_s=_median(start_s))


def _median(xs: list[float]) -> float | None:
    return round(sorted(xs)[len(xs) // 2], 3) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=40)
    ap.add_argument("--start-limit", type=float, default=10.0, help="seconds a DHT process has to start")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trial", choices=["hivemind", "ours"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trial:
        print(json.dumps(trial(args.trial, args.kills, args.start_limit, args.seed)))
        return
    out = {"bench": "child_kills", "kills": args.kills}
    for locks in ("hivemind", "ours"):
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, __file__, "--trial", locks, "--kills", str(args.kills),
                              "--start-limit", str(args.start_limit), "--seed", str(args.seed)],
                             capture_output=True, text=True, timeout=args.kills * (args.start_limit + 20) + 120)
        if run.returncode != 0:
            raise SystemExit(f"the {locks} trial failed:\n{run.stderr[-3000:]}")
        out[f"{locks}_locks"] = dict(json.loads(run.stdout.strip().splitlines()[-1]), seconds=round(time.monotonic() - t0, 1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
