"""The coordinator's side of the swarm, against a real coordinator on loopback (real SQLite, the real
tiny model, real rollouts and proofs): nodes' multiaddrs reported and handed out (rendezvous
without libp2p on the coordinator), final admission tickets at round close with the samples and
tokens the log adds up to, reports against peers and the ban by a majority of a round's other
participants, the operator's ban / unban through ``grpo-coordinator`` — each attacked the way an
attacker would, and ``grpo-audit`` replaying the resulting logs.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
import torch
from typer.testing import CliRunner

from grpo_swarm.coordinator.cli import app
from grpo_swarm.coordinator.core import Coordinator
from grpo_swarm.coordinator.service import start_server
from grpo_swarm.coordinator.status import read_status
from grpo_swarm.node.swarm.peer_dialing import MAX_UNVERIFIED_PEERS, dial_candidates
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.audit import audit
from grpo_swarm.protocol.client import CoordinatorClient, CoordinatorError
from grpo_swarm.protocol.errors import ProtocolError
from grpo_swarm.protocol.identity import Identity
from grpo_swarm.protocol.log import LogEntry, ProtocolLog
from grpo_swarm.protocol.payloads import unb64
from grpo_swarm.protocol.proofs import build_reward_proof, seal_envelope, sign_proof
from grpo_swarm.protocol.rpc import method_path, verify_ticket
from grpo_swarm.protocol.run_spec import load_hooks

from coordinator_world import HonestNode, Served
from protocol_world import proof_fields


def addr(identity: Identity, host: str = "10.0.0.1", port: int = 4001, transport: str = "tcp") -> str:
    return f"/ip4/{host}/{transport}/{port}/p2p/{identity.peer_id_base58}"


def refusal(fn) -> CoordinatorError:
    with pytest.raises(CoordinatorError) as info:
        fn()
    return info.value


def entries(served: Served) -> list[LogEntry]:
    log = ProtocolLog(served.data_dir / "protocol.sqlite", create=False, readonly=True)
    try:
        return list(log.entries())
    finally:
        log.close()


def audited(served: Served, log: list[LogEntry] | None = None):
    hooks = load_hooks(served.coordinator.spec.to_payload(), model="tiny", snapshots=str(served.data_dir / "snapshots"))
    return audit(log if log is not None else served.data_dir / "protocol.sqlite", hooks,
                 trusted_signers=[served.coordinator.identity.public_key_bytes])


def rechain(served: Served, log: list[LogEntry], changes: dict) -> list[LogEntry]:
    """The log as a dishonest coordinator would rewrite it: entries replaced by (kind, payload),
    re-hashed and re-signed with its own key (the key the auditor trusts)."""
    key = Identity.load(served.data_dir / "coordinator.key")
    out, prev = [], log[0].prev_hash
    for e in log:
        kind, payload = changes.get(e.index, (e.kind, e.payload))
        new = LogEntry.create(e.index, prev, e.time_ms, kind, payload, key)
        out.append(new)
        prev = new.hash
    return out


def submit_round(node: HonestNode, seed: int = 0) -> pb.SubmitProofsResponse:
    _, groups = node.round_proofs(seed=seed)
    reply = node.client.submit_proofs([p for g in groups for p in g])
    assert all(v.accepted for v in reply.verdicts), [v.detail for v in reply.verdicts]
    return reply


def honest_nodes(served: Served, tmp_path, names: str = "abc") -> list[HonestNode]:
    """One registered HonestNode per name, each in its own folder under ``tmp_path``."""
    nodes = []
    for name in names:
        (tmp_path / name).mkdir()
        nodes.append(HonestNode(served.address, tmp_path / name))
    return nodes


def admin_client(served: Served) -> CoordinatorClient:
    """What ``grpo-coordinator ban`` uses: a client holding the coordinator's own key."""
    key = Identity.load(served.data_dir / "coordinator.key")
    return CoordinatorClient(served.address, key, coordinator_key=key.public_key_bytes, timeout_s=30)


# ---- rendezvous ----------------------------------------------------------------------------------
def test_addresses_are_reported_and_handed_out(tmp_path):
    """Register / Heartbeat store a node's multiaddrs; every reply lists the live peers' (newest
    first), never the caller's own, a banned node's or a node silent for more than 3 heartbeat
    intervals; a node with no addresses is not listed."""
    s = Served(tmp_path)
    try:
        ids = {name: Identity.generate() for name in "abcd"}
        a, b, c, d = (s.client(ids[n]) for n in "abcd")
        ra = a.register(multiaddrs=[addr(ids["a"]), addr(ids["a"], port=4002) + "", addr(ids["a"])])
        assert list(ra.peers) == []
        rb = b.register(multiaddrs=[addr(ids["b"], "10.0.0.2")])
        assert [(p.node_id, list(p.multiaddrs)) for p in rb.peers] == [
            (ids["a"].node_id, [addr(ids["a"]), addr(ids["a"], port=4002)])]  # duplicates dropped
        time.sleep(0.01)
        rc = c.register()  # no addresses: c is handed the others, but is not listed itself
        assert [p.node_id for p in rc.peers] == [ids["b"].node_id, ids["a"].node_id]
        d.register(multiaddrs=[addr(ids["d"], "10.0.0.4")])
        time.sleep(0.01)
        hb = a.heartbeat(0)
        assert [p.node_id for p in hb.peers] == [ids["d"].node_id, ids["b"].node_id]
        assert all(p.last_seen_ms > 0 for p in hb.peers)
        time.sleep(0.01)
        c.heartbeat(0, multiaddrs=[addr(ids["c"], "10.0.0.3")])
        assert [p.node_id for p in a.heartbeat(0).peers] == [ids["c"].node_id, ids["d"].node_id, ids["b"].node_id]
        # a new list replaces the old one; an empty one keeps it
        b.heartbeat(0, multiaddrs=[addr(ids["b"], "10.9.9.9", 5000)])
        b.heartbeat(0)
        listed = {p.node_id: list(p.multiaddrs) for p in a.heartbeat(0).peers}
        assert listed[ids["b"].node_id] == [addr(ids["b"], "10.9.9.9", 5000)]

        # bad addresses: refused INVALID_ARGUMENT, in Register and in Heartbeat, and nothing changes
        mallory = Identity.generate()
        m = s.client(mallory)
        bad = {
            "too many": [addr(mallory, port=4000 + i) for i in range(9)],
            "too long": [f"/dns4/{'x' * 250}.example/tcp/1/p2p/{mallory.peer_id_base58}"],
            "no leading slash": [addr(mallory)[1:]],
            "no peer id": ["/ip4/10.0.0.5/tcp/4001"],
            "peer id only": [f"/p2p/{mallory.peer_id_base58}"],
            "empty component": [f"/ip4/10.0.0.5//tcp/4001/p2p/{mallory.peer_id_base58}"],
            "whitespace": [f"/ip4/10.0.0.5/tcp/4001 /p2p/{mallory.peer_id_base58}"],
            "not base58": ["/ip4/10.0.0.5/tcp/4001/p2p/0OIl"],
            # announcing addresses under another node's identity (eclipse / hijack)
            "another node's peer id": [addr(ids["a"], "6.6.6.6")],
            # the averaging cannot run over QUIC & co. (p2pd loses stream ends: node/swarm/dht.py)
            "QUIC": [addr(mallory), f"/ip4/10.0.0.5/udp/4001/quic-v1/p2p/{mallory.peer_id_base58}"],
            "WebRTC": [f"/ip4/10.0.0.5/udp/4001/webrtc-direct/p2p/{mallory.peer_id_base58}"],
        }
        for why, addrs in bad.items():
            err = refusal(lambda: m.register(multiaddrs=addrs))
            assert err.code == "INVALID_ARGUMENT", (why, err)
        assert mallory.node_id not in {p.node_id for p in a.heartbeat(0).peers}  # never registered
        for why, addrs in bad.items():
            err = refusal(lambda: b.heartbeat(0, multiaddrs=addrs))
            assert err.code == "INVALID_ARGUMENT", (why, err)
        listed = {p.node_id: list(p.multiaddrs) for p in a.heartbeat(0).peers}
        assert listed[ids["b"].node_id] == [addr(ids["b"], "10.9.9.9", 5000)]  # unchanged
        assert ids["a"].node_id not in listed

        # a banned node is not handed out; a node silent for 3 heartbeat intervals (30 s) is not either
        admin = admin_client(s)
        admin.admin(pb.ADMIN_BAN, ids["d"].node_id, "spam")
        with s.coordinator.lock:  # (liveness runs on the monotonic clock: coordinator/liveness.py)
            s.coordinator.liveness._seen[ids["c"].node_id] -= 31.0
            s.coordinator.liveness._seen.move_to_end(ids["c"].node_id, last=False)  # (oldest first)
        assert [p.node_id for p in a.heartbeat(0).peers] == [ids["b"].node_id]
        assert [p.node_id for p in c.heartbeat(0).peers] == [ids["a"].node_id, ids["b"].node_id]  # c is back
        assert s.coordinator.metrics.registry.get_sample_value("grpo_coordinator_nodes_active") == 4
        # the status lists the addresses and the ban
        rows = {r["node_id"]: r for r in read_status(s.data_dir)["nodes"]}
        assert rows[ids["a"].node_id]["multiaddrs"] == 2 and rows[ids["c"].node_id]["multiaddrs"] == 1
        assert rows[ids["d"].node_id]["banned"] and not rows[ids["a"].node_id]["banned"]
        admin.close()
        for client in (a, b, c, d, m):
            client.close()
    finally:
        s.stop()
    # the addresses are in coordinator.sqlite: a restarted coordinator hands them out at once
    coordinator = Coordinator(s.cfg, s.data_dir)
    server, port, _ = start_server(coordinator)
    try:
        with CoordinatorClient(f"127.0.0.1:{port}", ids["a"], timeout_s=30) as again:
            assert [p.node_id for p in again.register().peers] == [ids["c"].node_id, ids["b"].node_id]
    finally:
        server.stop(0).wait()
        coordinator.close()


def test_peers_with_verified_work_are_listed_before_many_fresh_keys(tmp_path):
    """An attacker registers 40 fresh keys announcing dead addresses after the honest nodes, more
    than a reply lists (32). A joiner is still handed the honest peers first: those with accepted work
    in the open round, then the participants of closed rounds (latest round first), then the fresh
    keys, newest first; a banned worker is not listed. It holds across a restart (rebuilt from the log)."""
    s = Served(tmp_path, samples_per_round=16)
    nodes = {}
    try:
        for name in "abc":
            (tmp_path / name).mkdir()
            nodes[name] = HonestNode(s.address, tmp_path / name)
            nodes[name].client.heartbeat(0, multiaddrs=[addr(nodes[name].identity, f"10.0.1.{len(nodes)}")])
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        submit_round(a, seed=0)
        assert submit_round(b, seed=1).round_closed  # round 0: a and b
        sybils = []
        for i in range(40):
            key = Identity.generate()
            client = s.client(key)
            client.register(multiaddrs=[addr(key, "203.0.113.1", 5000 + i)])
            sybils.append((key, client))
            time.sleep(0.002)  # each newer than the last
        newest_sybils = [k.node_id for k, _ in reversed(sybils)]
        joiner = s.client()
        reply = joiner.register().peers
        listed = [p.node_id for p in reply]
        assert len(listed) == 32
        assert listed[:2] == sorted([a.identity.node_id, b.identity.node_id])  # round 0's participants
        assert listed[2:] == newest_sybils[:30]  # c has no work yet: the fresh keys are newer than it
        # only the workers are marked verified, and a node dials only those (the fresh keys' dead
        # addresses would cost it a dial's timeout each): node/swarm/peer_dialing.py
        assert [p.verified for p in reply] == [True, True] + [False] * 30
        assert [p.node_id for p in dial_candidates(reply)] == listed[:2]
        assert [p.node_id for p in dial_candidates(reply[2:])] == listed[2:2 + MAX_UNVERIFIED_PEERS]

        submit_round(c, seed=2)  # accepted work in the open round 1 comes first
        reply = joiner.heartbeat(0).peers
        listed = [p.node_id for p in reply]
        assert listed[:3] == [c.identity.node_id] + sorted([a.identity.node_id, b.identity.node_id])
        assert listed[3:] == newest_sybils[:29]
        assert [p.node_id for p in reply if p.verified] == listed[:3]

        admin = admin_client(s)
        admin.admin(pb.ADMIN_BAN, b.identity.node_id, "test")
        admin.close()
        listed = [p.node_id for p in joiner.heartbeat(0).peers]
        assert listed[:2] == [c.identity.node_id, a.identity.node_id] and b.identity.node_id not in listed
        # a fresh key does not get ahead by heartbeating, and a worker is never listed to itself
        sybils[0][1].heartbeat(0)
        assert [p.node_id for p in a.client.heartbeat(0).peers][:2] == [c.identity.node_id, sybils[0][0].node_id]
        for _, client in sybils:
            client.close()
        joiner.close()
    finally:
        for n in nodes.values():
            n.client.close()
        s.stop()
    coordinator = Coordinator(s.cfg, s.data_dir)  # restarted: the workers come from the log
    server, port, _ = start_server(coordinator)
    try:
        with CoordinatorClient(f"127.0.0.1:{port}", Identity.generate(), timeout_s=30) as again:
            assert [p.node_id for p in again.register().peers][:3] == [c.identity.node_id, a.identity.node_id,
                                                                       sybils[0][0].node_id]
    finally:
        server.stop(0).wait()
        coordinator.close()


# ---- final tickets -------------------------------------------------------------------------------
def test_final_tickets_carry_the_rounds_verified_samples_and_tokens(tmp_path):
    """Round 0: n1 and n2 do honest work; the cheater's first group is accepted, then it fails a
    spot-check (its round is voided). At the close n1 and n2 get final tickets whose samples and
    tokens are what their accepted proofs in the log add up to; the cheater gets none. Interim
    tickets are refused where a final one is required, the final ones survive a restart byte for
    byte, and the audit recomputes the counts."""
    s = Served(tmp_path, spot_check_rate=1.0, samples_per_round=16)
    try:
        for name in ("n1", "n2", "cheat"):
            (tmp_path / name).mkdir()
        n1, n2 = HonestNode(s.address, tmp_path / "n1"), HonestNode(s.address, tmp_path / "n2")
        cheat = HonestNode(s.address, tmp_path / "cheat")
        _, groups = cheat.round_proofs(seed=3)
        first = cheat.client.submit_proofs(groups[0])
        assert first.verdicts[0].accepted and first.ticket.accepted_samples == 4
        assert first.ticket.accepted_tokens == sum(p.num_completion_tokens for p in groups[0])
        f = proof_fields(groups[1][1])
        f["behaviour_logprobs"] = [x + 0.5 for x in f["behaviour_logprobs"]]
        edited = [q for q in groups[1] if q.completion_index != 1] + [
            sign_proof(build_reward_proof(**f, node_public_key=cheat.identity.public_key_bytes), cheat.identity)]
        assert cheat.client.submit_proofs(edited).verdicts[0].code == "SPOT_CHECK_FAILED"

        r1 = submit_round(n1, seed=1)
        interim = r1.ticket
        assert not interim.final and interim.accepted_samples == 8 and not r1.round_closed
        assert n1.client.heartbeat(0).HasField("round_ticket") is False  # no round has closed yet
        r2 = submit_round(n2, seed=2)
        assert r2.round_closed and not r2.ticket.final

        log = entries(s)
        closed = next(e for e in log if e.kind == "round_closed")
        sums: dict[str, list[int]] = {}
        for e in log:
            if e.kind == "proofs_accepted" and e.index < closed.index:
                proofs = [pb.RewardProof.FromString(unb64(b, "proof")) for b in e.payload["proofs"]]
                acc = sums.setdefault(e.payload["node_id"], [0, 0])
                acc[0] += len(proofs)
                acc[1] += sum(p.num_completion_tokens for p in proofs)
        assert set(sums) == {n1.identity.node_id, n2.identity.node_id, cheat.identity.node_id}
        assert closed.payload["participants"] == sorted([n1.identity.node_id, n2.identity.node_id])

        key = n1.reply.coordinator_public_key
        tickets = {}
        for node in (n1, n2):
            hb = node.client.heartbeat(0)
            t = hb.round_ticket
            verify_ticket(t, key, run_id="coord-test", round_index=0, require_final=True)
            samples, tokens = sums[node.identity.node_id]
            assert (t.node_id, t.final, t.accepted_samples, t.accepted_tokens) == (node.identity.node_id, True,
                                                                                   samples, tokens)
            assert samples == 8 and tokens >= 8
            assert closed.payload["samples"][t.node_id] == samples and closed.payload["tokens"][t.node_id] == tokens
            assert (t.log_index, t.time_ms, t.policy_version) == (closed.index, closed.time_ms, 0)
            tickets[node.identity.node_id] = t.SerializeToString()
        assert not cheat.client.heartbeat(0).HasField("round_ticket")  # voided: no ticket
        with pytest.raises(ProtocolError, match="interim"):
            verify_ticket(interim, key, run_id="coord-test", round_index=0, require_final=True)
        forged = pb.AdmissionTicket.FromString(tickets[n1.identity.node_id])
        forged.accepted_tokens += 1000
        with pytest.raises(ProtocolError, match="BAD_SIGNATURE"):
            verify_ticket(forged, key, require_final=True)
        result = audited(s)
        assert result.ok, result.problem
        assert result.replayed["final_tickets"] == 2 and result.nodes[cheat.identity.node_id].failed_checks == 1
        # a coordinator that inflates a participant's tokens, or slips the voided cheater in, is caught
        inflated = {**closed.payload, "tokens": {**closed.payload["tokens"], n1.identity.node_id: 10**6}}
        bad = audited(s, rechain(s, log, {closed.index: ("round_closed", inflated)}))
        assert bad.problem.index == closed.index and "tokens" in bad.problem.reason
        slipped = dict(closed.payload)
        slipped["participants"] = sorted(closed.payload["participants"] + [cheat.identity.node_id])
        slipped["weights"] = {n: 1 / 3 for n in slipped["participants"]}
        slipped["samples"] = {**closed.payload["samples"], cheat.identity.node_id: 4}
        bad = audited(s, rechain(s, log, {closed.index: ("round_closed", slipped)}))
        assert bad.problem.index == closed.index and "participants" in bad.problem.reason
    finally:
        s.stop()
    # after a restart the same final tickets come back, byte for byte
    coordinator = Coordinator(s.cfg, s.data_dir)
    server, port, _ = start_server(coordinator)
    try:
        for node in (n1, n2):
            with CoordinatorClient(f"127.0.0.1:{port}", node.identity, timeout_s=30) as client:
                client.register()
                assert client.heartbeat(0).round_ticket.SerializeToString() == tickets[node.identity.node_id]
    finally:
        server.stop(0).wait()
        coordinator.close()


# ---- min_peers -------------------------------------------------------------------------------------
def test_no_round_starts_before_min_peers_nodes_are_live(tmp_path):
    """``swarm.min_peers`` = 3: nobody may start sampling (nothing is bound) while fewer than three
    unbanned nodes were seen lately, and every reply says how many are; once three are, they may. A
    node that already started the open round keeps sampling it when the count drops (a ban here)."""
    s = Served(tmp_path, min_peers=3)
    try:
        a, b, c, d = (s.client() for _ in range(4))
        for client, live in ((a, 1), (b, 2)):
            client.register()  # (a registration is a sign of life too)
            hb = client.heartbeat(0)
            assert (hb.may_sample, hb.live_nodes, hb.min_peers, hb.sample_version) == (False, live, 3, 0), hb
            assert list(hb.prompt_indices)  # the assignment is public; only the binding waits
        assert not list(s.coordinator.log.entries(kind="round_dispatched"))
        c.register()
        hb = c.heartbeat(0)
        assert hb.may_sample and hb.live_nodes == 3
        assert a.heartbeat(0).may_sample  # a asks again: three are live now, and it binds
        assert {e.payload["node_id"] for e in s.coordinator.log.entries(kind="round_dispatched")} == {
            a.identity.node_id, c.identity.node_id}
        admin = admin_client(s)
        admin.admin(pb.ADMIN_BAN, c.identity.node_id, "test")
        admin.close()
        hb = a.heartbeat(0)  # a banned node does not count; a started the round before the ban
        assert hb.live_nodes == 2 and hb.may_sample
        assert not b.heartbeat(0).may_sample  # b has not: it waits
        d.register()
        hb = d.heartbeat(0)
        assert hb.may_sample and hb.live_nodes == 3
    finally:
        s.stop()


# ---- the stall rule --------------------------------------------------------------------------------------
def test_a_peer_whose_rounds_never_publish_is_found_and_sits_out(tmp_path):
    """Three product participants over gRPC (the run's default stall window). The averaging itself is
    not run here (tests/test_swarm_averaging.py runs it): a round the staller holds a ticket in
    publishes nothing, as when it breaks every attempt in a way a round of three cannot pin on it;
    in a round it does not, the two honest ticket holders take the same step (a zero gradient),
    report its hash and one uploads it — the product's report and upload. Within five rounds the
    coordinator sits the staller out (no final ticket, told why in its heartbeat, its hash report
    counts 0, its work still accepted) and every later round publishes. The audit replays it."""
    s = Served(tmp_path, samples_per_round=24, spot_check_rate=0.0)
    try:
        nodes = []
        for name in "abh":
            (tmp_path / name).mkdir()
            nodes.append(HonestNode(s.address, tmp_path / name))
        staller = nodes[2]
        outcome, holders = [], []
        for r in range(9):
            for i, n in enumerate(nodes):
                if n.client.heartbeat(n.snapshot.version, sample=False).current.version != n.snapshot.version:
                    n.sync()  # the join loop's resync, before the round binds its version
                work = n.sample(n.heartbeat(completions_per_s=12.5, tokens_per_s=50.0))
                # the last round's ticket holders that started sampling this one have left its averaging
                moved = staller.client.heartbeat(staller.snapshot.version, sample=False).round_moved_on
                assert list(moved) == sorted(m.identity.public_key_bytes for m in nodes[: i + 1] if m in holders), r
                assert all(v.accepted for v in n.submit(work).verdicts), r  # everyone's work is accepted
            closed = {n: n.client.heartbeat(n.snapshot.version, sample=False) for n in nodes}
            assert closed[nodes[0]].current_round == r + 1
            holders = [n for n in nodes if closed[n].HasField("round_ticket")]
            assert all(closed[n].round_ticket.round_index == r for n in holders)
            assert list(closed[nodes[0]].round_participants) == sorted(n.identity.public_key_bytes for n in holders)
            for n in nodes:
                assert bool(closed[n].benched) == (n not in holders), (r, closed[n].benched)
            outcome.append({"benched": [nodes.index(n) for n in nodes if n not in holders], "published": False})
            if staller in holders:
                continue  # the round's averaging fails
            for n in holders:
                for t in n.trainer.trainable:
                    t.grad = torch.zeros_like(t)
                n.trainer.apply_gradients()
            shas = {n.state_sha256() for n in holders}
            assert len(shas) == 1
            sha, version = shas.pop(), holders[0].trainer.version
            if staller not in holders:  # sitting out, it reports another hash: it counts 0
                staller.report(version, b"\x66" * 32)
            for n in holders:
                n.report(version, sha)
            assert holders[0].upload(version, sha).published.sha256 == sha
            outcome[-1]["published"] = True
        failed = [r for r, o in enumerate(outcome) if not o["published"]]
        print("rounds:", outcome)
        assert 2 <= len(failed) <= 4 and failed[-1] <= 4, outcome  # n + 1 failures at most before it is found
        assert all(o == {"benched": [2], "published": True} for o in outcome[failed[-1] + 1:]), outcome
        assert "found 1 time(s)" in staller.client.heartbeat(0, sample=False).benched

        log = entries(s)
        reports = [e.payload for e in log if e.kind == "hash_reported" and e.payload["node_id"] == staller.node_id]
        assert reports and all(p["weight"] == 0.0 for p in reports)
        published = [e.payload for e in log if e.kind == "snapshot_published"][1:]
        assert all(p["total_weight"] == pytest.approx(1.0) and p["support_weight"] == pytest.approx(2 / 3)
                   for p in published)  # the bar: more than half of all the round's work, its share included
        result = audited(s)
        assert result.ok, result.problem
        assert result.nodes[staller.node_id].benched_rounds == sum(2 in o["benched"] for o in outcome)
        row = {r["node_id"]: r for r in read_status(s.data_dir)["nodes"]}[staller.node_id]
        assert row["sat_out"] == result.nodes[staller.node_id].benched_rounds and "found" in row["sits_out"]
    finally:
        s.stop()


# ---- reports and bans by peers -------------------------------------------------------------------
def test_reports_by_a_majority_of_the_other_participants_ban_the_peer(tmp_path):
    """Round 0 closes with a, b and c. Reports for it by a registered node that was not in it, for
    the open round, against oneself, or oversized are refused and not logged; a's report against c
    (1 of the 2 others) does not ban it, a's repeat is not counted twice, b's report (2 of 2) does:
    c is refused from then on. The audit replays the reports and the ban; a coordinator that bans
    without the majority, omits the ban or attributes a report to someone else is caught."""
    s = Served(tmp_path, samples_per_round=24)
    try:
        a, b, c = honest_nodes(s, tmp_path)
        outsider = s.client()
        outsider.register()
        for i, n in enumerate((a, b, c)):
            reply = submit_round(n, seed=i)
        assert reply.round_closed
        cid = c.identity.node_id
        before = len(entries(s))

        err = refusal(lambda: outsider.report_peer(0, cid, "excluded: bad gradient"))
        assert err.code == "PERMISSION_DENIED" and "participant" in err.detail
        err = refusal(lambda: a.client.report_peer(1, cid, "round 1 is open"))
        assert err.code == "FAILED_PRECONDITION"
        err = refusal(lambda: a.client.report_peer(0, a.identity.node_id, "myself"))
        assert err.code == "INVALID_ARGUMENT"
        err = refusal(lambda: a.client.report_peer(0, outsider.identity.node_id, "not a member"))
        assert err.code == "FAILED_PRECONDITION"
        err = refusal(lambda: a.client.report_peer(0, "zz", "not a node id"))
        assert err.code == "INVALID_ARGUMENT"
        err = refusal(lambda: a.client.report_peer(0, cid, "x" * 257))
        assert err.code == "INVALID_ARGUMENT"
        err = refusal(lambda: a.client.report_peer(0, cid, "big", b"\0" * (64 * 1024 + 1)))
        assert err.code == "INVALID_ARGUMENT"
        assert len(entries(s)) == before  # none of that was logged

        evidence = json.dumps({"peer": cid, "norm": 1e9}).encode()
        first = a.client.report_peer(0, cid, "gradient norm 1e9", evidence)
        assert (first.reporters, first.needed, first.banned, first.repeated) == (1, 2, False, False)
        again = a.client.report_peer(0, cid, "gradient norm 1e9 (again)", evidence)
        assert again.repeated and again.log_index == first.log_index and again.reporters == 1
        assert c.client.heartbeat(0).current_round == 1  # 1 of 2: not banned
        second = b.client.report_peer(0, cid, "stalled the all-reduce")
        assert (second.reporters, second.needed, second.banned) == (2, 2, True)
        err = refusal(lambda: c.client.heartbeat(0))
        assert err.code == "PERMISSION_DENIED" and "banned (reported by 2 of the 2 other participants" in err.detail
        assert cid not in {p.node_id for p in a.client.heartbeat(0).peers}

        log = entries(s)
        reports = [e for e in log if e.kind == "peer_reported"]
        (ban,) = [e for e in log if e.kind == "node_banned"]
        assert [(e.payload["node_id"], e.payload["peer_node_id"]) for e in reports] == [
            (a.identity.node_id, cid), (b.identity.node_id, cid)]
        assert ban.index == reports[1].index + 1 and ban.payload["evidence_index"] == reports[1].index
        assert ban.payload["by"] == "reports" and ban.payload["round"] == 0
        assert ban.payload["reporters"] == sorted([a.identity.node_id, b.identity.node_id])
        # the evidence is in the log, inside the reporter's signed envelope
        env = pb.SignedEnvelope.FromString(unb64(reports[0].payload["envelope"], "envelope"))
        assert pb.PeerReport.FromString(env.payload).evidence == evidence
        result = audited(s)
        assert result.ok, result.problem
        assert result.replayed["peer_reports"] == 2 and result.replayed["bans_by_reports"] == 1
        assert result.nodes[cid].banned

        # the rewritten logs of a dishonest coordinator
        noop = ("note", {})
        bad = audited(s, rechain(s, log, {reports[1].index: noop}))  # a ban with 1 report of 2
        assert bad.problem.index == ban.index and "no majority" in bad.problem.reason
        bad = audited(s, rechain(s, log, {ban.index: noop}))  # the majority without the ban
        assert bad.problem.index == ban.index and "ban does not follow" in bad.problem.reason
        framed = {**reports[1].payload, "node_id": outsider.identity.node_id}  # b's report given to the outsider
        bad = audited(s, rechain(s, log, {reports[1].index: ("peer_reported", framed)}))
        assert bad.problem.index == reports[1].index and "signed by" in bad.problem.reason
        fewer = {**ban.payload, "reporters": [b.identity.node_id]}
        bad = audited(s, rechain(s, log, {ban.index: ("node_banned", fewer)}))
        assert bad.problem.index == ban.index
    finally:
        s.stop()


WITHHELD = "AUDIT_WITHHELD: no reveal within 20.0 s"


def test_withheld_audit_reveals_are_a_strike_and_the_second_bans_across_a_restart(tmp_path):
    """a and b report c for withholding its share-audit reveal in round 0 (what a crash between its
    reduction and its reveal looks like): a strike, not a ban (``withheld_audit_strikes = 2``, the
    default); c goes on. The coordinator restarts (the strike is rebuilt from the log); their reports
    for round 1 are the second strike and ban c, the reason naming the first. The audit replays both;
    a log that bans at the first strike is caught; logs written before the rule ban at once."""
    s = Served(tmp_path, samples_per_round=24)
    try:
        a, b, c = honest_nodes(s, tmp_path)
        cid = c.identity.node_id
        assert s.coordinator.spec.withheld_audit_strikes == 2
        for i, n in enumerate((a, b, c)):
            reply = submit_round(n, seed=i)
        assert reply.round_closed
        assert a.client.report_peer(0, cid, WITHHELD).reporters == 1
        strike = b.client.report_peer(0, cid, WITHHELD)
        assert (strike.reporters, strike.needed, strike.banned) == (2, 2, False)
        # re-sent after the strike dropped its reports from the count: answered as a repeat, no new strike
        again = a.client.report_peer(0, cid, WITHHELD)
        assert again.repeated and not again.banned
        assert s.coordinator.recorder.peers.strikes == {cid: [0]}
        assert c.client.heartbeat(0).current_round == 1  # c goes on
        for i, n in enumerate((a, b, c)):
            reply = submit_round(n, seed=10 + i)
        assert reply.round_closed
        for n in (a, b, c):
            n.client.close()
    finally:
        s.stop()
    coordinator = Coordinator(s.cfg, s.data_dir)  # restarted: the strike comes back from the log
    assert coordinator.recorder.peers.strikes == {cid: [0]}
    server, port, _ = start_server(coordinator)
    try:
        clients = [CoordinatorClient(f"127.0.0.1:{port}", n.identity, timeout_s=30) for n in (a, b)]
        assert clients[0].report_peer(1, cid, WITHHELD).banned is False
        second = clients[1].report_peer(1, cid, WITHHELD)
        assert second.banned
        detail = coordinator.banned_detail(cid)
        assert "withheld its share-audit reveal" in detail and "round(s) 0 too" in detail, detail
        for client in clients:
            client.close()
    finally:
        server.stop(0).wait()
        coordinator.close()
    log = entries(s)
    # (audited() reads the first coordinator's spec and key, still in memory)
    (ban,) = [e for e in log if e.kind == "node_banned"]
    assert ban.payload["strikes"] == [0]
    result = audited(s)
    assert result.ok, result.problem
    assert result.replayed["peer_reports"] == 4 and result.replayed["bans_by_reports"] == 1
    reports = [e for e in log if e.kind == "peer_reported"]
    # a coordinator that banned at the first strike (the ban moved up, right after its second report)
    early = rechain(s, log, {reports[1].index + 1: ("node_banned", ban.payload)})
    bad = audited(s, early)
    assert bad.problem.index == reports[1].index + 1 and "no majority" in bad.problem.reason, bad.problem
    # a run started before the rule (no withheld_audit_strikes in run_started) banned at once
    started = log[0]
    old = {k: v for k, v in started.payload.items() if k != "withheld_audit_strikes"}
    assert type(s.coordinator.spec).from_payload(old).withheld_audit_strikes == 1


# ---- operators -----------------------------------------------------------------------------------
def test_operator_ban_and_unban_through_the_cli(tmp_path):
    """``grpo-coordinator ban/unban`` change the running coordinator (its state and its log
    together): signed with the data dir's coordinator.key; a node's key or another coordinator's
    key is refused PERMISSION_DENIED and changes nothing. A restart agrees with the log."""
    s = Served(tmp_path)
    runner = CliRunner()
    try:
        node_id_key = Identity.generate()
        node = s.client(node_id_key)
        node.register(multiaddrs=[addr(node_id_key)])
        watcher = s.client()
        watcher.register()
        nid = node_id_key.node_id

        def cli(*args, data_dir=s.data_dir):
            return runner.invoke(app, [*args, "-d", str(data_dir), "--address", s.address, "--timeout", "20"])

        res = cli("ban", nid, "--reason", "spamming the DHT")
        assert res.exit_code == 0, res.output
        assert "banned" in res.output
        assert refusal(lambda: node.heartbeat(0)).code == "PERMISSION_DENIED"
        err = refusal(lambda: node.register())  # the node is told why and who can lift it
        assert err.code == "PERMISSION_DENIED" and "operator: spamming the DHT" in err.detail, err.detail
        assert f"grpo-coordinator unban {nid}" in err.detail, err.detail
        assert nid not in {p.node_id for p in watcher.heartbeat(0).peers}
        res = cli("ban", nid, "--reason", "again")
        assert res.exit_code == 1 and "FAILED_PRECONDITION" in res.output and "already banned" in res.output
        res = cli("ban", "0" * 32, "--reason", "who?")
        assert res.exit_code == 1 and "NOT_FOUND" in res.output

        # a registered node's key, and another coordinator's key, are refused
        err = refusal(lambda: watcher.admin(pb.ADMIN_UNBAN, nid))
        assert err.code == "PERMISSION_DENIED" and "coordinator's own key" in err.detail
        impostor = tmp_path / "impostor"
        impostor.mkdir(mode=0o700)
        Identity.generate().save(impostor / "coordinator.key")
        res = cli("unban", nid, data_dir=impostor)
        assert res.exit_code == 1 and "PERMISSION_DENIED" in res.output
        assert refusal(lambda: node.heartbeat(0)).code == "PERMISSION_DENIED"  # still banned
        res = cli("unban", nid, data_dir=tmp_path / "nowhere")
        assert res.exit_code == 2 and "key" in res.output
        # an unsigned / replayed admin envelope is refused like any request
        sealed = seal_envelope(pb.AdminRequest(action=pb.ADMIN_UNBAN, node_id=nid),
                               Identity.load(s.data_dir / "coordinator.key"), nonce=1).SerializeToString()
        with grpc.insecure_channel(s.address) as ch:
            call = ch.unary_unary(method_path("Admin"), request_serializer=lambda x: x,
                                  response_deserializer=pb.AdminResponse.FromString)
            call(sealed, timeout=20)  # (this one unbans)
            with pytest.raises(grpc.RpcError) as info:
                call(sealed, timeout=20)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert node.heartbeat(0).current_round == 0
        res = cli("ban", nid, "--reason", "back to spamming")
        assert res.exit_code == 0, res.output
        res = cli("unban", nid, "--reason", "appeal granted")
        assert res.exit_code == 0 and "unbanned" in res.output
        res = cli("unban", nid)
        assert res.exit_code == 1 and "not banned" in res.output
        assert node.heartbeat(0).may_sample
        assert nid in {p.node_id for p in watcher.heartbeat(0).peers}

        log = entries(s)
        kinds = [(e.kind, e.payload.get("by")) for e in log if e.kind in ("node_banned", "node_unbanned")]
        assert kinds == [("node_banned", "operator"), ("node_unbanned", "operator")] * 2
        assert log[-1].payload["reason"] == "appeal granted"
        result = audited(s)
        assert result.ok, result.problem
        assert result.replayed["unbans"] == 2 and not result.nodes[nid].banned
        assert not {r["node_id"]: r for r in read_status(s.data_dir)["nodes"]}[nid]["banned"]
        # an unban of a node that is not banned is not a log a replay accepts
        unbans = [e for e in log if e.kind == "node_unbanned"]
        first_ban = next(e for e in log if e.kind == "node_banned")
        bad = audited(s, rechain(s, log, {first_ban.index: ("note", {})}))
        assert bad.problem.index == unbans[0].index and "not banned" in bad.problem.reason
        res = cli("ban", nid, "--reason", "for the restart")
        assert res.exit_code == 0, res.output
        node.close()
        watcher.close()
    finally:
        s.stop()
    coordinator = Coordinator(s.cfg, s.data_dir)  # the state rebuilt from the log agrees
    try:
        assert coordinator.is_banned(nid)
        assert "(operator: for the restart)" in coordinator.banned_detail(nid)  # its reason too
    finally:
        coordinator.close()


def test_the_new_requests_keep_the_door_rules(tmp_path):
    """ReportPeer and Admin payloads go through the same door as every request: unknown fields and
    uint64 values above 2**63-1 are refused INVALID_ARGUMENT naming the message; Admin checks the
    signer before it parses anything."""
    s = Served(tmp_path)
    try:
        node = s.client()
        node.register()
        key = Identity.load(s.data_dir / "coordinator.key")

        def call(method, payload: bytes, kind: str, identity: Identity, reply_cls):
            sealed = seal_envelope(payload, identity, nonce=time.time_ns(), kind=kind).SerializeToString()
            with grpc.insecure_channel(s.address) as ch:
                with pytest.raises(grpc.RpcError) as info:
                    ch.unary_unary(method_path(method), request_serializer=lambda x: x,
                                   response_deserializer=reply_cls.FromString)(sealed, timeout=20)
            return info.value.code(), info.value.details()

        big = pb.PeerReport(round_index=2**64 - 1, peer_node_id="0" * 32, reason="r").SerializeToString()
        code, detail = call("ReportPeer", big, "grpo_swarm.v1.PeerReport", node.identity, pb.PeerReportResponse)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "round_index" in detail and "2**63-1" in detail
        code, _ = call("ReportPeer", pb.PeerReport(round_index=2**63 - 1, peer_node_id="0" * 32).SerializeToString(),
                       "grpo_swarm.v1.PeerReport", node.identity, pb.PeerReportResponse)
        assert code == grpc.StatusCode.FAILED_PRECONDITION  # past the door: a round that has not closed
        unknown = b"\xb8\x3e\x01"
        code, detail = call("ReportPeer", pb.PeerReport(round_index=0).SerializeToString() + unknown,
                            "grpo_swarm.v1.PeerReport", node.identity, pb.PeerReportResponse)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "PeerReport has unknown fields" in detail
        admin = pb.AdminRequest(action=pb.ADMIN_BAN, node_id=node.identity.node_id, reason="x").SerializeToString()
        code, detail = call("Admin", admin + unknown, "grpo_swarm.v1.AdminRequest", key, pb.AdminResponse)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "AdminRequest has unknown fields" in detail
        code, _ = call("Admin", admin + unknown, "grpo_swarm.v1.AdminRequest", node.identity, pb.AdminResponse)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, detail = call("Admin", pb.AdminRequest(action=pb.ADMIN_BAN, node_id=node.identity.node_id)
                            .SerializeToString(), "grpo_swarm.v1.AdminRequest", key, pb.AdminResponse)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "reason" in detail
        code, _ = call("Admin", pb.AdminRequest(node_id=node.identity.node_id).SerializeToString(),
                       "grpo_swarm.v1.AdminRequest", key, pb.AdminResponse)
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # no action
        assert node.heartbeat(0).may_sample  # nothing of that banned anyone
        node.close()
    finally:
        s.stop()
