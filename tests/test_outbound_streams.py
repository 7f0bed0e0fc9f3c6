"""The coordinator's outbound streams (coordinator/outbound.py) as an attacker uses them: a registered
key (free to make) opening snapshot downloads and never reading them. Before, sixteen such streams
held every gRPC worker and no heartbeat was answered. A real coordinator on loopback, a 64 MB version."""

from __future__ import annotations

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


def _answered_within(fn, seconds: float) -> bool:
    done = threading.Event()
    threading.Thread(target=lambda: (fn(), done.set()), daemon=True).start()
    return done.wait(seconds)


def test_stalled_downloads_cannot_take_the_coordinators_workers(tmp_path):
    s = Served(tmp_path, limits=ServerLimits(workers=8, stream_idle_s=IDLE_S), chunk_size=64 << 10)
    try:
        big = tmp_path / "big.safetensors"
        big.write_bytes(os.urandom(1 << 20) * 64)
        s.coordinator.snapshots.add(big, 7, b"\x07" * 32)
        honest = HonestNode(s.address, tmp_path / "h")
        keys = [s.client() for _ in range(3)]
        for k in keys:
            k.register()
        stalled = [_open(keys[0], 7)]  # read once, then never again
        with pytest.raises(grpc.RpcError) as info:  # one stream per key
            _open(keys[0], 7)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "one at a time" in info.value.details()
        stalled.append(_open(keys[1], 7))
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
