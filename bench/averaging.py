"""Verified gradient averaging (node/swarm/averaging.py) against stock hivemind, 3 peers, same run.

    python bench/averaging.py                          # SmolLM2-135M-sized gradients, loopback
    python bench/averaging.py --uplink 100mbit --size 0.25 --rounds 2   # capped uplinks (root)
    python bench/averaging.py --size 20000 --rounds 1 --warmup 0        # smoke run, seconds

Three peer processes (this script with ``--peer``), each with its own hivemind DHT under its own
Ed25519 node key, average the same gradients: random float32 tensors with SmolLM2-135M's parameter
shapes (272 tensors, 134,515,008 values, computed from its config; nothing is loaded). ``--size`` scales that: a fraction (0.25) or a number of values (20000) keeps the 272
tensors' relative sizes as 1-D tensors. Peer ``i``'s gradient is fixed for the run; tickets give
the peers weights 3, 5, 7 (the stock averager gets the same weights as ``step(weight=...)``), so
every variant computes the same weighted mean. For each compression (``none`` = fp32, ``fp16``;
``uint8`` = hivemind's Uniform8BitQuantization on request, whose averages ours sends in fp16) a
fresh pair of averagers runs ``--warmup`` + ``--rounds`` rounds of each variant, the variants
interleaved round by round (order reversed every other round):

* ``ours``: :class:`VerifiedAverager` with real coordinator-signed tickets (a coordinator key made
  here, as the tests do), ``--part-size`` bytes per part;
  and its share audit reading ``--audit-fraction`` of the rows (default: the averager's);
* ``ours_fullaudit``: the same averager auditing every row (``audit_fraction=1``, switched between
  rounds);
* ``ours_noaudit``: the same averager with its share audit off (``audit_reducers=False``, switched
  between rounds; where the averager has no audit this is the same as ``ours``);
* ``ours_nocheck``: the same averager with every check off: no audit, and (a bench-only subclass)
  no finite/norm pass over the local gradient, no float64 norm check of incoming parts or returned
  averages — the runner and reducer classes are swapped in ``make_runner``. The gather/ticket
  verdicts, the trusted weights and the same-bytes-everywhere reduction stay;
* ``ours_streamreads``: ``ours`` reading every stream message through hivemind's ``StreamReader``
  (``direct_reads=False``, switched between rounds) instead of straight into the part's buffer;
* ``stock``: hivemind's ``DecentralizedAverager`` at its default part size (``--stock-part-size``);
* ``stock_tuned``: the same stock averager at ``--part-size`` (to tell part size from code).

A peer's round time runs from a file barrier (all three peers) to the averaged gradient being where
a trainer reads it, including matchmaking (target and minimum group size 3, ``min_matchmaking_time``
2 s: a full group starts at once). Neither side copies the gradient in that time, as a trainer on
the CPU would not: ours reads it from :meth:`VerifiedAverager.gradient_buffers` (filled once, as the
join loop's backward pass fills them) and leaves the average in its ``result_buffers``; stock's
tensors get the gradient before the barrier (it averages them in place) and hold the average after.
``round_s`` = median over the measured rounds of the slowest peer's time; ``allreduce_s`` the same
for the reduction alone (ours: ``_aggregate_with_group``, i.e. verdicts + snapshot + reduction;
stock: its ``_aggregate_with_group``). CPU: user + system seconds of each peer's whole process tree
(main, DHT and averager processes, p2pd) from the start barrier to the end barrier, summed over the
peers; ``cpu_s_per_gb`` divides by the tensor payload all peers sent (parts to the other reducers
plus averages back to the other senders: ``payload_bytes_per_peer``, 10^9 bytes a GB);
``minor_faults`` the same processes' minor page faults less p2pd's, summed over the peers (fresh
memory touched in the round: every fault is a page the kernel zeroes).
``speedup_vs_stock`` = stock ``round_s`` / ours ``round_s`` per compression (same compression);
``speedup_best_vs_stock_fp32`` = stock fp32 / ours' fastest compression; ``check_overhead`` =
ours / ours_nocheck - 1, ``audit_overhead`` = ours / ours_noaudit - 1, ``direct_reads_speedup`` =
ours_streamreads / ours (``*_allreduce``: the same
from ``allreduce_s``). Correctness: each peer keeps a strided sample (~1M values) of its last
round's result; ``results_equal`` says every variant matches the exact weighted mean (relative
max error ≤ 1e-5 fp32, 4e-3 fp16; relative L2 error ≤ 5e-2 uint8) and ours' results are the same
bytes (SHA-256) on every peer. ``payload_bytes_per_peer`` is computed from hivemind's own partition;
ours' averager also reports what it sent (``bytes_sent_per_peer_reported``).

``--uplink RATE`` (root): each peer runs in its own network namespace on a bridge
(:mod:`netns_link`), its veth capped with ``tc tbf rate RATE burst --tbf-burst``; DHTs bind to the
namespace addresses. Adds ``wire_bytes_per_peer`` (the veth's tx_bytes per round: payload plus
TCP/IP, TLS, yamux and DHT traffic) and ``efficiency`` = (payload bytes per peer / cap) / round_s.
Without root, ``uplink_skipped`` says why and the loopback run is done instead.
``--transport quic``: the peers listen on ``/udp/0/quic-v1`` instead of TCP (rounds fail: p2pd loses
the ends of long streams over QUIC, bench/RESULTS.md session 38).

``--p2p-noise``: the peers' p2p daemons offer Noise as well as TLS 1.3, as hivemind starts them (they
then settle on Noise), instead of TLS alone (:mod:`grpo_swarm.node.swarm.channel_security`); both
variants run over the same choice.

``--micro``: no peers; times the single operations the checks use (finite test vs float32/float64
norms of the whole gradient, float64 vs float32 norm of one part, a fresh clone vs a copy into an
existing buffer, compress/decompress of one part) in one process, one thread.

Prints ONE JSON line; progress goes to stderr, each peer's log to its work folder (kept with
``--keep``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import netns_link  # noqa: E402

from grpo_swarm.node.swarm.channel_security import NOISE_ENV  # noqa: E402  (a light import)

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                    attention_bias=False, mlp_bias=False)
SMOLLM2_135M_VALUES = 134_515_008
VARIANTS = ("ours", "ours_fullaudit", "ours_noaudit", "ours_nocheck", "ours_streamreads", "stock", "stock_tuned")
COMPRESSIONS = ("none", "fp16", "uint8")
DEFAULT_COMPRESSIONS = ("none", "fp16")
TOLERANCE = {"none": 1e-5, "fp16": 4e-3,  # max |result - exact| / max |exact|
             "uint8": 5e-2}  # |result - exact| / |exact| (L2): 8-bit quantisation clips the tails
WEIGHTS = (3, 5, 7)
PEERS = 3
GRAD_SCALE = 1e-3  # gradient values ~ N(0, 1e-6): norm ~ 11.6 at full size, well under NORM_BOUND
NORM_BOUND = 1e4
SAMPLE_VALUES = 1_000_000
RUN_ID = "bench-averaging"
BARRIER_TIMEOUT_S = 900.0


def log(msg: str) -> None:
    print(f"[averaging {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- shapes and gradients --------------------------------------------------------------------------
def smollm2_shapes(cfg: dict = SMOLLM2_135M) -> list[tuple[int, ...]]:
    """SmolLM2-135M's parameter shapes in ``model.parameters()`` order (the tied embedding once), from
    its config: the same list ``LlamaForCausalLM.from_config`` builds (checked against it once), without
    importing transformers (7 s here)."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    layer = [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter), (h,), (h,)]
    shapes = [(v, h), *layer * cfg["num_hidden_layers"], (h,)]
    assert cfg["tie_word_embeddings"] and sum(math.prod(s) for s in shapes) == SMOLLM2_135M_VALUES
    return shapes


def scaled_shapes(shapes: list[tuple[int, ...]], size: float) -> list[tuple[int, ...]]:
    """``size`` ≥ 1 (or exactly the full count): that many values; < 1: that fraction. A full size keeps
    the real shapes; otherwise 1-D tensors with the same relative sizes (at least 1 value each)."""
    total = sum(math.prod(s) for s in shapes)
    target = int(size) if size > 1 else int(round(size * total))
    if target >= total:
        return shapes
    f = target / total
    return [(max(1, int(round(math.prod(s) * f))),) for s in shapes]


def make_grads(shapes, index: int):
    import torch

    g = torch.Generator().manual_seed(7919 * (index + 1))
    return [torch.randn(s, generator=g).mul_(GRAD_SCALE) for s in shapes]


def sample(tensors, stride: int):
    """A strided sample of every tensor, concatenated (1-D float32)."""
    import torch

    return torch.cat([t.detach().reshape(-1)[::stride] for t in tensors]).float().contiguous()


def share_parts(shapes, part_size_bytes: int, compression: str) -> list[list[int]]:
    """The part sizes (values) of each of the 3 equal shares, split exactly as hivemind splits them."""
    import torch
    from hivemind.averaging.partition import TensorPartContainer

    tensors = [torch.empty(s, device="meta") for s in shapes]
    container = TensorPartContainer(tensors, [1.0] * PEERS, compression=compression_of(compression),
                                    part_size_bytes=part_size_bytes)
    return [[p.numel() for p, _ in parts] for parts in container._input_parts_by_peer]


def part_bytes(numel: int, compression: str) -> int:
    """Tensor bytes of one compressed part (Uniform8BitQuantization: an 8-byte codebook size, 256
    float32 codes, one byte a value)."""
    return {"none": 4 * numel, "fp16": 2 * numel, "uint8": 8 + 4 * 256 + numel}[compression]


def payload_per_peer(shares: list[list[int]], compression: str, averages: str | None = None) -> list[int]:
    """Tensor bytes each peer sends in one round: its parts of the others' shares, and its own share's
    averages to each other sender (in ``averages`` compression: ours sends 8-bit rounds' averages in
    fp16, stock hivemind in the parts' compression)."""
    averages = averages or compression
    n = len(shares)
    return [sum(part_bytes(x, compression) for j, share in enumerate(shares) if j != i for x in share)
            + (n - 1) * sum(part_bytes(x, averages) for x in shares[i]) for i in range(n)]


def compression_of(name: str):
    from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization

    return {"none": NoCompression, "fp16": Float16Compression, "uint8": Uniform8BitQuantization}[name]()


# ---- peer process ----------------------------------------------------------------------------------
def averager_classes():
    """The bench-only subclasses (imported in the peer processes only)."""
    from grpo_swarm.node.swarm.averaging import VerifiedAverager
    from grpo_swarm.node.swarm.part_codec import decode_values, float16_view
    from grpo_swarm.node.swarm.part_reducer import PartRejected, ValidatingReducer
    from grpo_swarm.node.swarm.reasons import Reason
    from grpo_swarm.node.swarm.reduction import VerifiedAllReduceRunner
    from hivemind.averaging import DecentralizedAverager
    from hivemind.compression import Float16Compression

    class UncheckedReducer(ValidatingReducer):
        def check_part(self, sender_index, part_index, part):
            pass  # no shape/dtype/finite/norm checks of incoming parts

    class UncheckedRunner(VerifiedAllReduceRunner):
        """The runner's wire checks and decoding, without measuring what it decodes."""

        reducer_class = UncheckedReducer

        def _decode_input(self, sender_index, part_index, msg):
            numel = self.tensor_part_reducer.part_shapes[part_index].numel()
            self._check_wire(msg.tensor_part, numel, f"part {part_index}", self.compression)
            return decode_values(msg.tensor_part, self.compression)

        def _decode_output(self, peer_index, part_index, msg):
            numels = self.part_numels_by_peer[peer_index]
            if part_index >= len(numels):
                raise PartRejected(Reason.BAD_SHAPE, "too many averaged parts")
            self._check_wire(msg.tensor_part, numels[part_index], f"averaged part {part_index}",
                             self.output_compression)
            fp16 = isinstance(self.output_compression, Float16Compression)
            values = float16_view(msg.tensor_part) if fp16 else decode_values(msg.tensor_part, self.output_compression)
            slot = self._output_slot(peer_index, part_index)
            if slot is None:
                return values.float()
            slot.copy_(values)  # into its place, in one pass (as the checked runner, less the norm)
            return slot

    class BenchVerifiedAverager(VerifiedAverager):
        """VerifiedAverager with switches for its validation and its share audit (same wire name and
        protocol; the audit switch is the constructor's ``audit_reducers``, where the averager has one)."""

        _rpc_handlers = None
        _stub_type = None
        checks = True
        check_s = 0.0

        def set_mode(self, checks: bool, audit: bool, direct: bool = True, audit_fraction: float | None = None) -> None:
            mode = [bool(checks), bool(audit), bool(direct), audit_fraction]
            self._bench_mode(*mode)
            self._outer_pipe.send(("_bench_set_mode", mode, {}))

        def _bench_mode(self, checks: bool, audit: bool, direct: bool, audit_fraction: float | None) -> None:
            self.checks = checks
            if hasattr(self, "audit_reducers"):
                self.audit_reducers = audit
            if hasattr(self, "direct_reads"):
                self.direct_reads = direct
            if audit_fraction is not None and hasattr(self, "audit_fraction"):
                self.audit_fraction = audit_fraction  # read where the gather entry is signed (the caller)

        async def _bench_set_mode(self, checks: bool, audit: bool, direct: bool, audit_fraction: float | None) -> None:
            self._bench_mode(checks, audit, direct, audit_fraction)  # in the averager process, before the next step

        def load_local_gradient(self, grads):
            t = time.perf_counter()
            try:
                if self.checks:
                    return super().load_local_gradient(grads)
                with self.get_tensors() as buffers:  # the copy alone
                    for buf, g in zip(buffers, grads):
                        buf.copy_(g)
                return 0.0
            finally:
                self.check_s = time.perf_counter() - t

        def make_runner(self, **kwargs):
            self.runner_class = VerifiedAllReduceRunner if self.checks else UncheckedRunner
            return super().make_runner(**kwargs)

    class StockAverager(DecentralizedAverager):
        """hivemind's DecentralizedAverager; step() returns the reduction's duration, and the part
        size can be changed between steps."""

        _rpc_handlers = None
        _stub_type = None

        def set_part_size(self, part_size_bytes: int) -> None:
            self._outer_pipe.send(("_bench_set_part_size", [int(part_size_bytes)], {}))

        async def _bench_set_part_size(self, part_size_bytes: int) -> None:
            self.allreduce_kwargs["part_size_bytes"] = part_size_bytes

        async def _aggregate_with_group(self, group_info, min_vector_size, **kwargs):
            t = time.monotonic()
            await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
            return {"allreduce_s": time.monotonic() - t, "group_size": len(group_info.peer_ids)}

    return BenchVerifiedAverager, StockAverager


class Barrier:
    def __init__(self, work: Path, index: int):
        self.work, self.index = work, index

    def __call__(self, tag: str, timeout: float = BARRIER_TIMEOUT_S) -> None:
        (self.work / f"b-{tag}-{self.index}").write_bytes(b"")
        paths = [self.work / f"b-{tag}-{i}" for i in range(PEERS)]
        deadline = time.monotonic() + timeout
        while not all(p.exists() for p in paths):
            if time.monotonic() > deadline:
                raise TimeoutError(f"barrier {tag}: missing {[p.name for p in paths if not p.exists()]}")
            time.sleep(0.005)


def tree_usage() -> tuple[float, float, int]:
    """User + system CPU seconds of this peer's process tree, of its p2pd daemons alone, and the
    minor page faults of its Python processes (fresh memory touched: each costs a zeroed page)."""
    import psutil

    me = psutil.Process()
    total = daemon = 0.0
    faults = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
            if p.name().startswith("p2pd"):
                daemon += t.user + t.system
            else:
                faults += minor_faults(p.pid)
        except psutil.Error:
            pass
    return total, daemon, faults


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (field 10 of /proc/PID/stat; 0 where unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2:].split()[7])  # fields after "comm)": state is field 3


def peer_main(config_path: str) -> int:
    cfg = json.loads(Path(config_path).read_text())
    import hashlib

    import torch

    torch.set_num_threads(1)
    from grpo_swarm.node.swarm.child_calls import launch_child
    from grpo_swarm.node.swarm.dht import start_dht
    from grpo_swarm.protocol import grpo_swarm_pb2 as pb
    from grpo_swarm.protocol.identity import Identity, node_id_from_public_key
    from grpo_swarm.protocol.rpc import sign_ticket
    from safetensors.torch import save_file

    me, work = int(cfg["index"]), Path(cfg["workdir"])
    barrier = Barrier(work, me)
    tx_path = cfg.get("tx_bytes_path")

    def tx_bytes() -> int | None:
        return int(Path(tx_path).read_text()) if tx_path else None

    t0 = time.monotonic()
    identity = Identity.from_seed(bytes.fromhex(cfg["node_seeds"][me]))
    coordinator = Identity.from_seed(bytes.fromhex(cfg["coordinator_seed"]))
    node_keys = [Identity.from_seed(bytes.fromhex(s)).public_key_bytes for s in cfg["node_seeds"]]
    quic = cfg.get("transport") == "quic"
    host = [f"/ip4/{cfg['host']}/udp/0/quic-v1" if quic else f"/ip4/{cfg['host']}/tcp/0"]
    maddrs_file = work / "maddrs-p0.json"
    if me == 0:
        dht = start_dht(identity, identity_path=work / f"p{me}.libp2p", host_maddrs=host, allow_udp=quic)
        tmp = maddrs_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([str(m) for m in dht.get_visible_maddrs()]))
        os.replace(tmp, maddrs_file)
    else:
        deadline = time.monotonic() + 120
        while not maddrs_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("peer 0's address file never appeared")
            time.sleep(0.05)
        dht = start_dht(identity, identity_path=work / f"p{me}.libp2p", host_maddrs=host, allow_udp=quic,
                        initial_peers=json.loads(maddrs_file.read_text()))
    shapes = [tuple(s) for s in cfg["shapes"]]
    grads = make_grads(shapes, me)
    out = [torch.empty_like(g) for g in grads]
    stride = cfg["sample_stride"]
    samples = {"grad": sample(grads, stride)}
    weight = WEIGHTS[me]
    startup_s = time.monotonic() - t0

    def ticket(round_index: int) -> bytes:
        t = pb.AdmissionTicket(run_id=RUN_ID, round_index=round_index, node_id=node_id_from_public_key(
            identity.public_key_bytes), node_public_key=identity.public_key_bytes, accepted_samples=weight,
            policy_version=0, time_ms=1)
        return sign_ticket(t, coordinator).SerializeToString()

    OursCls, StockCls = averager_classes()
    timing = cfg["timing"]
    report = {"index": me, "peer_id": identity.peer_id_base58, "startup_s": round(startup_s, 2), "phases": {}}
    ours_round = 0
    for comp in cfg["compressions"]:
        t = time.monotonic()
        compression = compression_of(comp)
        variants = cfg["variants"]
        ours = stock = None
        if any(v.startswith("ours") for v in variants):
            ours = OursCls(
                grads, dht=dht, prefix=f"bench_ours_{comp}", identity=identity,
                coordinator_key=coordinator.public_key_bytes, run_id=RUN_ID, weight_mode="sequences",
                norm_bound=NORM_BOUND, compression=compression, target_group_size=PEERS, min_group_size=PEERS,
                min_contributors=PEERS, min_matchmaking_time=timing["min_matchmaking_time"],
                request_timeout=timing["request_timeout"], matchmaking_timeout=timing["matchmaking_timeout"],
                sender_timeout=timing["sender_timeout"], reducer_timeout=timing["reducer_timeout"],
                allreduce_timeout=timing["allreduce_timeout"], max_attempts=1, part_size_bytes=cfg["part_size"])
        if {"stock", "stock_tuned"} & set(variants):
            stock = launch_child(lambda: StockCls(
                [torch.zeros_like(g) for g in grads], dht, start=False, prefix=f"bench_stock_{comp}",
                target_group_size=PEERS, min_group_size=PEERS, min_matchmaking_time=timing["min_matchmaking_time"],
                request_timeout=timing["request_timeout"], part_size_bytes=cfg["stock_part_size"],
                compression=compression, next_chunk_timeout=timing["sender_timeout"],
                sender_timeout=timing["sender_timeout"], reducer_timeout=timing["reducer_timeout"],
                allreduce_timeout=timing["allreduce_timeout"], allow_state_sharing=False), limit=60.0, what="averager")
        # "ours" audits --audit-fraction of the rows, or the averager's default (ours_fullaudit switches it to 1)
        ours_fraction = cfg["audit_fraction"] if cfg["audit_fraction"] is not None else getattr(ours, "audit_fraction", None)
        if ours is not None:  # as a CPU trainer's backward pass would leave it (the join loop binds .grad)
            for b, g in zip(ours.gradient_buffers(), grads):
                b.copy_(g)
        phase = {"averagers_up_s": round(time.monotonic() - t, 2), "rounds": [], "sha256": {},
                 "audit_switch": ours is not None and hasattr(ours, "audit_reducers")}
        report["phases"][comp] = phase
        total_rounds = cfg["warmup"] + cfg["rounds"]
        for r in range(total_rounds):
            order = variants if r % 2 == 0 else list(reversed(variants))
            for v in order:
                if v.startswith("ours"):
                    ours.set_mode(checks=v != "ours_nocheck", audit=v in ("ours", "ours_fullaudit", "ours_streamreads"),
                                  direct=v != "ours_streamreads",
                                  audit_fraction=1.0 if v == "ours_fullaudit" else ours_fraction)
                elif stock is not None:
                    stock.set_part_size(cfg["part_size"] if v == "stock_tuned" else cfg["stock_part_size"])
                if not v.startswith("ours"):  # stock averages in place: the gradient is written anew each round
                    with stock.get_tensors() as bufs:
                        for b, g in zip(bufs, grads):
                            b.copy_(g)
                barrier(f"{comp}-{r}-{v}-start")
                cpu0, tx0, start = tree_usage(), tx_bytes(), time.perf_counter()
                rec = {"variant": v, "round": r, "warmup": r < cfg["warmup"]}
                result = None
                try:
                    if v.startswith("ours"):
                        res = ours.average(ours_round, ticket(ours_round), ours.gradient_buffers(),
                                           expected_peers=node_keys, out=ours.result_buffers())
                        ours_round += 1
                        rec.update(ok=res.ok, average_s=res.seconds, check_s=ours.check_s,
                                   bytes_sent=getattr(res, "bytes_sent", None),
                                   allreduce_s=res.last.seconds if res.last else None, error=res.error,
                                   audit_s=getattr(res.last, "audit_seconds", None))
                        if not res.ok and res.last is not None:
                            rec["failure"] = {"accused": res.last.accused, "failed": res.last.failed}
                        result = res.grads
                        del res
                    else:
                        s = time.perf_counter()
                        got = stock.step(weight=float(weight), timeout=timing["matchmaking_timeout"],
                                         allow_retries=False)
                        rec.update(ok=True, step_s=time.perf_counter() - s, allreduce_s=got["allreduce_s"])
                        result = stock._averaged_tensors  # (read after the timing, outside its lock: idle now)
                except Exception as e:  # noqa: BLE001 - reported
                    rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
                rec["seconds"] = time.perf_counter() - start
                barrier(f"{comp}-{r}-{v}-done")
                cpu1 = tree_usage()
                if rec["ok"] and result is not None:  # outside the timing: the bench's copy of the result
                    for o, b in zip(out, result):
                        o.copy_(b)
                rec["cpu_s"], rec["cpu_s_p2pd"] = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
                rec["minor_faults"] = cpu1[2] - cpu0[2]
                if tx0 is not None:
                    rec["tx_bytes"] = tx_bytes() - tx0
                phase["rounds"].append(rec)
                if r == total_rounds - 1 and rec["ok"]:
                    samples[f"{comp}.{v}"] = sample(out, stride)
                    if v.startswith("ours"):
                        h = hashlib.sha256()
                        for o in out:
                            h.update(o.numpy().tobytes())
                        phase["sha256"][v] = h.hexdigest()
        for a in (ours, stock):
            if a is not None:
                a.shutdown()
        del ours, stock
    save_file(samples, str(work / f"sample-p{me}.safetensors"))
    out_path = work / f"peer-{me}.json"
    out_path.with_suffix(".tmp").write_text(json.dumps(report))
    os.replace(out_path.with_suffix(".tmp"), out_path)
    barrier("end", timeout=120)
    dht.shutdown()
    return 0


# ---- micro: what the checks cost, operation by operation --------------------------------------------
def micro_main(args) -> int:
    """One process, one thread: the per-round operations the checks add or could use instead, on this
    run's gradient (median of 3). Prints one JSON line."""
    import torch
    from hivemind.compression import CompressionInfo
    from hivemind.compression.serialization import deserialize_torch_tensor

    from grpo_swarm.node.swarm.part_codec import SQUARES_ROW, sum_of_squares

    torch.set_num_threads(1)
    shapes = scaled_shapes(smollm2_shapes(), args.size)
    g = make_grads(shapes, 0)
    values = sum(x.numel() for x in g)

    def timed(fn, n=3):
        xs = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - t)
        return statistics.median(xs)

    res: dict = {"values": values, "threads": 1}
    whole = {
        "isfinite_all": lambda: [bool(torch.isfinite(x).all()) for x in g],
        "norm32": lambda: float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in g]))),
        "norm64": lambda: [float(torch.linalg.vector_norm(x, dtype=torch.float64)) for x in g],
        "clone_fresh": lambda: [x.clone() for x in g],
        # the checks' sum of squares (float32 row norms added in float64), and row dots (linalg.vecdot,
        # which writes every product to a temporary first: session 20)
        "sum_of_squares": lambda: [sum_of_squares(x.reshape(-1)) for x in g],
        "rows_vecdot": lambda: [float(torch.linalg.vecdot(r, r).sum(dtype=torch.float64))
                                for r in (x.reshape(-1)[: x.numel() // SQUARES_ROW * SQUARES_ROW].view(-1, SQUARES_ROW)
                                          for x in g)],
    }
    for name, fn in whole.items():
        res[f"{name}_s"] = rnd(timed(fn), 4)
    buf = [x.clone() for x in g]
    res["copy_into_existing_s"] = rnd(timed(lambda: [b.copy_(x) for b, x in zip(buf, g)]), 4)
    part_values = args.part_size // 4
    flat = max(g, key=lambda x: x.numel()).reshape(-1)
    parts = flat[: part_values * max(1, min(100, flat.numel() // part_values))].split(part_values)

    def per_part(fn):
        return 1e3 * timed(lambda: [fn(p) for p in parts]) / len(parts)

    res["part_values"] = part_values
    res["part_norm64_ms"] = rnd(per_part(lambda p: float(torch.linalg.vector_norm(p, dtype=torch.float64))), 4)
    res["part_norm32_ms"] = rnd(per_part(lambda p: float(torch.linalg.vector_norm(p))), 4)
    res["part_sum_of_squares_ms"] = rnd(per_part(sum_of_squares), 4)
    for name in ("none", "fp16", "uint8"):
        comp, info = compression_of(name), CompressionInfo.from_tensor(parts[0], key=0)
        res[f"part_compress_{name}_ms"] = rnd(per_part(lambda p: comp.compress(p, info, False)), 4)
        ser = [comp.compress(p, info, False) for p in parts]
        res[f"part_decompress_{name}_ms"] = rnd(1e3 * timed(lambda: [deserialize_torch_tensor(x) for x in ser])
                                                / len(ser), 4)
    res.update(micro_decode_under_gil(parts))
    # a peer checks the parts it reduces (2 senders x 1/3) and the averages it gets back (2 reducers x 1/3)
    checked_parts = 2 * (2 * values / 3) / part_values
    res["per_peer_part_checks_norm64_s"] = rnd(checked_parts * res["part_norm64_ms"] / 1e3, 4)
    res["per_peer_part_checks_norm32_s"] = rnd(checked_parts * res["part_norm32_ms"] / 1e3, 4)
    # the share audit's sketch of the whole gradient: one (rows x ROW) @ (ROW x dims) product
    import numpy as np

    from grpo_swarm.node.swarm.share_sketch import ROW, Projection

    rows = -(-values // ROW)
    proj = Projection.draw(b"micro", 0, rows)
    whole_flat = torch.cat([x.reshape(-1) for x in g])
    full = values // ROW
    u, v = proj.U.numpy(), proj.V.numpy()
    # numpy's BLAS threads are set by OPENBLAS_NUM_THREADS before start (run with =1 to compare one thread)
    res["sketch_numpy_s"] = rnd(timed(lambda: np.einsum("rd,rd->d", whole_flat[: full * ROW].numpy().reshape(full, ROW) @ u,
                                                        v[:full], dtype=np.float64)), 4)
    res["openblas_num_threads"] = os.environ.get("OPENBLAS_NUM_THREADS")
    res["sketch_torch_s"] = rnd(timed(lambda: proj.block(whole_flat, 0)), 4)
    halves = [p.half() for p in whole_flat.split(part_values)]
    scratch = torch.empty(part_values)

    def sketch_fp16(reuse: bool):
        row = 0
        for h in halves:
            x = scratch[: h.numel()].copy_(h) if reuse else h.float()
            proj.block(x, row)
            row += -(-h.numel() // ROW)

    def sketch_fp16_blocked():  # what the audit does: float16 views, converted in cache-sized blocks
        row = 0
        for h in halves:
            proj.block(h, row)
            row += -(-h.numel() // ROW)

    res["sketch_fp16_fresh_decode_s"] = rnd(timed(lambda: sketch_fp16(False)), 4)
    res["sketch_fp16_scratch_decode_s"] = rnd(timed(lambda: sketch_fp16(True)), 4)
    res["sketch_fp16_blocked_s"] = rnd(timed(sketch_fp16_blocked), 4)
    res["loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res), flush=True)
    return 0


def micro_decode_under_gil(parts) -> dict:
    """An averaged part decoded into place and measured, ms per part, in a worker thread, alone and
    while another thread runs Python (as the averager's event loop does while parts stream): the
    decoder as it is (whole-part operations) against measuring it chunk by chunk (128 Ki values, as
    before). Each torch call re-takes the GIL, which a busy thread holds up to the switch interval."""
    import threading

    import torch

    from grpo_swarm.node.swarm.part_codec import decode_into, decode_values, encode_values

    chunk = 1 << 17

    def chunked(tp, compression, dst):
        src = decode_values(tp, compression)
        squares = 0.0
        for start in range(0, dst.numel(), chunk):
            piece = dst[start: start + chunk]
            piece.copy_(src[start: start + chunk])
            squares += float(torch.dot(piece, piece))
        return squares

    out: dict = {}
    dsts = [torch.empty_like(p) for p in parts]
    for name in ("none", "fp16"):
        comp = compression_of(name)
        wires = [encode_values(p, comp) for p in parts]
        for load in ("idle", "busy"):
            stop = threading.Event()

            def spin():
                while not stop.is_set():
                    sum(range(1000))

            spinner = threading.Thread(target=spin, daemon=True)
            if load == "busy":
                spinner.start()
            for label, fn in (("whole", decode_into), ("chunked", chunked)):
                times: list[float] = []

                def work():
                    for _ in range(3):
                        t = time.perf_counter()
                        for w, d in zip(wires, dsts):
                            fn(w, comp, d)
                        times.append(time.perf_counter() - t)

                worker = threading.Thread(target=work)
                worker.start()
                worker.join()
                out[f"part_decode_{name}_{label}_{load}_ms"] = rnd(1e3 * statistics.median(times) / len(parts), 4)
            stop.set()
            if load == "busy":
                spinner.join()
    return out


# ---- orchestration ---------------------------------------------------------------------------------
def stop_peers(procs: list[subprocess.Popen]) -> None:
    """Terminate the peer processes we started and everything they started (p2pd, averager and DHT
    processes), by pid."""
    import psutil

    victims = []
    for p in procs:
        if p.poll() is None:
            try:
                victims += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
            except psutil.Error:
                pass
    for v in victims:
        try:
            v.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(victims, timeout=5)
    for v in alive:
        try:
            v.kill()
        except psutil.Error:
            pass


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rnd(x, digits=3):
    return None if x is None else round(x, digits)


def summarize(args, peers: list[dict], samples: list[dict], shapes, uplink_bits: float | None) -> dict:
    res: dict = {}
    exact = sum(w * s["grad"].double() for w, s in zip(WEIGHTS, samples)) / sum(WEIGHTS)
    scale = float(exact.abs().max()) or 1.0
    equal = True
    for comp in args.compressions:
        ours_averages = "fp16" if comp == "uint8" else comp
        payload = {"ours": payload_per_peer(share_parts(shapes, args.part_size, comp), comp, ours_averages),
                   "stock_tuned": payload_per_peer(share_parts(shapes, args.part_size, comp), comp),
                   "stock": payload_per_peer(share_parts(shapes, args.stock_part_size, comp), comp)}
        block: dict = {"audit_switch": all(p["phases"][comp]["audit_switch"] for p in peers),
                       "averagers_up_s": max(p["phases"][comp]["averagers_up_s"] for p in peers),
                       "payload_bytes_per_peer": {k: max(v) for k, v in payload.items()}}
        for v in args.variants:
            pay = payload["ours" if v.startswith("ours") else v]
            rows = [[r for r in p["phases"][comp]["rounds"] if r["variant"] == v] for p in peers]
            measured = list(zip(*[[r for r in rs if not r["warmup"]] for rs in rows]))  # per round: 3 peers
            oks = all(r["ok"] for rs in rows for r in rs)
            round_s = [max(r["seconds"] for r in rr) for rr in measured]
            allreduce = [max((r.get("allreduce_s") or 0.0) for r in rr) for rr in measured]
            cpu = [sum(r["cpu_s"] for r in rr) for rr in measured]
            cpu_p2pd = [sum(r.get("cpu_s_p2pd", 0.0) for r in rr) for rr in measured]
            d = {"ok": oks, "round_s": rnd(median(round_s)), "allreduce_s": rnd(median(allreduce)),
                 "round_s_all": [rnd(x, 2) for x in round_s], "cpu_s": rnd(median(cpu), 2),
                 "cpu_s_p2pd": rnd(median(cpu_p2pd), 2),
                 "minor_faults": int(median([sum(r.get("minor_faults", 0) for r in rr) for rr in measured])),
                 "cpu_s_per_gb": rnd(median(cpu) / (sum(pay) / 1e9), 2) if cpu else None,
                 "warmup_round_s": rnd(median([max(r["seconds"] for r in rr) for rr in
                                               zip(*[[r for r in rs if r["warmup"]] for rs in rows])]), 2)}
            d["payload_bytes_per_peer"] = max(pay)
            if v.startswith("ours"):
                sent = [max(r.get("bytes_sent") or 0 for r in rr) for rr in measured]
                if any(sent):
                    d["bytes_sent_per_peer_reported"] = int(median(sent))  # by the averager itself
                # copying the local gradient into the averager's buffers, with its checks in "ours"
                d["local_load_s"] = rnd(median([max(r.get("check_s") or 0 for r in rr) for rr in measured]))
                d["average_call_s"] = rnd(median([max(r.get("average_s") or 0 for r in rr) for rr in measured]))
                steps = sorted({k for rr in measured for r in rr for k in (r.get("audit_s") or {})})
                if steps:  # the share audit's steps: median over rounds of the slowest peer
                    d["audit_steps_s"] = {k: rnd(median([max((r.get("audit_s") or {}).get(k, 0.0) for r in rr)
                                                         for rr in measured])) for k in steps}
            errors = [r["error"] + (f" {r['failure']}" if r.get("failure") else "") for rs in rows for r in rs
                      if not r["ok"]]
            if errors:
                d["errors"] = errors[:3]
            if all("tx_bytes" in r for rr in measured for r in rr) and measured:
                d["wire_bytes_per_peer"] = int(median([max(r["tx_bytes"] for r in rr) for rr in measured]))
            if uplink_bits and d["round_s"]:
                d["efficiency"] = rnd(max(pay) * 8 / uplink_bits / d["round_s"])
                d["efficiency_allreduce"] = rnd(max(pay) * 8 / uplink_bits / d["allreduce_s"]) if d["allreduce_s"] \
                    else None
            key = f"{comp}.{v}"
            if all(key in s for s in samples):
                err = max(float((s[key].double() - exact).abs().max()) for s in samples) / scale
                l2 = max(float((s[key].double() - exact).norm() / exact.norm()) for s in samples)
                d["max_rel_error"], d["rel_l2_error"] = float(f"{err:.3g}"), float(f"{l2:.3g}")
                # 8-bit quantisation clips the tails: judged by the L2 error there, elsewhere by the worst value
                d["results_ok"] = (l2 if comp == "uint8" else err) <= TOLERANCE[comp]
                equal &= d["results_ok"]
            else:
                d["results_ok"] = False
                equal = False
            if v.startswith("ours"):
                shas = {p["phases"][comp]["sha256"].get(v) for p in peers}
                d["same_bytes_on_every_peer"] = len(shas) == 1 and None not in shas
                equal &= d["same_bytes_on_every_peer"]
            equal &= oks
            block[v] = d
        if "ours" in block and "stock" in block and block["ours"]["round_s"]:
            key = f"{comp}.ours", f"{comp}.stock"
            if all(k in s for s in samples for k in key):
                block["ours_vs_stock_max_rel_diff"] = float(f"{max(float((s[key[0]] - s[key[1]]).abs().max()) for s in samples) / scale:.3g}")
        res[comp] = block
    def ratio(a, b, field="round_s"):  # (a variant whose rounds failed has no time to compare)
        return {c: rnd(res[c][a][field] / res[c][b][field]) for c in args.compressions
                if a in res[c] and b in res[c] and res[c][a]["ok"] and res[c][b]["ok"]
                and res[c][a][field] and res[c][b][field]}
    res["speedup_vs_stock"] = ratio("stock", "ours")
    res["speedup_vs_stock_allreduce"] = ratio("stock", "ours", "allreduce_s")
    res["speedup_vs_stock_tuned"] = ratio("stock_tuned", "ours")
    # tuned including the compression: ours' best round against stock at fp32 (hivemind's default)
    best = [res[c]["ours"]["round_s"] for c in args.compressions
            if "ours" in res[c] and res[c]["ours"]["ok"] and res[c]["ours"]["round_s"]]
    if best and "none" in res and "stock" in res["none"] and res["none"]["stock"]["ok"] and res["none"]["stock"]["round_s"]:
        res["speedup_best_vs_stock_fp32"] = rnd(res["none"]["stock"]["round_s"] / min(best))
    res["check_overhead"] = {c: rnd(v - 1) for c, v in ratio("ours", "ours_nocheck").items()}
    res["check_overhead_allreduce"] = {c: rnd(v - 1) for c, v in ratio("ours", "ours_nocheck", "allreduce_s").items()}
    res["audit_overhead"] = {c: rnd(v - 1) for c, v in ratio("ours", "ours_noaudit").items()}
    res["full_audit_check_overhead"] = {c: rnd(v - 1) for c, v in ratio("ours_fullaudit", "ours_nocheck").items()}
    res["noaudit_check_overhead"] = {c: rnd(v - 1) for c, v in ratio("ours_noaudit", "ours_nocheck").items()}
    res["direct_reads_speedup"] = ratio("ours_streamreads", "ours")
    res["results_equal"] = bool(equal)
    return res


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=1.0,
                    help="a fraction of SmolLM2-135M's 134.5M values (<= 1) or a number of values (> 1)")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds of each variant and compression")
    ap.add_argument("--warmup", type=int, default=1, help="rounds before those, not counted")
    ap.add_argument("--compressions", default=",".join(DEFAULT_COMPRESSIONS),
                    help="some of none (fp32), fp16, uint8 (hivemind Uniform8BitQuantization)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {','.join(VARIANTS)}")
    ap.add_argument("--part-size", type=int, default=1 << 20,
                    help="ours' (and stock_tuned's) part_size_bytes (compressed bytes per part; 1 MiB is the "
                         "averager's default, 4 MiB is faster on loopback)")
    ap.add_argument("--audit-fraction", type=float, default=None,
                    help="ours' share audit reads this fraction of the rows (default: the averager's)")
    ap.add_argument("--stock-part-size", type=int, default=1 << 19, help="stock's part_size_bytes (hivemind default)")
    ap.add_argument("--uplink", default=None, help="cap each peer's uplink (tc rate: 100mbit, 1gbit; root only)")
    ap.add_argument("--transport", choices=("tcp", "quic"), default="tcp",
                    help="how the peers connect (quic: every round fails here, stock's too; why grpo-node join "
                         "refuses QUIC addresses)")
    ap.add_argument("--p2p-noise", action="store_true",
                    help="the peers' p2pd offers Noise as well as TLS, as hivemind starts it (they then settle on "
                         "Noise); by default it offers TLS 1.3 alone (node/swarm/channel_security.py)")
    ap.add_argument("--tbf-burst", default="2mbit")
    ap.add_argument("--tbf-latency", default="50ms")
    ap.add_argument("--min-matchmaking-time", type=float, default=2.0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (peer logs, reports)")
    ap.add_argument("--micro", action="store_true",
                    help="only time the single operations the checks use (one process, one thread)")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.compressions = [c for c in args.compressions.split(",") if c]
    args.variants = [v for v in args.variants.split(",") if v]
    if not set(args.compressions) <= set(COMPRESSIONS) or not set(args.variants) <= set(VARIANTS):
        ap.error(f"compressions among {COMPRESSIONS}, variants among {VARIANTS}")
    if args.rounds < 1 or args.warmup < 0 or args.size <= 0:
        ap.error("--rounds >= 1, --warmup >= 0, --size > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peer:
        return peer_main(args.peer)
    if args.micro:
        return micro_main(args)
    result_fd = os.dup(1)  # the JSON line goes here; everything else to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # both clean up (peers, namespaces)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt even if started with SIGINT ignored
    started = time.perf_counter()
    shapes = scaled_shapes(smollm2_shapes(), args.size)
    values = sum(math.prod(s) for s in shapes)
    res: dict = {"values": values, "tensors": len(shapes)}
    net = None
    uplink_bits = None
    if args.uplink:
        uplink_bits = netns_link.rate_bits(args.uplink)
        why = netns_link.unavailable()
        if why:
            res["uplink_skipped"] = why
            log(f"--uplink {args.uplink} skipped: {why}; running on loopback")
            uplink_bits = None
    payload = max(payload_per_peer(share_parts(shapes, args.part_size, "none"), "none"))
    floor = (uplink_bits / 8 * 0.2) if uplink_bits else 20e6  # bytes/s no honest run falls below
    allreduce_timeout = max(120.0, 3 * payload / floor)
    timing = dict(min_matchmaking_time=args.min_matchmaking_time, request_timeout=1.0,
                  matchmaking_timeout=max(30.0, 4 * args.min_matchmaking_time), sender_timeout=30.0,
                  reducer_timeout=60.0, allreduce_timeout=allreduce_timeout)
    work = Path(tempfile.mkdtemp(prefix="bench-averaging-"))
    procs: list[subprocess.Popen] = []
    logs = []
    ok = False
    try:
        if uplink_bits:
            netns_link.remove_stale()
            net = netns_link.CappedBridge(PEERS, args.uplink, burst=args.tbf_burst, latency=args.tbf_latency).open()
            log(f"capped links: {net.describe()}")
        seeds = [bytes([i + 1]) * 32 for i in range(PEERS)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "HIVEMIND_LOGLEVEL": os.environ.get("HIVEMIND_LOGLEVEL", "WARNING"),
               NOISE_ENV: "1" if args.p2p_noise else "0"}
        for i in range(PEERS):
            cfg = dict(index=i, workdir=str(work), shapes=shapes, node_seeds=[s.hex() for s in seeds],
                       coordinator_seed=bytes(range(32)).hex(), host=net.address(i) if net else "127.0.0.1",
                       tx_bytes_path=net.tx_bytes_path(i) if net else None, compressions=args.compressions,
                       variants=args.variants, warmup=args.warmup, rounds=args.rounds, part_size=args.part_size,
                       stock_part_size=args.stock_part_size, audit_fraction=args.audit_fraction, timing=timing,
                       sample_stride=max(1, values // SAMPLE_VALUES), transport=args.transport)
            path = work / f"peer-{i}.config.json"
            path.write_text(json.dumps(cfg))
            logf = open(work / f"peer-{i}.log", "w")
            logs.append(logf)
            prefix = net.exec_prefix(i) if net else []
            procs.append(subprocess.Popen([*prefix, sys.executable, str(Path(__file__).resolve()), "--peer", str(path)],
                                          stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(HERE.parent)))
        log(f"{PEERS} peers started ({values:,} values in {len(shapes)} tensors, variants {args.variants}, "
            f"compressions {args.compressions}, {args.warmup} + {args.rounds} rounds); work folder {work}")
        seen = set()
        while True:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
                raise RuntimeError(f"peer(s) {bad} exited with {[codes[i] for i in bad]}: "
                                   + " | ".join((work / f"peer-{i}.log").read_text()[-1500:] for i in bad))
            if all(c == 0 for c in codes):
                break
            for f in sorted(work.glob("b-*-done-0")):
                if f.name not in seen:
                    seen.add(f.name)
                    log(f"  {f.name[2:-7]} done")
            time.sleep(0.5)
        from safetensors.torch import load_file

        peers = [json.loads((work / f"peer-{i}.json").read_text()) for i in range(PEERS)]
        samples = [load_file(str(work / f"sample-p{i}.safetensors")) for i in range(PEERS)]
        res.update(summarize(args, peers, samples, shapes, uplink_bits))
        res["startup_s"] = max(p["startup_s"] for p in peers)
        ok = True
    except BaseException as e:
        res["error"] = f"{type(e).__name__}: {e}"[:3000]
        log(f"failed: {res['error']}")
    finally:
        stop_peers(procs)
        for f in logs:
            f.close()
        if net is not None:
            net.close()
        if args.keep or not ok:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res["config"] = {
        "peers": PEERS, "weights": list(WEIGHTS), "variants": args.variants, "compressions": args.compressions,
        "rounds": args.rounds, "warmup": args.warmup, "part_size": args.part_size,
        "audit_fraction": args.audit_fraction, "stock_part_size": args.stock_part_size, "size": args.size, "timing": timing,
        "link": net.describe() if net is not None else "loopback 127.0.0.1", "transport": args.transport,
        "channel_security": "noise+tls (hivemind's)" if args.p2p_noise else "tls", "uplink": args.uplink if uplink_bits else None, "cpus": os.cpu_count(),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2), "wall_s": round(time.perf_counter() - started, 1),
    }
    os.write(result_fd, (json.dumps(res) + "\n").encode())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
