"""A node that says it is leaving (``HeartbeatRequest.leaving``, sent by `grpo-node join` as it stops):
a real coordinator on loopback and real nodes (tests/coordinator_world.py). Before, the open round
waited for a node that left until it counted it as gone, 3 heartbeat intervals later (30 s at the
default interval), and listed it to peers until then. As an attacker: only the key's own fresh,
signed request of its running instance makes it leave; a replay, a superseded process and another
key cannot, and a goodbye cannot also take the round's assignment. Nodes that Ctrl-C out of a real
swarm: tests/test_swarm_join.py."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from grpo_swarm.coordinator.liveness import MAX_LEFT, Liveness
from grpo_swarm.coordinator.status import read_status
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.client import CoordinatorClient, CoordinatorError
from grpo_swarm.protocol.identity import Identity
from grpo_swarm.protocol.peers import PEER_TTL_INTERVALS
from grpo_swarm.protocol.rpc import method_path

from coordinator_world import HonestNode, Served, flat

INTERVAL_S = 30.0  # the heartbeat interval: a silent node would count as gone only after 90 s


def _serve(tmp_path) -> Served:
    return Served(tmp_path, samples_per_round=64, round_timeout_s=3600.0, heartbeat_interval_s=INTERVAL_S,
                  close_when_all_submitted=True)


def _addr(identity: Identity) -> str:
    return f"/ip4/10.0.0.1/tcp/4001/p2p/{identity.peer_id_base58}"


def _raw_heartbeat(s: Served, sealed: bytes) -> pb.HeartbeatResponse:
    with grpc.insecure_channel(s.address) as ch:
        return ch.unary_unary(method_path("Heartbeat"), request_serializer=lambda b: b,
                              response_deserializer=pb.HeartbeatResponse.FromString)(sealed, timeout=20)


def test_a_node_that_leaves_is_not_waited_for_nor_listed_until_it_comes_back(tmp_path):
    s = _serve(tmp_path)
    try:
        a, b, c = (HonestNode(s.address, tmp_path / n) for n in "abc")
        c.client.heartbeat(0, sample=False, multiaddrs=[_addr(c.identity)])
        (_, ga), (_, gb), _ = a.round_proofs(), b.round_proofs(), c.round_proofs()  # c takes its assignment
        a.client.submit_proofs(flat(ga))
        assert not b.client.submit_proofs(flat(gb)).round_closed  # c is live and has submitted nothing
        hb = a.client.heartbeat(0, sample=False)
        assert hb.live_nodes == 3 and [p.node_id for p in hb.peers] == [c.identity.node_id]
        started = time.monotonic()
        bye = c.client.leave(0)  # c's Ctrl-C
        assert bye.current_round == 1  # the round closed at the goodbye, not 90 s later
        assert time.monotonic() - started < 5.0 < PEER_TTL_INTERVALS * INTERVAL_S
        closed = [e for e in a.client.get_log() if e.kind == "round_closed"]
        assert sorted(closed[0].payload["participants"]) == sorted([a.identity.node_id, b.identity.node_id])
        hb = a.client.heartbeat(0, sample=False)
        assert hb.live_nodes == 2 and not hb.peers  # c is no longer handed out to dial
        assert s.coordinator.metrics.nodes_left._value.get() == 1
        c.client.heartbeat(0, sample=False)  # back (a restart): live and listed again
        hb = a.client.heartbeat(0, sample=False)
        assert hb.live_nodes == 3 and [p.node_id for p in hb.peers] == [c.identity.node_id]
    finally:
        s.stop()


def test_a_participant_that_leaves_has_moved_on_from_its_rounds_averaging(tmp_path):
    """The last closed round's participants read ``round_moved_on`` to stop retrying an averaging that
    cannot reach its majority, and to stop waiting for a publication nobody will make."""
    s = _serve(tmp_path)
    try:
        a, b = HonestNode(s.address, tmp_path / "a"), HonestNode(s.address, tmp_path / "b")
        (_, ga), (_, gb) = a.round_proofs(), b.round_proofs()
        a.client.submit_proofs(flat(ga))
        assert b.client.submit_proofs(flat(gb)).round_closed  # round 0: both hold tickets
        hb = a.client.heartbeat(0, sample=False)
        assert sorted(hb.round_participants) == sorted([a.identity.public_key_bytes, b.identity.public_key_bytes])
        assert list(hb.round_moved_on) == []
        b.client.leave(0)
        assert list(a.client.heartbeat(0, sample=False).round_moved_on) == [b.identity.public_key_bytes]
        b.client.heartbeat(0, sample=False)  # back, and not sampling the open round yet: still averaging
        assert list(a.client.heartbeat(0, sample=False).round_moved_on) == []
    finally:
        s.stop()


def test_a_heartbeat_in_flight_as_the_node_stopped_does_not_bring_it_back(tmp_path):
    """The round loop's heartbeat, interrupted by the Ctrl-C, is signed before the goodbye but may be
    handled after it (seen in a churn run: the next two rounds then waited for the node that had left)."""
    s = _serve(tmp_path)
    try:
        a, b = HonestNode(s.address, tmp_path / "a"), HonestNode(s.address, tmp_path / "b")
        live = lambda: a.client.heartbeat(0, sample=False).live_nodes  # noqa: E731
        in_flight = b.client.seal(pb.HeartbeatRequest(policy_version=0, instance=b.client.instance))
        time.sleep(0.01)
        b.client.leave(0)
        assert live() == 1
        assert _raw_heartbeat(s, in_flight).current_round == 0  # answered (a valid request) ...
        assert live() == 1  # ... but it does not make b live again
        assert [r["left"] for r in read_status(s.data_dir)["nodes"] if r["node_id"] == b.identity.node_id] == [True]
        b.client.heartbeat(0, sample=False)  # signed after the goodbye: back
        assert live() == 2
    finally:
        s.stop()


def test_only_the_running_process_of_the_key_can_say_it_leaves_and_only_once(tmp_path):
    s = _serve(tmp_path)
    try:
        a = HonestNode(s.address, tmp_path / "a")
        key = Identity.generate()
        old, new = (CoordinatorClient(s.address, key, timeout_s=30, instance=os.urandom(16)) for _ in range(2))
        old.register()
        new.register()  # the key's node restarted: the newest process runs
        live = lambda: a.client.heartbeat(0, sample=False).live_nodes  # noqa: E731
        assert live() == 2
        # the superseded process (or a stale copy of the key elsewhere) cannot make the running one leave
        with pytest.raises(CoordinatorError) as info:
            old.leave(0)
        assert info.value.code == "FAILED_PRECONDITION" and info.value.detail.startswith("superseded")
        assert live() == 2
        # another key leaving is that key leaving
        stranger = HonestNode(s.address, tmp_path / "s")
        assert live() == 3
        stranger.client.leave(0)
        assert live() == 2
        # a goodbye cannot also take the round's assignment (it would bind a version and leave no trace)
        bad = pb.HeartbeatRequest(policy_version=0, sample=True, leaving=True, instance=new.instance)
        with pytest.raises(grpc.RpcError) as raised:
            _raw_heartbeat(s, new.seal(bad))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sample must be false" in raised.value.details()
        assert live() == 2
        # the running process's goodbye, captured and sent again after it came back: refused as a replay
        goodbye = new.seal(pb.HeartbeatRequest(policy_version=0, leaving=True, instance=new.instance))
        assert _raw_heartbeat(s, goodbye).current_round == 0
        assert live() == 1
        new.heartbeat(0, sample=False)
        with pytest.raises(grpc.RpcError) as raised:
            _raw_heartbeat(s, goodbye)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED and "replayed" in raised.value.details()
        assert live() == 2
    finally:
        s.stop()


def test_the_leavers_remembered_are_bounded_and_seeing_a_node_forgets_it_left():
    now = [0.0]
    liveness = Liveness(30.0, clock=lambda: now[0])
    liveness.seen("a")
    liveness.leave("a")
    assert liveness.live() == [] and liveness.has_left("a")
    liveness.seen("a")
    assert liveness.live() == ["a"] and not liveness.has_left("a")
    for i in range(MAX_LEFT + 10):  # many cheap keys saying goodbye
        liveness.leave(f"k{i}")
    assert len(liveness._left) == MAX_LEFT and not liveness.has_left("k0") and liveness.has_left(f"k{MAX_LEFT + 9}")
    assert liveness.live() == ["a"]


def _stopping_peer(node: HonestNode, workdir, stopped: list):
    """What ``SwarmPeer.close`` needs of a joined node: its coordinator client and participant (real),
    its saved round batch, and its DHT and averager (stand-ins recording their shutdown: the real ones
    stopping is tests/test_swarm_join.py's)."""
    from types import SimpleNamespace

    from grpo_swarm.node.swarm.join import ROUND_BATCH_FILE, SwarmPeer

    peer = SwarmPeer.__new__(SwarmPeer)
    peer._keeper, peer.client, peer.participant = None, node.client, node
    peer._round_batch_path = workdir / ROUND_BATCH_FILE
    peer._round_batch_path.write_bytes(b"the batch of the round in progress")
    peer.averager, peer.dht = (SimpleNamespace(shutdown=lambda what=what: stopped.append(what)) for what in ("averager", "dht"))
    return peer


def test_a_stopping_node_says_goodbye_and_drops_the_round_it_left_unless_it_cannot(tmp_path):
    s = _serve(tmp_path)
    try:
        a, b, c = (HonestNode(s.address, tmp_path / n) for n in "abc")
        live = lambda: a.client.heartbeat(0, sample=False).live_nodes  # noqa: E731
        stopped: list = []
        peer = _stopping_peer(b, tmp_path / "b", stopped)
        peer.close()  # Ctrl-C, SIGTERM, --rounds done
        assert live() == 2 and stopped == ["averager", "dht"]
        assert not peer._round_batch_path.exists()  # its groupmates go on without it: nothing to resume
        kept = _stopping_peer(c, tmp_path / "c", stopped)
        kept.close(leave=False)  # banned or superseded: the coordinator would refuse the goodbye
        assert live() == 2 and kept._round_batch_path.exists()  # a and c
    finally:
        s.stop()
    # the coordinator is down: no goodbye, the batch is kept for a restart to resume (as after a crash)
    d = _stopping_peer(a, tmp_path / "a", stopped)
    started = time.monotonic()
    d.close()
    assert time.monotonic() - started < 10.0 and d._round_batch_path.exists()


def test_a_restarted_coordinator_still_counts_a_node_that_left_as_gone_and_status_says_so(tmp_path):
    s = _serve(tmp_path)
    try:
        a, b = HonestNode(s.address, tmp_path / "a"), HonestNode(s.address, tmp_path / "b")
        b.client.leave(0)
        assert a.client.heartbeat(0, sample=False).live_nodes == 1
        left = {r["node_id"]: r["left"] for r in read_status(s.data_dir)["nodes"]}
        assert left == {a.identity.node_id: False, b.identity.node_id: True}
    finally:
        s.stop()
    s = _serve(tmp_path)  # the same data directory: the restart seeds liveness from its last-seen times
    try:
        a.client = CoordinatorClient(s.address, a.identity, timeout_s=30)
        assert a.client.heartbeat(0, sample=False).live_nodes == 1  # not 2 for the next 90 s
        b.client = CoordinatorClient(s.address, b.identity, timeout_s=30)
        assert b.client.heartbeat(0, sample=False).live_nodes == 2  # back
        assert not any(r["left"] for r in read_status(s.data_dir)["nodes"])
    finally:
        s.stop()


def test_a_store_from_before_goodbyes_is_read_and_upgraded(tmp_path):
    import sqlite3

    from grpo_swarm.coordinator.store import CoordinatorStore

    path = tmp_path / "coordinator.sqlite"
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE nodes (node_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, registered_ms INTEGER "
                      "NOT NULL, last_seen_ms INTEGER NOT NULL, version INTEGER, completions_per_s REAL NOT NULL "
                      "DEFAULT 0, tokens_per_s REAL NOT NULL DEFAULT 0, hardware BLOB, multiaddrs TEXT);"
                      "INSERT INTO nodes VALUES ('n1', x'00', 1, 5, 0, 0, 0, NULL, NULL);")
    old.commit()
    old.close()
    readonly = CoordinatorStore(path, readonly=True)  # `grpo-coordinator status` beside an older coordinator
    assert [(r.node_id, r.left) for r in readonly.nodes()] == [("n1", False)]
    readonly.close()
    store = CoordinatorStore(path)
    assert store.last_seen(0) == [("n1", 5)]
    store.heartbeat("n1", 0, 0.0, 0.0, None, leaving=True)
    assert store.last_seen(0) == [] and store.nodes()[0].left
    store.heartbeat("n1", 0, 0.0, 0.0, None)
    assert [n for n, _ in store.last_seen(0)] == ["n1"] and not store.nodes()[0].left
    store.close()
