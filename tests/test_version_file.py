"""Version files streamed from live tensors, hashed by the coordinator as they arrive
(protocol.version_file, coordinator.upload_hashing): the canonical bytes load back as the same
tensors, the streaming state hash is the state-dict hash, it never disagrees with what safetensors
reads from the same bytes (a non-canonical file is handed to the slow path instead), and over gRPC a
canonical upload is published without a second read while a lying one is refused."""

from __future__ import annotations

import hashlib
import json
import struct
import threading

import pytest
import torch
from safetensors.torch import load, save

from grpo_swarm.coordinator import core
from grpo_swarm.coordinator.snapshots import snapshot_state_sha256
from grpo_swarm.coordinator.upload_hashing import BackgroundFeed
from grpo_swarm.node import proving
from grpo_swarm.node.swarm.training_state import version_file
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.client import CoordinatorError
from grpo_swarm.protocol.rpc import upload_chunk_message
from grpo_swarm.protocol.version_file import NotCanonical, StreamingStateHash

from coordinator_world import HonestNode, Served


def a_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tied = torch.randn(5, 3)
    return {"z.weight": torch.randn(7), "a.weight": tied, "lm_head.weight": tied, "optimizer/0/step": torch.tensor(3.0),
            "empty": torch.zeros(0, 4), "optimizer/scheduler_last_epoch": torch.tensor(5, dtype=torch.int64),
            "half": torch.randn(4, 2).bfloat16(), "mask": torch.tensor([True, False])}


def file_bytes(state) -> bytes:
    return b"".join(data for _, data in version_file(state).chunks(13))


def streamed(data: bytes, piece: int) -> bytes:
    h = StreamingStateHash()
    for i in range(0, len(data), piece):
        h.update(data[i: i + piece])
    return h.result()


def test_the_canonical_file_loads_back_as_the_live_tensors():
    state = a_state()
    writer = version_file(state)
    data = file_bytes(state)
    assert len(data) == writer.total_bytes and hashlib.sha256(data).digest() == writer.sha256()
    offsets = [off for off, _ in writer.chunks(13)]
    assert offsets == list(range(0, len(data), 13))
    back = load(data)
    assert set(back) == set(state)
    for name, t in state.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    header = json.loads(data[8: 8 + struct.unpack("<Q", data[:8])[0]])
    assert list(header) == sorted(state)  # by name, data in that order too
    assert [header[k]["data_offsets"][0] for k in sorted(state)] == sorted(header[k]["data_offsets"][0] for k in state)


@pytest.mark.parametrize("piece", [1, 5, 8, 64, 1 << 20])
def test_the_streaming_hash_is_the_state_dict_hash(piece):
    state = a_state()
    assert streamed(file_bytes(state), piece) == proving.state_dict_sha256(state)


def _with_text(data: bytes, text: str) -> bytes:
    """``data`` with another JSON header, padded as the canonical one is (so only the change differs)."""
    n = struct.unpack("<Q", data[:8])[0]
    raw = text.encode() + b" " * (-len(text.encode()) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _reheader(data: bytes, header: dict, **dumps) -> bytes:
    return _with_text(data, json.dumps(header, **dumps))


def _header(data: bytes) -> dict:
    return json.loads(data[8: 8 + struct.unpack("<Q", data[:8])[0]])


def mutations(data: bytes):
    """Files a cheating uploader could send instead of the canonical bytes of a state."""
    h = _header(data)
    yield "data changed", data[:-3] + bytes(b ^ 0xFF for b in data[-3:])
    yield "bytes appended", data + b"\0" * 8
    yield "cut short", data[:-4]
    yield "metadata", _reheader(data, {"__metadata__": {"x": "y"}, **h}, separators=(",", ":"))
    yield "reversed order", _reheader(data, dict(reversed(list(h.items()))), separators=(",", ":"))
    yield "spaced JSON", _reheader(data, h)
    yield "escaped name", _with_text(data, json.dumps(h, separators=(",", ":")).replace('"a.weight"',
                                                                                       '"\\u0061.weight"'))
    a, z = h["a.weight"]["data_offsets"], h["z.weight"]["data_offsets"]
    yield "offsets pointing elsewhere", _reheader(data, {**h, "a.weight": {**h["a.weight"], "data_offsets": z},
                                                         "z.weight": {**h["z.weight"], "data_offsets": a}},
                                                  separators=(",", ":"))
    yield "other dtype", _reheader(data, {**h, "z.weight": {**h["z.weight"], "dtype": "I32"}}, separators=(",", ":"))
    yield "not safetensors", b"\x10\0\0\0\0\0\0\0" + b"not json at all!" + data[24:]
    yield "a dimension past 64 bits", _reheader(data, {**h, "z.weight": {**h["z.weight"], "shape": [2 ** 70]}},
                                                separators=(",", ":"))
    yield "deeply nested JSON", _with_text(data, "[" * 100_000 + "]" * 100_000)
    yield "save_file's order", save({k: v.clone() for k, v in a_state().items()})


def test_the_streaming_hash_never_disagrees_with_what_safetensors_reads():
    state = a_state()
    data = file_bytes(state)
    verdicts = {}
    for what, bad in mutations(data):
        try:
            fast = streamed(bad, 7)
        except NotCanonical:
            verdicts[what] = "slow path"
            continue
        # accepted as canonical: it must be exactly what the slow path computes from the same bytes
        assert fast == proving.state_dict_sha256(load(bad)), what
        verdicts[what] = "same hash"
    assert verdicts.pop("data changed") == "same hash"  # (a different state: its own hash)
    assert verdicts.pop("other dtype") == "same hash"
    assert set(verdicts.values()) == {"slow path"}, verdicts


def test_a_background_feed_keeps_order_and_hands_back_errors():
    h, pieces = hashlib.sha256(), [bytes([i]) * 5000 for i in range(50)]
    feed = BackgroundFeed(h, depth=2)
    for p in pieces:
        feed.update(p)
    feed.close()
    assert h.digest() == hashlib.sha256(b"".join(pieces)).digest()

    class Broken:
        def update(self, data):
            raise ValueError("sink broke")

    feed = BackgroundFeed(Broken(), depth=1)
    for p in pieces:  # the feed keeps draining after the error: the sender never blocks
        feed.update(p)
    with pytest.raises(ValueError, match="sink broke"):
        feed.close()
    assert not any(t.name.startswith("feed-") and t.is_alive() for t in threading.enumerate())


def test_a_canonical_upload_is_published_from_its_streamed_hash_and_a_lying_one_refused(tmp_path, monkeypatch):
    s = Served(tmp_path, samples_per_round=8)
    try:
        node = HonestNode(s.address, tmp_path)
        _, groups = node.round_proofs()
        assert node.client.submit_proofs([p for g in groups for p in g]).round_closed
        state = {k: v.detach().clone() for k, v in node.model.state_dict().items()}
        for t in state.values():
            t.mul_(1.01)
        sha = proving.state_dict_sha256(state)
        node.client.heartbeat(1, computed=pb.PolicySnapshotRef(version=1, sha256=sha))

        def read_again(path):
            raise AssertionError("a canonical upload was read again to hash it")

        monkeypatch.setattr(core, "snapshot_state_sha256", read_again)
        lie = {k: v.clone() for k, v in state.items()}
        next(iter(lie.values())).view(-1)[0] = 1000.0  # the reported hash, other tensors
        with pytest.raises(CoordinatorError) as info:
            node.client.upload_version(version_file(lie), pb.PolicySnapshotRef(version=1, sha256=sha))
        assert info.value.code == "INVALID_ARGUMENT" and "not the claimed" in info.value.detail
        # without a file hash the bytes must be canonical: a file with metadata is refused, with the reason
        plain = save(state, metadata={"note": "not canonical"})
        with pytest.raises(CoordinatorError) as info:
            node.client._upload(len(plain), b"", lambda: iter([(0, [plain])]), pb.PolicySnapshotRef(version=1, sha256=sha),
                                timeout_s=60).result()
        assert info.value.code == "INVALID_ARGUMENT" and "canonical version file" in info.value.detail
        # cut mid-way: refused for its length, nothing left on disk, no hashing thread left running
        writer = version_file(state)
        half = list(writer.chunk_pieces(1 << 16))[: writer.total_bytes // (2 << 16)]
        with pytest.raises(CoordinatorError) as info:
            node.client._upload(writer.total_bytes, b"", lambda: iter(half), pb.PolicySnapshotRef(version=1, sha256=sha),
                                timeout_s=60).result()
        assert info.value.code == "INVALID_ARGUMENT" and "announced" in info.value.detail
        assert not [p for p in (s.data_dir / "snapshots").iterdir() if p.name.startswith(".upload")]
        assert not [t for t in threading.enumerate() if t.name.startswith("feed-")]
        reply = node.client.upload_version(version_file(state), pb.PolicySnapshotRef(version=1, sha256=sha),
                                           chunk_size=1 << 16)
        assert reply.published == pb.PolicySnapshotRef(version=1, sha256=sha)
        monkeypatch.undo()
        published = s.coordinator.snapshot_file(1)
        assert snapshot_state_sha256(published) == sha  # the slow path agrees with what was published
        assert published.read_bytes() == file_bytes(state)
    finally:
        s.stop()


@pytest.mark.parametrize("offset", [0, 1, 127, 128, 300, 4 << 20, 1 << 40])
@pytest.mark.parametrize("sizes", [(1,), (5, 0, 7), (127,), (128,), (70_000, 3)])
def test_chunk_messages_are_protobufs_bytes(offset, sizes):
    pieces = [memoryview(bytes(range(256)) * (n // 256 + 1))[:n] for n in sizes]
    data = b"".join(pieces)
    expected = pb.UploadPart(chunk=pb.SnapshotChunk(offset=offset, data=data)).SerializeToString()
    assert upload_chunk_message(offset, pieces) == expected
    assert pb.UploadPart.FromString(expected).chunk.data == data
