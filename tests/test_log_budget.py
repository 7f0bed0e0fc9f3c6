"""What one key can make the coordinator write to the protocol log. Every submitted group is logged, a
refused one with its proofs as evidence, and every new or changed hash report is an entry; keys are
free. Before, one fresh key wrote ~1 MB of refused junk groups per request (0.15 s each) and added an
entry at every heartbeat by flipping its reported hash. A real coordinator on loopback, attacked
through its gRPC API."""

from __future__ import annotations

import copy
import hashlib

import pytest

from grpo_swarm.coordinator.core import GROUPS_PER_ASSIGNMENT
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.client import CoordinatorError
from grpo_swarm.protocol.recorder import MAX_REPORTS_PER_VERSION

from coordinator_world import HonestNode, Served, flat


def _log_bytes(s: Served) -> int:
    return sum(f.stat().st_size for f in s.data_dir.glob("protocol.sqlite*"))


def _junk(proofs, n_groups: int, tag: str) -> list[pb.RewardProof]:
    """Groups under new ids made of the sender's own proofs (refused: the signatures no longer match)."""
    out = []
    for i in range(n_groups):
        for p in proofs:
            q = copy.deepcopy(p)
            q.group_id = f"{tag}{i}"
            out.append(q)
    return out


def test_a_key_cannot_fill_the_log_with_refused_groups(tmp_path):
    s = Served(tmp_path, samples_per_round=64, close_when_all_submitted=True)
    try:
        node, other = HonestNode(s.address, tmp_path / "node"), HonestNode(s.address, tmp_path / "other")
        (_, groups), (_, other_groups) = node.round_proofs(), other.round_proofs()
        assert len(groups) == 2  # prompts_per_round
        budget = GROUPS_PER_ASSIGNMENT * 2
        assert all(v.accepted for v in node.client.submit_proofs(flat(groups)).verdicts)
        # a lost reply's resubmission still gets its verdicts (refused as replays, logged)
        again = node.client.submit_proofs(flat(groups))
        assert [v.code for v in again.verdicts] == ["REPLAYED_SEQUENCE"] * 2
        # junk groups are recorded up to the budget: 4 groups so far, 4 more fit
        assert len(node.client.submit_proofs(_junk(groups[0], budget - 4, "a")).verdicts) == budget - 4
        entries, size = len(list(node.client.get_log())), _log_bytes(s)
        for n_groups in (1, 200):  # a request past the budget is refused whole: nothing is recorded
            with pytest.raises(CoordinatorError) as info:
                node.client.submit_proofs(_junk(groups[0], n_groups, "b"))
            assert info.value.code == "RESOURCE_EXHAUSTED" and f"at most {budget} a round" in info.value.detail
        # a group with more proofs than the run's group size, refused before anything is recorded
        with pytest.raises(CoordinatorError) as info:
            other.client.submit_proofs(_junk(other_groups[0], 1, "big") * 50)
        assert info.value.code == "INVALID_ARGUMENT" and "has 200 proofs" in info.value.detail
        assert len(list(node.client.get_log())) == entries and _log_bytes(s) <= size + 65536  # (SQLite's own pages)
        # a key without accepted work has half that: its own groups, tampered, are refused (logged as
        # evidence), two junk groups too, and then nothing more of it is recorded this round
        fresh = HonestNode(s.address, tmp_path / "fresh")
        _, fresh_groups = fresh.round_proofs()
        tampered = copy.deepcopy(flat(fresh_groups))
        for p in tampered:
            p.reward_total += 1.0
        assert [v.code for v in fresh.client.submit_proofs(tampered).verdicts] == ["BAD_SIGNATURE"] * 2
        assert len(fresh.client.submit_proofs(_junk(fresh_groups[0], 2, "c")).verdicts) == 2
        with pytest.raises(CoordinatorError) as info:
            fresh.client.submit_proofs(_junk(fresh_groups[0], 1, "d"))
        assert info.value.code == "RESOURCE_EXHAUSTED" and "no accepted work yet" in info.value.detail
        assert len(list(node.client.get_log())) == entries + 6  # its registration, dispatch and four refusals
        # the budget is per round: once the other node's work closes it, the next assignment is accepted
        assert other.client.submit_proofs(flat(other_groups)).round_closed
        _, groups = node.round_proofs()
        reply = node.client.submit_proofs(flat(groups))
        assert reply.current_round == 1 and all(v.accepted for v in reply.verdicts)
    finally:
        s.stop()


def _upload_refused(client, path, version: int, sha: bytes) -> str:
    with pytest.raises(CoordinatorError) as info:
        client.upload_snapshot(path, pb.PolicySnapshotRef(version=version, sha256=sha))
    assert info.value.code == "FAILED_PRECONDITION", info.value
    return info.value.detail


def test_a_key_cannot_add_a_log_entry_at_every_upload_it_is_refused(tmp_path):
    """Each refused upload was an ``upload_refused`` entry: a fresh key wrote ~300 a second. Now a node
    has at most 3 logged while a version is current, one without weight in the producing round, whatever
    version, hash or order it tries."""
    s = Served(tmp_path, samples_per_round=8)  # one node's 2 groups x G=4 close a round
    try:
        worker, fresh = HonestNode(s.address, tmp_path / "w"), s.client()
        fresh.register()
        junk = tmp_path / "junk.bin"
        junk.write_bytes(b"\x00" * 4096)
        for i in range(5):  # before any round closed
            assert "no round has closed" in _upload_refused(fresh, junk, 1, hashlib.sha256(b"a%d" % i).digest())
        _, groups = worker.round_proofs()
        assert worker.client.submit_proofs(flat(groups)).round_closed
        before = len(list(worker.client.get_log()))
        for i in range(10):  # the next version under unreported hashes, and versions that are not next
            sha = hashlib.sha256(b"b%d" % i).digest()
            assert "has not reported" in _upload_refused(fresh, junk, 1, sha)
            assert "not the next version" in _upload_refused(fresh, junk, 2 + i, sha)
            assert "has not reported" in _upload_refused(worker.client, junk, 1, sha)
        refused = [e.payload for e in worker.client.get_log() if e.kind == "upload_refused"]
        assert len(list(worker.client.get_log())) == before + 1 + MAX_REPORTS_PER_VERSION
        by = {n: [(p["version"], p["code"]) for p in refused if p["node_id"] == n]
              for n in (worker.node_id, fresh.identity.node_id)}
        assert by[fresh.identity.node_id] == [(1, "NO_ROUND_CLOSED"), (1, "NOT_REPORTED")]  # one while v0 had no round, one since
        assert by[worker.node_id] == [(1, "NOT_REPORTED")] * MAX_REPORTS_PER_VERSION
    finally:
        s.stop()


def test_a_key_cannot_add_a_log_entry_at_every_heartbeat_by_flipping_its_hash(tmp_path):
    s = Served(tmp_path, samples_per_round=8)  # one node's 2 groups x G=4 close a round
    try:
        worker, fresh = HonestNode(s.address, tmp_path / "w"), s.client()
        fresh.register()
        _, groups = worker.round_proofs()
        assert worker.client.submit_proofs(flat(groups)).round_closed
        hashes = [hashlib.sha256(b"%d" % i).digest() for i in range(10)]
        for sha in hashes:
            for c in (worker.client, fresh):
                c.heartbeat(1, computed=pb.PolicySnapshotRef(version=1, sha256=sha), sample=False)
        reports = [e.payload for e in worker.client.get_log() if e.kind == "hash_reported"]
        by = {n: [p["sha256"] for p in reports if p["node_id"] == n] for n in (worker.node_id, fresh.identity.node_id)}
        # the worker's first three reports are logged (and the third stands); the fresh key's first alone
        assert by[worker.node_id] == [h.hex() for h in hashes[:MAX_REPORTS_PER_VERSION]]
        assert by[fresh.identity.node_id] == [hashes[0].hex()]
        assert s.coordinator.recorder.publication.reports[worker.node_id] == (1, hashes[MAX_REPORTS_PER_VERSION - 1])
    finally:
        s.stop()
