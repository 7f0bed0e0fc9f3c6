"""The coordinator's gRPC service in-process on loopback, with real nodes (tiny model, real rollouts
and proofs): the happy path, every refusal with its status code, resumable downloads, uploads by
a quorum of verified work, staleness, rounds, the log over GetLog and Prometheus metrics."""

from __future__ import annotations

import hashlib
import time
import urllib.request

import grpc
import pytest
import torch

from grpo_swarm.coordinator.service import ServerLimits
from grpo_swarm.node import proving
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.audit import audit
from grpo_swarm.protocol.run_spec import load_hooks
from grpo_swarm.protocol.client import CoordinatorClient, CoordinatorError
from grpo_swarm.protocol.errors import ProtocolError
from grpo_swarm.protocol.identity import Identity
from grpo_swarm.protocol.log import verify_entries
from grpo_swarm.protocol.pacing import NODE_PACE
from grpo_swarm.protocol.proofs import seal_envelope
from grpo_swarm.protocol.rpc import MAX_REQUEST_BYTES, method_path, verify_manifest, verify_ticket

from coordinator_world import HonestNode, Served


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path)
    yield s
    s.stop()


def raw_call(served: Served, method: str, data: bytes, reply_cls=pb.HeartbeatResponse):
    with grpc.insecure_channel(served.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        call = ch.unary_unary(method_path(method), request_serializer=lambda b: b,
                              response_deserializer=reply_cls.FromString)
        return call(data, timeout=20)


def status_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def test_register_download_submit_ticket_and_audit(served, tmp_path):
    node = HonestNode(served.address, tmp_path)
    assert node.reply.newly_registered and node.reply.node_id == node.identity.node_id
    assert node.reply.current.version == 0 and node.run["run"]["id"] == "coord-test"
    # the downloaded snapshot is the published version, byte for byte and by state-dict hash
    assert proving.state_dict_sha256(node.model.state_dict()) == node.reply.current.sha256
    again = served.client(node.identity).register()
    assert not again.newly_registered

    hb, groups = node.round_proofs()
    assert hb.may_sample and hb.staleness == pb.STALENESS_CURRENT and len(hb.prompt_indices) == 2
    reply = node.client.submit_proofs([p for g in groups for p in g])
    assert [v.accepted for v in reply.verdicts] == [True, True], [v.detail for v in reply.verdicts]
    assert [list(v.sequences) for v in reply.verdicts] == [[p.sequence for p in g] for g in groups]
    t = reply.ticket
    verify_ticket(t, node.reply.coordinator_public_key, run_id="coord-test", round_index=0)
    assert (t.node_id, t.accepted_samples, t.policy_version) == (node.identity.node_id, 8, 0)
    # a forged ticket does not verify
    t.accepted_samples = 1000
    with pytest.raises(ProtocolError, match="BAD_SIGNATURE"):
        verify_ticket(t, node.reply.coordinator_public_key)
    # the same groups again: rejected, logged, and the ticket does not grow
    reply2 = node.client.submit_proofs([p for g in groups for p in g])
    assert [v.code for v in reply2.verdicts] == ["REPLAYED_SEQUENCE"] * 2
    assert reply2.ticket.accepted_samples == 8

    entries = list(node.client.get_log())
    assert verify_entries(entries, [node.reply.coordinator_public_key]) is None
    kinds = [e.kind for e in entries]
    assert kinds[:3] == ["run_started", "snapshot_published", "node_registered"]
    assert kinds.count("proofs_accepted") == 2 and kinds.count("proofs_rejected") == 2
    assert [e.index for e in node.client.get_log(from_index=3, max_entries=2)] == [3, 4]
    # an auditor replays every verification (spot-checks too) from the fetched entries
    hooks = load_hooks(entries[0].payload, model="tiny", snapshots=str(served.data_dir / "snapshots"),
                       allow_plugin_rewards=True)
    result = audit(entries, hooks, trusted_signers=[node.reply.coordinator_public_key])
    assert result.ok, result.problem
    assert result.replayed["accepted_groups"] == 2


def test_refusals_get_status_codes_and_the_server_keeps_serving(served, tmp_path):
    node = HonestNode(served.address, tmp_path)
    hb_req = pb.HeartbeatRequest(policy_version=0)
    # unsigned: a bare request, and an envelope without a signature
    code, detail = status_of(lambda: raw_call(served, "Heartbeat", hb_req.SerializeToString()))
    assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT), detail
    env = pb.SignedEnvelope(payload=hb_req.SerializeToString(), kind="grpo_swarm.v1.HeartbeatRequest",
                            signer_public_key=node.identity.public_key_bytes, nonce=1)
    code, detail = status_of(lambda: raw_call(served, "Heartbeat", env.SerializeToString()))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "not signed" in detail
    # bad signature
    env = seal_envelope(hb_req, node.identity, nonce=node.client._nonce())
    env.payload = pb.HeartbeatRequest(policy_version=5).SerializeToString()
    code, detail = status_of(lambda: raw_call(served, "Heartbeat", env.SerializeToString()))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "BAD_SIGNATURE" in detail
    # unknown key
    stranger = served.client(Identity.generate())
    with pytest.raises(CoordinatorError) as info:
        stranger.heartbeat(0)
    assert info.value.code == "PERMISSION_DENIED" and "not registered" in info.value.detail
    # replayed request: the identical signed bytes twice
    sealed = node.client.seal(hb_req)
    assert raw_call(served, "Heartbeat", sealed).current.version == 0
    code, detail = status_of(lambda: raw_call(served, "Heartbeat", sealed))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "replayed" in detail
    # a request signed long ago
    old = seal_envelope(hb_req, node.identity, nonce=node.client._nonce(), time_ms=1_000_000)
    code, detail = status_of(lambda: raw_call(served, "Heartbeat", old.SerializeToString()))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "clock" in detail
    # the envelope of another method
    wrong = node.client.seal(pb.RegisterRequest())
    code, detail = status_of(lambda: raw_call(served, "Heartbeat", wrong))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "expected" in detail
    # oversized: refused by gRPC before any parsing
    big = node.client.seal(pb.ProofBatch(), kind="grpo_swarm.v1.ProofBatch") + b"\0" * (MAX_REQUEST_BYTES + 10)
    code, _ = status_of(lambda: raw_call(served, "SubmitProofs", big, pb.SubmitProofsResponse))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # a payload that is not a proof batch, and proofs signed by another key than the request's
    junk = seal_envelope(b"\xff\xff\xff", node.identity, nonce=node.client._nonce(), kind="grpo_swarm.v1.ProofBatch")
    code, detail = status_of(lambda: raw_call(served, "SubmitProofs", junk.SerializeToString(), pb.SubmitProofsResponse))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "MALFORMED" in detail
    other = HonestNode(served.address, tmp_path)
    _, groups = other.round_proofs()
    with pytest.raises(CoordinatorError) as info:
        node.client.submit_proofs(groups[0])
    assert info.value.code == "INVALID_ARGUMENT" and "another node key" in info.value.detail
    # the wrong run
    with pytest.raises(CoordinatorError) as info:
        served.client(Identity.generate()).register(run_id="another-run")
    assert info.value.code == "FAILED_PRECONDITION"
    # after all that: still serving, and every refusal was counted
    assert node.client.heartbeat(0).may_sample
    text = served.coordinator.metrics.registry.get_sample_value(
        "grpo_coordinator_requests_total", {"method": "Heartbeat", "code": "UNAUTHENTICATED"})
    assert text >= 4


def test_rate_limit(tmp_path):
    s = Served(tmp_path, limits=ServerLimits(rate_per_s=0.5, burst=3))
    try:
        client = s.client()
        client.register()
        client.heartbeat(0)
        client.heartbeat(0)
        with pytest.raises(CoordinatorError) as info:
            client.heartbeat(0)
        assert info.value.code == "RESOURCE_EXHAUSTED" and "rate limit" in info.value.detail
        s.client().register()  # other keys are not affected
    finally:
        s.stop()


def _heartbeats(client: CoordinatorClient, n: int) -> float:
    """Seconds ``client`` takes to send ``n`` heartbeats."""
    started = time.monotonic()
    for _ in range(n):
        client.heartbeat(0)
    return time.monotonic() - started


def _refusal(client: CoordinatorClient, n: int) -> str:
    """The code that refuses one of ``n`` heartbeats sent at once."""
    with pytest.raises(CoordinatorError) as info:
        _heartbeats(client, n)
    return info.value.code


def test_a_paced_client_waits_instead_of_being_refused(tmp_path):
    """A client kept inside the server's bucket (as a node is: protocol/pacing.py) sends twice the
    burst without one refusal, taking the time the rate asks for; unpaced, the same run is refused."""
    s = Served(tmp_path, limits=ServerLimits(rate_per_s=10.0, burst=5))
    try:
        ident = Identity.generate()
        paced = CoordinatorClient(s.address, ident, timeout_s=30, pace=(8.0, 4))
        paced.register()
        took = _heartbeats(paced, 10)
        assert took >= (10 - 4) / 8.0 - 0.02, took  # at most the whole burst left after the register; then 8/s
        unpaced = s.client()
        unpaced.register()
        assert _refusal(unpaced, 10) == "RESOURCE_EXHAUSTED"
    finally:
        s.stop()


def test_a_node_keeps_inside_a_rate_its_coordinator_announces_below_its_own_pace(tmp_path):
    """An operator's `serve --rate 5 --burst 5`, below a node's own pace (18/s, bursts of 60): the
    coordinator says so in its RegisterResponse and the node's client keeps inside it, sending 12
    heartbeats without one refusal; at its own pace the same run is refused."""
    s = Served(tmp_path, limits=ServerLimits(rate_per_s=5.0, burst=5))
    try:
        paced = CoordinatorClient(s.address, Identity.generate(), timeout_s=30, pace=NODE_PACE)
        reply = paced.register()
        assert (reply.request_rate_per_s, reply.request_burst) == (5.0, 5)
        assert _heartbeats(paced, 12) >= (12 - 3) / 4.5 - 0.05  # 90 % of the rate, 60 % of the burst
        fast = CoordinatorClient(s.address, Identity.generate(), timeout_s=30, pace=NODE_PACE)
        fast.register()
        fast._pacer.fit(0.0, 0)  # as if the coordinator had not said
        assert _refusal(fast, 12) == "RESOURCE_EXHAUSTED"
    finally:
        s.stop()


def settled(read, quiet_s: float = 0.3, timeout_s: float = 10.0):
    """``read()`` once it has returned the same value for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    value, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return value


def test_download_resumes_and_checks_chunks(tmp_path):
    s = Served(tmp_path, chunk_size=64 << 10)
    try:
        client = s.client()
        client.register()
        m = client.manifest()
        verify_manifest(m, client.coordinator_key)
        assert m.chunk_size == 64 << 10 and len(m.chunk_sha256) > 4
        dest = tmp_path / "snap.safetensors"
        client.download_snapshot(dest, manifest=m, max_chunks=3)
        part = dest.with_name(dest.name + ".part")
        assert not dest.exists() and part.stat().st_size == 3 * m.chunk_size
        # damage the last chunk on disk: the resume re-checks and fetches it again
        with open(part, "r+b") as f:
            f.seek(3 * m.chunk_size - 1)
            last = f.read(1)
            f.seek(3 * m.chunk_size - 1)
            f.write(b"\x00" if last != b"\x00" else b"\x01")
        # the first stream's server side may still be sending (and counting) a chunk after the client
        # left it: sample the counter once it has settled
        served_before = settled(lambda: s.coordinator.metrics.registry.get_sample_value(
            "grpo_coordinator_bytes_served_total", {"method": "DownloadSnapshot"}))
        client.download_snapshot(dest, manifest=m)
        assert hashlib.sha256(dest.read_bytes()).digest() == m.file_sha256 and not part.exists()
        served_after = s.coordinator.metrics.registry.get_sample_value(
            "grpo_coordinator_bytes_served_total", {"method": "DownloadSnapshot"})
        assert served_after - served_before == m.total_bytes - 2 * m.chunk_size
        # a tampered manifest is refused
        m.total_bytes += 1
        with pytest.raises(ProtocolError):
            verify_manifest(m, client.coordinator_key)
        with pytest.raises(CoordinatorError) as info:
            client.manifest(version=9)
        assert info.value.code == "NOT_FOUND"
        req = pb.DownloadSnapshotRequest(version=0, offset=5)
        code, _ = status_of(lambda: list(grpc.insecure_channel(s.address).unary_stream(
            method_path("DownloadSnapshot"), request_serializer=lambda b: b)(client.seal(req), timeout=10)))
        assert code == grpc.StatusCode.OUT_OF_RANGE
    finally:
        s.stop()


def _changed_snapshot(node: HonestNode, directory, scale: float):
    """A new set of weights (what an averaging round would produce) saved as a snapshot file."""
    with torch.no_grad():
        for p in node.model.parameters():
            p.mul_(scale)
    sha = proving.save_snapshot(node.model, directory)
    return directory / f"{sha.hex()}.safetensors", sha


def test_upload_needs_a_quorum_of_verified_work_and_staleness_follows(tmp_path):
    s = Served(tmp_path, max_staleness=1, keep_snapshots=2, samples_per_round=16)
    try:
        a, b, c = (HonestNode(s.address, tmp_path) for _ in range(3))
        v0_file = s.coordinator.snapshots.file_of(0)
        for n in (a, b):  # round 0: a and b, 8 accepted samples each (weights 0.5, 0.5); c does no work
            _, groups = n.round_proofs()
            assert all(v.accepted for v in n.client.submit_proofs([p for g in groups for p in g]).verdicts)
        up = tmp_path / "up"
        path_a, sha_a = _changed_snapshot(a, up, 1.01)
        _, sha_b = _changed_snapshot(b, up, 0.99)
        # nodes report the hash of the version they now hold (policy_version 1: ahead of the coordinator)
        a.client.heartbeat(1, computed=pb.PolicySnapshotRef(version=1, sha256=sha_a))
        b.client.heartbeat(1, computed=pb.PolicySnapshotRef(version=1, sha256=sha_b))
        with pytest.raises(CoordinatorError) as info:  # half of round 0's weight is not more than half
            a.client.upload_snapshot(path_a, pb.PolicySnapshotRef(version=1, sha256=sha_a))
        assert info.value.code == "FAILED_PRECONDITION" and "more than 0.5" in info.value.detail
        c.client.heartbeat(1, computed=pb.PolicySnapshotRef(version=1, sha256=sha_a))
        with pytest.raises(CoordinatorError) as info:  # c has no verified work in round 0: it adds nothing
            a.client.upload_snapshot(path_a, pb.PolicySnapshotRef(version=1, sha256=sha_a))
        assert info.value.code == "FAILED_PRECONDITION"
        b.client.heartbeat(1, computed=pb.PolicySnapshotRef(version=1, sha256=sha_a))  # b's report changes
        with pytest.raises(CoordinatorError) as info:  # b no longer backs its own first hash
            b.client.upload_snapshot(up / f"{sha_b.hex()}.safetensors", pb.PolicySnapshotRef(version=1, sha256=sha_b))
        assert info.value.code == "FAILED_PRECONDITION"
        with pytest.raises(CoordinatorError) as info:  # the right claim, the wrong tensors
            a.client.upload_snapshot(up / f"{sha_b.hex()}.safetensors", pb.PolicySnapshotRef(version=1, sha256=sha_a))
        assert info.value.code == "INVALID_ARGUMENT" and "hash to" in info.value.detail
        reply = a.client.upload_snapshot(path_a, pb.PolicySnapshotRef(version=1, sha256=sha_a))
        assert reply.published.version == 1 and (reply.supporting_reports, reply.total_reports) == (2, 3)
        assert a.client.manifest().snapshot.sha256 == sha_a

        hb = c.client.heartbeat(0)
        assert (hb.staleness, hb.lag, hb.may_sample, hb.min_version) == (pb.STALENESS_BEHIND, 1, True, 0)
        _, stale_groups = c.round_proofs()  # sampled at version 0 in round 1, submitted later
        # version 2, produced by round 1 (a and b, now holding version 1); version 0 falls out of η = 1
        for n in (a, b):
            n.sync()
            _, groups = n.round_proofs()
            assert all(v.accepted for v in n.client.submit_proofs([p for g in groups for p in g]).verdicts)
        path2, sha2 = _changed_snapshot(a, up, 1.02)
        for n in (a, b):
            n.client.heartbeat(2, computed=pb.PolicySnapshotRef(version=2, sha256=sha2))
        a.client.upload_snapshot(path2, pb.PolicySnapshotRef(version=2, sha256=sha2))
        hb = c.client.heartbeat(0)
        assert (hb.staleness, hb.lag, hb.may_sample, hb.min_version) == (pb.STALENESS_TOO_STALE, 2, False, 1)
        # only the newest 2 versions are kept (η + 1 = 2)
        assert not v0_file.exists() and s.coordinator.snapshots.versions() == [1, 2]
        with pytest.raises(CoordinatorError) as info:
            c.client.manifest(version=0)
        assert info.value.code == "NOT_FOUND" and "kept: [1, 2]" in info.value.detail
        verdicts = c.client.submit_proofs([p for g in stale_groups for p in g]).verdicts
        assert [v.code for v in verdicts] == ["STALE_VERSION"] * 2
        # c catches up and its proofs are accepted again
        c.sync()
        assert c.client.heartbeat(2).staleness == pb.STALENESS_CURRENT
        _, groups = c.round_proofs()
        assert all(v.accepted for v in c.client.submit_proofs([p for g in groups for p in g]).verdicts)
        assert s.coordinator.metrics.registry.get_sample_value("grpo_coordinator_policy_version") == 2
        result = audit(list(a.client.get_log()), trusted_signers=[a.reply.coordinator_public_key])
        assert result.ok, result.problem
        assert result.replayed["publications"] == 2 and result.replayed["upload_refusals"] == 3
    finally:
        s.stop()


def test_round_closes_at_the_target_and_assignments_move_on(tmp_path):
    s = Served(tmp_path, samples_per_round=16)
    try:
        n1, n2 = HonestNode(s.address, tmp_path), HonestNode(s.address, tmp_path)
        _, g1 = n1.round_proofs()
        r1 = n1.client.submit_proofs([p for g in g1 for p in g])
        assert not r1.round_closed and r1.current_round == 0
        _, g2 = n2.round_proofs()
        r2 = n2.client.submit_proofs([p for g in g2 for p in g])
        assert r2.round_closed and r2.current_round == 1 and r2.ticket.round_index == 0
        hb = n1.client.heartbeat(0)
        assert hb.current_round == 1 and hb.round_samples_accepted == 0
        closed = [e for e in n1.client.get_log() if e.kind == "round_closed"]
        assert len(closed) == 1 and closed[0].payload["weights"] == {n1.identity.node_id: 0.5,
                                                                     n2.identity.node_id: 0.5}
    finally:
        s.stop()


def test_round_times_out_with_some_samples(tmp_path):
    s = Served(tmp_path, samples_per_round=64, round_timeout_s=0.5)
    try:
        node = HonestNode(s.address, tmp_path)
        import time
        time.sleep(0.6)  # nobody sampled the round yet: its clock has not started
        _, groups = node.round_proofs()  # the first dispatch starts it
        first = node.client.submit_proofs([p for g in groups[:1] for p in g])
        assert not first.round_closed
        time.sleep(0.6)
        assert node.client.heartbeat(0).current_round == 1  # open 0.6 s with some samples: closed
    finally:
        s.stop()


def test_prometheus_metrics_over_http(served, tmp_path):
    node = HonestNode(served.address, tmp_path)
    _, groups = node.round_proofs()
    node.client.submit_proofs([p for g in groups for p in g])
    bad = [proving.sign_proof(p, node.identity) for p in groups[0]]  # replayed sequences, fresh signatures
    node.client.submit_proofs(bad)
    port = served.coordinator.metrics.serve_http(0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "grpo_coordinator_nodes 1.0" in text
    assert "grpo_coordinator_proofs_accepted_total 8.0" in text
    assert 'grpo_coordinator_proofs_rejected_total{reason="REPLAYED_SEQUENCE"} 4.0' in text
    assert "grpo_coordinator_staleness_versions_bucket" in text
    assert 'grpo_coordinator_bytes_served_total{method="DownloadSnapshot"}' in text


def self_signed_cert() -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for localhost / 127.0.0.1, made here with cryptography."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def test_tls(tmp_path):
    from grpo_swarm.coordinator.config import load_run_config
    from grpo_swarm.coordinator.core import Coordinator
    from grpo_swarm.coordinator.service import start_server
    from grpo_swarm.protocol.client import CoordinatorClient

    from coordinator_world import write_run_toml

    key_pem, cert_pem = self_signed_cert()
    coordinator = Coordinator(load_run_config(write_run_toml(tmp_path / "run.toml")), tmp_path / "coord")
    server, port, _ = start_server(coordinator, tls=(key_pem, cert_pem))
    try:
        with CoordinatorClient(f"localhost:{port}", Identity.generate(), root_certificates=cert_pem) as client:
            assert client.register().current.version == 0
            client.download_snapshot(tmp_path / "snap.safetensors")
        # a plaintext client cannot talk to a TLS server
        with CoordinatorClient(f"localhost:{port}", Identity.generate(), timeout_s=3, retries=0) as plain:
            with pytest.raises(CoordinatorError) as info:
                plain.register()
            assert info.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    finally:
        server.stop(0).wait()
        coordinator.close()
