"""The coordinator's outbound streams (coordinator/outbound.py) as an attacker uses them: registered
keys (free to make) opening snapshot downloads and never reading them, or reading a trickle. Before,
sixteen such streams held every gRPC worker and no heartbeat was answered; then eight free keys could
hold every outbound slot for as long as they took a chunk a minute. A real coordinator on loopback, a
64 MB version. One key holds one slot: its newer download takes its older one's (a node restarted
mid-download was refused before, the coordinator not having seen the old stream end)."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import grpc
import pytest

from grpo_swarm.coordinator.service import ServerLimits
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.rpc import method_path

from coordinator_world import HonestNode, Served

IDLE_S = 2.0


def _open(client, version: int):
    call = client.channel.unary_stream(method_path("DownloadSnapshot"), request_serializer=lambda b: b,
                                       response_deserializer=pb.SnapshotChunk.FromString)
    it = call(client.seal(pb.DownloadSnapshotRequest(version=version)), timeout=120)
    next(it)  # the stream is running (and its first chunk in)
    return it


def _version(s: Served, tmp_path) -> None:
    big = tmp_path / "big.safetensors"
    big.write_bytes(os.urandom(1 << 20) * 64)
    s.coordinator.snapshots.add(big, 7, b"\x07" * 32)


def _worker(s: Served, tmp_path) -> HonestNode:
    """A node with verified work: its groups of the open round accepted."""
    node = HonestNode(s.address, tmp_path / "worker")
    _, groups = node.round_proofs()
    assert all(v.accepted for v in node.client.submit_proofs([p for g in groups for p in g]).verdicts)
    return node


def _answered_within(fn, seconds: float) -> bool:
    done = threading.Event()
    threading.Thread(target=lambda: (fn(), done.set()), daemon=True).start()
    return done.wait(seconds)


def test_stalled_downloads_cannot_take_the_coordinators_workers(tmp_path):
    s = Served(tmp_path, limits=ServerLimits(workers=8, stream_idle_s=IDLE_S), chunk_size=64 << 10)
    try:
        _version(s, tmp_path)
        honest = HonestNode(s.address, tmp_path / "h")
        worker = _worker(s, tmp_path)
        keys = [s.client() for _ in range(3)]
        for k in keys:
            k.register()
        abandoned = _open(keys[0], 7)
        t0 = time.monotonic()
        # one stream per key: its newest download takes the slot (its process restarted, or was superseded)
        stalled = [_open(keys[0], 7)]  # read once, then never again
        with pytest.raises(grpc.RpcError) as info:  # the older one is cancelled at once, not by the watchdog
            for _ in abandoned:
                pass
        assert info.value.code() == grpc.StatusCode.CANCELLED and time.monotonic() - t0 < IDLE_S / 2
        # the key's next download takes the slot again; an eavesdropper replaying that signed request is
        # refused before it could (its nonce is spent), so it cannot cancel the key's stream
        sealed = keys[0].seal(pb.DownloadSnapshotRequest(version=7))
        victim = keys[0].channel.unary_stream(method_path("DownloadSnapshot"), request_serializer=lambda b: b,
                                              response_deserializer=pb.SnapshotChunk.FromString)(sealed, timeout=120)
        next(victim)
        with pytest.raises(grpc.RpcError) as info:
            next(keys[1].channel.unary_stream(method_path("DownloadSnapshot"), request_serializer=lambda b: b,
                                              response_deserializer=pb.SnapshotChunk.FromString)(sealed, timeout=30))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stalled = [victim]  # the key's stream now (stalled, its predecessor was cancelled)
        log = keys[0].channel.unary_stream(method_path("GetLog"), request_serializer=lambda b: b,
                                           response_deserializer=pb.LogEntryLine.FromString)
        with pytest.raises(grpc.RpcError) as info:  # a stream of another kind does not take the key's slot
            next(log(keys[0].seal(pb.GetLogRequest()), timeout=30))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "one at a time" in info.value.details()
        stalled.append(_open(worker.client, 7))  # (a stalled worker: the slot kept for workers)
        with pytest.raises(grpc.RpcError) as info:  # 8 workers: 2 outbound streams at most
            _open(keys[2], 7)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 download/log streams" in info.value.details()
        assert _answered_within(lambda: honest.client.heartbeat(0, sample=False), 5.0)  # the others still served
        # the stalled streams are cut after IDLE_S: their slots serve others again
        t0 = time.monotonic()
        while True:
            try:
                reader = _open(keys[2], 7)
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() - t0 < IDLE_S + 8.0, "a stalled stream was never cut"
                time.sleep(0.2)
        assert time.monotonic() - t0 >= IDLE_S - 1.0
        with pytest.raises(grpc.RpcError) as info:  # the cut stream ends with CANCELLED on its client
            for _ in stalled[0]:
                pass
        assert info.value.code() == grpc.StatusCode.CANCELLED
        # a slow reader that keeps taking chunks, longer than IDLE_S in all, is not cut
        t0, chunks = time.monotonic(), 0
        for _ in reader:
            chunks += 1
            if time.monotonic() - t0 > IDLE_S + 1.5:
                break
            time.sleep(0.02)
        assert chunks > 10 and time.monotonic() - t0 > IDLE_S + 1.5
        reader.cancel()
    finally:
        s.stop()


def test_free_keys_cannot_take_the_slots_kept_for_workers_nor_hold_one_by_trickling(tmp_path):
    """8 workers: 2 outbound slots, one of them kept for nodes with verified work. A free key takes the
    other; a second free key (or GetLog, which needs no registration) is refused while a worker still
    gets its download. The free key then reads a chunk every 0.3 s: never idle for IDLE_S, but far
    below the minimum rate, so it is cut; the worker reading at full speed is not."""
    rate = 1 << 20  # bytes/s over each IDLE_S window
    s = Served(tmp_path, limits=ServerLimits(workers=8, stream_idle_s=IDLE_S, stream_min_rate=rate),
               chunk_size=64 << 10)
    try:
        _version(s, tmp_path)
        worker = _worker(s, tmp_path)
        free, other = s.client(), s.client()
        free.register()
        other.register()
        # a client keeping its receive window small, as one crafting its HTTP/2 window updates would: the
        # server's sends then follow its reads (gRPC's default window takes 6 MB at once, then waits)
        narrow = grpc.insecure_channel(s.address, options=[("grpc.http2.bdp_probe", 0),
                                                           ("grpc.http2.lookahead_bytes", 64 << 10)])
        trickle = narrow.unary_stream(method_path("DownloadSnapshot"), request_serializer=lambda b: b,
                                      response_deserializer=pb.SnapshotChunk.FromString)(
            free.seal(pb.DownloadSnapshotRequest(version=7)), timeout=120)
        next(trickle)
        log = s.client().channel.unary_stream(method_path("GetLog"), request_serializer=lambda b: b,
                                               response_deserializer=pb.LogEntryLine.FromString)
        for call in (lambda: _open(other, 7), lambda: next(log(s.client().seal(pb.GetLogRequest()), timeout=30))):
            with pytest.raises(grpc.RpcError) as info:  # a second free key, or an unregistered one reading the log
                call()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "keys without verified work" in info.value.details(), info.value.details()
        fast, got = _open(worker.client, 7), []  # the slot kept for workers, read at full speed meanwhile
        reading = threading.Thread(target=lambda: got.append(sum(len(c.data) for c in fast)), daemon=True)
        reading.start()
        t0, cut, read = time.monotonic(), None, 0
        try:
            for _ in trickle:
                read += 1
                assert time.monotonic() - t0 < 3 * IDLE_S + 8.0, "a trickling stream was never cut"
                time.sleep(0.3)  # ~210 KiB/s: a chunk well within IDLE_S, a fifth of the minimum rate
        except grpc.RpcError as e:
            cut = e
        assert cut is not None and cut.code() == grpc.StatusCode.CANCELLED, cut
        assert time.monotonic() - t0 >= IDLE_S - 0.5 and read > 3
        narrow.close()
        reading.join(30)
        assert got == [(64 << 20) - (64 << 10)]  # the worker's download completes (its first chunk read by _open)
        # the trickler's slot serves free keys again
        t1 = time.monotonic()
        while True:
            try:
                _open(other, 7).cancel()
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t1 < 5.0
                time.sleep(0.1)
    finally:
        s.stop()


def test_a_node_waits_for_a_download_slot_instead_of_exiting(tmp_path):
    """4 workers: one outbound slot. While another key's stalled download holds it, a node's download is
    refused (RESOURCE_EXHAUSTED, "retry in a while"): with no time to wait that is raised (what made a
    node say "could not join" and exit); waiting, the node gets the slot once the stall is cut and its
    file is whole. A swarm restarted all at once asks for more downloads than there are slots."""
    from grpo_swarm.node.swarm.patience import download_patiently
    from grpo_swarm.protocol.client import CoordinatorError

    s = Served(tmp_path, limits=ServerLimits(workers=4, stream_idle_s=IDLE_S), chunk_size=64 << 10)
    try:
        _version(s, tmp_path)
        node = HonestNode(s.address, tmp_path / "n")  # (it downloads version 0 as it starts)
        hog = s.client()
        hog.register()
        stalled = _open(hog, 7)
        manifest = node.client.manifest(7)
        dest = tmp_path / "n" / "v7.safetensors"
        with pytest.raises(CoordinatorError) as info:
            download_patiently(node.client, dest, manifest, wait_s=0)
        assert info.value.code == "RESOURCE_EXHAUSTED" and "retry in a while" in info.value.detail
        t0 = time.monotonic()
        download_patiently(node.client, dest, manifest, retry_s=(0.2, 0.5))
        assert time.monotonic() - t0 >= IDLE_S - 1.0  # it did wait for the stall's cut
        assert hashlib.sha256(dest.read_bytes()).digest() == manifest.file_sha256 and dest.stat().st_size == 64 << 20
        with pytest.raises(grpc.RpcError):
            for _ in stalled:
                pass
    finally:
        s.stop()
