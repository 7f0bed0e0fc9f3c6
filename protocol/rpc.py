"""The coordinator's gRPC API as both sides see it: method names, limits, and the two messages the
coordinator signs for peers to show each other (snapshot manifests and admission tickets).

Requests travel as :class:`SignedEnvelope` bytes (see ``grpo_swarm.proto``, service
``Coordinator``); :func:`method_path` gives each method's gRPC path. The handlers are registered
without generated stubs (``grpc.method_handlers_generic_handler`` on the server, raw
``channel.unary_unary`` on the client), so the wire format is exactly the messages in the .proto.

Manifests and tickets are signed with the coordinator's Ed25519 key over their canonical bytes
(:mod:`.canonical`) without the ``signature`` field; :func:`verify_manifest` and
:func:`verify_ticket` raise :class:`~.errors.ProtocolError` naming what is wrong. Tickets come in
two kinds: interim ones from SubmitProofs while a round is open, and final ones (``final = true``)
issued when it closes (Heartbeat's ``round_ticket``) — averaging admits only final tickets
(``verify_ticket(..., require_final=True)``).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from typing import Iterator

from . import grpo_swarm_pb2 as pb
from .canonical import canonical_bytes
from .errors import ProtocolError, ReasonCode
from .identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, node_id_from_public_key, verify_signature

SERVICE = "grpo_swarm.v1.Coordinator"
METHODS = ("Register", "Heartbeat", "GetSnapshotManifest", "DownloadSnapshot", "SubmitProofs", "UploadSnapshot",
           "GetLog", "ReportPeer", "Admin")
# the payload kind each method's envelope must carry
REQUEST_KIND = {
    "Register": "grpo_swarm.v1.RegisterRequest",
    "Heartbeat": "grpo_swarm.v1.HeartbeatRequest",
    "GetSnapshotManifest": "grpo_swarm.v1.SnapshotManifestRequest",
    "DownloadSnapshot": "grpo_swarm.v1.DownloadSnapshotRequest",
    "SubmitProofs": "grpo_swarm.v1.ProofBatch",
    "UploadSnapshot": "grpo_swarm.v1.UploadSnapshotHeader",
    "GetLog": "grpo_swarm.v1.GetLogRequest",
    "ReportPeer": "grpo_swarm.v1.PeerReport",
    "Admin": "grpo_swarm.v1.AdminRequest",
}
DEFAULT_CHUNK_SIZE = 4 << 20  # 4 MiB: large messages keep gRPC near socket speed
MAX_CHUNK_SIZE = 16 << 20
# gRPC message limits: one request (an envelope around a proof batch or an upload chunk) and one
# response (a download chunk). Anything larger is refused by gRPC itself with RESOURCE_EXHAUSTED.
MAX_REQUEST_BYTES = 24 << 20
MAX_RESPONSE_BYTES = MAX_CHUNK_SIZE + (1 << 20)
SIGNATURE_FIELD = "signature"


def method_path(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown coordinator method {name!r}")
    return f"/{SERVICE}/{name}"


# A channel that lost its server tries to reconnect after a backoff that gRPC grows from 1 s by
# 1.6x up to 120 s: a node took up to 75 s to find a restarted coordinator. Capped at 0.5 s, it
# is found within about half a second (plus jitter); the cost is a refused TCP connect twice a
# second per node while the coordinator is down. grpc.min_reconnect_backoff_ms is left alone: it
# is also the connect timeout (20 s), and 100 ms broke slow links.
RECONNECT_BACKOFF_MS = 500


def channel_options(max_request: int = MAX_REQUEST_BYTES, max_response: int = MAX_RESPONSE_BYTES) -> list:
    """gRPC channel/server options both sides use (message limits, keepalive; the reconnect
    backoff matters to clients only)."""
    return [
        ("grpc.max_send_message_length", max(max_request, max_response)),
        ("grpc.max_receive_message_length", max(max_request, max_response)),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.lookahead_bytes", 16 << 20),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
    ]


class NonceSource:
    """Strictly increasing request nonces for one client (nanoseconds since the epoch, bumped past
    the last one handed out), safe across threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._last = 0

    def __call__(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, time.time_ns())
            return self._last


# ---- snapshot files ------------------------------------------------------------------------------
class ChunkHasher:
    """SHA-256 of each ``chunk_size`` piece and of the whole of a byte stream fed in pieces of any
    size (an upload as it arrives: no second read of the file)."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE):
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}")
        self.chunk_size = chunk_size
        self.whole = hashlib.sha256()
        self.chunks: list[bytes] = []
        self.size = 0
        self._piece, self._filled = hashlib.sha256(), 0

    def update(self, data) -> None:
        self.whole.update(data)
        self.update_chunks(data)

    def update_chunks(self, data) -> None:
        """The chunks' hashes (and the size) alone, for a caller that feeds :attr:`whole` itself
        (in another thread: the two hashes are two passes over the bytes)."""
        view = memoryview(data).cast("B")
        self.size += len(view)
        while len(view):
            take = min(len(view), self.chunk_size - self._filled)
            self._piece.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.chunk_size:
                self.chunks.append(self._piece.digest())
                self._piece, self._filled = hashlib.sha256(), 0

    def result(self) -> tuple[list[bytes], bytes, int]:
        """(SHA-256 of each chunk, SHA-256 of the whole, size) of what was fed so far."""
        tail = [self._piece.digest()] if self._filled else []
        return self.chunks + tail, self.whole.digest(), self.size


def file_chunk_hashes(path: str | os.PathLike, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[list[bytes], bytes, int]:
    """(SHA-256 of each chunk, SHA-256 of the whole file, size) of a file, read once."""
    hasher = ChunkHasher(chunk_size)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk_size)
        while n := f.readinto(buf):
            hasher.update(memoryview(buf)[:n])
    return hasher.result()


def sign_manifest(manifest: pb.SnapshotManifest, identity: Identity) -> pb.SnapshotManifest:
    manifest.coordinator_public_key = identity.public_key_bytes
    manifest.signature = identity.sign(canonical_bytes(manifest, exclude=SIGNATURE_FIELD))
    return manifest


def _check_signed(msg, key_field: str, coordinator_key: bytes | None, what: str) -> None:
    key = getattr(msg, key_field)
    if len(key) != PUBLIC_KEY_SIZE or len(msg.signature) != SIGNATURE_SIZE:
        raise ProtocolError(ReasonCode.MALFORMED, f"{what}: key or signature has the wrong length")
    if coordinator_key is not None and bytes(key) != bytes(coordinator_key):
        raise ProtocolError(ReasonCode.UNKNOWN_KEY, f"{what} is signed by {key.hex()[:16]}..., not the coordinator")
    if not verify_signature(key, canonical_bytes(msg, exclude=SIGNATURE_FIELD), msg.signature):
        raise ProtocolError(ReasonCode.BAD_SIGNATURE, f"{what} signature does not verify")


def verify_manifest(manifest: pb.SnapshotManifest, coordinator_key: bytes | None = None) -> None:
    """Check a manifest's signature (by ``coordinator_key`` when given) and internal consistency."""
    _check_signed(manifest, "coordinator_public_key", coordinator_key, "SnapshotManifest")
    cs, total = manifest.chunk_size, manifest.total_bytes
    if not 0 < cs <= MAX_CHUNK_SIZE:
        raise ProtocolError(ReasonCode.MALFORMED, f"SnapshotManifest.chunk_size {cs} is not in 1..{MAX_CHUNK_SIZE}")
    expected = expected_chunks(total, cs)
    if len(manifest.chunk_sha256) != expected:
        raise ProtocolError(ReasonCode.MALFORMED, f"SnapshotManifest has {len(manifest.chunk_sha256)} chunk hashes, "
                                                  f"{total} bytes in chunks of {cs} need {expected}")
    if any(len(h) != 32 for h in manifest.chunk_sha256) or len(manifest.file_sha256) != 32 \
            or len(manifest.snapshot.sha256) != 32:
        raise ProtocolError(ReasonCode.MALFORMED, "SnapshotManifest hashes must be 32 bytes")


def chunk_range(manifest: pb.SnapshotManifest, index: int) -> tuple[int, int]:
    start = index * manifest.chunk_size
    return start, min(manifest.total_bytes, start + manifest.chunk_size)


def sign_ticket(ticket: pb.AdmissionTicket, identity: Identity) -> pb.AdmissionTicket:
    ticket.coordinator_public_key = identity.public_key_bytes
    ticket.signature = identity.sign(canonical_bytes(ticket, exclude=SIGNATURE_FIELD))
    return ticket


def verify_ticket(ticket: pb.AdmissionTicket, coordinator_key: bytes | None = None, *, run_id: str | None = None,
                  round_index: int | None = None, require_final: bool = False) -> None:
    """Check an admission ticket: the coordinator's signature, the node id matching the key, and
    (when given) the run and round; with ``require_final``, that it is a final ticket (issued when
    the round closed, not an interim one from SubmitProofs). What an averaging peer checks before
    counting a gradient: ``verify_ticket(t, key, run_id=run, round_index=r, require_final=True)``."""
    _check_signed(ticket, "coordinator_public_key", coordinator_key, "AdmissionTicket")
    if len(ticket.node_public_key) != PUBLIC_KEY_SIZE or ticket.node_id != node_id_from_public_key(
            ticket.node_public_key):
        raise ProtocolError(ReasonCode.MALFORMED, "AdmissionTicket.node_id is not the hash of its node_public_key")
    if run_id is not None and ticket.run_id != run_id:
        raise ProtocolError(ReasonCode.WRONG_RUN, f"AdmissionTicket is for run {ticket.run_id!r}, not {run_id!r}")
    if round_index is not None and ticket.round_index != round_index:
        raise ProtocolError(ReasonCode.STALE_VERSION,
                            f"AdmissionTicket is for round {ticket.round_index}, not {round_index}")
    if require_final and not ticket.final:
        raise ProtocolError(ReasonCode.STALE_VERSION, f"AdmissionTicket of round {ticket.round_index} is an interim "
                                                      "ticket (final = false): the round had not closed")


def hardware_summary(accelerator: str = "", accelerator_memory_bytes: int = 0, software: str = "") -> pb.HardwareSummary:
    """This machine's summary from psutil (the accelerator comes from the caller, e.g. torch.cuda)."""
    import platform

    import psutil

    return pb.HardwareSummary(
        cpu_count=psutil.cpu_count(logical=True) or 0, memory_bytes=psutil.virtual_memory().total,
        accelerator=accelerator, accelerator_memory_bytes=accelerator_memory_bytes,
        platform=platform.platform(terse=True)[:128], software=software[:128])


def iter_file_chunks(path: str | os.PathLike, offset: int, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) pieces of a file from ``offset`` in ``chunk_size`` steps, read with one
    buffer per piece (the bytes object handed to gRPC is the only copy)."""
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        for off in itertools.count(offset, chunk_size):
            data = f.read(chunk_size)
            if not data:
                return
            yield off, data


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def upload_chunk_message(offset: int, pieces) -> bytes:
    """``UploadPart(chunk=SnapshotChunk(offset, data=b"".join(pieces))).SerializeToString()``, the
    same bytes, built with one copy of the data (protobuf's way copies a large chunk three times)."""
    size = sum(memoryview(p).nbytes for p in pieces)
    inner = (b"\x08" + _varint(offset) if offset else b"") + b"\x12" + _varint(size)  # offset 1, data 2
    return b"".join([b"\x12", _varint(len(inner) + size), inner, *pieces])  # UploadPart.chunk = 2


def upload_seconds_left(progress: pb.UploadProgress) -> float | None:
    """When an upload in flight will end at its rate so far; None before its first byte."""
    if progress.bytes_received <= 0 or progress.elapsed_ms <= 0:
        return None
    return (progress.total_bytes - progress.bytes_received) * (progress.elapsed_ms / 1000) / progress.bytes_received


def expected_chunks(total_bytes: int, chunk_size: int) -> int:
    return -(-total_bytes // chunk_size)


def check_chunk(manifest: pb.SnapshotManifest, offset: int, data: bytes | memoryview) -> None:
    """ProtocolError unless ``data`` is the manifest's chunk starting at ``offset``."""
    if offset % manifest.chunk_size:
        raise ProtocolError(ReasonCode.MALFORMED, f"chunk offset {offset} is not a multiple of {manifest.chunk_size}")
    index = offset // manifest.chunk_size
    if index >= len(manifest.chunk_sha256):
        raise ProtocolError(ReasonCode.OVERSIZED, f"chunk at offset {offset} is past the end ({manifest.total_bytes})")
    start, end = chunk_range(manifest, index)
    if len(data) != end - start:
        raise ProtocolError(ReasonCode.MALFORMED, f"chunk at offset {offset} has {len(data)} bytes, expected "
                                                  f"{end - start}")
    if hashlib.sha256(data).digest() != manifest.chunk_sha256[index]:
        raise ProtocolError(ReasonCode.MALFORMED, f"chunk at offset {offset} does not match its SHA-256")
