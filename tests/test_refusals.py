"""A reducer's last message reaches a sender that is still sending parts, through two real p2pd
daemons: a refusal (one message, then the handler returns), and the CANCELLED of a reduction that
stopped reading mid-stream (its prefetching reader cancelled, as an abort does); a sender that never
ends its input holds the handler at most the linger time; the tap loses nothing to a cancelled read."""

import asyncio
import os
import time

import pytest

from hivemind.p2p import P2P
from hivemind.proto import averaging_pb2, runtime_pb2

from hivemind.utils.asyncio import achain, amap_in_executor, as_aiter

from grpo_swarm.node.swarm.refusals import REFUSAL_MAX_MESSAGES, InputTap, refuse

TRIALS = 16


def _answers(handler) -> list[str]:
    """What a sender of up to 20 parts of 1 MiB saw first from ``handler`` besides AVERAGED_PART, in
    each of TRIALS streams (a sender that stops sending once answered, then ends its input, as the
    runner's does)."""
    blob = os.urandom(1 << 20)

    async def main():
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[
            f"{a}/p2p/{server.peer_id}" for a in await server.get_visible_maddrs()])
        try:
            await server.add_protobuf_handler("h", handler, averaging_pb2.AveragingData,
                                              stream_input=True, stream_output=True)
            answers = []
            for _ in range(TRIALS):
                refused = asyncio.Event()

                async def parts():  # as the runner's sender: stops sending once refused, then ends
                    for _ in range(20):
                        if refused.is_set():
                            return
                        yield averaging_pb2.AveragingData(tensor_part=runtime_pb2.Tensor(buffer=blob))
                    await refused.wait()

                try:
                    async for message in await client.iterate_protobuf_handler(
                            server.peer_id, "h", parts(), averaging_pb2.AveragingData):
                        if message.code != averaging_pb2.AVERAGED_PART:
                            answers.append(averaging_pb2.MessageCode.Name(message.code))
                            break
                    else:
                        answers.append("end")
                except Exception as e:  # noqa: BLE001 - what the runner would name REDUCER_FAILED
                    answers.append(type(e).__name__)
                refused.set()
            return answers
        finally:
            await client.shutdown()
            await server.shutdown()

    return asyncio.run(asyncio.wait_for(main(), 120))


def test_every_refusal_reaches_a_sender_still_sending_parts():
    """Answered with a plain ``yield; return``, about one refusal in five arrived here as a
    ConnectionResetError (p2pd drops it as the stream closes under the sender's parts)."""
    async def not_in_group(stream, context):
        await anext(stream)
        async for message in refuse(averaging_pb2.BAD_GROUP_ID, stream):
            yield message

    answers = _answers(not_in_group)
    assert answers == ["BAD_GROUP_ID"] * TRIALS, answers


def test_a_reduction_aborted_mid_stream_delivers_its_cancelled():
    """The reduction reads through hivemind's prefetching ``amap_in_executor`` and stops after two
    parts; closing that reader cancels its read of the stream mid-wait, which kills a plain stream.
    Through the tap the stream stays readable, and draining it before returning delivers the
    CANCELLED. (Returning at once, half of these arrived as a BrokenPipeError or ConnectionResetError.)"""
    async def aborts_after_two_parts(stream, context):
        tap = InputTap(stream)
        try:
            reader = amap_in_executor(lambda m: len(m.tensor_part.buffer), achain(as_aiter(), tap), max_prefetch=2)
            seen = 0
            async for _ in reader:
                seen += 1
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART)
                if seen == 2:
                    break
            await reader.aclose()  # (what the abort's cleanup does: its read of the tap is cancelled)
            yield averaging_pb2.AveragingData(code=averaging_pb2.CANCELLED)
            await tap.drain()
        finally:
            tap.close()

    answers = _answers(aborts_after_two_parts)
    assert answers == ["CANCELLED"] * TRIALS, answers


def test_the_tap_loses_nothing_to_a_cancelled_read_and_ends_every_reader():
    async def main():
        async def numbers():
            for i in range(5):
                await asyncio.sleep(0.01)
                yield i

        tap = InputTap(numbers())
        got = [await anext(tap)]
        with pytest.raises(asyncio.TimeoutError):  # a read cancelled while it waits ...
            await asyncio.wait_for(anext(tap), 0.001)
        got += [m async for m in tap]  # ... loses nothing
        again = [m async for m in tap]  # a second reader ends too
        tap.close()
        return got, again

    assert asyncio.run(main()) == ([0, 1, 2, 3, 4], [])


def test_a_sender_that_never_ends_its_input_holds_the_handler_only_the_linger_time():
    async def endless():
        while True:
            await asyncio.sleep(0.05)
            yield averaging_pb2.AveragingData()

    async def main():
        start = time.monotonic()
        answers = [m async for m in refuse(averaging_pb2.CANCELLED, endless(), linger_s=0.3)]
        return answers, time.monotonic() - start

    answers, seconds = asyncio.run(main())
    assert [a.code for a in answers] == [averaging_pb2.CANCELLED]
    assert 0.3 <= seconds < 2.0


def test_a_sender_that_goes_on_sending_is_read_only_so_far():
    """Anyone can open a stream to a reducer and be refused: the drain reads at most
    REFUSAL_MAX_MESSAGES more of it, well before the linger time, through refuse and the tap alike."""
    read = {"plain": 0, "tap": 0}

    def endless(kind):
        async def messages():
            while True:
                await asyncio.sleep(0)
                read[kind] += 1
                yield averaging_pb2.AveragingData()
        return messages()

    async def main():
        start = time.monotonic()
        [m async for m in refuse(averaging_pb2.BAD_GROUP_ID, endless("plain"), linger_s=5.0)]
        tap = InputTap(endless("tap"))
        await anext(tap)
        await tap.drain(linger_s=5.0)
        tap.close()
        return time.monotonic() - start

    seconds = asyncio.run(main())
    assert seconds < 2.0
    assert read["plain"] == REFUSAL_MAX_MESSAGES, read
    # (the one read, the queue's few, then the cap)
    assert REFUSAL_MAX_MESSAGES <= read["tap"] <= REFUSAL_MAX_MESSAGES + 4, read


def test_a_whole_message_is_answered_as_it_is_and_a_closed_input_returns_at_once():
    async def two():
        yield averaging_pb2.AveragingData()
        raise ConnectionResetError("the sender went away")

    async def main():
        reply = averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
        start = time.monotonic()
        answers = [m async for m in refuse(reply, two(), linger_s=5.0)]
        return answers, time.monotonic() - start

    answers, seconds = asyncio.run(main())
    assert [a.code for a in answers] == [averaging_pb2.PROTOCOL_VIOLATION] and seconds < 1.0
