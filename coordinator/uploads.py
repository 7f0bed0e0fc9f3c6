"""The UploadSnapshot streams a coordinator is receiving: who sends which version, how far along.

Heartbeats tell waiting contributors about the next version's upload that is furthest ahead
(:meth:`InFlightUploads.progress`), so that on a slow link they let it finish instead of all
uploading the same gigabytes at once, and start their own only when it stalls or crawls; while it
moves, the coordinator keeps the open round from closing (which would drop the reports behind it).
The bytes still announced by streams in flight are reserved against the disk (:meth:`reserved_bytes`).
Thread-safe: each stream runs in its own gRPC worker thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.rpc import upload_seconds_left

PROGRESSING_S = 20.0  # an upload that received something this recently moves (the nodes' STALL_S too)


def _now() -> float:
    return time.monotonic()


@dataclass(eq=False)  # compared and hashed by identity: two streams may look alike
class Flight:
    """One stream: updated by its handler (:meth:`advance`), read by heartbeats."""

    node_id: str
    version: int
    total_bytes: int
    started: float = field(default_factory=_now)
    received: int = 0
    last_chunk: float = field(default_factory=_now)
    ended: bool = False
    cancelled: bool = False  # by the server's idle watchdog

    def advance(self, received: int) -> None:
        self.received, self.last_chunk = received, _now()

    @property
    def bytes_moved(self) -> int:  # (what the idle watchdog reads, .outbound.cancel_when_idle)
        return self.received

    def progress(self, now: float) -> pb.UploadProgress:
        return pb.UploadProgress(version=self.version, node_id=self.node_id, bytes_received=self.received,
                                 total_bytes=self.total_bytes, elapsed_ms=int(1000 * (now - self.started)),
                                 idle_ms=int(1000 * (now - self.last_chunk)))


def _ends_first(p: pb.UploadProgress) -> tuple[float, int]:
    left = upload_seconds_left(p)
    return (float("inf") if left is None else left, -p.bytes_received)


class TooManyUploads(Exception):
    pass


class InFlightUploads:
    def __init__(self):
        self._lock = threading.Lock()
        self._flights: set[Flight] = set()

    def start(self, node_id: str, version: int, total_bytes: int, *, max_streams: int) -> Flight:
        """A new stream; TooManyUploads when ``node_id`` already has one in flight or ``max_streams``
        are (each holds a server worker for as long as its sender keeps it moving)."""
        flight = Flight(node_id, version, total_bytes)
        with self._lock:
            if any(f.node_id == node_id for f in self._flights):
                raise TooManyUploads(f"an upload from node {node_id} is already in flight")
            if len(self._flights) >= max_streams:
                raise TooManyUploads(f"{len(self._flights)} uploads are in flight, the most this coordinator takes")
            self._flights.add(flight)
        return flight

    def end(self, flight: Flight) -> None:
        with self._lock:
            self._flights.discard(flight)
            flight.ended = True

    def progress(self, version: int) -> pb.UploadProgress | None:
        """The stream of ``version`` that will end first at its rate so far (the one furthest along
        before any has a rate), None when none streams."""
        now = _now()
        with self._lock:
            flights = [f for f in self._flights if f.version == version]
            if not flights:
                return None
            progress = [f.progress(now) for f in flights]
        return min(progress, key=_ends_first)

    def reserved_bytes(self) -> int:
        """Bytes the streams in flight have announced but not yet sent."""
        with self._lock:
            return sum(max(0, f.total_bytes - f.received) for f in self._flights)
