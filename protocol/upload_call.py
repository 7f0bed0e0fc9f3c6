"""One UploadSnapshot stream in flight on the client: its progress, a stall watchdog, cancellation.

A SmolLM2-135M version (weights and AdamW moments) is 1.6 GB: eleven minutes on a 20 Mbit/s home
uplink. So an upload has no deadline for the whole call; it fails when gRPC has taken no message
for ``stall_s`` (a dead link, a coordinator that stopped reading), and the caller may cancel it at
any time (another peer published the version first) or watch it from another thread.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import grpc

from . import grpo_swarm_pb2 as pb
from .errors import CoordinatorError

METHOD = "UploadSnapshot"
DEFAULT_STALL_S = 60.0


class UploadCall:
    """``start(messages)`` opens the stream (a gRPC stream-unary ``future``) over the messages,
    which this object counts as gRPC takes them."""

    def __init__(self, start: Callable[[Iterable[bytes]], grpc.Future], messages: Iterable[bytes], total_bytes: int,
                 *, stall_s: float = DEFAULT_STALL_S):
        self.total_bytes, self.stall_s = total_bytes, stall_s
        self.sent = 0  # bytes of the messages gRPC has taken so far (the header's included)
        self.started = self.last_progress = time.monotonic()
        self._future = start(self._counted(messages))

    def _counted(self, messages: Iterable[bytes]) -> Iterable[bytes]:
        for message in messages:
            yield message
            # gRPC asks for the next message once it has taken this one
            self.sent += len(message)
            self.last_progress = time.monotonic()

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> None:
        self._future.cancel()

    def stalled(self) -> bool:
        return not self.done() and time.monotonic() - self.last_progress > self.stall_s

    def result(self, poll_s: float = 0.25) -> pb.UploadSnapshotResponse:
        """Wait for the coordinator's reply; CoordinatorError when it refused the upload, the stream
        broke, it stalled (DEADLINE_EXCEEDED, after cancelling it) or it was cancelled (CANCELLED)."""
        while True:
            try:
                return self._future.result(timeout=poll_s)
            except grpc.FutureTimeoutError:
                if self.stalled():
                    self.cancel()
                    raise CoordinatorError(METHOD, "DEADLINE_EXCEEDED", f"no progress for {self.stall_s:.0f} s after "
                                                                        f"{self.sent} of {self.total_bytes} bytes")
            except grpc.FutureCancelledError:
                raise CoordinatorError(METHOD, "CANCELLED", f"cancelled after {self.sent} of {self.total_bytes} "
                                                            "bytes") from None
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED:
                    raise CoordinatorError(METHOD, "CANCELLED", f"cancelled after {self.sent} of "
                                                                f"{self.total_bytes} bytes") from None
                raise CoordinatorError(METHOD, e.code().name, e.details() or "") from None
