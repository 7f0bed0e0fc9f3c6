"""One swarm peer for tests/test_swarm_averaging.py, run as ``python tests/swarm_peer.py CONFIG.json``.

It starts its DHT from its node key file (peer 0 first; the others bootstrap from peer 0's address
file), builds the averagers its plan uses (small tensors with each compression, in client mode, in
small parts; the tiny model's parameters weighted by sequences and by tokens) and plays its plan
(the rounds of the test's plan its swarm was given) round by round. A round
starts when all its participants have reached it (files ``ready-<round>-<peer>`` in the shared
work folder). Each round's outcome goes to ``r<round>-p<peer>.json`` (report, plain JSON) and
``r<round>-p<peer>.safetensors`` (local and averaged tensors): the test reads only those formats.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BARRIER_TIMEOUT_S = 180.0


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def wait_for(paths: list[Path], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.exists()]
            raise TimeoutError(f"{what}: still missing {missing} after {timeout} s")
        time.sleep(0.05)


def main(config_path: str) -> int:
    cfg = json.loads(Path(config_path).read_text())
    import torch

    torch.set_num_threads(1)
    from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization
    from safetensors.torch import save_file
    from swarm_hostile import NORM_LIE_FACTOR, OVER_BOUND_FACTOR, HostileAverager
    from swarm_world import (
        GROUPS,
        NORM_BOUND,
        RUN_ID,
        SMALL_SHAPES,
        gradient,
        make_ticket,
        make_trainer,
        small_grads,
        ticket_type,
        union_batch,
    )

    from grpo_swarm.node.swarm.averaging import VerifiedAverager, tensors_sha256
    from grpo_swarm.node.swarm.dht import start_dht
    from grpo_swarm.protocol.identity import Identity, peer_id_from_public_key

    me = int(cfg["index"])
    work = Path(cfg["workdir"])
    timing = cfg["timing"]
    identity = Identity.load(cfg["key_path"])
    coordinator = Identity.from_seed(bytes.fromhex(cfg["coordinator_seed"]))
    node_keys = [bytes.fromhex(k) for k in cfg["node_keys"]]
    events = open(work / f"events-p{me}.log", "a", buffering=1)

    def event(text: str) -> None:
        events.write(f"{time.time():.3f} {text}\n")

    t0 = time.monotonic()
    loopback = ["/ip4/127.0.0.1/tcp/0"]
    maddrs_file = work / "maddrs-p0.json"
    if me == 0:
        dht = start_dht(identity, identity_path=work / f"p{me}.libp2p", host_maddrs=loopback)
        write_atomic(maddrs_file, json.dumps([str(m) for m in dht.get_visible_maddrs()]).encode())
    else:
        wait_for([maddrs_file], BARRIER_TIMEOUT_S, "peer 0's address")
        dht = start_dht(identity, identity_path=work / f"p{me}.libp2p", host_maddrs=loopback,
                        initial_peers=json.loads(maddrs_file.read_text()))
    event(f"dht {dht.peer_id} up after {time.monotonic() - t0:.2f} s")

    # only what this peer's plan uses: a plan without GRPO rounds builds no model (nor its averagers)
    used = {rnd["averager"] for rnd in cfg["plan"] if me in rnd["participants"]}
    trainer = batch = completion_sha = None
    if used & {"model_seq", "model_tok"}:
        trainer = make_trainer()
        batch = union_batch(trainer)
        completion_sha = tensors_sha256([batch.rollouts.completion_ids, batch.rollouts.completion_mask])

    hostile = cfg["role"] == "hostile"
    cls = HostileAverager if hostile else VerifiedAverager
    extra = {}
    if hostile:
        extra = dict(behaviours={r["round"]: r["behaviour"].get(str(me), "honest") for r in cfg["plan"]},
                     stall_marker=str(work / f"stalled-p{me}"), lost_cancel_marker=str(work / f"lost-cancel-p{me}"),
                     accuse_target=peer_id_from_public_key(node_keys[0]),
                     accuse_all=tuple(peer_id_from_public_key(k) for k in node_keys if k != identity.public_key_bytes))
    common = dict(dht=dht, identity=identity, coordinator_key=coordinator.public_key_bytes, run_id=RUN_ID,
                  norm_bound=NORM_BOUND, ticket_type=ticket_type(), target_group_size=len(node_keys),
                  min_group_size=2, min_contributors=2, **timing, **extra,
                  # members ask for different audit fractions: every round must still agree on the
                  # group's (the largest a contributor asks for), or honest sketches would not match
                  audit_fraction=(0.25, 0.5, 0.125)[me % 3],
                  # the plan's hostile rounds follow each other: H would sit out the next ones; a round
                  # turns the sit-outs on with "sit_out_limit" (the memory itself records every round)
                  sit_out_limit=0)
    small = [torch.zeros(s) for s in SMALL_SHAPES]
    builders = {
        "small_none": lambda: cls(small, prefix="small", weight_mode="sequences", compression=NoCompression(),
                                  part_size_bytes=4096, **common),
        "small_fp16": lambda: cls(small, prefix="smallfp16", weight_mode="sequences", compression=Float16Compression(),
                                  part_size_bytes=2048, **common),
        # peer 1 in client mode: it reduces nothing, serves no calls, and its audit entries reach
        # the others only through the reducers (relayed) and their answers
        "small_client": lambda: cls(small, prefix="smallclient", weight_mode="sequences", compression=NoCompression(),
                                    part_size_bytes=4096, client_mode=me == 1, **common),
        "small_8bit": lambda: cls(small, prefix="small8bit", weight_mode="sequences",
                                  compression=Uniform8BitQuantization(), part_size_bytes=2048, **common),
        # small parts (about 11 a share): a sender dripping them just under sender_timeout outlasts the
        # all-reduce timeout
        "small_drip": lambda: cls(small, prefix="smalldrip", weight_mode="sequences", compression=NoCompression(),
                                  part_size_bytes=512, **common),
        "model_seq": lambda: cls(trainer.trainable, prefix="modelseq", weight_mode="sequences",
                                 part_size_bytes=1 << 16, **common),
        "model_tok": lambda: cls(trainer.trainable, prefix="modeltok", weight_mode="tokens", part_size_bytes=1 << 16,
                                 **common),
    }
    averagers = {name: build() for name, build in builders.items() if name in used}
    event(f"averagers up after {time.monotonic() - t0:.2f} s")
    write_atomic(work / f"started-p{me}", b"1")

    for rnd in cfg["plan"]:
        r, participants = int(rnd["round"]), [int(p) for p in rnd["participants"]]
        if me not in participants:
            continue
        write_atomic(work / f"ready-{r}-{me}", b"1")
        wait_for([work / f"ready-{r}-{p}" for p in participants], BARRIER_TIMEOUT_S, f"round {r} barrier")
        behaviour = rnd["behaviour"].get(str(me), "honest")
        if rnd["kind"] == "grpo":
            grads, seqs, toks = gradient(trainer, batch, GROUPS[rnd["K"]][me], rnd["loss_type"])
        else:
            grads, seqs, toks = small_grads(r, me), cfg["small_weights"][me], 0
        if behaviour == "norm_lie":
            grads = [g * NORM_LIE_FACTOR for g in grads]
        elif behaviour == "over_bound":
            grads = [g * OVER_BOUND_FACTOR for g in grads]
        ticket = make_ticket(coordinator, identity.public_key_bytes, r, seqs, toks)
        if behaviour == "forged_ticket":  # inflate the weight after the coordinator signed
            t = ticket_type().FromString(ticket)
            t.accepted_samples *= 100
            ticket = t.SerializeToString()
        elif behaviour == "other_round_ticket":
            ticket = make_ticket(coordinator, identity.public_key_bytes, r + 100, seqs, toks)
        elif behaviour == "other_node_ticket":
            ticket = make_ticket(coordinator, node_keys[0], r, seqs, toks)
        # the round's peers as the coordinator names them; a member left out of them (a sybil) still
        # averages, counting itself in
        named = [int(p) for p in rnd.get("expected", participants)]
        expected = [node_keys[p] for p in (named if me in named else participants)]
        out = {"round": r, "index": me, "behaviour": behaviour, "peer_id": identity.peer_id_base58,
               "weights": {"sequences": seqs, "tokens": toks}, "completion_sha": completion_sha}
        event(f"round {r} start ({behaviour})")
        started = time.monotonic()
        averager, kwargs = averagers[rnd["averager"]], {}
        averager.break_memory.limit = int(rnd.get("sit_out_limit", 0))
        if rnd["kind"] == "grpo" and me != 0 and behaviour == "honest":
            # peers 1 and 2 take the in-place path a CPU trainer takes (the gradient already in the
            # averager's input buffers, the result left in its output buffers); peer 0 copies both ways
            for b, g in zip(averager.gradient_buffers(), grads):
                b.copy_(g)
            grads, kwargs = averager.gradient_buffers(), {"out": averager.result_buffers()}
        if str(me) in rnd.get("delay", {}):  # a slower gradient: this member reaches the averaging late
            time.sleep(float(rnd["delay"][str(me)]))
        if "straggler_wait" in rnd:
            kwargs["straggler_wait"] = float(rnd["straggler_wait"])
        if "gone" in rnd:  # as the coordinator's round_moved_on lists a peer that said goodbye
            kwargs["gone"] = lambda gone=rnd["gone"]: [node_keys[int(q)] for q in gone]
        # as join asks the coordinator for a published version; the hostile peer asks in each round it
        # misbehaves in or is not named in (as a product node would), so that it does not hold the next
        # round's barrier with retries for nobody once the others are done
        if rnd.get("round_over_when_others_done") or (hostile and (behaviour != "honest" or me not in named)):
            kwargs["round_over"] = lambda r=r, ps=participants: all(
                (work / f"r{r}-p{q}.json").exists() for q in ps if q != me)
        try:
            res = averager.average(r, ticket, grads, expected_peers=expected, max_attempts=rnd.get("max_attempts"),
                                   **kwargs)
            if "out" in kwargs:
                assert all(a is b for a, b in zip(res.grads or kwargs["out"], kwargs["out"])), "the result was copied"
            out.update(ok=res.ok, error=res.error, seconds=res.seconds,
                       attempts=[dataclasses.asdict(a) for a in res.attempts], reportable=res.reportable(),
                       left_out_as_stalled=res.left_out_as_stalled, sat_out=res.sat_out,
                       sha256=tensors_sha256(res.grads) if res.ok else None)
        except Exception as e:  # noqa: BLE001 - reported to the test
            res = None
            out.update(ok=False, error=f"raised {type(e).__name__}: {e}", seconds=time.monotonic() - started,
                       attempts=[], sha256=None, traceback=traceback.format_exc())
        event(f"round {r} done ok={out['ok']} in {out['seconds']:.2f} s")
        tensors = {f"local.{k}": g.detach().float().contiguous() for k, g in enumerate(grads)}
        if res is not None and res.ok:
            tensors.update({f"avg.{k}": g.contiguous() for k, g in enumerate(res.grads)})
        save_file(tensors, str(work / f"r{r}-p{me}.safetensors"))
        write_atomic(work / f"r{r}-p{me}.json", json.dumps(out).encode())

    write_atomic(work / f"finished-p{me}", b"1")
    event("finished")
    if cfg.get("release"):  # stop only once the test says so: a swarm still playing beside this one
        wait_for([Path(cfg["release"])], BARRIER_TIMEOUT_S * 4, "the test's release")  # is not slowed by our stop
    for av in averagers.values():
        av.shutdown()
    dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
