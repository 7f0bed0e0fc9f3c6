"""Receiving through hivemind's P2P: asyncio's StreamReader against direct reads, side by side.

    python bench/p2p_transport.py                         # 1 GiB per variant in 4 MiB messages
    python bench/p2p_transport.py --total-mib 256 --message-kib 1024
    python bench/p2p_transport.py --transport quic --total-mib 64 --message-kib 1024 --repeats 1

Two processes on loopback, each with its own p2pd (TLS, yamux: hivemind's defaults) and uvloop (as
hivemind's averager runs): the sender writes length-prefixed messages on one binary stream per
variant (one write per message), the receiver reads them with `readexactly` — through the stream's
`StreamReader` (``streamreader``) or with :func:`read_directly` installed (``direct``). Variants
alternate ``--repeats`` times. Reported per variant (medians): wall seconds, CPU-seconds per GB of
the receiving and sending Python processes and of both p2pd daemons; ``recv_cpu_ratio`` =
streamreader ÷ direct receiving CPU, ``wall_ratio`` likewise; ``streams_cut``: streams p2pd cut
mid-message (each such repeat runs again, at most twice in a row; a variant cut three times in a row
reports ``cut_every_time`` and the MiB each try delivered instead of its figures).
``--transport quic``: the peers connect over QUIC (``/udp/0/quic-v1``) instead of TCP, which is why
``grpo-node join`` refuses QUIC addresses (p2pd cuts its long streams).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import psutil


VARIANTS = ("streamreader", "direct")
MAX_CUTS = 2
ANSWER_TIMEOUT_S = 120.0


def _cpu(process: psutil.Process) -> float:
    t = process.cpu_times()
    return t.user + t.system


HOST_MADDRS = {"tcp": "/ip4/127.0.0.1/tcp/0", "quic": "/ip4/127.0.0.1/udp/0/quic-v1"}


async def _receive(conn, max_message: int, transport: str) -> None:
    from hivemind.p2p import P2P

    from grpo_swarm.node.swarm.direct_reads import read_directly

    p2p = await P2P.create(host_maddrs=[HOST_MADDRS[transport]])
    me = psutil.Process()

    async def handler(info, reader, writer):
        variant = info.proto.rsplit(".", 1)[-1]
        if variant == "direct":
            read_directly(reader, max_message)
        cpu0, got = _cpu(me), 0
        try:
            while True:
                try:
                    header = await reader.readexactly(8)
                except asyncio.IncompleteReadError:
                    break
                got += len(await reader.readexactly(int.from_bytes(header, "big")))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # a stream cut mid-message: the sender sees too few bytes and says so
        finally:  # always answer: the sender waits for this
            conn.send((variant, got, _cpu(me) - cpu0))
            writer.close()

    for v in VARIANTS:
        await p2p.add_binary_stream_handler(f"bench.{v}", handler)
    conn.send((p2p.peer_id.to_bytes(), [str(a) for a in await p2p.get_visible_maddrs()], p2p._child.pid))
    await asyncio.sleep(3600)


def _receiver(conn, max_message: int, transport: str) -> None:
    import uvloop

    uvloop.install()
    asyncio.run(_receive(conn, max_message, transport))


async def _send(conn, args) -> dict:
    from hivemind.p2p import P2P, PeerID

    peer, maddrs, receiver_daemon = conn.recv()
    peer = PeerID(peer)
    p2p = await P2P.create(host_maddrs=[HOST_MADDRS[args.transport]], initial_peers=[f"{maddrs[0]}/p2p/{peer.to_base58()}"])
    daemons = [psutil.Process(receiver_daemon), psutil.Process(p2p._child.pid)]
    me = psutil.Process()
    message = os.urandom(args.message_kib << 10)
    total = args.total_mib << 20
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    delivered: dict[str, list[float]] = {}  # variant -> MiB each try delivered, when every try was cut
    cut = 0  # streams p2pd cut mid-message (seen once in a full-suite run): that repeat is run again
    try:
        for repeat in range(args.repeats):
            for v in (VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]):
                got = []
                for _ in range(MAX_CUTS + 1):
                    got.append(await _one_run(p2p, peer, conn, v, message, total, daemons, me, runs))
                    if got[-1] == total:
                        break
                    cut += 1
                    print(f"the {v} stream was cut mid-message after {got[-1]} bytes; running it again", file=sys.stderr)
                else:
                    delivered[v] = [round(b / 2 ** 20, 2) for b in got]
    finally:
        await p2p.shutdown()
    out = {v: ({"cut_every_time": True, "mib_delivered": delivered[v]} if v in delivered else
               {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}) for v, rs in runs.items()}
    out["streams_cut"] = cut
    if delivered:
        return out
    for key, field in (("recv_cpu_ratio", "recv_cpu_s_per_gb"), ("wall_ratio", "wall_s")):
        # None: too few bytes for the CPU clock's 10 ms ticks to measure the direct variant
        mine = out["direct"][field]
        out[key] = round(out["streamreader"][field] / mine, 3) if mine > 0 else None
    return out


async def _one_run(p2p, peer, conn, v: str, message: bytes, total: int, daemons, me, runs) -> int:
    """Send ``total`` bytes on a new ``v`` stream and time it into ``runs``; the bytes the receiver got
    (fewer than ``total``: the stream was cut, nothing timed)."""
    _, reader, writer = await p2p.call_binary_stream_handler(peer, f"bench.{v}")
    d0, s0, t0 = sum(map(_cpu, daemons)), _cpu(me), time.perf_counter()
    try:
        for _ in range(total // len(message)):
            writer.write(len(message).to_bytes(8, "big"))
            writer.write(message)
            await writer.drain()
        writer.write_eof()
    except ConnectionError:
        pass  # cut on our side: the receiver answers with what it got
    if not await asyncio.get_running_loop().run_in_executor(None, conn.poll, ANSWER_TIMEOUT_S):
        raise TimeoutError(f"the receiver did not answer within {ANSWER_TIMEOUT_S} s")
    variant, got, recv_cpu = conn.recv()
    wall = time.perf_counter() - t0
    writer.close()
    assert variant == v and got <= total, (variant, got)
    if got < total:
        return got
    gb = total / 1e9
    runs[v].append({"wall_s": wall, "recv_cpu_s_per_gb": recv_cpu / gb, "send_cpu_s_per_gb": (_cpu(me) - s0) / gb,
                    "p2pd_cpu_s_per_gb": (sum(map(_cpu, daemons)) - d0) / gb})
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--total-mib", type=int, default=1024, help="bytes per variant and repeat (MiB)")
    ap.add_argument("--message-kib", type=int, default=4096, help="message size (KiB)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--transport", choices=sorted(HOST_MADDRS), default="tcp", help="how the two peers connect")
    args = ap.parse_args()
    import uvloop

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    receiver = ctx.Process(target=_receiver, args=(there, 2 * (args.message_kib << 10), args.transport),
                           daemon=True)
    receiver.start()
    try:
        uvloop.install()
        result = asyncio.run(_send(here, args))
    finally:
        receiver.kill()
    result["config"] = {"total_mib": args.total_mib, "message_kib": args.message_kib, "repeats": args.repeats,
                        "transport": args.transport, "loop": "uvloop", "cpus": os.cpu_count()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
