"""A client of the coordinator's gRPC API (what ``grpo-node`` and auditors use).

Every call seals its request in a :class:`SignedEnvelope` with the caller's key and a fresh nonce
(:mod:`.rpc`). Errors come back as :class:`CoordinatorError` with the gRPC status name and the
server's message. The coordinator's key is pinned at the first Register (or given up front) and
every manifest and admission ticket is checked against it.

Downloads are resumable: :meth:`CoordinatorClient.download_snapshot` writes ``<dest>.part``,
checks each chunk against the signed manifest as it arrives, and on a later call re-checks the
chunks already on disk and asks only for the rest. Stale ``.part`` files of other versions in the
same folder are removed (:mod:`.partfiles`).

Transient failures (UNAVAILABLE: the coordinator restarting, a broken connection) are retried with
jittered backoff (:mod:`.retry`; ``retries``, ``retry_deadline_s``) for every call but
UploadSnapshot, each attempt signed anew with a fresh nonce; streams resume after what they
delivered. When the budget is spent the error names the address and what to check.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import grpc

from . import grpo_swarm_pb2 as pb
from . import partfiles
from .errors import CoordinatorError, ProtocolError
from .identity import Identity
from .log import LogEntry, parse_jsonl_line
from .pacing import RequestPacer
from .proofs import seal_envelope
from .retry import NO_RETRY, TRANSIENT_CODES, Attempts, RetryPolicy
from .rpc import (
    NonceSource,
    channel_options,
    check_chunk,
    chunk_range,
    iter_file_chunks,
    method_path,
    upload_chunk_message,
    verify_manifest,
    verify_ticket,
)
from .upload_call import DEFAULT_STALL_S, UploadCall
from .version_file import VersionFileWriter

DEFAULT_TIMEOUT_S = 60.0


def _identity(x: bytes) -> bytes:
    return x


class CoordinatorClient:
    """``retries`` / ``retry_deadline_s``: how many times, and for how long, a call that failed with
    UNAVAILABLE is tried again (``retries=0``: never); ``self.retry`` may be replaced any time."""

    def __init__(self, address: str, identity: Identity, *, coordinator_key: bytes | None = None,
                 root_certificates: bytes | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retries: int = RetryPolicy.retries, retry_deadline_s: float = RetryPolicy.deadline_s,
                 instance: bytes = b"", pace: tuple[float, int] = (0.0, 1)):
        """``instance``: a random id of this running node process, sent with every Register and
        Heartbeat, so that the coordinator can tell two processes of one key apart (empty: none).
        ``pace``: (requests/s, burst) this client keeps to, sleeping before a request that would go
        over (:mod:`.pacing`; 0: none)."""
        self.address, self.identity, self.timeout_s = address, identity, timeout_s
        self.instance = bytes(instance)
        self.retry = RetryPolicy(retries=retries, deadline_s=retry_deadline_s)
        self._rng = random.Random()
        self.coordinator_key = bytes(coordinator_key) if coordinator_key is not None else None
        options = channel_options()
        if root_certificates is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates), options=options)
        self._nonce = NonceSource()
        self._pacer = RequestPacer(*pace)
        self.node_id = identity.node_id
        self.run_id: str | None = None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing
    def seal(self, message, kind: str | None = None) -> bytes:
        return seal_envelope(message, self.identity, nonce=self._nonce(), kind=kind).SerializeToString()

    def _paced_seal(self, message) -> bytes:
        """:meth:`seal` for a request about to be sent: each one counts against the key's rate."""
        self._pacer.wait()
        return self.seal(message)

    def _wait_or_raise(self, method: str, error: grpc.RpcError, attempts: Attempts) -> None:
        """Sleep before the next attempt if ``error`` is transient and the budget allows one, else
        raise it as a CoordinatorError (saying where and what to check once retries are spent)."""
        code, detail = error.code().name, error.details() or ""
        if code not in TRANSIENT_CODES:
            raise CoordinatorError(method, code, detail) from None
        delay = attempts.next_delay(self._rng)
        if delay is None:
            if self.retry.retries:
                detail = (f"{detail} (gave up after {attempts.made} attempts in {attempts.elapsed_s:.1f} s): check "
                          f"that the coordinator at {self.address} is running and reachable from here, and that "
                          "the address and the TLS setting are right")
            raise CoordinatorError(method, code, detail) from None
        time.sleep(delay)

    def _unary(self, method: str, message, reply_cls, timeout_s: float | None = None,
               retry: RetryPolicy | None = None):
        """One call, retried on UNAVAILABLE. Every method retried this way is idempotent or safe to
        re-sign: Register (a second registration of the key answers newly_registered=false),
        Heartbeat (the latest report wins), GetSnapshotManifest; and SubmitProofs, because the
        coordinator refuses replayed proof sequences: if the first attempt was committed before the
        connection broke, the retry gets REPLAYED_SEQUENCE verdicts instead of counting the
        proofs twice (its ticket still counts them: tickets are cumulative per node and round);
        ReportPeer, because a repeated report is answered without counting it again. Admin is retried
        too: a ban or unban committed before the connection broke is refused FAILED_PRECONDITION
        ("already banned" / "not banned") on the retry, which says what state the node is in."""
        call = self.channel.unary_unary(method_path(method), request_serializer=_identity,
                                        response_deserializer=reply_cls.FromString)
        attempts = (retry or self.retry).attempts()
        while True:
            try:
                return call(self._paced_seal(message), timeout=timeout_s or self.timeout_s)  # a fresh nonce each time
            except grpc.RpcError as e:
                self._wait_or_raise(method, e, attempts)

    def _stream(self, method: str, request_for, reply_cls, timeout_s: float | None) -> Iterator:
        """The replies of a server stream opened with ``request_for()``. After a transient failure
        the stream is opened again with a new ``request_for()`` (the caller makes it resume after
        what it has received); a stream that delivered something since gets a fresh retry budget."""
        call = self.channel.unary_stream(method_path(method), request_serializer=_identity,
                                         response_deserializer=reply_cls.FromString)
        attempts = self.retry.attempts()
        while True:
            it = call(self._paced_seal(request_for()), timeout=timeout_s)
            delivered = False
            try:
                for reply in it:
                    delivered = True
                    yield reply
                return
            except grpc.RpcError as e:
                if delivered:
                    attempts = self.retry.attempts()
                self._wait_or_raise(method, e, attempts)
            finally:
                it.cancel()

    def _pin(self, key: bytes) -> None:
        if self.coordinator_key is None:
            self.coordinator_key = bytes(key)
        elif bytes(key) != self.coordinator_key:
            raise ProtocolError("UNKNOWN_KEY", f"the coordinator at {self.address} presents key {key.hex()[:16]}..., "
                                               f"not the pinned {self.coordinator_key.hex()[:16]}...")

    # -- methods
    def register(self, run_id: str = "", hardware: pb.HardwareSummary | None = None, *,
                 multiaddrs: Sequence[str] = ()) -> pb.RegisterResponse:
        """Register (or re-register) the key; ``multiaddrs``: the libp2p addresses this node announces
        (each ending in ``/p2p/<its own peer id>``). The reply lists the live peers' addresses."""
        req = pb.RegisterRequest(run_id=run_id, multiaddrs=list(multiaddrs), instance=self.instance)
        if hardware is not None:
            req.hardware.CopyFrom(hardware)
        reply = self._unary("Register", req, pb.RegisterResponse)
        self._pin(reply.coordinator_public_key)
        self.run_id = reply.run_id
        self._pacer.fit(reply.request_rate_per_s, reply.request_burst)  # (a client that paces itself)
        return reply

    @staticmethod
    def run_config(reply: pb.RegisterResponse) -> dict:
        return json.loads(reply.run_config_json)

    def heartbeat(self, policy_version: int, *, computed: pb.PolicySnapshotRef | None = None,
                  completions_per_s: float = 0.0, tokens_per_s: float = 0.0,
                  hardware: pb.HardwareSummary | None = None, multiaddrs: Sequence[str] = (),
                  sample: bool = True) -> pb.HeartbeatResponse:
        """Report in; the reply carries the live peers' addresses and, after a round this node took part
        in closed, its final ticket of that round (``round_ticket``, checked here: the coordinator's
        signature, this node, final). ``multiaddrs`` replaces the announced addresses (empty: unchanged).
        ``sample``: this heartbeat asks for the round's assignment and binds ``policy_version`` as the
        version to sample it with (the round's first such heartbeat binds); False for liveness and reports."""
        req = pb.HeartbeatRequest(policy_version=policy_version, completions_per_s=completions_per_s,
                                  tokens_per_s=tokens_per_s, multiaddrs=list(multiaddrs), sample=sample,
                                  instance=self.instance)
        if computed is not None:
            req.computed.CopyFrom(computed)
        if hardware is not None:
            req.hardware.CopyFrom(hardware)
        reply = self._unary("Heartbeat", req, pb.HeartbeatResponse)
        if reply.HasField("round_ticket"):
            t = reply.round_ticket
            verify_ticket(t, self.coordinator_key, run_id=self.run_id, require_final=True)
            if t.node_id != self.identity.node_id:
                raise ProtocolError("MALFORMED", f"the round ticket names node {t.node_id}, not this node")
        return reply

    def leave(self, policy_version: int, timeout_s: float = 5.0) -> pb.HeartbeatResponse:
        """Say this node is leaving the swarm (``HeartbeatRequest.leaving``): the coordinator stops
        counting it as live at once instead of 3 heartbeat intervals later, so no round waits for it.
        One try within ``timeout_s``, no retry: whoever leaves does not wait for a coordinator that is
        down (it then counts the node as gone a TTL later, as after a crash)."""
        req = pb.HeartbeatRequest(policy_version=policy_version, sample=False, leaving=True, instance=self.instance)
        return self._unary("Heartbeat", req, pb.HeartbeatResponse, timeout_s, retry=NO_RETRY)

    def report_peer(self, round_index: int, peer_node_id: str, reason: str, evidence: bytes = b"") -> pb.PeerReportResponse:
        """Report a participant of closed round ``round_index`` that this node (a participant too)
        excluded from that round's averaging; reason <= 256 characters, evidence <= 64 KiB. Repeating
        a report is harmless (``repeated`` in the reply)."""
        req = pb.PeerReport(round_index=round_index, peer_node_id=peer_node_id, reason=reason, evidence=evidence)
        return self._unary("ReportPeer", req, pb.PeerReportResponse)

    def admin(self, action: int, node_id: str, reason: str = "") -> pb.AdminResponse:
        """An operator's ``pb.ADMIN_BAN`` / ``pb.ADMIN_UNBAN``: this client's identity must be the
        coordinator's own key (refused PERMISSION_DENIED otherwise)."""
        return self._unary("Admin", pb.AdminRequest(action=action, node_id=node_id, reason=reason), pb.AdminResponse)

    def manifest(self, version: int | None = None) -> pb.SnapshotManifest:
        req = pb.SnapshotManifestRequest(version=version or 0, latest=version is None)
        m = self._unary("GetSnapshotManifest", req, pb.SnapshotManifest)
        verify_manifest(m, self.coordinator_key)
        return m

    def download_snapshot(self, dest: str | os.PathLike, version: int | None = None, *,
                          manifest: pb.SnapshotManifest | None = None, timeout_s: float | None = None,
                          max_chunks: int | None = None) -> pb.SnapshotManifest:
        """Download a snapshot to ``dest`` (resuming ``dest.part``); returns its verified manifest.
        ``max_chunks`` stops after that many new chunks (leaving the .part file), for tests. A
        broken stream is reopened after the last chunk received (within the retry budget); the
        ``.part`` files of other versions in ``dest``'s folder are removed (:mod:`.partfiles`), and
        a failure that left this one empty removes it too.

        A helper thread checks each chunk's SHA-256 and writes it at its offset while the next
        chunks arrive (hashlib and file writes release the GIL); a chunk reaches the file only
        after it matched, and the first failure is what this call raises. Chunk data is not copied
        out of the received messages (:class:`_ReceivedChunk`)."""
        manifest = manifest or self.manifest(version)
        dest = Path(dest)
        part = partfiles.part_path(dest)
        partfiles.remove_stale(dest.parent, keep=manifest)  # leftovers of other versions (this dest's too)
        partfiles.claim(dest, manifest)
        # not open(part, "wb"): that would truncate a .part another download is writing
        with open(os.open(part, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644), "r+b", buffering=0) as f:
            if not partfiles.lock(f.fileno()):
                raise CoordinatorError("DownloadSnapshot", "ABORTED", f"another download into {dest} is running")
            try:
                offset = self._download_into(f, part, manifest, timeout_s, max_chunks)
            except BaseException:
                if os.fstat(f.fileno()).st_size == 0:  # nothing to resume: leave no 0-byte .part behind
                    partfiles.release(dest, remove_part=True)
                raise
            if offset is None:  # stopped early (max_chunks)
                return manifest
        if offset != manifest.total_bytes:
            raise CoordinatorError("DownloadSnapshot", "DATA_LOSS",
                                   f"stream ended at {offset} of {manifest.total_bytes} bytes; call again to resume")
        os.replace(part, dest)
        partfiles.release(dest)
        partfiles.remove_stale(dest.parent, keep=manifest)  # what was left while this one ran
        return manifest

    def _download_into(self, f, part: Path, manifest: pb.SnapshotManifest, timeout_s: float | None,
                       max_chunks: int | None) -> int | None:
        """Fill the open, locked ``.part`` file ``f`` from its verified prefix on, resuming the
        stream after the last chunk received if it breaks; the bytes now in it (synced), or None if
        ``max_chunks`` stopped it."""
        offset = _verified_prefix(part, manifest)
        f.truncate(offset)
        if offset < manifest.total_bytes:
            def request() -> pb.DownloadSnapshotRequest:  # (re)opens the stream where it stopped
                return pb.DownloadSnapshotRequest(version=manifest.snapshot.version, offset=offset,
                                                  file_sha256=manifest.file_sha256)

            writer = _ChunkWriter(f.fileno(), manifest)
            stream = self._stream("DownloadSnapshot", request, _ReceivedChunk, timeout_s)
            try:
                for n, chunk in enumerate(stream):
                    if chunk.offset != offset:
                        raise ProtocolError("MALFORMED", f"chunk at offset {chunk.offset}, expected {offset}")
                    data = chunk.data
                    writer.put(offset, data)
                    offset += len(data)
                    if max_chunks is not None and n + 1 >= max_chunks and offset < manifest.total_bytes:
                        return None
            finally:
                stream.close()
                failure = writer.close()  # every chunk handed over is checked (and written) by now
                if failure is not None:
                    raise failure
        os.fsync(f.fileno())
        return offset

    def submit_proofs(self, proofs: Sequence[pb.RewardProof]) -> pb.SubmitProofsResponse:
        reply = self._unary("SubmitProofs", pb.ProofBatch(proofs=list(proofs)), pb.SubmitProofsResponse)
        if reply.HasField("ticket"):
            verify_ticket(reply.ticket, self.coordinator_key, run_id=self.run_id)
        return reply

    def upload_snapshot(self, path: str | os.PathLike, snapshot: pb.PolicySnapshotRef, *,
                        chunk_size: int = 4 << 20, timeout_s: float | None = None,
                        stall_s: float = DEFAULT_STALL_S) -> pb.UploadSnapshotResponse:
        """Upload a version file from disk (read twice: once for its hash, once to send it)."""
        path = Path(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        return self._upload(path.stat().st_size, h.digest(),
                            lambda: ((off, [data]) for off, data in iter_file_chunks(path, 0, chunk_size)),
                            snapshot, timeout_s=timeout_s, stall_s=stall_s).result()

    def upload_version(self, writer: VersionFileWriter, snapshot: pb.PolicySnapshotRef, *,
                       chunk_size: int = 4 << 20, timeout_s: float | None = None,
                       stall_s: float = DEFAULT_STALL_S) -> pb.UploadSnapshotResponse:
        """Upload a canonical version file produced from tensors in memory, read once: no file hash
        in the header (the state hash binds a canonical file's bytes)."""
        return self.start_upload_version(writer, snapshot, chunk_size=chunk_size, timeout_s=timeout_s,
                                         stall_s=stall_s).result()

    def start_upload_version(self, writer: VersionFileWriter, snapshot: pb.PolicySnapshotRef, *,
                             chunk_size: int = 4 << 20, timeout_s: float | None = None,
                             stall_s: float = DEFAULT_STALL_S) -> UploadCall:
        """:meth:`upload_version` in the background: the stream in flight (its tensors must not
        change until it is done)."""
        return self._upload(writer.total_bytes, b"", lambda: writer.chunk_pieces(chunk_size), snapshot,
                            timeout_s=timeout_s, stall_s=stall_s)

    def _upload(self, total_bytes: int, file_sha256: bytes, chunks: Callable[[], Iterable[tuple[int, list]]],
                snapshot: pb.PolicySnapshotRef, *, timeout_s: float | None = None,
                stall_s: float = DEFAULT_STALL_S) -> UploadCall:
        """The stream, started. No deadline for the whole call unless ``timeout_s`` (a large version
        over a home uplink takes many minutes); it fails once gRPC has taken nothing for ``stall_s``."""
        header = pb.UploadSnapshotHeader(snapshot=snapshot, total_bytes=total_bytes, file_sha256=file_sha256)

        def messages() -> Iterable[bytes]:
            self._pacer.wait()
            sealed = seal_envelope(header, self.identity, nonce=self._nonce())
            yield pb.UploadPart(header=sealed).SerializeToString()
            for off, pieces in chunks():  # unsigned: the header's file hash binds them
                yield upload_chunk_message(off, pieces)

        # not retried: the chunks come from a generator that a retry would have to rewind; a node
        # whose upload broke calls again (the coordinator keeps nothing of a broken upload)
        call = self.channel.stream_unary(method_path("UploadSnapshot"), request_serializer=_identity,
                                         response_deserializer=pb.UploadSnapshotResponse.FromString)
        return UploadCall(lambda it: call.future(it, timeout=timeout_s), messages(), total_bytes, stall_s=stall_s)

    def get_log(self, from_index: int = 0, max_entries: int = 0, timeout_s: float | None = None) -> Iterator[LogEntry]:
        next_index, left = from_index, max_entries

        def request() -> pb.GetLogRequest:  # (re)opens the stream after the last entry received
            return pb.GetLogRequest(from_index=next_index, max_entries=left)

        for line in self._stream("GetLog", request, pb.LogEntryLine, timeout_s):
            entry = parse_jsonl_line(line.json)
            next_index = entry.index + 1
            yield entry
            if max_entries:
                left -= 1
                if not left:  # (0 would ask for everything on a reopened stream)
                    return


def _verified_prefix(part: Path, manifest: pb.SnapshotManifest) -> int:
    """Bytes at the start of ``part`` that are whole chunks matching the manifest."""
    if not part.is_file():
        return 0
    size = part.stat().st_size
    good = 0
    for index, (off, data) in enumerate(iter_file_chunks(part, 0, manifest.chunk_size)):
        start, end = chunk_range(manifest, index)
        if index >= len(manifest.chunk_sha256) or len(data) != end - start or \
                hashlib.sha256(data).digest() != manifest.chunk_sha256[index]:
            break
        good = end
    return min(good, size)


def _varint(buf: bytes, pos: int) -> tuple[int, int] | None:
    """(value, next position) of the protobuf varint at ``buf[pos]``; None past the end or above 63 bits."""
    value = shift = 0
    for i in range(pos, min(pos + 9, len(buf))):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return None


class _ReceivedChunk:
    """A received SnapshotChunk whose ``data`` is a view into the message bytes rather than a copy.
    Only the layout SerializeToString writes (``offset`` if not 0, then ``data`` to the end) is read
    here; any other message goes through protobuf's own parser (which also raises on bad ones)."""

    __slots__ = ("data", "offset")

    def __init__(self, offset: int, data: bytes | memoryview):
        self.offset, self.data = offset, data

    @classmethod
    def FromString(cls, message: bytes) -> _ReceivedChunk:
        head: tuple[int, int] | None = (0, 0)
        if message[:1] == b"\x08":  # field 1 (offset), varint
            head = _varint(message, 1)
        if head is not None and message[head[1]:head[1] + 1] == b"\x12":  # field 2 (data), length-delimited
            size = _varint(message, head[1] + 1)
            if size is not None and size[1] + size[0] == len(message):
                return cls(head[0], memoryview(message)[size[1]:])
        parsed = pb.SnapshotChunk.FromString(message)
        return cls(parsed.offset, parsed.data)


_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class _ChunkWriter:
    """Checks downloaded chunks against the manifest (:func:`check_chunk`) and writes each at its
    offset, in order, in a thread of its own, flushing to disk every ``SYNC_BYTES`` (so the
    caller's final fsync does not wait for the whole file). After the first failure nothing more
    is written; :meth:`put` raises it, :meth:`close` returns it."""

    QUEUED_BYTES = 32 << 20  # chunks received but not yet checked and written
    SYNC_BYTES = 16 << 20  # fdatasync after this many bytes written

    def __init__(self, fd: int, manifest: pb.SnapshotManifest):
        self.fd, self.manifest = fd, manifest
        self.error: BaseException | None = None
        self._unsynced = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(2, self.QUEUED_BYTES // max(manifest.chunk_size, 1)))
        self._thread = threading.Thread(target=self._run, name="snapshot-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is not None:
                continue  # keep taking items so that put() never blocks
            offset, data = item
            try:
                check_chunk(self.manifest, offset, data)
                view = memoryview(data)
                while view:
                    written = os.pwrite(self.fd, view, offset)
                    view, offset = view[written:], offset + written
                self._unsynced += len(data)
                if self._unsynced >= self.SYNC_BYTES:  # flush as we go: the final fsync has less to do
                    _fdatasync(self.fd)
                    self._unsynced = 0
            except BaseException as e:  # noqa: BLE001 - handed to the downloading thread
                self.error = e

    def put(self, offset: int, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put((offset, data))

    def close(self) -> BaseException | None:
        self._queue.put(None)
        self._thread.join()
        return self.error
