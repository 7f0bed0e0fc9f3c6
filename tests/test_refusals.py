"""A reducer's last message reaches a sender that is still sending parts, through two real p2pd
daemons: a refusal (one message, then the handler returns), and the CANCELLED of a reduction that
stopped reading mid-stream (its prefetching reader cancelled, as an abort does); a sender that never
ends its input holds the handler at most the linger time; the tap loses nothing to a cancelled read."""

import asyncio
import sys
import time
from pathlib import Path

import pytest
from hivemind.proto import averaging_pb2

from grpo_swarm.node.swarm.refusals import REFUSAL_MAX_MESSAGES, InputTap, refuse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from refusal_delivery import first_answers, handlers  # noqa: E402  (the bench's sender and handlers)

TRIALS = 16


def _answers(handler) -> list[str]:
    """What a sender of up to 20 parts of 1 MiB saw first from ``handler`` besides AVERAGED_PART, in
    each of TRIALS streams (bench/refusal_delivery.py's sender)."""
    return asyncio.run(asyncio.wait_for(first_answers(handler, TRIALS, 20, 1 << 20), 120))


def test_every_refusal_reaches_a_sender_still_sending_parts():
    """Answered with a plain ``yield; return``, about one refusal in five arrived here as a
    ConnectionResetError (p2pd drops it as the stream closes under the sender's parts)."""
    answers = _answers(handlers()["refusal_drained"])
    assert answers == ["BAD_GROUP_ID"] * TRIALS, answers


def test_a_reduction_aborted_mid_stream_delivers_its_cancelled():
    """The reduction reads through hivemind's prefetching ``amap_in_executor`` and stops after two
    parts; closing that reader cancels its read of the stream mid-wait, which kills a plain stream.
    Through the tap the stream stays readable, and draining it before returning delivers the
    CANCELLED. (Returning at once, half of these arrived as a BrokenPipeError or ConnectionResetError.)"""
    answers = _answers(handlers()["abort_tap"])
    assert answers == ["CANCELLED"] * TRIALS, answers


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
