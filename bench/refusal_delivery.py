"""Whether a reducer's last message reaches a sender that is still sending parts, side by side.

    python bench/refusal_delivery.py                  # 20 streams per variant, 20 parts of 1 MiB each
    python bench/refusal_delivery.py --trials 50 --part-kib 256

Two hivemind P2P instances (each with its p2pd) on loopback, in one process. In every stream the
sender sends up to ``--parts`` parts and stops once it reads anything but AVERAGED_PART (then ends
its input, as the runner's sender does). Handlers, in pairs:

* ``refusal_plain`` — reads the first part, answers BAD_GROUP_ID and returns (hivemind's way);
* ``refusal_drained`` — the same through :func:`node.swarm.refusals.refuse` (reads the input to its end);
* ``abort_plain`` — answers two parts through a prefetching reader (hivemind's ``amap_in_executor``,
  as the reduction reads), stops it, answers CANCELLED and returns (an abort mid-stream);
* ``abort_tap`` — the same reading through :class:`node.swarm.refusals.InputTap`, drained before returning.

Prints ONE JSON line: per variant, how often each first non-average answer was seen
(``BAD_GROUP_ID`` / ``CANCELLED``, or the error the sender saw instead), and ``delivered`` (the share
of streams that got the message).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys


def handlers():
    """The four handlers above, by variant name."""
    from hivemind.proto import averaging_pb2
    from hivemind.utils.asyncio import achain, amap_in_executor, as_aiter

    from grpo_swarm.node.swarm.refusals import InputTap, refuse

    async def refusal_plain(stream, context):
        await anext(stream)
        yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)

    async def refusal_drained(stream, context):
        await anext(stream)
        async for message in refuse(averaging_pb2.BAD_GROUP_ID, stream):
            yield message

    def abort(tapped: bool):
        async def handler(stream, context):
            source = InputTap(stream) if tapped else stream
            try:
                reader = amap_in_executor(lambda m: len(m.tensor_part.buffer), achain(as_aiter(), source),
                                          max_prefetch=2)
                seen = 0
                async for _ in reader:
                    seen += 1
                    yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART)
                    if seen == 2:
                        break
                await reader.aclose()
                yield averaging_pb2.AveragingData(code=averaging_pb2.CANCELLED)
                if tapped:
                    await source.drain()
            finally:
                if tapped:
                    source.close()
        return handler

    return {"refusal_plain": refusal_plain, "refusal_drained": refusal_drained,
            "abort_plain": abort(False), "abort_tap": abort(True)}


async def first_answers(handler, trials: int, parts: int, part_bytes: int) -> list[str]:
    """What a sender saw first from ``handler`` besides AVERAGED_PART, in each of ``trials`` streams
    (two P2P instances on loopback): the answer's code, ``end``, or the error it saw instead. The
    sender sends up to ``parts`` parts of ``part_bytes``, stops once answered and ends its input, as
    the runner's sender does."""
    from hivemind.p2p import P2P
    from hivemind.proto import averaging_pb2, runtime_pb2

    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[
        f"{a}/p2p/{server.peer_id}" for a in await server.get_visible_maddrs()])
    blob = os.urandom(part_bytes)
    answers = []
    try:
        await server.add_protobuf_handler("h", handler, averaging_pb2.AveragingData,
                                          stream_input=True, stream_output=True)
        for _ in range(trials):
            answered = asyncio.Event()

            async def sent():
                for _ in range(parts):
                    if answered.is_set():
                        return
                    yield averaging_pb2.AveragingData(tensor_part=runtime_pb2.Tensor(buffer=blob))
                await answered.wait()

            what = "end"
            try:
                async for message in await client.iterate_protobuf_handler(
                        server.peer_id, "h", sent(), averaging_pb2.AveragingData):
                    if message.code != averaging_pb2.AVERAGED_PART:
                        what = averaging_pb2.MessageCode.Name(message.code)
                        break
            except Exception as e:  # noqa: BLE001 - what the runner would name REDUCER_FAILED
                what = type(e).__name__
            answered.set()
            answers.append(what)
    finally:
        await client.shutdown()
        await server.shutdown()
    return answers


async def measure(args) -> dict:
    out = {}
    for name, handler in handlers().items():
        answers = await first_answers(handler, args.trials, args.parts, args.part_kib << 10)
        seen = {what: answers.count(what) for what in dict.fromkeys(answers)}
        wanted = "BAD_GROUP_ID" if name.startswith("refusal") else "CANCELLED"
        out[name] = {"seen": seen, "delivered": round(seen.get(wanted, 0) / args.trials, 3)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="streams per variant")
    ap.add_argument("--parts", type=int, default=20, help="parts the sender has to send")
    ap.add_argument("--part-kib", type=int, default=1024)
    args = ap.parse_args(argv)
    result = asyncio.run(measure(args))
    print(json.dumps({"bench": "refusal_delivery", "trials": args.trials, "parts": args.parts,
                      "part_kib": args.part_kib, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
