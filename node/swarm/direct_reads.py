"""Reads large messages on a hivemind P2P's streams straight from the socket into their own buffer.

hivemind reads every stream message with `asyncio.StreamReader.readexactly`: the bytes go from the
socket into a fresh chunk, are appended to the reader's growing buffer, and are copied out again,
with the transport paused and resumed every 128 KiB. For the averager's parts (megabytes each)
that is most of the Python side of receiving. Here a read of at least `min_size` bytes takes what
the reader already holds and then lets the transport `recv_into` the message's own buffer (an
`asyncio.BufferedProtocol` for the length of one message), returning a writable `memoryview` of
it; smaller reads are left to the reader. A read longer than `max_size` is refused before anything
is allocated (`MessageTooLarge`): a peer's 9-byte header cannot make us reserve gigabytes, and
nobody can make us buffer more than one legitimate message. The buffer is left uninitialised
(`numpy.empty`, not a zero-filled `bytearray`), so memory is committed only as bytes arrive: many
streams announcing large messages and sending nothing cost us what they send, as with hivemind's
own reader. Only the P2P instance it is installed on is affected.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import numpy as np

MIN_DIRECT_READ = 64 << 10


class MessageTooLarge(ConnectionAbortedError):
    """A peer announced a message longer than the stream allows; the stream is given up."""


class _MessageFiller(asyncio.BufferedProtocol):
    """Stands in for a stream's protocol while one message is read into `buffer`, then hands back.

    It offers the transport exactly the bytes still missing, so nothing past the message is read;
    writing flow control is forwarded, so a drain on the same stream is not stalled meanwhile.
    """

    def __init__(self, transport: asyncio.BaseTransport, stream_protocol: asyncio.BaseProtocol,
                 buffer: memoryview, filled: int):
        self.transport, self.stream_protocol = transport, stream_protocol
        self.view, self.filled = memoryview(buffer), filled
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def hand_back(self) -> None:
        if self.transport.get_protocol() is self:
            self.transport.set_protocol(self.stream_protocol)
        self.view.release()

    def _finish(self, error: BaseException | None) -> None:
        self.hand_back()
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        if self.filled == len(self.view):
            self._finish(None)

    def eof_received(self) -> bool | None:
        self._finish(asyncio.IncompleteReadError(bytes(self.view[:self.filled]), len(self.view)))
        return self.stream_protocol.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionResetError("stream closed in the middle of a message"))
        self.stream_protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.stream_protocol.pause_writing()

    def resume_writing(self) -> None:
        self.stream_protocol.resume_writing()


def _direct_readexactly(reader: asyncio.StreamReader, min_size: int, max_size: int):
    small_read = reader.readexactly

    async def readexactly(n: int) -> bytes | memoryview:
        transport = reader._transport
        if n < min_size or transport is None or reader._exception is not None:
            return await small_read(n)
        if n > max_size:
            error = MessageTooLarge(f"the peer announced a message of {n} bytes; at most {max_size} are read")
            reader.set_exception(error)
            raise error
        message = memoryview(np.empty(n, dtype=np.uint8))  # pages are committed as bytes arrive
        held = min(len(reader._buffer), n)
        message[:held] = memoryview(reader._buffer)[:held]
        del reader._buffer[:held]
        if held == n:
            return message
        if reader._eof:
            raise asyncio.IncompleteReadError(bytes(message[:held]), n)
        filler = _MessageFiller(transport, transport.get_protocol(), message, held)
        transport.set_protocol(filler)
        if reader._paused:  # the reader paused the transport when its buffer filled up
            reader._paused = False
            transport.resume_reading()
        try:
            await filler.done
        except asyncio.CancelledError:
            # part of a message is gone: nothing later on this stream can be read correctly
            filler.hand_back()
            reader.set_exception(ConnectionAbortedError("a read was cancelled in the middle of a message"))
            raise
        return message

    return readexactly


def read_directly(reader: asyncio.StreamReader, max_size: int, min_size: int = MIN_DIRECT_READ) -> None:
    """Makes `reader.readexactly(n)` for n ≥ min_size read straight into the returned buffer, and
    refuse n > max_size."""
    reader.readexactly = _direct_readexactly(reader, min_size, max_size)


def install_direct_reads(p2p: Any, handler_names: list[str], max_size: int, min_size: int = MIN_DIRECT_READ,
                         enabled: Callable[[], bool] = lambda: True) -> None:
    """Streams this P2P opens, and streams to the named handlers, read large messages directly
    (each stream as `enabled()` says when it opens) and refuse messages over `max_size` bytes."""
    client = p2p._client
    open_stream = client.stream_open

    async def stream_open(peer_id, protocols):
        info, reader, writer = await open_stream(peer_id, protocols)
        if enabled():
            read_directly(reader, max_size, min_size)
        return info, reader, writer

    client.stream_open = stream_open
    handlers = client.control.handlers
    for name in handler_names:
        if name in handlers:
            handlers[name] = _with_direct_reads(handlers[name], max_size, min_size, enabled)


def _with_direct_reads(handler, max_size: int, min_size: int, enabled: Callable[[], bool]):
    async def handle(stream_info, reader, writer):
        if enabled():
            read_directly(reader, max_size, min_size)
        return await handler(stream_info, reader, writer)

    return handle
