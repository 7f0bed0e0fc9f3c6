"""The coordinator's pure parts: nonce window, rate limiter, store, manifests and tickets,
and a RunRecorder resumed from its log and stored salts continuing exactly where it stopped."""

from __future__ import annotations

import hashlib

import pytest
import torch

from grpo_swarm.coordinator.limits import NonceWindow, RateLimiter
from grpo_swarm.coordinator.store import CoordinatorStore
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.audit import audit
from grpo_swarm.protocol.recorder import RunRecorder
from grpo_swarm.protocol.errors import ProtocolError
from grpo_swarm.protocol.identity import Identity
from grpo_swarm.protocol.log import LogError, ProtocolLog
from grpo_swarm.protocol.rpc import (
    ChunkHasher,
    file_chunk_hashes,
    sign_manifest,
    sign_ticket,
    verify_manifest,
    verify_ticket,
)

from protocol_world import COORDINATOR, World, identity


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_nonce_window():
    clock = Clock()
    w = NonceWindow(60_000, clock=clock)
    now = int(clock.t * 1000)
    assert w.check(b"k", 1, now) is None
    assert "replayed" in w.check(b"k", 1, now)
    assert w.check(b"other", 1, now) is None  # nonces are per key
    assert "clock" in w.check(b"k", 3, now - 61_000)
    assert "clock" in w.check(b"k", 4, now + 61_000)
    restarted = NonceWindow(60_000, clock=Clock(clock.t + 10))
    assert "older than the server's start" in restarted.check(b"k", 1, now)  # captured before a restart
    clock.t += 1000  # old pairs are forgotten once the window rejects them anyway
    assert w.check(b"k", 9, int(clock.t * 1000)) is None and len(w._seen) == 1


def test_rate_limiter():
    clock = Clock(0.0)
    r = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [r.allow(b"a") for _ in range(4)] == [True, True, True, False]
    assert r.allow(b"b")
    clock.t += 0.5  # one token back
    assert r.allow(b"a") and not r.allow(b"a")
    assert all(RateLimiter(0, 0).allow(b"x") for _ in range(100))  # rate 0 = unlimited


def test_store_round_trips(tmp_path):
    st = CoordinatorStore(tmp_path / "c.sqlite")
    st.put_salt(0, b"s" * 32)
    st.put_salt(0, b"t" * 32)
    hw = pb.HardwareSummary(cpu_count=2, accelerator="GPU X")
    st.node_registered("n1", b"k" * 32, hw)
    st.heartbeat("n1", 3, 1.5, 20.0, None)
    st.close()
    ro = CoordinatorStore(tmp_path / "c.sqlite", readonly=True)
    assert ro.salts() == {0: b"t" * 32}
    (row,) = ro.nodes()
    assert (row.version, row.completions_per_s, row.hardware.accelerator) == (3, 1.5, "GPU X")
    with pytest.raises(FileNotFoundError):
        CoordinatorStore(tmp_path / "none.sqlite", readonly=True)
    # hash reports live in the protocol log now: an older file's reports table is dropped
    import sqlite3

    with sqlite3.connect(tmp_path / "old.sqlite") as old:
        old.execute("CREATE TABLE reports (version INTEGER, node_id TEXT, sha256 BLOB, time_ms INTEGER)")
    CoordinatorStore(tmp_path / "old.sqlite").close()
    with sqlite3.connect(tmp_path / "old.sqlite") as old:
        assert old.execute("SELECT name FROM sqlite_master WHERE name = 'reports'").fetchone() is None


@pytest.mark.parametrize("length", [0, 999, 1000, 256_000, 256_123])
def test_chunk_hashes_of_a_stream_in_uneven_pieces_equal_the_files(tmp_path, length):
    data = bytes((i * 7 + i // 251) % 256 for i in range(length))
    f = tmp_path / "blob"
    f.write_bytes(data)
    expected = ([hashlib.sha256(data[i:i + 1000]).digest() for i in range(0, length, 1000)],
                hashlib.sha256(data).digest(), length)
    assert file_chunk_hashes(f, 1000) == expected
    hasher, at, step = ChunkHasher(1000), 0, 1
    while at < length:  # pieces of 1, 2, 4, ... 2048 bytes, then again: inside, across and over chunk ends
        hasher.update(data[at: at + step])
        at, step = at + step, step * 2 if step < 2048 else 1
    assert hasher.result() == expected


def test_manifest_and_ticket_signatures(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(bytes(range(256)) * 1000)
    chunks, whole, size = file_chunk_hashes(f, 1000)
    assert size == 256_000 and len(chunks) == 256 and whole == hashlib.sha256(f.read_bytes()).digest()
    coord = Identity.from_seed(b"\x09" * 32)
    m = sign_manifest(pb.SnapshotManifest(run_id="r", snapshot=pb.PolicySnapshotRef(version=1, sha256=b"s" * 32),
                                          format="safetensors", total_bytes=size, chunk_size=1000, chunk_sha256=chunks,
                                          file_sha256=whole), coord)
    verify_manifest(m, coord.public_key_bytes)
    with pytest.raises(ProtocolError, match="UNKNOWN_KEY"):
        verify_manifest(m, Identity.generate().public_key_bytes)
    m.chunk_sha256[3] = b"x" * 32
    with pytest.raises(ProtocolError, match="BAD_SIGNATURE"):
        verify_manifest(m)
    node = Identity.generate()
    t = sign_ticket(pb.AdmissionTicket(run_id="r", round_index=2, node_id=node.node_id,
                                       node_public_key=node.public_key_bytes, accepted_samples=16), coord)
    verify_ticket(t, coord.public_key_bytes, run_id="r", round_index=2)
    with pytest.raises(ProtocolError, match="WRONG_RUN"):
        verify_ticket(t, run_id="other")
    with pytest.raises(ProtocolError, match="STALE_VERSION"):
        verify_ticket(t, round_index=3)
    t.accepted_samples = 10_000
    with pytest.raises(ProtocolError, match="BAD_SIGNATURE"):
        verify_ticket(t)
    t.node_id = Identity.generate().node_id  # signed, but for a node id that is not its key's
    with pytest.raises(ProtocolError, match="MALFORMED"):
        verify_ticket(sign_ticket(t, coord))


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return World(group_size=4, prompts_per_round=2, spot_check_rate=0.5, max_staleness=1)


def test_resumed_recorder_continues_the_run(world, tmp_path):
    nodes = [identity(0), identity(1)]
    salts: dict[int, bytes] = {}
    log = ProtocolLog(tmp_path / "log.sqlite")
    rec = RunRecorder(log, COORDINATOR, world.run_spec(), hooks=world.hooks, on_salt=salts.__setitem__)
    for n in nodes:
        rec.register(n.public_key_bytes)
    rec.publish_snapshot(0, world.shas[0])
    seq = {n.node_id: 0 for n in nodes}

    def submit(r, node, recorder):
        groups = world.groups(node, r, seq[node.node_id])
        seq[node.node_id] += sum(map(len, groups))
        return recorder.submit([p for g in groups for p in g])

    assert all(v.accepted for v in submit(0, nodes[0], rec))
    rec.close_round()
    assert all(v.accepted for v in submit(1, nodes[0], rec))  # round 1 is open at the "crash"
    log.close()

    log2 = ProtocolLog(tmp_path / "log.sqlite")
    resumed = RunRecorder.resume(log2, COORDINATOR, salts=salts, hooks=world.hooks, on_salt=salts.__setitem__)
    for attr in ("current_round", "current_version", "keys", "sequences", "accepted_groups", "snapshots",
                 "spot_check_salt"):
        assert getattr(resumed.state, attr) == getattr(rec.state, attr), attr
    assert resumed.round_accepted == rec.round_accepted
    # it goes on: replays are still caught, new work accepted, the salt of round 1 revealed
    first = world.groups(nodes[0], 1, 0)
    assert [v.code.value for v in resumed.submit([p for g in first for p in g])] == ["REPLAYED_SEQUENCE"] * 2
    assert all(v.accepted for v in submit(1, nodes[1], resumed))
    resumed.close_round()
    result = audit(log2, world.hooks, trusted_signers=[COORDINATOR.public_key_bytes])
    assert result.ok, result.problem
    assert result.replayed["rounds"] == 2 and result.replayed["accepted_groups"] == 6
    # without the stored salt of the open round a resume is refused, and so is a log signed by another key
    with pytest.raises(LogError, match="salt"):
        RunRecorder.resume(log2, COORDINATOR, salts={}, hooks=world.hooks)
    with pytest.raises(LogError):
        RunRecorder.resume(log2, Identity.generate(), salts=salts, hooks=world.hooks)
    # a restart reads the accepted proofs for their sequences without validating them again (its own
    # signed entries): one that does not decode is a broken log, named with its entry
    bad = log2.append("proofs_accepted", {"node_id": nodes[0].node_id, "group_id": f"{nodes[0].node_id}/1/0",
                                          "round": 1, "proofs": ["bm90IGEgcHJvb2Y="]}, COORDINATOR)
    with pytest.raises(LogError, match="does not decode") as caught:
        RunRecorder.resume(log2, COORDINATOR, salts=salts, hooks=world.hooks)
    assert caught.value.index == bad.index
    log2.close()
