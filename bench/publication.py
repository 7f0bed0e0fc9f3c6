"""Publishing a version: a node's upload streamed from its live tensors (a canonical version file,
hashed by the coordinator as it arrives) against the same state saved to a file first and that
file uploaded (safetensors' ``save_file``; the coordinator reads a non-canonical file back to hash
it), to a real ``grpo-coordinator serve`` on loopback, alternated in one run.

    python bench/publication.py                 # SmolLM2-135M-sized weights + AdamW moments (1.6 GB)
    python bench/publication.py --size 0.05 --repeats 1   # smoke run

The state is what a swarm version holds: 272 weight tensors with SmolLM2-135M's parameter count,
the two AdamW moments of each, their step counts and the schedule's position (random values; the
shapes are 1-D, scaled by ``--size``). One node (tiny model, its own prompts) closes round 0 alone
and reports a hash for version 1 with all of the round's weight; every upload then claims that
hash for a state whose tensors hash otherwise, so the coordinator receives, writes, fsyncs and
hashes all of it and refuses it at the end (``... hash to ..., not the claimed ...``): the version
never advances and every upload does the whole work (publishing itself, a manifest and a log entry,
takes milliseconds). Timed on the node, from the start of the publication to the coordinator's
answer: ``streamed`` = ``CoordinatorClient.upload_version``; ``saved`` = ``save_file`` + the
file's hash + ``upload_snapshot`` (the path the node took before session 14). The node's own state
hash, which both need for their report, is not timed.

Prints ONE JSON line: the median seconds of each, ``speedup`` = saved / streamed, the bytes, and
``refused_as_expected`` (every upload was refused for its hash, after the whole file).
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

SMOLLM2_135M_VALUES = 134_515_008
TENSORS = 272


def log(msg: str) -> None:
    print(f"[publication] {msg}", file=sys.stderr, flush=True)


def version_state(size: float):
    """A swarm version's tensors: weights, both AdamW moments and step counts, the schedule's position."""
    import torch

    per = max(1, int(SMOLLM2_135M_VALUES * size) // TENSORS)
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(TENSORS):
        state[f"model.tensor.{i:03d}"] = torch.randn(per, generator=g)
        state[f"optimizer/{i}/exp_avg"] = torch.randn(per, generator=g) * 1e-3
        state[f"optimizer/{i}/exp_avg_sq"] = torch.rand(per, generator=g) * 1e-6
        state[f"optimizer/{i}/step"] = torch.tensor(7.0)
    state["optimizer/scheduler_last_epoch"] = torch.tensor(7, dtype=torch.int64)
    return state


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=1.0, help="fraction of SmolLM2-135M's parameter count")
    ap.add_argument("--repeats", type=int, default=3, help="uploads of each kind, alternated")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)

    from safetensors.torch import save_file

    from grpo_swarm.node import proving
    from grpo_swarm.node.swarm.demo import LocalSwarm
    from grpo_swarm.node.swarm.participant import Participant
    from grpo_swarm.node.swarm.training_state import version_file
    from grpo_swarm.protocol import grpo_swarm_pb2 as pb
    from grpo_swarm.protocol.client import CoordinatorClient, CoordinatorError
    from grpo_swarm.protocol.identity import Identity

    work = Path(tempfile.mkdtemp(prefix="bench-publication-"))
    try:
        with LocalSwarm(work, nodes=1) as swarm:
            address = swarm.start_coordinator(timeout_s=300)
            client = CoordinatorClient(address, Identity.generate(), timeout_s=600)
            node = Participant(client, work / "node", overrides=["run.threads=1"], software="bench/publication.py")
            hb = node.heartbeat()
            node.submit(node.sample(hb))
            if node.heartbeat().current_round != 1:
                raise RuntimeError("the node's groups did not close round 0")
            claimed = bytes(range(32))  # reported with the round's whole weight; no upload hashes to it
            node.report(1, claimed)
            ref = pb.PolicySnapshotRef(version=1, sha256=claimed)
            state = version_state(args.size)
            actual = proving.state_dict_sha256(state)
            total = version_file(state).total_bytes
            log(f"coordinator on {address}; {total / 1e9:.2f} GB a version; {args.repeats} uploads of each kind")

            def streamed():
                node.client.upload_version(version_file(state), ref)

            def saved():
                path = work / "node" / f"{actual.hex()}.safetensors"
                save_file(state, str(path))
                try:
                    node.client.upload_snapshot(path, ref)
                finally:
                    path.unlink(missing_ok=True)

            times: dict[str, list[float]] = {"streamed": [], "saved": []}
            refused = True
            for i in range(args.repeats):
                order = ("saved", "streamed") if i % 2 == 0 else ("streamed", "saved")
                for kind in order:
                    started = time.perf_counter()
                    try:
                        (streamed if kind == "streamed" else saved)()
                        refused = False  # published: the trick failed
                    except CoordinatorError as e:
                        refused = refused and e.code == "INVALID_ARGUMENT" and "not the claimed" in e.detail
                        if not refused:
                            log(f"{kind}: unexpected refusal {e.code}: {e.detail}")
                    times[kind].append(time.perf_counter() - started)
                    log(f"{kind}: {times[kind][-1]:.2f} s")
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {"streamed_s": round(med["streamed"], 2), "saved_s": round(med["saved"], 2),
                  "speedup": round(med["saved"] / med["streamed"], 2), "version_bytes": total,
                  "repeats": args.repeats, "runs_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
                  "refused_as_expected": refused}
        print(json.dumps(result), flush=True)
        return 0 if refused else 1
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
