"""A reducer's last message to a sender, delivered: a refusal of the stream (BAD_GROUP_ID, CANCELLED,
PROTOCOL_VIOLATION, ...) or the CANCELLED of an attempt it aborted mid-stream.

hivemind closes a stream as soon as its handler returns, and p2pd can drop a message still in flight
at that moment, while the sender is still sending parts: the sender then sees a clean end, a broken
pipe or a reset instead of the message (here: 4 refusals in 20, and 10 mid-stream CANCELLEDs in 20,
with a sender of 1 MiB parts; bench/RESULTS.md). What it names differs with it — an end is a failure
of the reducer (REDUCER_FAILED), BAD_GROUP_ID names nobody at first (NOT_IN_GROUP), CANCELLED passes
another member's failure on — so a lost message changes whom the group names as the breaker of an
attempt. So the handler answers, then reads the sender's input to its end (the sender ends it as
soon as it reads the answer) for at most :data:`REFUSAL_LINGER_S` before returning.

* :func:`refuse` — one message, then the drain, for a stream nothing else reads.
* :class:`InputTap` — a stream the reduction reads: one task of its own reads it, so that a reader
  cancelled mid-read (hivemind's prefetching ``amap_in_executor`` is, when the reduction stops)
  never breaks it, and :meth:`InputTap.drain` can still read it to its end afterwards.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator  # typing's, as hivemind's handlers are annotated

from hivemind.proto import averaging_pb2

REFUSAL_LINGER_S = 3.0  # an honest sender ends its input within a round trip of reading the answer
# ... and has at most its queued parts still in flight: a sender that goes on is not read any further
# (anyone can open a stream to a reducer and be refused; each costs it at most this much reading)
REFUSAL_MAX_MESSAGES = 32
_END = object()


async def refuse(answer: int | averaging_pb2.AveragingData, requests: AsyncIterator,
                 linger_s: float = REFUSAL_LINGER_S) -> AsyncIterator:
    """Yield ``answer`` (a message code, or a whole message), then drain ``requests`` until the sender
    ends its input, closes the stream, sent :data:`REFUSAL_MAX_MESSAGES` more, or ``linger_s`` passes."""
    yield averaging_pb2.AveragingData(code=answer) if isinstance(answer, int) else answer
    if isinstance(requests, InputTap):
        await requests.drain(linger_s)
        return
    try:
        await asyncio.wait_for(_drain(requests), linger_s)
    except asyncio.TimeoutError:
        pass
    except Exception:  # noqa: BLE001 - a broken or closed stream: nothing left to protect
        pass


async def _drain(requests: AsyncIterator) -> None:
    read = 0
    async for _ in requests:
        read += 1
        if read >= REFUSAL_MAX_MESSAGES:
            return


class InputTap:
    """A handler's input stream, read by a task of its own into a small queue (``prefetch`` messages:
    the sender still waits for us as it would for hivemind's own handler queue). Iterating it yields
    the stream's messages; a read cancelled while it waits loses nothing. :meth:`close` (always, when
    the handler ends) stops the reading task."""

    def __init__(self, stream: AsyncIterator, prefetch: int = 2):
        self._queue: asyncio.Queue = asyncio.Queue(prefetch)
        self._ended = asyncio.Event()
        self._discard = False
        self._discarded = 0
        self._error: BaseException | None = None
        self._reader = asyncio.ensure_future(self._read(stream.__aiter__()))

    async def _read(self, stream) -> None:
        try:
            async for message in stream:
                if not self._discard:
                    await self._queue.put(message)
                else:
                    self._discarded += 1
                    if self._discarded >= REFUSAL_MAX_MESSAGES:  # a sender that goes on: stop reading it
                        break
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken stream: its reader sees the error
            self._error = e
        self._ended.set()
        if not self._discard:
            await self._queue.put(_END)

    def __aiter__(self) -> InputTap:
        return self

    async def __anext__(self):
        message = await self._queue.get()
        if message is _END:
            self._queue.put_nowait(_END)  # (room: nothing is put after it) any other reader ends too
            if self._error is not None:
                raise self._error
            raise StopAsyncIteration
        return message

    async def drain(self, linger_s: float = REFUSAL_LINGER_S) -> None:
        """Read the rest of the input, unread, until the sender ends it, sent :data:`REFUSAL_MAX_MESSAGES`
        more, or ``linger_s`` passes."""
        self._discard = True
        while not self._queue.empty():  # (unblocks a reading task waiting for room)
            self._queue.get_nowait()
        try:
            await asyncio.wait_for(self._ended.wait(), linger_s)
        except asyncio.TimeoutError:
            pass

    def close(self) -> None:
        if not self._reader.done():
            self._reader.cancel()
