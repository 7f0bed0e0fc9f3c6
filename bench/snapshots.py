"""Snapshot downloads and proof submission through the coordinator's gRPC API.

    python bench/snapshots.py                        # SmolLM2-135M-sized fp32 snapshot (~538 MB), 64 nodes
    python bench/snapshots.py --quick --skip-capped  # smoke run: ~20 MB, 4 nodes, < 60 s

Prints ONE JSON line (everything else goes to stderr):

* loopback: ``CoordinatorClient.download_snapshot`` (signed manifest, every chunk's SHA-256
  checked, written to disk and fsynced) of a safetensors file of ``--params`` random parameters
  against a raw TCP transfer of the same bytes on 127.0.0.1 (a server thread ``sendfile``s the file,
  the client ``recv_into``s a buffer of ``chunk_size`` bytes, writes it to a file and fsyncs). Both
  servers run in this process, in threads. Runs alternate raw, gRPC, raw, gRPC, ... ``--repeats``
  times; ``grpc_mb_s`` / ``raw_mb_s`` are the best (fastest) run, ``*_median_mb_s`` the median,
  ``loopback_ratio`` = best gRPC / best raw (``loopback_ratio_median`` of the medians).
  ``raw_fsync_seconds`` is the raw client's final fsync; ``raw_no_fsync_mb_s`` the best raw run
  without it (the client flushes as it goes, every few MiB, so its own final fsync is short), and
  ``loopback_ratio_vs_raw_no_fsync`` best gRPC against that. MB = 10^6 bytes.
* capped: the same over a veth pair between two network namespaces, each end shaped with
  ``tc qdisc ... tbf rate 1gbit``; coordinator and client are subprocesses started with
  ``ip netns exec``. ``capped_throughput_mbit`` is the best gRPC download, ``capped_ratio`` =
  that / 1000 Mbit/s; ``capped_raw_mbit`` the raw TCP transfer over the same link, for reference
  (the link's own ceiling with TCP/IP headers is ~95.6% of 1 Gbit/s at MTU 1500). Needs root and
  ``ip netns``; otherwise ``capped_skipped`` says why.
* resume: a download stopped after half the chunks (``max_chunks``), with a torn write appended to
  the ``.part`` file, then resumed; ``resume_ok`` = the final file's SHA-256 is the manifest's,
  ``resumed_from_bytes`` = the verified prefix kept, ``resume_bytes_served`` = what the
  coordinator sent for the second call.
* submit: real reward proofs from real rollouts of the tiny model (``--proof-nodes`` node
  identities, one round's assigned prompts each, ``G`` completions per prompt), made before the
  clock starts, then sent with ``CoordinatorClient.submit_proofs``, one node's round per request,
  to a coordinator built by ``model_setup`` (so rewards are recomputed, prompt hashes and decoding
  checked, and ``spot_check_rate`` of the groups re-run through the model).
  ``submit_proofs_per_s`` = proofs / wall time of all requests; ``submit_all_accepted`` = every
  group was accepted.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SMOLLM2_135M_PARAMS = 134_515_008  # 30 layers of 576, vocab 49152, tied embeddings
QUICK_PARAMS = 5_000_000  # 20 MB at fp32
TENSOR_ELEMENTS = 1 << 24  # the snapshot is cut into tensors of at most this many parameters
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LINK_MBIT = 1000.0
NS_ADDR = ("10.77.0.1", "10.77.0.2")  # server, client (each namespace has its own routing)


def log(msg: str) -> None:
    print(f"[snapshots] {msg}", file=sys.stderr, flush=True)


def mb_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def sha256_file(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.digest()


def unlink(*paths: Path) -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)


# ---- configuration -------------------------------------------------------------------------------
def run_config(run_id: str, *, prompts_per_round: int = 2, group_size: int = 4, samples_per_round: int = 16,
               max_completion_length: int = 4, spot_check_rate: float = 0.05, data_size: int = 64):
    from grpo_swarm.coordinator.config import parse_run_config

    return parse_run_config({
        "run": {"id": run_id, "seed": 7},
        "model": {"name": "tiny", "dtype": "float32"},
        "data": {"dataset": "arithmetic:4", "size": data_size},
        "rewards": [{"name": "arithmetic_accuracy"}],
        "grpo": {"group_size": group_size, "max_completion_length": max_completion_length},
        "optim": {"lr": 1e-3},
        "swarm": {"prompts_per_round": prompts_per_round, "samples_per_round": samples_per_round,
                  "max_staleness": 1, "spot_check_rate": spot_check_rate},
    }, f"<{run_id}>")


def file_setup(src: Path, sha: bytes):
    """A RunSetup factory whose initial snapshot is an existing file (hard-linked into the store):
    no model is loaded. The run's tokenizer-dependent numbers are placeholders."""
    from grpo_swarm.coordinator.core import RunSetup
    from grpo_swarm.protocol.run_spec import AuditHooks

    def build(payload_for, snapshot_dir: Path) -> RunSetup:
        def initial(directory: Path) -> tuple[Path, bytes]:
            dest = Path(directory) / f"{sha.hex()}.safetensors"
            if not dest.exists():
                try:
                    os.link(src, dest)
                except OSError:
                    shutil.copyfile(src, dest)
            return dest, sha

        return RunSetup(64, (0,), 80, AuditHooks(), initial)

    return build


def file_coordinator(data_dir: Path, src: Path, sha: bytes, chunk_size: int):
    from grpo_swarm.coordinator.core import Coordinator

    return Coordinator(run_config("bench-snapshots"), data_dir, setup=file_setup(src, sha), chunk_size=chunk_size)


def write_snapshot(directory: Path, params: int, dtype: str, seed: int = 0) -> tuple[Path, bytes, int]:
    """``params`` random parameters as a safetensors file ``<state-dict sha>.safetensors``."""
    import torch
    from safetensors.torch import save_file

    from grpo_swarm.node.proving import state_dict_sha256

    gen = torch.Generator().manual_seed(seed)
    tensors, left, i = {}, params, 0
    while left > 0:
        n = min(TENSOR_ELEMENTS, left)
        tensors[f"model.block.{i:03d}.weight"] = (torch.rand(n, generator=gen) * 2 - 1).to(getattr(torch, dtype))
        left, i = left - n, i + 1
    sha = state_dict_sha256(tensors)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{sha.hex()}.safetensors"
    save_file(tensors, str(path))
    return path, sha, path.stat().st_size


# ---- raw TCP baseline ----------------------------------------------------------------------------
class RawFileServer:
    """Sends a file's bytes (socket.sendfile) to every TCP connection, from a thread."""

    def __init__(self, path: Path, host: str = "127.0.0.1", port: int = 0):
        self.path = path
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, name="raw-server", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with conn, open(self.path, "rb") as f:
                    conn.sendfile(f)
            except OSError as e:
                log(f"raw server: {e}")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=5)


def raw_download(host: str, port: int, dest: Path, bufsize: int) -> tuple[int, float]:
    """Receive everything the server sends into a ``bufsize`` buffer, write it to ``dest``, fsync;
    (bytes, seconds the final fsync took)."""
    buf = bytearray(bufsize)
    view = memoryview(buf)
    total = filled = 0
    with socket.create_connection((host, port)) as s, open(dest, "wb", buffering=0) as f:
        while True:
            n = s.recv_into(view[filled:])
            if not n:
                break
            filled += n
            if filled == bufsize:
                total += f.write(view)
                filled = 0
        if filled:
            total += f.write(view[:filled])
        t = time.perf_counter()
        os.fsync(f.fileno())
    return total, time.perf_counter() - t


def timed(fn, *a, **kw) -> float:
    t = time.perf_counter()
    fn(*a, **kw)
    return time.perf_counter() - t


def alternate(repeats: int, raw, grpc_, reset) -> tuple[list[float], list[float]]:
    """Seconds of ``raw()`` and ``grpc_()`` run alternately (raw first) ``repeats`` times each;
    ``reset()`` (deleting the last download: ~0.1-0.3 s for 538 MB) runs untimed before each."""
    raw_s, grpc_s = [], []
    for i in range(repeats):
        reset()
        raw_s.append(timed(raw))
        reset()
        grpc_s.append(timed(grpc_))
        log(f"  run {i + 1}/{repeats}: raw {raw_s[-1]:.3f} s, gRPC {grpc_s[-1]:.3f} s")
    return raw_s, grpc_s


def spawn_server(prefix: list[str], data_dir: Path, src: Path, sha: bytes, host: str,
                 chunk_size: int) -> tuple[subprocess.Popen, str, str] | str:
    """A coordinator and a raw file server in a subprocess of their own (``--serve``), as in real
    use (no GIL shared with the client): (process, gRPC port, raw port), or why it did not start."""
    server = subprocess.Popen(
        [*prefix, sys.executable, str(Path(__file__).resolve()), "--serve", str(data_dir), "--snapshot", str(src),
         "--sha", sha.hex(), "--host", host, "--chunk-size", str(chunk_size)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    line = server.stdout.readline().split()
    if len(line) != 3 or line[0] != "READY":
        stop_server(server)
        return f"the coordinator did not start ({line!r}, exit {server.poll()})"
    return server, line[1], line[2]


def stop_server(server: subprocess.Popen | None) -> None:
    if server is None:
        return
    try:
        server.stdin.close()
        server.wait(timeout=10)
    except (subprocess.TimeoutExpired, OSError):
        server.kill()
        server.wait()


# ---- (a) loopback + resume -----------------------------------------------------------------------
def bench_loopback(args, tmp: Path, src: Path, sha: bytes, size: int) -> dict:
    """Timings against a coordinator in its own process; the resume check against one in this
    process (to read its bytes-served counter)."""
    from grpo_swarm.coordinator.service import start_server
    from grpo_swarm.protocol.client import CoordinatorClient, _verified_prefix
    from grpo_swarm.protocol.identity import Identity

    spawned = spawn_server([], tmp / "coordinator-process", src, sha, "127.0.0.1", args.chunk_size)
    if isinstance(spawned, str):
        raise SystemExit(spawned)
    remote, grpc_port, raw_port = spawned
    t = time.perf_counter()
    coord = file_coordinator(tmp / "coordinator", src, sha, args.chunk_size)
    log(f"coordinator up (manifest of {size} bytes hashed) in {time.perf_counter() - t:.2f} s")
    server, port, _ = start_server(coord)
    timing_client = CoordinatorClient(f"127.0.0.1:{grpc_port}", Identity.generate(), timeout_s=600)
    client = CoordinatorClient(f"127.0.0.1:{port}", Identity.generate(), timeout_s=600)
    out: dict = {}
    try:
        timing_client.register("bench-snapshots")
        client.register("bench-snapshots")
        manifest = client.manifest()
        dest = tmp / "download.safetensors"
        part = dest.with_name(dest.name + ".part")

        def grpc_once():
            timing_client.download_snapshot(dest)

        raw_fsync = []

        def raw_once():
            got, fsync_s = raw_download("127.0.0.1", int(raw_port), dest, args.chunk_size)
            assert got == size, (got, size)
            raw_fsync.append(fsync_s)

        log(f"loopback: {args.repeats} x (raw, gRPC) of {size / 1e6:.1f} MB")
        raw_s, grpc_s = alternate(args.repeats, raw_once, grpc_once, lambda: unlink(dest, part))
        grpc_ok = sha256_file(dest) == manifest.file_sha256  # the last gRPC download
        unlink(dest, part)
        best_g, best_r = mb_s(size, min(grpc_s)), mb_s(size, min(raw_s))
        med_g, med_r = mb_s(size, statistics.median(grpc_s)), mb_s(size, statistics.median(raw_s))
        out.update({
            "grpc_mb_s": round(best_g, 1), "raw_mb_s": round(best_r, 1), "loopback_ratio": round(best_g / best_r, 3),
            "grpc_median_mb_s": round(med_g, 1), "raw_median_mb_s": round(med_r, 1),
            "loopback_ratio_median": round(med_g / med_r, 3), "loopback_aggregate": "best",
            "grpc_seconds": [round(x, 4) for x in grpc_s], "raw_seconds": [round(x, 4) for x in raw_s],
            "raw_fsync_seconds": [round(x, 4) for x in raw_fsync], "grpc_download_sha_ok": grpc_ok,
        })
        # the raw transfer without its final fsync: what gRPC costs on top of moving the bytes
        raw_nosync = mb_s(size, min(r - f for r, f in zip(raw_s, raw_fsync)))
        out.update({"raw_no_fsync_mb_s": round(raw_nosync, 1),
                    "loopback_ratio_vs_raw_no_fsync": round(best_g / raw_nosync, 3)})

        # -- resume
        n_chunks = len(manifest.chunk_sha256)
        stop_after = max(1, n_chunks // 2)
        served = coord.metrics.registry
        unlink(dest, part)
        client.download_snapshot(dest, manifest=manifest, max_chunks=stop_after)
        interrupted = part.is_file() and not dest.exists()
        part_bytes = part.stat().st_size if part.is_file() else 0
        with open(part, "ab") as f:  # a torn write after the last whole chunk
            f.write(os.urandom(min(1000, manifest.chunk_size - 1)))
        kept = _verified_prefix(part, manifest)
        before = served.get_sample_value("grpo_coordinator_bytes_served_total", {"method": "DownloadSnapshot"})
        client.download_snapshot(dest, manifest=manifest)
        after = served.get_sample_value("grpo_coordinator_bytes_served_total", {"method": "DownloadSnapshot"})
        final_ok = dest.is_file() and not part.exists() and sha256_file(dest) == manifest.file_sha256
        expected_kept = min(stop_after * manifest.chunk_size, size)
        out.update({
            "resume_ok": bool(final_ok and interrupted and kept == expected_kept and after - before == size - kept),
            "resume_file_sha_ok": final_ok, "resume_interrupted_after_chunks": stop_after,
            "resume_part_bytes": part_bytes, "resumed_from_bytes": kept,
            "resume_bytes_served": int(after - before), "snapshot_chunks": n_chunks,
        })
        log(f"resume: stopped after {stop_after}/{n_chunks} chunks, resumed from {kept} bytes, ok={out['resume_ok']}")
        unlink(dest, part)
    finally:
        client.close()
        timing_client.close()
        stop_server(remote)
        server.stop(0)
        coord.close()
    return out


# ---- (b) a 1 Gbit/s link between two network namespaces -----------------------------------------
def sh(*cmd: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {(p.stderr or p.stdout).strip() or f'exit {p.returncode}'}")


def bench_capped(args, tmp: Path, src: Path, sha: bytes, size: int) -> dict:
    if os.geteuid() != 0:
        return {"capped_skipped": "needs root (ip netns, tc)"}
    if not shutil.which("ip") or not shutil.which("tc"):
        return {"capped_skipped": "ip or tc (iproute2) not found"}
    tag = f"{os.getpid() % 100000}"
    ns_s, ns_c = f"gsbench{tag}s", f"gsbench{tag}c"
    veth_s, veth_c = f"gsb{tag}s", f"gsb{tag}c"
    created: list[str] = []
    server = None
    try:
        try:
            sh("ip", "netns", "add", ns_s)
            created.append(ns_s)
            sh("ip", "netns", "add", ns_c)
            created.append(ns_c)
            sh("ip", "link", "add", veth_s, "type", "veth", "peer", "name", veth_c)
            created.append(veth_s)
            sh("ip", "link", "set", veth_s, "netns", ns_s)
            sh("ip", "link", "set", veth_c, "netns", ns_c)
            for ns, dev, addr in ((ns_s, veth_s, NS_ADDR[0]), (ns_c, veth_c, NS_ADDR[1])):
                sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "1gbit",
                   "burst", args.tbf_burst, "latency", args.tbf_latency)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            return {"capped_skipped": f"cannot set up the namespaces: {e}"}
        me = str(Path(__file__).resolve())
        t0 = time.perf_counter()
        spawned = spawn_server(["ip", "netns", "exec", ns_s], tmp / "capped-coordinator", src, sha, NS_ADDR[0],
                               args.chunk_size)
        if isinstance(spawned, str):
            return {"capped_skipped": f"in {ns_s}: {spawned}"}
        server, grpc_port, raw_port = spawned
        log(f"capped: coordinator in {ns_s} up in {time.perf_counter() - t0:.1f} s; "
            f"{args.capped_repeats} x (raw, gRPC) over tbf 1gbit")
        client = subprocess.run(
            ["ip", "netns", "exec", ns_c, sys.executable, me, "--fetch", NS_ADDR[0], "--grpc-port", grpc_port,
             "--raw-port", raw_port, "--dest", str(tmp / "capped.safetensors"), "--repeats", str(args.capped_repeats),
             "--chunk-size", str(args.chunk_size)],
            stdout=subprocess.PIPE, stderr=sys.stderr, text=True, timeout=60 + 30 * args.capped_repeats * size / 1.25e8)
        if client.returncode:
            return {"capped_skipped": f"the client in {ns_c} failed (exit {client.returncode})"}
        got = json.loads(client.stdout.strip().splitlines()[-1])
        grpc_mbit = [size * 8 / s / 1e6 for s in got["grpc_seconds"]]
        raw_mbit = [size * 8 / s / 1e6 for s in got["raw_seconds"]]
        return {
            "capped_throughput_mbit": round(max(grpc_mbit), 1), "capped_ratio": round(max(grpc_mbit) / LINK_MBIT, 3),
            "capped_median_mbit": round(statistics.median(grpc_mbit), 1),
            "capped_raw_mbit": round(max(raw_mbit), 1), "capped_vs_raw": round(max(grpc_mbit) / max(raw_mbit), 3),
            "capped_grpc_seconds": got["grpc_seconds"], "capped_raw_seconds": got["raw_seconds"],
            "capped_raw_fsync_seconds": got["raw_fsync_seconds"],
            "capped_sha_ok": got["sha_ok"], "capped_link": f"veth, tbf rate 1gbit burst {args.tbf_burst} "
                                                           f"latency {args.tbf_latency} on both ends, MTU 1500",
            "capped_aggregate": "best", "capped_wall_s": round(time.perf_counter() - t0, 1),
        }
    except (subprocess.TimeoutExpired, OSError, ValueError, KeyError) as e:
        return {"capped_skipped": f"{type(e).__name__}: {e}"}
    finally:
        stop_server(server)
        for ns in created:  # deleting a namespace deletes the veth end inside it (and so the pair)
            if ns.startswith("gsbench"):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", veth_s], capture_output=True)  # if it never left this namespace


def serve_main(args) -> None:
    """--serve: a coordinator (and a raw file server) on --host until stdin closes."""
    from grpo_swarm.coordinator.service import start_server

    src = Path(args.snapshot)
    coord = file_coordinator(Path(args.serve), src, bytes.fromhex(args.sha), args.chunk_size)
    server, port, _ = start_server(coord, host=args.host)
    raw = RawFileServer(src, host=args.host)
    print(f"READY {port} {raw.port}", flush=True)
    try:
        sys.stdin.read()
    finally:
        raw.close()
        server.stop(0)
        coord.close()


def fetch_main(args) -> None:
    """--fetch: register, then alternate raw and gRPC downloads; one JSON line of seconds."""
    from grpo_swarm.protocol.client import CoordinatorClient
    from grpo_swarm.protocol.identity import Identity

    dest = Path(args.dest)
    part = dest.with_name(dest.name + ".part")
    client = CoordinatorClient(f"{args.fetch}:{args.grpc_port}", Identity.generate(), timeout_s=600)
    try:
        client.register()
        manifest = client.manifest()
        sha_ok, raw_fsync = True, []

        def grpc_once():
            client.download_snapshot(dest)

        def raw_once():
            raw_fsync.append(raw_download(args.fetch, args.raw_port, dest, args.chunk_size)[1])

        raw_s, grpc_s = alternate(args.repeats, raw_once, grpc_once, lambda: unlink(dest, part))
        sha_ok = sha256_file(dest) == manifest.file_sha256
    finally:
        client.close()
        unlink(dest, part)
    print(json.dumps({"raw_seconds": [round(x, 4) for x in raw_s], "grpc_seconds": [round(x, 4) for x in grpc_s],
                      "raw_fsync_seconds": [round(x, 4) for x in raw_fsync], "sha_ok": sha_ok}), flush=True)


# ---- SubmitProofs --------------------------------------------------------------------------------
def bench_submit(args, tmp: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    from safetensors.torch import load_file

    from grpo_swarm.coordinator.core import Coordinator
    from grpo_swarm.coordinator.service import start_server
    from grpo_swarm.node import proving
    from grpo_swarm.node.models import load_model
    from grpo_swarm.node.noise import group_keys
    from grpo_swarm.node.rewards import build_reward_functions
    from grpo_swarm.node.swarm_config import run_examples, train_config_from_run
    from grpo_swarm.node.trainer import GRPOTrainer
    from grpo_swarm.protocol.client import CoordinatorClient
    from grpo_swarm.protocol.identity import Identity

    nodes, ppr, g = args.proof_nodes, args.prompts_per_round, args.group_size
    total = nodes * ppr * g
    cfg = run_config("bench-submit", prompts_per_round=ppr, group_size=g, samples_per_round=total + g,
                     max_completion_length=args.completion_tokens, spot_check_rate=args.spot_check_rate,
                     data_size=max(64, ppr))
    t = time.perf_counter()
    coord = Coordinator(cfg, tmp / "submit-coordinator")  # model_setup(cfg): the tiny model, full verification
    server, port, _ = start_server(coord)
    clients = [CoordinatorClient(f"127.0.0.1:{port}", Identity.generate(), timeout_s=600) for _ in range(nodes)]
    try:
        regs = [c.register(cfg.run.id) for c in clients]
        r = regs[0]
        run, spec = json.loads(r.run_config_json), json.loads(r.run_spec_json)
        snap = tmp / "submit-snapshot.safetensors"
        clients[0].download_snapshot(snap)
        tc = train_config_from_run(run, ["run.threads=1"])
        loaded = load_model(run["model"]["name"])
        loaded.model.load_state_dict(load_file(str(snap)))
        trainer = GRPOTrainer(loaded.model, loaded.tokenizer, tc, build_reward_functions([x.model_dump() for x in tc.rewards]))
        examples = run_examples(run)
        spec_id = proving.spec_id_of(tc.rewards)
        batches = []
        for n, c in enumerate(clients):
            hb = c.heartbeat(0)
            assert hb.may_sample and len(hb.prompt_indices) == ppr, hb
            ex = [examples[i] for i in hb.prompt_indices]
            keys = group_keys(int(spec["run_seed"]), c.identity.node_id, hb.current_round, hb.prompt_indices,
                              tc.grpo.group_size)  # the run's keyed noise: what the spot-check recomputes
            texts, rollouts = trainer.rollout(ex, seed=1000 + n, noise_keys=keys)
            batch = trainer.score(ex, texts, rollouts)
            batches.append(proving.proofs_from_batch(
                batch, ex, texts, c.identity, run_id=spec["run_id"], snapshot_sha256=r.current.sha256,
                round_index=hb.current_round, first_sequence=0, reward_spec_id=spec_id))
        setup_s = time.perf_counter() - t
        n_proofs = sum(len(b) for b in batches)
        proof_bytes = sum(p.ByteSize() for b in batches for p in b)
        log(f"submit: {n_proofs} proofs from {nodes} nodes made in {setup_s:.1f} s; submitting")
        t = time.perf_counter()
        replies = [c.submit_proofs(b) for c, b in zip(clients, batches)]
        elapsed = time.perf_counter() - t
        verdicts = [v for rep in replies for v in rep.verdicts]
        accepted = sum(v.proof_count for v in verdicts if v.accepted)
        rejected = {}
        for v in verdicts:
            if not v.accepted:
                rejected[v.code] = rejected.get(v.code, 0) + v.proof_count
        tickets_ok = all(rep.HasField("ticket") and rep.ticket.accepted_samples == ppr * g for rep in replies)
        from grpo_swarm.protocol.log import PROOFS_ACCEPTED

        spot_checked = sum(len(e.payload.get("spot_checked") or ()) for e in coord.log.entries(kind=PROOFS_ACCEPTED))
        return {
            "submit_proofs_per_s": round(n_proofs / elapsed, 1), "submit_seconds": round(elapsed, 3),
            "submit_proofs": n_proofs, "submit_requests": len(replies), "submit_accepted_proofs": accepted,
            "submit_all_accepted": accepted == n_proofs == total and not rejected and tickets_ok,
            "submit_rejected": rejected, "submit_round_closed": any(rep.round_closed for rep in replies),
            "submit_mean_proof_bytes": round(proof_bytes / max(n_proofs, 1)),
            "spot_check_rate": args.spot_check_rate, "submit_spot_checked_proofs": spot_checked,
            "submit_mean_completion_tokens": round(
                sum(len(p.completion_token_ids) for b in batches for p in b) / max(n_proofs, 1), 2),
        }
    finally:
        for c in clients:
            c.close()
        server.stop(0)
        coord.close()


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv=None):
    from grpo_swarm.protocol.rpc import DEFAULT_CHUNK_SIZE

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=None,
                    help=f"parameters in the snapshot (default {SMOLLM2_135M_PARAMS}, SmolLM2-135M; "
                         f"{QUICK_PARAMS} with --quick)")
    ap.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float32")
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="manifest chunk size (bytes)")
    ap.add_argument("--repeats", type=int, default=3, help="loopback runs of each transfer (alternating)")
    ap.add_argument("--skip-capped", action="store_true", help="skip the 1 Gbit/s network-namespace part")
    ap.add_argument("--capped-repeats", type=int, default=2)
    ap.add_argument("--tbf-burst", default="256kb")
    ap.add_argument("--tbf-latency", default="20ms")
    ap.add_argument("--skip-submit", action="store_true")
    ap.add_argument("--proof-nodes", type=int, default=None, help="node identities submitting (default 64; 4 quick)")
    ap.add_argument("--prompts-per-round", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--completion-tokens", type=int, default=16, help="grpo.max_completion_length")
    ap.add_argument("--spot-check-rate", type=float, default=0.05)
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    # internal: the two ends of the capped part, run under `ip netns exec`
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--snapshot", help=argparse.SUPPRESS)
    ap.add_argument("--sha", help=argparse.SUPPRESS)
    ap.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--fetch", help=argparse.SUPPRESS)
    ap.add_argument("--grpc-port", help=argparse.SUPPRESS)
    ap.add_argument("--raw-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dest", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.params is None:
        args.params = QUICK_PARAMS if args.quick else SMOLLM2_135M_PARAMS
    if args.proof_nodes is None:
        args.proof_nodes = 4 if args.quick else 64
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.serve:
        return serve_main(args)
    if args.fetch:
        return fetch_main(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still remove namespaces and temporary files
    # everything but the result line goes to stderr, native libraries included
    result_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    started = time.perf_counter()
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-snapshots-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        src, sha, size = write_snapshot(tmp / "src", args.params, args.dtype)
        log(f"snapshot: {args.params} {args.dtype} parameters, {size} bytes, written in {time.perf_counter() - t:.1f} s")
        res.update({"snapshot_bytes": size, "snapshot_params": args.params, "chunk_size": args.chunk_size})
        res.update(bench_loopback(args, tmp, src, sha, size))
        if args.skip_capped:
            res["capped_skipped"] = "--skip-capped"
        else:
            res.update(bench_capped(args, tmp, src, sha, size))
        if not args.skip_submit:
            res.update(bench_submit(args, tmp))
    from grpo_swarm.protocol.client import _ChunkWriter

    res["config"] = {
        "params": args.params, "dtype": args.dtype, "chunk_size": args.chunk_size, "repeats": args.repeats,
        "quick": args.quick, "mb": "1e6 bytes",
        "loopback": "coordinator and raw file server in a subprocess, client in this process, 127.0.0.1",
        "raw": "sendfile -> recv_into(chunk_size buffer) -> write -> fsync",
        "grpc": "CoordinatorClient.download_snapshot (manifest call, per-chunk SHA-256 in a helper thread, "
                f"pwrite, fdatasync every {_ChunkWriter.SYNC_BYTES >> 20} MiB, final fsync)",
        "capped_repeats": None if args.skip_capped else args.capped_repeats,
        "capped_tbf": None if args.skip_capped else f"rate 1gbit burst {args.tbf_burst} latency {args.tbf_latency}",
        "proof_nodes": args.proof_nodes, "prompts_per_round": args.prompts_per_round, "group_size": args.group_size,
        "completion_tokens": args.completion_tokens, "spot_check_rate": args.spot_check_rate,
        "submit_batching": "one request per node (its whole round)", "model": "tiny",
        "cpus": os.cpu_count(), "python": platform.python_version(),
    }
    res["total_seconds"] = round(time.perf_counter() - started, 1)
    os.write(result_fd, (json.dumps(res) + "\n").encode())
    os.close(result_fd)


if __name__ == "__main__":
    main()
