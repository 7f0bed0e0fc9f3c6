"""Publishing a version over capped uplinks: a real ``grpo-coordinator serve`` and two contributors,
each in its own network namespace (:mod:`netns_link`, root only), every uplink capped with tc tbf.

    python bench/publication_links.py --uplink 100mbit             # a SmolLM2-135M-sized version (1.6 GB)
    python bench/publication_links.py --uplink 20mbit --size 0.1    # a home uplink, a smaller version
    python bench/publication_links.py --uplink 1gbit --size 0.02 --scenarios honest   # smoke run

Both contributors close round 0 together (the embedded demo run: tiny model, arithmetic), then
report the same hash for version 1: a synthetic state of SmolLM2-135M's size (272 weight tensors,
both AdamW moments and step counts, random values, the same on both), and follow it to its
publication with ``node/swarm/publication.py`` as ``grpo-node join`` does. Scenarios, each from a
fresh coordinator:

* ``honest``: the designated contributor (smallest node id) uploads at once; the other has no
  measured upload rate yet (it assumes 50 MB/s), so it races after the 10 s grace (``--grace-s``), sees the
  designated upload end first and cancels its own;
* ``stalled``: the designated contributor stops sending after 10 % of the file and keeps its stream
  open (a broken or hostile peer); the other starts its own once the stream was idle for 20 s
  (``--stall-s``);
* ``call_deadline``: the designated contributor uploads once with a 60 s deadline for the whole
  call, as ``CoordinatorClient`` did before session 15 (the other does nothing): on a link too
  slow to send the version in 60 s this fails every time.

Per scenario, as the contributors saw it: ``publish_s`` (from the hash report to the publication;
``null`` when it was not published), ``efficiency`` = version bytes / cap / publish_s, what each
contributor uploaded (bytes, uploads started, whether it gave way), and the uploads' errors.
Prints ONE JSON line; without root, ``skipped`` says why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import netns_link  # noqa: E402
from publication import version_state  # noqa: E402

SCENARIOS = ("honest", "stalled", "call_deadline")
STALL_AT = 0.1  # the stalled scenario's designated contributor stops after this fraction of the file


def log(msg: str) -> None:
    print(f"[publication_links] {msg}", file=sys.stderr, flush=True)


def contributor(args) -> int:
    """One contributor, in its namespace: close round 0, report version 1, follow it to publication."""
    from grpo_swarm.node import proving
    from grpo_swarm.node.swarm.participant import Participant
    from grpo_swarm.node.swarm.publication import PublicationFollower, upload_rank
    from grpo_swarm.node.swarm.training_state import version_file
    from grpo_swarm.protocol import grpo_swarm_pb2 as pb
    from grpo_swarm.protocol.client import CoordinatorClient, CoordinatorError
    from grpo_swarm.protocol.identity import Identity, node_id_from_public_key

    work = Path(args.work)
    state = version_state(args.size)

    class Contributor(Participant):
        def training_state(self):  # the version's tensors: SmolLM2-sized, not the tiny model's
            return state

        def start_upload(self, version, sha256, **kw):
            if not (args.scenario == "stalled" and is_designated):
                return super().start_upload(version, sha256, **kw)
            writer = version_file(state)

            class Stalling:  # sends STALL_AT of the file, then holds the stream open
                total_bytes = writer.total_bytes

                def chunk_pieces(self, chunk_size):
                    for off, pieces in writer.chunk_pieces(chunk_size):
                        if off >= STALL_AT * writer.total_bytes:
                            time.sleep(3600)
                        yield off, pieces

            return self.client.start_upload_version(Stalling(), pb.PolicySnapshotRef(version=version, sha256=sha256),
                                                    **kw)

    client = CoordinatorClient(args.coordinator, Identity.load_or_create(work / "node.key"), timeout_s=600)
    node = Contributor(client, work, overrides=["run.threads=1"], software="bench/publication_links.py")
    node.submit(node.sample(node.heartbeat()))
    deadline = time.monotonic() + 300
    while (hb := node.heartbeat()).current_round < 1:
        if time.monotonic() > deadline:
            raise RuntimeError("round 0 did not close")
        time.sleep(0.2)
    ids = [node_id_from_public_key(bytes(k)) for k in hb.round_participants]
    rank = upload_rank(ids, node.node_id)
    is_designated = rank == 0
    sha = proving.state_dict_sha256(state)
    node.report(1, sha)
    started = time.monotonic()
    out = {"node_id": node.node_id, "designated": is_designated, "version_bytes": version_file(state).total_bytes}
    if args.scenario == "call_deadline":
        if is_designated:
            time.sleep(2.0)  # the other contributor's report
            call = node.client.start_upload_version(version_file(state), pb.PolicySnapshotRef(version=1, sha256=sha),
                                                    timeout_s=60.0)
            try:
                call.result()
                out["published_s"] = time.monotonic() - started
            except CoordinatorError as e:
                out["error"] = f"{e.code}: {e.detail}"[:200]
            out.update(bytes_sent=call.sent, uploads=1, gave_way=False)
        else:
            out.update(bytes_sent=0, uploads=0, gave_way=False)
    else:
        follower = PublicationFollower(node, node.heartbeat, timeout_s=600.0, poll_s=0.2, grace_s=args.grace_s,
                                       stall_s=args.stall_s)
        published = follower.follow(1, sha, rank=rank)
        out.update(published_s=time.monotonic() - started if published is not None else None,
                   bytes_sent=follower.bytes_sent, uploads=follower.uploads, gave_way=follower.gave_way,
                   measured_rate=follower.rate.measured, note=follower.note)
    (work / "result.json").write_text(json.dumps(out))
    os._exit(0)  # a stalled upload's sending thread still sleeps


def run_scenario(net, scenario: str, args, work: Path) -> dict:
    from grpo_swarm.node.swarm.demo import _bin, demo_config_text

    work.mkdir(parents=True)
    text = demo_config_text().replace("samples_per_round = 384", "samples_per_round = 256")
    text = text.replace("round_timeout_s = 15.0", "round_timeout_s = 600.0")
    text = text.replace("min_peers = 2 ", "min_peers = 1 ")  # each contributor samples as it comes up
    # round 0 closes with both contributors' work (256 samples), not at the first one's submission
    text = text.replace("[swarm]\n", "[swarm]\nclose_when_all_submitted = false\n", 1)
    (work / "run.toml").write_text(text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    try:
        with open(work / "coordinator.log", "w") as out:
            coord = subprocess.Popen(net.exec_prefix(0) + [*_bin("grpo-coordinator"), "serve", "-c", str(work / "run.toml"),
                                     "-d", str(work / "coord"), "--host", net.address(0), "--port", "0",
                                     "--port-file", str(work / "port")], stdout=out, stderr=subprocess.STDOUT, env=env)
        procs.append(coord)
        deadline = time.monotonic() + 120
        while not ((work / "port").is_file() and (work / "port").read_text().strip()):
            if coord.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not start: see {work / 'coordinator.log'}")
            time.sleep(0.1)
        address = f"{net.address(0)}:{(work / 'port').read_text().strip()}"
        for i in (1, 2):
            (work / f"c{i}").mkdir()
            with open(work / f"c{i}.log", "w") as out:
                procs.append(subprocess.Popen(
                    net.exec_prefix(i) + [sys.executable, __file__, "--contributor", "--coordinator", address,
                                          "--work", str(work / f"c{i}"), "--size", str(args.size),
                                          "--scenario", scenario, "--grace-s", str(args.grace_s),
                                          "--stall-s", str(args.stall_s)], stdout=out, stderr=subprocess.STDOUT, env=env))
        for p in procs[1:]:
            p.wait(timeout=args.timeout_s)
        results = []
        for i in (1, 2):
            path = work / f"c{i}" / "result.json"
            if not path.is_file():
                raise RuntimeError(f"contributor {i} left no result: see {work / f'c{i}.log'}")
            results.append(json.loads(path.read_text()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results.sort(key=lambda r: not r["designated"])
    times = [r.get("published_s") for r in results if r.get("published_s") is not None]
    publish_s = max(times) if times else None
    total = results[0]["version_bytes"]
    cap = net.rate_bits / 8
    return {"publish_s": None if publish_s is None else round(publish_s, 2),
            "efficiency": None if publish_s is None else round(total / cap / publish_s, 3),
            "ideal_s": round(total / cap, 2), "version_bytes": total,
            "uploaded_bytes": sum(r["bytes_sent"] for r in results),
            "designated": {k: v for k, v in results[0].items() if k not in ("designated", "version_bytes")},
            "other": {k: v for k, v in results[1].items() if k not in ("designated", "version_bytes")}}


def main(argv=None) -> int:
    from grpo_swarm.node.swarm.publication import GRACE_S, STALL_S

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uplink", default="100mbit", help="tc rate of every uplink, e.g. 20mbit, 100mbit, 1gbit")
    ap.add_argument("--size", type=float, default=1.0, help="fraction of SmolLM2-135M's parameter count")
    ap.add_argument("--scenarios", default="honest,stalled,call_deadline")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per scenario")
    ap.add_argument("--grace-s", type=float, default=GRACE_S, help="the race's grace period per rank "
                                                                  "(the run's upload_grace_s)")
    ap.add_argument("--stall-s", type=float, default=STALL_S, help="an upload idle this long has stalled")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--contributor", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--coordinator", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--scenario", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.contributor:
        return contributor(args)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    why = netns_link.unavailable()
    if why:
        print(json.dumps({"skipped": f"capped links {why}"}), flush=True)
        return 0
    netns_link.remove_stale()
    work = Path(tempfile.mkdtemp(prefix="bench-publication-links-"))
    result = {"uplink": args.uplink, "size": args.size}
    try:
        try:
            net = netns_link.CappedBridge(3, args.uplink).open()
        except RuntimeError as e:  # root without the right to make namespaces (a container)
            print(json.dumps({"skipped": f"capped links could not be made: {e}"}), flush=True)
            return 0
        try:
            result["link"] = net.describe()
            for scenario in scenarios:
                log(f"{scenario}: {args.uplink} uplinks")
                result[scenario] = run_scenario(net, scenario, args, work / scenario)
                log(f"{scenario}: {json.dumps(result[scenario])}")
        finally:
            net.close()
        print(json.dumps(result), flush=True)
        return 0
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
