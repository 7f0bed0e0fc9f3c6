"""The streams a coordinator sends (DownloadSnapshot, GetLog): how many may run at once, whose they
may be, and when a stalled or trickling one is cut.

Each such stream holds a gRPC worker thread for as long as it runs, and a client that stops reading
blocks that thread in its send (HTTP/2 flow control). Sixteen stalled downloads of a 200 MB version,
opened by one registered key in a second, held every worker: no heartbeat or submission was answered.
So:

* a key may have one outbound stream at a time, and at most ``max_streams`` run at once (the rest of
  the workers serve the unary calls). A key's newer request of the same kind takes its older stream's
  slot, which is cancelled: the key's process died, was superseded by a restart, or gave up on it
  (refusing the newcomer instead made a node restarted mid-download exit, the server not having
  seen the old stream end yet);
* keys without verified work (free to make, and GetLog needs no registration) may hold at most
  ``max_streams - reserved`` of them: the other ``reserved`` slots stay for nodes that have taken part
  in a round, so free keys cannot keep the swarm's own nodes from a snapshot;
* a watchdog thread (:func:`cancel_when_idle`, which watches the upload streams too) cancels a
  stream whose client has taken nothing for ``idle_s``, or less than ``min_rate`` bytes/s over a
  window of ``idle_s``: reading one chunk a minute no longer holds a slot for ever.

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
    bytes_moved: int  # in all, so far
    ended: bool
    cancelled: bool


def cancel_when_idle(stream: Watched, context: grpc.ServicerContext, idle_s: float, min_rate: float = 0.0) -> bool:
    """Cancel the stream's RPC once it has not moved for ``idle_s``, or moved fewer than ``min_rate``
    bytes/s over a window of ``idle_s`` (True); or return when it ends (False). A stream with no
    deadline (a large version over a slow link) must not hold a worker for ever once the other side
    stops, nor while it takes a trickle."""
    window_start, window_bytes = time.monotonic(), stream.bytes_moved
    while not stream.ended:
        now = time.monotonic()
        idle = now - stream.last_chunk
        slow = False
        if now - window_start >= idle_s:
            slow = stream.bytes_moved - window_bytes < min_rate * (now - window_start)
            window_start, window_bytes = now, stream.bytes_moved
        if idle > idle_s or slow:
            stream.cancelled = True
            context.cancel()  # (the handler's blocked send or receive returns)
            return True
        time.sleep(max(0.01, min(1.0, idle_s - idle + 0.01, window_start + idle_s - now + 0.01)))
    return False


class TooManyStreams(Exception):
    pass


@dataclass(eq=False)  # compared and hashed by identity
class Outbound:
    key: str
    what: str = ""  # the method
    context: grpc.ServicerContext | None = None
    verified: bool = False  # the key's node has taken part in a round
    last_chunk: float = field(default_factory=time.monotonic)
    bytes_moved: int = 0
    ended: bool = False
    cancelled: bool = False  # by the watchdog

    def sent(self, nbytes: int) -> None:
        self.bytes_moved += nbytes
        self.last_chunk = time.monotonic()


class OutboundStreams:
    def __init__(self, max_streams: int, idle_s: float, min_rate: float = 0.0, reserved: int | None = None):
        """``reserved``: slots only keys with verified work may take (default: half, rounded down)."""
        self.max_streams, self.idle_s, self.min_rate = max(1, int(max_streams)), float(idle_s), float(min_rate)
        self.reserved = min(self.max_streams - 1, self.max_streams // 2 if reserved is None else max(0, int(reserved)))
        self._lock = threading.Lock()
        self._streams: set[Outbound] = set()

    def start(self, key: str, context: grpc.ServicerContext, what: str, verified: bool = False) -> Outbound:
        """A slot for ``key``'s stream, watched. ``key``'s running stream of the same method is
        cancelled and its slot taken; TooManyStreams when ``key`` runs one of another method, all are
        taken, or (``verified`` False) all those open to keys without verified work are."""
        stream = Outbound(key, what, context, verified)
        with self._lock:
            own = next((s for s in self._streams if s.key == key), None)
            if own is not None and own.what != what:
                raise TooManyStreams(f"a {own.what} stream of this key is running already: one at a time")
            others = self._streams - {own}  # the same key's newer request takes the older one's slot
            if len(others) >= self.max_streams:
                raise TooManyStreams(f"{len(others)} download/log streams are running, the most this "
                                     "coordinator sends at once: retry in a while")
            unverified = sum(1 for s in others if not s.verified)
            if not verified and unverified >= self.max_streams - self.reserved:
                raise TooManyStreams(f"{unverified} download/log streams of keys without verified work are running, "
                                     f"the most this coordinator sends them at once ({self.reserved} slots are kept "
                                     "for nodes that have taken part in a round): retry in a while")
            if own is not None:  # abandoned by its client: it died, was superseded, or gave up on it
                self._streams.discard(own)
                own.ended = own.cancelled = True
            self._streams.add(stream)
        if own is not None:
            own.context.cancel()  # (its handler's blocked send returns)
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
        if cancel_when_idle(stream, context, self.idle_s, self.min_rate):
            self.end(stream)  # (the slot is free now, whenever gRPC closes the handler's generator)
