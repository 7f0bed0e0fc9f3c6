"""Keys without verified work share their network's allowance of log entries (coordinator/networks.py).
Keys are free, and each could add its registration, a dispatch a round, refused groups, a hash report
and a refused upload: the log grew with the number of keys an attacker made (~143 a second from one
process). A real coordinator on loopback with loopback charged, attacked through its gRPC API."""

from __future__ import annotations

import copy
import hashlib
import logging
import time

import pytest

from grpo_swarm.coordinator.networks import Charge, network_of
from grpo_swarm.coordinator.service import ServerLimits
from grpo_swarm.node.swarm.patience import register_patiently
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.client import CoordinatorError

from coordinator_world import HonestNode, Served

BURST = 8


def test_network_of_groups_ipv6_by_site_and_trusts_loopback():
    assert network_of("ipv4:203.0.113.7:5555") == "203.0.113.7"
    assert network_of("ipv6:[2001:db8:1:2:3::9]:5555") == network_of("ipv6:[2001:db8:1:ffff::1]:1") == "2001:db8:1::/48"
    assert network_of("ipv6:[2001:db8:2::1]:1") == "2001:db8:2::/48"
    assert network_of("ipv6:[::ffff:203.0.113.7]:80") == "203.0.113.7"  # an IPv4 client on a dual-stack socket
    assert network_of("ipv4:127.0.0.1:80") is None and network_of("ipv6:[::1]:80") is None
    assert network_of("unix:/tmp/sock") is None
    assert network_of("ipv4:127.0.0.1:80", limit_loopback=True) == "127.0.0.1"
    assert network_of("garbage") == network_of("ipv4:nonsense:1") == "unknown"


def _entries(client) -> int:
    return len(list(client.get_log()))


def test_free_keys_from_one_network_add_no_more_than_its_allowance(tmp_path):
    s = Served(tmp_path, samples_per_round=8,  # one node's 2 groups x G=4 close a round
               limits=ServerLimits(limit_loopback=True, newcomer_burst=BURST, newcomer_entries_per_hour=1.0))
    try:
        # a worker pays as a newcomer until its work is accepted: registration, dispatch, 2 groups
        worker = HonestNode(s.address, tmp_path / "w")
        _, groups = worker.round_proofs()
        assert worker.client.submit_proofs([p for g in groups for p in g]).round_closed
        # an attacker's keys spend the rest (4 entries), then nothing more of them is logged
        registered, refused = [], []
        for k in [s.client() for _ in range(6)]:
            try:
                k.register()
                registered.append(k)
            except CoordinatorError as e:
                refused.append(e)
        assert len(registered) == 4 and len(refused) == 2 and all(e.code == "RESOURCE_EXHAUSTED" for e in refused)
        assert "no new key is registered" in refused[0].detail and "network 127.0.0.1" in refused[0].detail
        registered[0].register()  # a registered key registering again costs nothing
        before = _entries(worker.client)
        for k in registered:
            with pytest.raises(CoordinatorError) as info:  # no assignment: a dispatch would be an entry
                k.heartbeat(0, sample=True)
            assert info.value.code == "RESOURCE_EXHAUSTED" and "is not assigned" in info.value.detail
            k.heartbeat(0, sample=False)  # liveness still works
            for i in range(3):  # hash reports, each different: not logged
                k.heartbeat(0, computed=pb.PolicySnapshotRef(version=1, sha256=hashlib.sha256(b"%d" % i).digest()),
                            sample=False)
        with pytest.raises(CoordinatorError) as info:  # refused uploads: refused, not logged
            registered[0].upload_snapshot(_junk_file(tmp_path), pb.PolicySnapshotRef(version=1, sha256=b"\x01" * 32))
        assert info.value.code == "FAILED_PRECONDITION"
        forged = copy.deepcopy([p for g in groups for p in g])  # its own key on another's proofs: refused,
        for p in forged:  # and each refused group would be logged as evidence
            p.node_public_key = registered[1].identity.public_key_bytes
        with pytest.raises(CoordinatorError) as info:
            registered[1].submit_proofs(forged)
        assert info.value.code == "RESOURCE_EXHAUSTED" and "were not recorded" in info.value.detail
        assert _entries(worker.client) == before
        refused = {what: s.coordinator.metrics.registry.get_sample_value(
            "grpo_coordinator_newcomers_refused_total", {"what": what})
            for what in ("register", "dispatch", "report", "upload_refusal", "groups")}
        assert refused == {"register": 2, "dispatch": 4, "report": 12, "upload_refusal": 1, "groups": 1}, refused
        # the worker is never charged: its next round is assigned, accepted and closed
        _, groups = worker.round_proofs()
        reply = worker.client.submit_proofs([p for g in groups for p in g])
        assert all(v.accepted for v in reply.verdicts) and reply.round_closed
        worker.client.heartbeat(2, computed=pb.PolicySnapshotRef(version=1, sha256=b"\x02" * 32), sample=False)
        kinds = [e.kind for e in list(worker.client.get_log())[before:]]
        assert (kinds.count("round_dispatched"), kinds.count("proofs_accepted"), kinds.count("hash_reported")) == \
            (1, 2, 1), kinds
    finally:
        s.stop()


def _junk_file(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\x00" * 4096)
    return path


def test_free_keys_count_once_per_network_toward_min_peers(tmp_path):
    """``min_peers`` = 3: three fresh keys from one network are one live node, and no round starts;
    keys from two more networks make three (requests from other networks go to the coordinator's core
    directly, with the charge the service would attach: every gRPC client here is 127.0.0.1)."""
    s = Served(tmp_path, min_peers=3, limits=ServerLimits(limit_loopback=True))
    try:
        keys = [s.client() for _ in range(3)]
        for k in keys:
            k.register()
            hb = k.heartbeat(0, sample=True)
        assert (hb.live_nodes, hb.may_sample, hb.sample_version) == (1, False, 0), hb
        allowance = s.service.newcomers
        for i, net in enumerate(("198.51.100.7", "2001:db8:7::/48")):
            other = s.client()
            other.register()
            core_hb = s.coordinator.heartbeat(other.identity.node_id, pb.HeartbeatRequest(policy_version=0),
                                              charge=Charge(net, allowance))
            assert core_hb.live_nodes == 2 + i
        hb = keys[0].heartbeat(0, sample=True)
        assert (hb.live_nodes, hb.may_sample) == (3, True), hb
    finally:
        s.stop()


def test_a_new_node_waits_for_its_networks_allowance_instead_of_exiting(tmp_path, caplog):
    """One entry at once, refilled every 2 s: a second new key is refused at first, and the node's
    registration (node/swarm/participant.py) waits and gets in; without the wait it would exit."""
    s = Served(tmp_path, limits=ServerLimits(limit_loopback=True, newcomer_burst=1, newcomer_entries_per_hour=1800.0))
    try:
        s.client().register()
        late = s.client()
        with pytest.raises(CoordinatorError) as info:  # not waiting: refused at once
            register_patiently(late, pb.HardwareSummary(), wait_s=0)
        assert info.value.code == "RESOURCE_EXHAUSTED"
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING):
            reply = register_patiently(late, pb.HardwareSummary(), retry_s=(0.5, 1.0))
        assert reply.newly_registered and time.monotonic() - t0 < 10
        assert "registers no new key from here for now" in caplog.text
    finally:
        s.stop()
