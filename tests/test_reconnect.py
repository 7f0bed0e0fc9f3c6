"""A node's client across coordinator restarts, and its download leftovers.

* A coordinator in its own process, on a fixed port, is killed (-9) and restarted on the same
  port and data directory while a client keeps heartbeating: the client's next call succeeds
  within 5 s of the new server serving (gRPC's default reconnect backoff made it up to 75 s), and
  a download and a log read started while it was down finish once it is back.
* When retries are spent, the error names the address and what to check.
* ``.part`` files of versions a node skipped or gave up on are removed; a ``.part`` this client
  did not create, or one a running download holds, is not.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.client import CoordinatorClient, CoordinatorError
from grpo_swarm.protocol.identity import Identity

from coordinator_world import Served, write_run_toml

BIN = Path(sys.executable).parent
RECONNECT_LIMIT_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Coordinator:
    """``grpo-coordinator serve`` on a fixed port; ``serving_at`` = when its port file appeared
    (written right after the server started)."""

    def __init__(self, tmp: Path, config: Path, data_dir: Path, port: int, tag: str):
        port_file = tmp / f"port-{tag}"
        self.log = tmp / f"serve-{tag}.log"
        self.proc = subprocess.Popen(
            [str(BIN / "grpo-coordinator"), "serve", "--config", str(config), "--data-dir", str(data_dir),
             "--port", str(port), "--port-file", str(port_file), "--rate", "0"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"serve did not start: {self.log.read_text()}")
            time.sleep(0.01)
        self.serving_at = time.monotonic()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def test_client_reaches_a_restarted_coordinator_within_seconds(tmp_path):
    config = write_run_toml(tmp_path / "run.toml")
    data, port = tmp_path / "coord", free_port()
    first = Coordinator(tmp_path, config, data, port, "a")
    second = patient = None
    client = CoordinatorClient(f"127.0.0.1:{port}", Identity.generate(), timeout_s=10)
    stop = threading.Event()
    results: list[tuple[float, bool]] = []  # (when the heartbeat returned, ok)

    def heartbeat_forever():
        while not stop.is_set():
            try:
                client.heartbeat(0)
                results.append((time.monotonic(), True))
            except CoordinatorError:
                results.append((time.monotonic(), False))
            time.sleep(0.05)

    try:
        client.register()
        manifest = client.manifest()
        log_before = [e.index for e in client.get_log()]
        beat = threading.Thread(target=heartbeat_forever, daemon=True)
        beat.start()
        while sum(ok for _, ok in results) < 3:
            time.sleep(0.01)
        first.kill()
        killed_at = time.monotonic()
        # started while the coordinator is down: both retry until it is back (with a budget that
        # outlasts a restart on a busy machine; the default is 30 s)
        patient = CoordinatorClient(client.address, client.identity, timeout_s=10, retries=1000, retry_deadline_s=120)
        fetched: dict = {}
        dest = tmp_path / "node" / "snap.safetensors"
        dest.parent.mkdir()
        later = threading.Thread(target=lambda: fetched.update(
            manifest=patient.download_snapshot(dest, manifest=manifest), log=[e.index for e in patient.get_log()]))
        later.start()
        second = Coordinator(tmp_path, config, data, port, "b")
        deadline = second.serving_at + 30
        while not any(ok and t > second.serving_at for t, ok in results) and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        beat.join(30)
        back = [t - second.serving_at for t, ok in results if ok and t > second.serving_at]
        assert back, f"no successful heartbeat within 30 s of the restart: {results[-5:]}"
        print(f"down {second.serving_at - killed_at:.1f} s; the first heartbeat succeeded {back[0]:.2f} s after "
              "the new server started serving")
        assert back[0] < RECONNECT_LIMIT_S, f"the first call succeeded {back[0]:.2f} s after the restart"
        later.join(60)
        assert not later.is_alive() and fetched["log"][:len(log_before)] == log_before
        assert hashlib.sha256(dest.read_bytes()).digest() == manifest.file_sha256
    finally:
        stop.set()
        client.close()
        if patient is not None:
            patient.close()
        first.kill()
        if second is not None:
            second.kill()


def test_retries_end_with_an_error_naming_the_address(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with CoordinatorClient(address, Identity.generate(), timeout_s=5, retries=3, retry_deadline_s=10) as client:
        start = time.monotonic()
        with pytest.raises(CoordinatorError) as info:
            client.register()
        took = time.monotonic() - start
    e = info.value
    assert e.code == "UNAVAILABLE" and address in e.detail and "gave up after 4 attempts" in e.detail, e.detail
    assert "running and reachable" in e.detail and took < 10
    with CoordinatorClient(address, Identity.generate(), timeout_s=5, retries=0) as client:
        with pytest.raises(CoordinatorError) as info:
            client.heartbeat(0)
    assert info.value.code == "UNAVAILABLE" and "gave up" not in info.value.detail  # no retries: gRPC's own words
    with CoordinatorClient(address, Identity.generate(), timeout_s=5, retries=50, retry_deadline_s=1.0) as client:
        start = time.monotonic()
        with pytest.raises(CoordinatorError):
            client.heartbeat(0)
        assert time.monotonic() - start < 3  # the deadline bounds the retries, not their number


def test_stale_part_files_of_other_versions_are_removed(tmp_path):
    s = Served(tmp_path, chunk_size=64 << 10)
    try:
        client = s.client()
        client.register()
        m0 = client.manifest()
        folder = tmp_path / "snapshots"
        folder.mkdir()
        notes = folder / "notes.part"  # not this client's: no sidecar
        notes.write_bytes(b"mine")
        # a download of version 0 given up after one chunk, and one that is still running (its lock)
        client.download_snapshot(folder / "n-v0.safetensors", manifest=m0, max_chunks=1)
        client.download_snapshot(folder / "busy-v0.safetensors", manifest=m0, max_chunks=1)
        busy = os.open(folder / "busy-v0.safetensors.part", os.O_RDWR)
        fcntl.flock(busy, fcntl.LOCK_EX)
        assert (folder / "n-v0.safetensors.part").stat().st_size == m0.chunk_size
        # version 3 was announced, then pruned before the node fetched it: the download fails, and
        # used to leave a 0-byte n-v3.safetensors.part behind for good
        ghost = pb.SnapshotManifest()
        ghost.CopyFrom(m0)
        ghost.snapshot.version = 3
        with pytest.raises(CoordinatorError) as info:
            client.download_snapshot(folder / "n-v3.safetensors", manifest=ghost)
        assert info.value.code == "NOT_FOUND"
        left = sorted(p.name for p in folder.iterdir())
        # version 3's empty .part is gone, and so is version 0's abandoned one (another version);
        # the running download's and the foreign file are kept
        assert left == ["busy-v0.safetensors.part", "busy-v0.safetensors.part.manifest", "notes.part"], left
        os.close(busy)
        # a complete download leaves no .part and no sidecar of its own; the other version-0
        # .part (same version: it may still be resumed) stays
        client.download_snapshot(folder / "n-v0.safetensors", manifest=m0)
        assert hashlib.sha256((folder / "n-v0.safetensors").read_bytes()).digest() == m0.file_sha256
        left = sorted(p.name for p in folder.iterdir())
        assert left == ["busy-v0.safetensors.part", "busy-v0.safetensors.part.manifest", "n-v0.safetensors",
                        "notes.part"], left
        # once another version is downloaded, that one goes too
        with pytest.raises(CoordinatorError):
            client.download_snapshot(folder / "n-v3.safetensors", manifest=ghost)
        assert sorted(p.name for p in folder.iterdir()) == ["n-v0.safetensors", "notes.part"]
    finally:
        s.stop()
