"""What the coordinator refuses at the door, from the outside over gRPC (findings of a security
review): unsigned 64-bit values SQLite cannot hold, unknown fields inside signed payloads, and
proof timestamps far from the coordinator's clock (0, ten years ahead, -2**63). Every refusal
names the field or message, and the server keeps serving afterwards."""

from __future__ import annotations

import hashlib

import grpc
import pytest

from grpo_swarm.coordinator.config import ConfigError, parse_run_config
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.canonical import is_repeated_field
from grpo_swarm.protocol.hygiene import MAX_STORABLE_UINT64
from grpo_swarm.protocol.proofs import build_reward_proof, now_ms, seal_envelope, sign_proof
from grpo_swarm.protocol.rpc import REQUEST_KIND, method_path

from coordinator_world import HonestNode, Served, write_run_toml

U64_MAX = 2**64 - 1
STREAMED = {"DownloadSnapshot", "GetLog"}  # server-streaming: the status comes with the first read
UNARY = ("Register", "Heartbeat", "GetSnapshotManifest", "SubmitProofs")


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path, samples_per_round=8)
    yield s
    s.stop()


def _raw(bytes_):
    return bytes_


def send(client, method: str, sealed: bytes) -> None:
    """One raw request (already sealed) to ``method``; the RpcError of a refusal propagates."""
    path = method_path(method)
    if method == "UploadSnapshot":  # the envelope opens the stream as its first UploadPart
        opening = pb.UploadPart(header=pb.SignedEnvelope.FromString(sealed)).SerializeToString()
        client.channel.stream_unary(path, request_serializer=_raw)(iter([opening]), timeout=20)
    elif method in STREAMED:
        list(client.channel.unary_stream(path, request_serializer=_raw)(sealed, timeout=20))
    else:
        client.channel.unary_unary(path, request_serializer=_raw)(sealed, timeout=20)


def refusal(fn, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value.code(), info.value.details()


def a_proof(client) -> pb.RewardProof:
    """A structurally valid, signed proof (the batch checks run before any verification)."""
    proof = build_reward_proof(
        run_id="coord-test", policy_version=0, snapshot_sha256=b"\1" * 32, round_index=0, prompt_index=0,
        group_id="g", group_size=4, completion_index=0, completion_token_ids=[1, 2], completion_text="12",
        behaviour_logprobs=[-0.5, -0.25], rewards={"arithmetic_accuracy": 1.0}, reward_total=1.0,
        reward_spec_id="spec", advantage=0.0, sequence=1, prompt_text="1+1=")
    return sign_proof(proof, client.identity)


def base_request(method: str, client) -> pb.RewardProof:
    cls = getattr(pb, REQUEST_KIND[method].rpartition(".")[2])
    return cls(proofs=[a_proof(client)]) if cls is pb.ProofBatch else cls()


def uint64_paths(desc, prefix=()) -> list[tuple[str, ...]]:
    """Every path to a uint64/fixed64 field of a message type, descending into sub-messages (and
    the first element of repeated ones): found from the descriptors, so a new field is covered."""
    out = []
    for f in desc.fields:
        if f.type in (f.TYPE_UINT64, f.TYPE_FIXED64):
            out.append(prefix + (f.name,))
        elif f.message_type is not None and len(prefix) < 4:
            out += uint64_paths(f.message_type, prefix + (f.name,))
    return out


def set_path(msg, path: tuple[str, ...], value: int) -> None:
    for name in path[:-1]:
        field = msg.DESCRIPTOR.fields_by_name[name]
        if is_repeated_field(field):
            container = getattr(msg, name)
            msg = container[0] if len(container) else container.add()
        else:
            msg = getattr(msg, name)
    field = msg.DESCRIPTOR.fields_by_name[path[-1]]
    if is_repeated_field(field):
        getattr(msg, path[-1]).append(value)
    else:
        setattr(msg, path[-1], value)


CASES = [(m, p) for m in (*UNARY, *STREAMED, "UploadSnapshot")
         for p in uint64_paths(getattr(pb, REQUEST_KIND[m].rpartition(".")[2]).DESCRIPTOR)]


def test_every_request_message_has_cases():
    covered = {m for m, _ in CASES}
    assert covered == {"Heartbeat", "GetSnapshotManifest", "SubmitProofs", "DownloadSnapshot", "GetLog",
                       "UploadSnapshot", "Register"}  # Register: hardware.memory_bytes, ...
    assert ("Heartbeat", ("computed", "version")) in CASES and ("GetLog", ("from_index",)) in CASES


def test_uint64_above_int64_is_refused_in_every_request(served):
    """Each uint64 field of each request, set to 2**64-1: INVALID_ARGUMENT naming the field (it
    used to be INTERNAL for Heartbeat.policy_version/computed.version and UNKNOWN for GetLog's
    from_index: SQLite overflowed), and the server keeps serving. The same for the envelope's nonce."""
    client = served.client()
    client.register()
    for method, path in CASES:
        msg = base_request(method, client)
        set_path(msg, path, U64_MAX)
        code, detail = refusal(send, client, method, client.seal(msg))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, path, code, detail)
        assert ".".join(path).replace("proofs.", "proofs[0].") in detail and "2**63-1" in detail, detail
        # one below the limit passes the door (what happens next is the method's business)
        set_path(msg, path, MAX_STORABLE_UINT64)
        try:
            send(client, method, client.seal(msg))
        except grpc.RpcError as e:
            assert "2**63-1" not in (e.details() or "") and e.code() not in (
                grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (method, path, e.code(), e.details())
    env = seal_envelope(pb.HeartbeatRequest(), client.identity, nonce=U64_MAX)
    code, detail = refusal(send, client, "Heartbeat", env.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "SignedEnvelope.nonce" in detail
    assert client.heartbeat(0).current.version == 0  # still serving
    errors = served.coordinator.metrics.registry.get_sample_value(
        "grpo_coordinator_requests_total", {"method": "Heartbeat", "code": "INTERNAL"})
    assert not errors


UNKNOWN_FIELD = b"\xb8\x3e\x01"  # field 999, varint 1: in no message of this schema


def test_unknown_fields_in_payloads_are_refused(served):
    """Raw bytes: a serialised payload with an unknown field appended (or inside a sub-message),
    sealed in a properly signed envelope: INVALID_ARGUMENT naming the message."""
    client = served.client()
    client.register()
    for method in (*UNARY, *STREAMED, "UploadSnapshot"):
        msg = base_request(method, client)
        kind = REQUEST_KIND[method]
        payload = msg.SerializeToString() + UNKNOWN_FIELD
        sealed = seal_envelope(payload, client.identity, nonce=client._nonce(), kind=kind).SerializeToString()
        code, detail = refusal(send, client, method, sealed)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown fields" in detail, (method, detail)
        assert kind.rpartition(".")[2] in detail, detail
    # nested: inside HeartbeatRequest.hardware
    hw = pb.HardwareSummary(cpu_count=2).SerializeToString() + UNKNOWN_FIELD
    payload = pb.HeartbeatRequest(policy_version=0).SerializeToString() + b"\x12" + bytes([len(hw)]) + hw
    assert pb.HeartbeatRequest.FromString(payload).hardware.cpu_count == 2  # protobuf itself accepts it
    sealed = seal_envelope(payload, client.identity, nonce=client._nonce(), kind=REQUEST_KIND["Heartbeat"])
    code, detail = refusal(send, client, "Heartbeat", sealed.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "HeartbeatRequest.hardware has unknown fields" in detail
    assert client.heartbeat(0).current.version == 0


def test_upload_chunks_are_checked_too(served, tmp_path):
    """The chunks of an upload go through the same door: after an acceptable header, a chunk with
    offset 2**64-1, a chunk with an unknown field, a second header, or bytes that are not the
    file the signed header names are refused INVALID_ARGUMENT; nothing is published."""
    node = HonestNode(served.address, tmp_path)
    _, groups = node.round_proofs()
    assert node.client.submit_proofs([p for g in groups for p in g]).round_closed  # 8 samples close round 0
    sha = hashlib.sha256(b"weights").digest()
    node.client.heartbeat(0, computed=pb.PolicySnapshotRef(version=1, sha256=sha))
    header = pb.UploadSnapshotHeader(snapshot=pb.PolicySnapshotRef(version=1, sha256=sha), total_bytes=10,
                                     file_sha256=hashlib.sha256(b"0123456789").digest())
    c = node.client
    upload = c.channel.stream_unary(method_path("UploadSnapshot"), request_serializer=_raw)

    def opening() -> bytes:  # a fresh nonce each time
        return pb.UploadPart(header=pb.SignedEnvelope.FromString(c.seal(header))).SerializeToString()

    def chunk(offset: int, data: bytes) -> bytes:
        return pb.UploadPart(chunk=pb.SnapshotChunk(offset=offset, data=data)).SerializeToString()

    code, detail = refusal(lambda: upload(iter([opening(), chunk(U64_MAX, b"0123456789")]), timeout=20))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "offset" in detail, detail
    inner = pb.SnapshotChunk(offset=0, data=b"0123456789").SerializeToString() + UNKNOWN_FIELD
    unknown = b"\x12" + bytes([len(inner)]) + inner  # UploadPart.chunk with an unknown field inside
    code, detail = refusal(lambda: upload(iter([opening(), unknown]), timeout=20))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown fields" in detail, detail
    code, detail = refusal(lambda: upload(iter([opening(), opening()]), timeout=20))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "chunk alone" in detail, detail
    code, detail = refusal(lambda: upload(iter([chunk(0, b"0123456789")]), timeout=20))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "header alone" in detail, detail
    # the chunks are not signed: the signed header's file hash is what binds them
    code, detail = refusal(lambda: upload(iter([opening(), chunk(0, b"0123456780")]), timeout=20))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "file_sha256" in detail, detail
    # the bytes the signed header names, but not a safetensors file: the uploader's fault, said so
    code, detail = refusal(lambda: upload(iter([opening(), chunk(0, b"0123456789")]), timeout=20))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a readable safetensors file" in detail, detail
    assert c.heartbeat(0).current.version == 0


def test_proof_timestamps_far_from_now_are_rejected_time_skew(tmp_path):
    """Proofs whose time_ms is 0, now + 10 years or -2**63 (re-signed, otherwise honest) get a
    TIME_SKEW verdict, logged as proofs_rejected; an honest group is accepted."""
    s = Served(tmp_path, samples_per_round=64)
    try:
        a, b = HonestNode(s.address, tmp_path), HonestNode(s.address, tmp_path)
        (_, ga), (_, gb) = a.round_proofs(), b.round_proofs()
        ten_years_ms = 10 * 365 * 86400 * 1000
        cases = [(a, ga[0], 0), (a, ga[1], now_ms() + ten_years_ms), (b, gb[0], -2**63)]
        for node, group, t in cases:
            forged = [pb.RewardProof.FromString(p.SerializeToString()) for p in group]
            for p in forged:
                p.time_ms = t
                sign_proof(p, node.identity)
            (verdict,) = node.client.submit_proofs(forged).verdicts
            assert not verdict.accepted and verdict.code == "TIME_SKEW", (t, verdict.code, verdict.detail)
        assert b.client.submit_proofs(gb[1]).verdicts[0].accepted
        rejected = [e.payload for e in a.client.get_log() if e.kind == "proofs_rejected"]
        assert [r["code"] for r in rejected] == ["TIME_SKEW"] * 3
    finally:
        s.stop()


def test_proof_time_window_is_in_the_run_spec(tmp_path):
    """The window reaches the verifier's policy (what the run records and audits replay): derived
    from the round settings by default, settable, and refused when absurd."""
    import tomllib

    base = tomllib.loads(write_run_toml(tmp_path / "run.toml").read_text())
    cfg = parse_run_config(base)  # η = 1, max_round_lag = 0, round_timeout_s = 3600
    assert cfg.verifier_policy().max_time_skew_ms == 2 * 3600 * 1000
    base["swarm"]["round_timeout_s"] = 10.0
    assert parse_run_config(base).verifier_policy().max_time_skew_ms == 600 * 1000  # the floor
    base["swarm"]["max_proof_time_skew_s"] = 90.0
    assert parse_run_config(base).verifier_policy().max_time_skew_ms == 90_000
    for bad in (0, -1, float("inf"), 1e9):
        base["swarm"]["max_proof_time_skew_s"] = bad
        with pytest.raises(ConfigError, match="swarm.max_proof_time_skew_s"):
            parse_run_config(base)
