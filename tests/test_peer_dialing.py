"""Whom a node dials among the peers the coordinator lists (node/swarm/peer_dialing.py, node/swarm/dht.py).

The attack: registering keys is free, and each announced address that never answers costs a dialler a
dial's timeout. Dialled one after another, every round, 30 listed fresh keys with 8 such addresses each
held a node for 20 minutes a round. Here the "dead" addresses are a TCP listener that never accepts
(the connection opens, libp2p's handshake never completes): what a blackholed peer costs, on loopback.
"""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest

from grpo_swarm.node.swarm.dht import DIAL_TIMEOUT_S, connect_peers, connected_peers, start_dht
from grpo_swarm.node.swarm.join import SwarmPeer
from grpo_swarm.node.swarm.peer_dialing import (MAX_UNVERIFIED_PEERS, DialBackoff, addresses, dial_candidates,
                                                peer_id)
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.identity import Identity

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def listed(addrs: list[str], verified: bool, node_id: str = "n") -> pb.PeerAddress:
    return pb.PeerAddress(node_id=node_id, multiaddrs=addrs, last_seen_ms=1, verified=verified)


def test_dial_candidates_are_the_verified_peers_over_tcp_else_a_few_unverified():
    keys = [Identity.generate().peer_id_base58 for _ in range(8)]
    tcp = [f"/ip4/10.0.0.{i}/tcp/4001/p2p/{k}" for i, k in enumerate(keys)]
    quic = [f"/ip4/10.0.0.{i}/udp/4001/quic-v1/p2p/{k}" for i, k in enumerate(keys)]
    peers = [listed([quic[0], tcp[0]], True, "v0"), listed([quic[1]], True, "quic-only"),
             *[listed([tcp[i]], False, f"u{i}") for i in range(2, 8)]]
    chosen = dial_candidates(peers)
    assert [p.node_id for p in chosen] == ["v0"] and list(chosen[0].multiaddrs) == [tcp[0]]
    assert peer_id(chosen[0]) == keys[0] and addresses(chosen) == [tcp[0]]
    # no verified peer listed (a run's first round): the first few of the list
    assert [p.node_id for p in dial_candidates(peers[1:])] == [f"u{i}" for i in range(2, 2 + MAX_UNVERIFIED_PEERS)]
    assert dial_candidates([listed([quic[3]], False)]) == []


def test_a_peer_that_was_not_reached_waits_twice_as_long_each_time():
    now = [0.0]
    backoff = DialBackoff(first_s=10, max_s=40, clock=lambda: now[0])
    key = Identity.generate().peer_id_base58
    peer = listed([f"/ip4/10.0.0.1/tcp/1/p2p/{key}"], True)
    moved = listed([f"/ip4/10.0.0.1/tcp/2/p2p/{key}"], True)
    waits = []
    for _ in range(4):
        assert backoff.due(peer)
        backoff.record(peer, reached=False)
        start = now[0]
        while not backoff.due(peer):
            now[0] += 1
        waits.append(now[0] - start)
    assert waits == [10, 20, 40, 40]
    backoff.record(peer, reached=False)
    assert not backoff.due(peer) and backoff.due(moved)  # new addresses (a restart's ports) start afresh
    backoff.record(peer, reached=True)
    assert backoff.due(peer)


@pytest.fixture
def hanging_port():
    """A TCP port whose listener never accepts: a dial to it hangs until its timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    yield sock.getsockname()[1]
    sock.close()


def test_listed_peers_that_never_answer_cost_one_dial_timeout_and_then_back_off(tmp_path, hanging_port):
    """Six peers with two hanging addresses each cost one DIAL_TIMEOUT_S together (one after another:
    60 s), the live peer among them is reached; the join loop's meeting dials only the verified peers,
    and after a verified peer failed, not again until its back-off ran out."""
    me, live = Identity.generate(), Identity.generate()
    live_dht = start_dht(live, identity_path=tmp_path / "live", host_maddrs=LOOPBACK)
    dht = start_dht(me, identity_path=tmp_path / "me", host_maddrs=LOOPBACK)
    try:
        live_addrs = [str(m) for m in live_dht.get_visible_maddrs()]
        hanging = [[f"/ip4/127.0.0.1/tcp/{hanging_port}/p2p/{Identity.generate().peer_id_base58}"] * 2
                   for _ in range(6)]
        t0 = time.monotonic()
        reached = connect_peers(dht, [m for addrs in hanging[:3] for m in addrs] + live_addrs
                                + [m for addrs in hanging[3:] for m in addrs])
        took = time.monotonic() - t0
        assert reached == [live_dht.peer_id.to_base58()]
        assert DIAL_TIMEOUT_S - 0.5 <= took < 2 * DIAL_TIMEOUT_S + 3, took

        # the join loop's meeting: a verified hanging peer is dialled once, then backs off; the fresh
        # keys' hanging addresses are never dialled while a verified peer is listed
        # (new keys: p2pd itself refuses a peer whose dial failed at once for a while)
        hanging = [[f"/ip4/127.0.0.1/tcp/{hanging_port}/p2p/{Identity.generate().peer_id_base58}"] * 2
                   for _ in range(6)]
        node = SimpleNamespace(dht=dht, _dials=DialBackoff())
        sybils = [listed(addrs, False, f"sybil{i}") for i, addrs in enumerate(hanging[1:])]
        hb = pb.HeartbeatResponse(peers=[listed(hanging[0], True, "dead worker"), listed(live_addrs, True, "live"),
                                         *sybils])
        t0 = time.monotonic()
        SwarmPeer._meet(node, hb)  # "live" is connected already: only the dead worker is dialled
        assert DIAL_TIMEOUT_S - 0.5 <= time.monotonic() - t0 < 2 * DIAL_TIMEOUT_S + 3
        assert not node._dials.due(hb.peers[0]) and all(node._dials.due(p) for p in hb.peers[1:])
        t0 = time.monotonic()
        SwarmPeer._meet(node, hb)  # backing off: nothing to dial
        assert time.monotonic() - t0 < 2.0
        assert live_dht.peer_id.to_base58() in connected_peers(dht)
    finally:
        dht.shutdown()
        live_dht.shutdown()


async def _routing_table_peers(dht, node) -> list[str]:
    return [p.to_base58() for p in node.protocol.routing_table.uid_to_peer_id.values()]


def test_a_joiner_through_hanging_initial_peers_waits_one_dial_timeout_and_finds_the_others(tmp_path, hanging_port):
    """start_dht dials its initial peers itself, all at once: seven that accept a connection and never
    answer, listed before the live one, cost one DIAL_TIMEOUT_S (p2pd's bootstrap, then one peer at a
    time: 52 s). The joiner then looks up its neighbours as hivemind's bootstrap does: a peer known only
    to the live one enters its routing table."""
    from grpo_swarm.node.swarm.child_calls import run_in_dht

    me, live, other = Identity.generate(), Identity.generate(), Identity.generate()
    live_dht = start_dht(live, identity_path=tmp_path / "live", host_maddrs=LOOPBACK)
    live_addrs = [str(m) for m in live_dht.get_visible_maddrs()]
    other_dht = start_dht(other, identity_path=tmp_path / "other", host_maddrs=LOOPBACK, initial_peers=live_addrs)
    dht = None
    try:
        hanging = [f"/ip4/127.0.0.1/tcp/{hanging_port}/p2p/{Identity.generate().peer_id_base58}" for _ in range(7)]
        t0 = time.monotonic()
        dht = start_dht(me, identity_path=tmp_path / "me", host_maddrs=LOOPBACK, initial_peers=hanging + live_addrs,
                        attempts=1)
        took = time.monotonic() - t0
        assert took < DIAL_TIMEOUT_S + 6.0, took
        assert live_dht.peer_id.to_base58() in connected_peers(dht)
        assert other_dht.peer_id.to_base58() in run_in_dht(dht, _routing_table_peers, limit=10.0)
    finally:
        for d in (dht, other_dht, live_dht):
            if d is not None:
                d.shutdown()


def test_a_dht_process_that_dies_while_dialling_is_replaced_and_the_join_goes_on(tmp_path, monkeypatch):
    """The DHT's child process dies as its dial is handed to it (SIGKILL once it started and said its
    peer id): start_dht starts a fresh one, which reaches the live peer, instead of raising (CI once
    saw a forked DHT child die with SIGSEGV mid-dial, and the node's join failed)."""
    import os
    import signal

    from grpo_swarm.node.swarm import dht as dht_module

    launched = []  # every DHT process started, in order
    real_checked = dht_module._checked

    def first_dies(dht, identity):
        launched.append(real_checked(dht, identity))
        if len(launched) == 1:
            os.kill(dht.pid, signal.SIGKILL)
        return dht

    live_dht = start_dht(Identity.generate(), identity_path=tmp_path / "live", host_maddrs=LOOPBACK)
    monkeypatch.setattr(dht_module, "_checked", first_dies)
    dht = None
    try:
        dht = start_dht(Identity.generate(), identity_path=tmp_path / "me", host_maddrs=LOOPBACK,
                        initial_peers=[str(m) for m in live_dht.get_visible_maddrs()], attempts=1)
        assert len(launched) == 2 and launched[0].exitcode == -signal.SIGKILL and dht is launched[1]
        assert dht.is_alive() and live_dht.peer_id.to_base58() in connected_peers(dht)
    finally:
        for d in (dht, live_dht):
            if d is not None:
                d.shutdown()


def test_the_dht_log_drops_only_a_request_whose_sender_is_gone():
    """hivemind's DHT process logs a request it could not read with its traceback; one whose sender
    exited first (its reply pipe could no longer be handed over: a node's Ctrl-C) is dropped, any other
    error is kept."""
    import logging
    import multiprocessing as mp
    from multiprocessing import reduction, resource_sharer

    from grpo_swarm.node.swarm.dht import SenderGoneFilter

    def record_of(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord("hivemind.dht.dht", logging.ERROR, "dht.py", 130, str(exc), (),
                                 (type(exc), exc, exc.__traceback__))

    ours, _theirs = mp.Pipe()
    sent = reduction.ForkingPickler.dumps(ours)
    resource_sharer.stop()  # as if the sending process had exited
    with pytest.raises(FileNotFoundError) as gone:
        reduction.ForkingPickler.loads(sent)
    with pytest.raises(FileNotFoundError) as other:
        open("/nonexistent/file")
    keep = SenderGoneFilter()
    assert not keep.filter(record_of(gone.value))
    assert keep.filter(record_of(other.value))
    assert keep.filter(logging.LogRecord("hivemind.dht.dht", logging.ERROR, "dht.py", 1, "no exception", (), None))
