"""The streams a coordinator sends (DownloadSnapshot, GetLog): how many may run at once, and when a
stalled one is cut.

Each such stream holds a gRPC worker thread for as long as it runs, and a client that stops reading
blocks that thread in its send (HTTP/2 flow control). Sixteen stalled downloads of a 200 MB version,
opened by one registered key in a second, held every worker: no heartbeat or submission was answered.
So a key may have one outbound stream at a time, at most ``max_streams`` run at once (the rest of the
workers serve the unary calls), and a stream whose client has taken nothing for ``idle_s`` is
cancelled by a watchdog thread (:func:`cancel_when_idle`, which watches the upload streams too).
Thread-safe.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import grpc


class Watched(Protocol):
    last_chunk: float  # (monotonic) when the stream last moved
    ended: bool
    cancelled: bool


def cancel_when_idle(stream: Watched, context: grpc.ServicerContext, idle_s: float) -> bool:
    """Cancel the stream's RPC once it has not moved for ``idle_s`` (True), or return when it ends
    (False). A stream with no deadline (a large version over a slow link) must not hold a worker for
    ever once the other side stops."""
    while not stream.ended:
        idle = time.monotonic() - stream.last_chunk
        if idle > idle_s:
            stream.cancelled = True
            context.cancel()  # (the handler's blocked send or receive returns)
            return True
        time.sleep(min(1.0, idle_s - idle + 0.01))
    return False


class TooManyStreams(Exception):
    pass


@dataclass(eq=False)  # compared and hashed by identity
class Outbound:
    key: str
    last_chunk: float = field(default_factory=time.monotonic)
    ended: bool = False
    cancelled: bool = False  # by the watchdog

    def sent(self) -> None:
        self.last_chunk = time.monotonic()


class OutboundStreams:
    def __init__(self, max_streams: int, idle_s: float):
        self.max_streams, self.idle_s = max(1, int(max_streams)), float(idle_s)
        self._lock = threading.Lock()
        self._streams: set[Outbound] = set()

    def start(self, key: str, context: grpc.ServicerContext, what: str) -> Outbound:
        """A slot for ``key``'s stream, watched; TooManyStreams when ``key`` has one already or all are taken."""
        stream = Outbound(key)
        with self._lock:
            if any(s.key == key for s in self._streams):
                raise TooManyStreams(f"a {what} stream of this key is running already: one at a time")
            if len(self._streams) >= self.max_streams:
                raise TooManyStreams(f"{len(self._streams)} download/log streams are running, the most this "
                                     "coordinator sends at once: retry in a while")
            self._streams.add(stream)
        threading.Thread(target=self._watch, args=(stream, context), name="outbound-watchdog", daemon=True).start()
        return stream

    def end(self, stream: Outbound) -> None:
        with self._lock:
            self._streams.discard(stream)
            stream.ended = True

    def running(self) -> int:
        with self._lock:
            return len(self._streams)

    def _watch(self, stream: Outbound, context: grpc.ServicerContext) -> None:
        if cancel_when_idle(stream, context, self.idle_s):
            self.end(stream)  # (the slot is free now, whenever gRPC closes the handler's generator)
