"""The gRPC face of a :class:`~.core.Coordinator`: request authentication, limits, status codes,
streaming, and the server itself.

Each request is checked in this order, and refused with the gRPC status in brackets (the server
keeps serving): the size (gRPC's own limit, RESOURCE_EXHAUSTED); a SignedEnvelope that parses
(INVALID_ARGUMENT) and is signed (UNAUTHENTICATED); the method's payload kind
(INVALID_ARGUMENT); the time window and a fresh nonce (UNAUTHENTICATED); the signer's rate limit
(RESOURCE_EXHAUSTED; an UploadSnapshot stream counts as one request); a registered, unbanned key, except for Register and GetLog
(PERMISSION_DENIED); for Admin, the coordinator's own key and no other (PERMISSION_DENIED); the payload
(INVALID_ARGUMENT). Then the method runs; its refusals come as
:class:`~.core.RequestError` with their own status. Every call is counted in
``grpo_coordinator_requests{method, code}``.
"""

from __future__ import annotations

import os
import shutil
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc

from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.errors import ProtocolError, ReasonCode
from grpo_swarm.protocol.hygiene import check_uint64_range, parse_request
from grpo_swarm.protocol.identity import node_id_from_public_key
from grpo_swarm.protocol.log import ProtocolLog
from grpo_swarm.protocol.proofs import check_envelope, parse_envelope, parse_proof_batch
from grpo_swarm.protocol.rpc import (
    MAX_REQUEST_BYTES,
    REQUEST_KIND,
    SERVICE,
    ChunkHasher,
    channel_options,
    iter_file_chunks,
)
from grpo_swarm.protocol.version_file import NotCanonical, StreamingStateHash

from .core import Coordinator, RequestError
from .limits import NonceWindow, RateLimiter
from .networks import Charge, NewcomerAllowance
from .outbound import OutboundStreams, TooManyStreams, cancel_when_idle
from .upload_hashing import BackgroundFeed
from .uploads import TooManyUploads

OPEN_METHODS = frozenset({"Register", "GetLog"})  # any valid key may call these
ADMIN_METHODS = frozenset({"Admin"})  # only the coordinator's own key may call these
MAX_LOG_ENTRIES_PER_CALL = 100_000


@dataclass(frozen=True)
class ServerLimits:
    rate_per_s: float = 20.0  # requests per second per key (token bucket)
    burst: int = 100
    window_s: float = 120.0  # allowed |client time - server time|
    max_request_bytes: int = MAX_REQUEST_BYTES
    workers: int = 32  # uploads take at most half of them, downloads and log streams a quarter (.outbound)
    upload_idle_s: float = 120.0  # an upload stream that sends nothing for this long is cancelled
    stream_idle_s: float = 60.0  # a download or log stream whose client takes nothing for this long is cancelled
    stream_min_rate: float = 128 << 10  # bytes/s: ... or takes less than this over stream_idle_s (0: no minimum)
    # log entries of keys without verified work, per network (.networks): at once, and refilled an hour
    newcomer_burst: int = 256
    newcomer_entries_per_hour: float = 256.0
    limit_loopback: bool = False  # loopback clients are charged too (tests; a coordinator behind a local proxy)


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


# how a ProtocolError in a request's envelope or payload maps to a status (default INVALID_ARGUMENT)
_PROTOCOL_STATUS = {ReasonCode.BAD_SIGNATURE: grpc.StatusCode.UNAUTHENTICATED,
                    ReasonCode.OVERSIZED: grpc.StatusCode.RESOURCE_EXHAUSTED}


def _status(name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, name)


def _varint_field(number: int, length: int) -> bytes:
    """Protobuf key and length of a length-delimited field (what precedes its bytes on the wire)."""
    out = bytearray()
    for n in ((number << 3) | 2, length):
        while n >= 0x80:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
    return bytes(out)


class CoordinatorService:
    def __init__(self, coordinator: Coordinator, limits: ServerLimits = ServerLimits()):
        self.c = coordinator
        self.limits = limits
        self.nonces = NonceWindow(int(limits.window_s * 1000))
        self.rate = RateLimiter(limits.rate_per_s, limits.burst)
        self.newcomers = NewcomerAllowance(limits.newcomer_entries_per_hour, limits.newcomer_burst,
                                           limits.limit_loopback)
        self.outbound = OutboundStreams(limits.workers // 4, limits.stream_idle_s, limits.stream_min_rate)

    # -- authentication
    def _open(self, method: str, data: bytes, kind: str | None = None) -> tuple[pb.SignedEnvelope, str | None]:
        try:
            env = parse_envelope(data, max_bytes=self.limits.max_request_bytes)
            check_uint64_range(env)  # the nonce too: nothing above 2**63-1 gets past the door
            if not env.signature:
                raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "request is not signed (empty signature)")
            check_envelope(env, expected_kind=kind or REQUEST_KIND[method])
        except ProtocolError as e:
            raise _Refused(_PROTOCOL_STATUS.get(e.code, grpc.StatusCode.INVALID_ARGUMENT),
                           f"{e.code.value}: {e.detail}") from None
        key = bytes(env.signer_public_key)
        why = self.nonces.check(key, env.nonce, env.time_ms)
        if why is not None:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, why)
        if not self.rate.allow(key):
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"rate limit: at most {self.limits.rate_per_s:g} requests/s per key")
        node_id = self.c.node_id_of(key)
        if method in ADMIN_METHODS:
            if key != self.c.identity.public_key_bytes:
                raise _Refused(grpc.StatusCode.PERMISSION_DENIED,
                               f"{method} must be signed by the coordinator's own key "
                               f"({self.c.identity.public_key_bytes.hex()[:16]}...), not {key.hex()[:16]}...")
        elif method not in OPEN_METHODS:
            if node_id is None:
                raise _Refused(grpc.StatusCode.PERMISSION_DENIED,
                               f"key {node_id_from_public_key(key)} is not registered (call Register first)")
            if self.c.is_banned(node_id):
                raise _Refused(grpc.StatusCode.PERMISSION_DENIED, self.c.banned_detail(node_id))
        return env, node_id

    @staticmethod
    def _payload(cls, env: pb.SignedEnvelope):
        """The envelope's payload as a ``cls``: INVALID_ARGUMENT naming the message (and field) if it
        does not parse, has unknown fields, or holds a uint64 above 2**63-1 (SQLite's limit), so that
        no such value reaches a handler or the store."""
        try:
            return parse_request(cls, env.payload)
        except ProtocolError as e:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{e.code.value}: {e.detail}") from None

    def _fail(self, method: str, context, exc: Exception):
        if isinstance(exc, _Refused):
            code, detail = exc.code, exc.detail
        elif isinstance(exc, RequestError):
            code, detail = _status(exc.status), exc.detail
        else:
            code, detail = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
        self.c.metrics.requests.labels(method, code.name).inc()
        context.abort(code, detail)

    def _ok(self, method: str) -> None:
        self.c.metrics.requests.labels(method, "OK").inc()

    # -- unary methods
    def _unary(self, method: str, handler):
        def call(request: bytes, context):
            try:
                env, node_id = self._open(method, request)
                reply = handler(env, node_id, context)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                self._fail(method, context, exc)
            self._ok(method)
            return reply.SerializeToString()

        return grpc.unary_unary_rpc_method_handler(call)

    def register(self, env, node_id, context):
        reply = self.c.register(bytes(env.signer_public_key), self._payload(pb.RegisterRequest, env),
                                self._charge(context))
        # the limit _open enforces, so that a node pacing itself keeps inside it (protocol/pacing.py)
        reply.request_rate_per_s, reply.request_burst = self.limits.rate_per_s, self.limits.burst
        return reply

    def heartbeat(self, env, node_id, context):
        return self.c.heartbeat(node_id, self._payload(pb.HeartbeatRequest, env), bytes(env.signer_public_key),
                                self._charge(context), signed_ms=env.time_ms)

    def report_peer(self, env, node_id, context):
        return self.c.report_peer(node_id, env, self._payload(pb.PeerReport, env))

    def admin(self, env, node_id, context):
        return self.c.admin(self._payload(pb.AdminRequest, env))

    def manifest(self, env, node_id, context):
        req = self._payload(pb.SnapshotManifestRequest, env)
        return self.c.manifest(None if req.latest else req.version)

    def submit(self, env, node_id, context):
        try:
            batch = parse_proof_batch(env.payload, verify=False)  # unknown fields are refused there
            check_uint64_range(batch)
        except ProtocolError as e:
            raise _Refused(_PROTOCOL_STATUS.get(e.code, grpc.StatusCode.INVALID_ARGUMENT),
                           f"{e.code.value}: {e.detail}") from None
        if not batch.proofs:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "empty proof batch")
        return self.c.submit(bytes(env.signer_public_key), list(batch.proofs), self._charge(context))

    # -- streaming methods
    def download(self, request: bytes, context):
        method = "DownloadSnapshot"
        try:
            env, _ = self._open(method, request)
            req = self._payload(pb.DownloadSnapshotRequest, env)
            manifest = self.c.manifest(req.version)
            if req.file_sha256 and bytes(req.file_sha256) != manifest.file_sha256:
                raise RequestError("FAILED_PRECONDITION", f"version {req.version} is now another file")
            if req.offset % manifest.chunk_size or req.offset > manifest.total_bytes:
                raise RequestError("OUT_OF_RANGE", f"offset {req.offset} is not a chunk boundary in 0.."
                                                   f"{manifest.total_bytes} (chunk size {manifest.chunk_size})")
            path = self.c.snapshot_file(req.version)
            stream = self._outbound(env, context, method)
        except Exception as exc:  # noqa: BLE001
            self._fail(method, context, exc)
        try:
            served = self.c.metrics.bytes_served.labels(method)
            for off, data in iter_file_chunks(path, req.offset, manifest.chunk_size):
                if not context.is_active():
                    return
                served.inc(len(data))
                # the bytes of SnapshotChunk(offset=off, data=data).SerializeToString() (data is never
                # empty), put together here so that the chunk is copied once instead of twice
                yield pb.SnapshotChunk(offset=off).SerializeToString() + _varint_field(2, len(data)) + data
                stream.sent(len(data))
        finally:
            self.outbound.end(stream)
        self._ok(method)

    def get_log(self, request: bytes, context):
        method = "GetLog"
        try:
            env, _ = self._open(method, request)
            req = self._payload(pb.GetLogRequest, env)
            stream = self._outbound(env, context, method)
        except Exception as exc:  # noqa: BLE001
            self._fail(method, context, exc)
        limit = min(req.max_entries or MAX_LOG_ENTRIES_PER_CALL, MAX_LOG_ENTRIES_PER_CALL)
        reader = ProtocolLog(self.c.log.path, create=False, readonly=True)
        try:
            served = self.c.metrics.bytes_served.labels(method)
            for n, entry in enumerate(reader.entries(req.from_index)):
                if n >= limit or not context.is_active():
                    break
                line = entry.to_jsonl()
                served.inc(len(line))
                yield pb.LogEntryLine(json=line).SerializeToString()
                stream.sent(len(line))
        finally:
            reader.close()
            self.outbound.end(stream)
        self._ok(method)

    def _charge(self, context) -> Charge | None:
        """What the request's network pays for keys without verified work (.networks)."""
        return self.newcomers.for_peer(context.peer())

    def _outbound(self, env: pb.SignedEnvelope, context, method: str):
        """A slot among the outbound streams for the request's key (.outbound), or RESOURCE_EXHAUSTED."""
        key = bytes(env.signer_public_key)
        try:
            return self.outbound.start(key.hex(), context, method, verified=self.c.has_verified_work(key))
        except TooManyStreams as e:
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None

    def upload(self, request_iterator, context):
        method = "UploadSnapshot"
        tmp = flight = None
        try:
            first = next(request_iterator, None)
            if first is None:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "empty upload")
            # the whole stream costs one token of the per-key rate limit: this header's (see _open_chunk)
            opening = self._upload_part(first)
            if not opening.HasField("header") or opening.HasField("chunk"):
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "the first UploadPart must hold the header alone")
            env, node_id = self._open(method, opening.header.SerializeToString())
            header = self._payload(pb.UploadSnapshotHeader, env)
            self.c.check_upload(node_id, header, self._charge(context))
            version = header.snapshot.version
            # (the other streams in flight will need what they announced)
            free = shutil.disk_usage(self.c.snapshots.dir).free - self.c.uploads.reserved_bytes()
            if header.total_bytes > free:
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{header.total_bytes} bytes announced, "
                                                                   f"{max(free, 0)} free on the coordinator's disk "
                                                                   "beside the uploads in flight")
            try:  # half the workers at most: the rest serve heartbeats and submissions
                flight = self.c.uploads.start(node_id, version, header.total_bytes,
                                              max_streams=max(1, self.limits.workers // 2))
            except TooManyUploads as e:
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
            self.c.metrics.uploads_in_flight.inc()
            # a stream with no deadline (a large version over a slow link) must not hold a worker and its
            # disk reservation for ever once its sender stops sending
            threading.Thread(target=cancel_when_idle, args=(flight, context, self.limits.upload_idle_s),
                             name="upload-watchdog", daemon=True).start()
            tmp = self.c.snapshots.upload_path(f"{node_id}-{version}-{os.getpid()}")
            # the file's hashes are taken, and its bytes written, as they arrive, each in a thread beside
            # this one (outside the coordinator's lock); a canonical version file's state hash too
            received, hashes, state_hash = 0, ChunkHasher(self.c.snapshots.chunk_size), StreamingStateHash()
            with open(tmp, "wb") as f:
                feeds = [BackgroundFeed(hashes.whole), BackgroundFeed(hashes, method="update_chunks"),
                         BackgroundFeed(state_hash), BackgroundFeed(f, method="write")]
                try:
                    for message in request_iterator:
                        chunk = self._open_chunk(message)
                        if chunk.offset != received:
                            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                           f"chunk offset {chunk.offset}, expected {received}")
                        data = chunk.data  # (each read of a protobuf bytes field is a new copy)
                        received += len(data)
                        if received > header.total_bytes:
                            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                           f"more than the announced {header.total_bytes} bytes")
                        for feed in feeds:
                            feed.update(data)
                        flight.advance(received)
                        self.c.metrics.bytes_received.inc(len(data))
                        if self.c.state.current_version >= version:  # another upload won the race
                            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                                           f"version {version} was published while this upload streamed")
                except BaseException:  # the refusal is what the uploader hears, not a feed's own failure
                    for feed in feeds:
                        feed.close(check=False)
                    raise
                for feed in feeds:
                    feed.close()
                f.flush()
                os.fsync(f.fileno())
            if received != header.total_bytes:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"received {received} bytes, announced {header.total_bytes}")
            if header.file_sha256 and hashes.whole.digest() != bytes(header.file_sha256):
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "uploaded bytes do not match file_sha256")
            try:
                state_sha256 = state_hash.result()
            except NotCanonical as e:  # a valid upload still: publish_upload reads the file to hash it
                if not header.file_sha256:  # nothing else binds the bytes to the signed header
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "an upload without file_sha256 must be a "
                                                                     f"canonical version file: {e}") from None
                state_sha256 = None
            reply = self.c.publish_upload(node_id, header, tmp, chunk_hashes=hashes.result(), state_sha256=state_sha256)
            tmp = None
        except Exception as exc:  # noqa: BLE001
            if flight is not None and flight.cancelled:
                exc = _Refused(grpc.StatusCode.DEADLINE_EXCEEDED, f"nothing arrived for {self.limits.upload_idle_s:.0f} s "
                                                                 f"after {flight.received} bytes")
            self._fail(method, context, exc)
        finally:
            if flight is not None:
                self.c.uploads.end(flight)
                self.c.metrics.uploads_in_flight.dec()
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        self._ok(method)
        return reply.SerializeToString()

    def _upload_part(self, data: bytes) -> pb.UploadPart:
        if len(data) > self.limits.max_request_bytes:
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"an UploadPart of {len(data)} bytes is over {self.limits.max_request_bytes}")
        try:
            return parse_request(pb.UploadPart, data)
        except ProtocolError as e:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{e.code.value}: {e.detail}") from None

    def _open_chunk(self, data: bytes) -> pb.SnapshotChunk:
        """One upload chunk: an UploadPart holding a chunk alone, parsed as strictly as a request.

        Chunks are not signed: the header is (its nonce charged to the per-key rate limit), and it
        names the file's SHA-256, which every byte must match before anything is published, so a
        chunk slipped in by anyone else can only break the upload. Signing each chunk cost the node
        two SHA-512 passes over the snapshot and the coordinator one more (bench/RESULTS.md). A
        header is accepted only from a node whose hash a quorum of the producing round's verified
        work backs, so streams cannot be opened at will, and a stream's bytes are bounded by the
        header's total_bytes, which must fit on the disk."""
        part = self._upload_part(data)
        if not part.HasField("chunk") or part.HasField("header"):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "an UploadPart after the first must hold a chunk alone")
        return part.chunk

    # -- wiring
    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Register": self._unary("Register", self.register),
            "Heartbeat": self._unary("Heartbeat", self.heartbeat),
            "GetSnapshotManifest": self._unary("GetSnapshotManifest", self.manifest),
            "SubmitProofs": self._unary("SubmitProofs", self.submit),
            "DownloadSnapshot": grpc.unary_stream_rpc_method_handler(self.download),
            "GetLog": grpc.unary_stream_rpc_method_handler(self.get_log),
            "UploadSnapshot": grpc.stream_unary_rpc_method_handler(self.upload),
            "ReportPeer": self._unary("ReportPeer", self.report_peer),
            "Admin": self._unary("Admin", self.admin),
        })


def start_server(coordinator: Coordinator, host: str = "127.0.0.1", port: int = 0, *,
                 limits: ServerLimits = ServerLimits(), tls: tuple[bytes, bytes] | None = None
                 ) -> tuple[grpc.Server, int, CoordinatorService]:
    """Start serving ``coordinator``; returns (server, bound port, service). ``tls`` = (key PEM,
    certificate chain PEM)."""
    service = CoordinatorService(coordinator, limits)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="coordinator"),
                         options=channel_options(limits.max_request_bytes))
    server.add_generic_rpc_handlers((service.handler(),))
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    if bound == 0:
        raise OSError(f"cannot bind {address}")
    server.start()
    return server, bound, service
