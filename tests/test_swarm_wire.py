"""The copy-free AveragingData codec (grpo_swarm.node.swarm.wire) against protobuf's own encoding,
and its strictness on bytes a peer made up."""

import asyncio
import json
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from hivemind.compression import CompressionInfo, Float16Compression, NoCompression, Uniform8BitQuantization
from hivemind.compression.serialization import deserialize_torch_tensor
from hivemind.proto import averaging_pb2, runtime_pb2

from grpo_swarm.node.swarm.part_codec import decode_into, decode_values, encode_values, sum_of_squares
from grpo_swarm.node.swarm.reduction import in_thread_to_the_end
from grpo_swarm.node.swarm.wire import WireAveragingData, WireTensor


def _pb_message(values: torch.Tensor, **fields) -> averaging_pb2.AveragingData:
    tensor = runtime_pb2.Tensor(buffer=values.numpy().tobytes(), size=list(values.shape), dtype="float32",
                                compression=runtime_pb2.CompressionType.FLOAT16, requires_grad=False, chunks=3)
    return averaging_pb2.AveragingData(tensor_part=tensor, **fields)


@pytest.mark.parametrize("fields", [
    dict(code=averaging_pb2.PART_FOR_AVERAGING, group_id=b"g" * 32, weight=3.0),
    dict(weight=7.25), dict(code=averaging_pb2.AVERAGED_PART), dict(peer_id=b"p" * 38, weight=-1.5), {}])
def test_encoding_is_protobufs_and_decoding_reads_it(fields):
    values = torch.randn(1000)
    reference = _pb_message(values, **fields)
    tensor = WireTensor(memoryview(values.numpy()).cast("B"), (1000,), "float32",
                        runtime_pb2.CompressionType.FLOAT16, chunks=3)
    ours = WireAveragingData(tensor_part=tensor, **fields)
    assert ours.SerializeToString() == reference.SerializeToString()
    assert tensor.byte_size() == reference.tensor_part.ByteSize()

    got = WireAveragingData()
    got.ParseFromString(reference.SerializeToString())
    assert got.malformed is None
    assert (got.code, got.group_id, got.peer_id, got.weight) == (reference.code, reference.group_id,
                                                                 reference.peer_id, reference.weight)
    part = got.tensor_part
    assert (part.size, part.dtype, part.compression, part.chunks, part.requires_grad) == \
        ((1000,), "float32", runtime_pb2.CompressionType.FLOAT16, 3, False)
    assert isinstance(part.buffer, memoryview) and bytes(part.buffer) == reference.tensor_part.buffer


def test_messages_without_a_tensor_and_protobufs_replies_round_trip():
    for code in (averaging_pb2.CANCELLED, averaging_pb2.BAD_GROUP_ID, averaging_pb2.PROTOCOL_VIOLATION):
        raw = averaging_pb2.AveragingData(code=code).SerializeToString()
        got = WireAveragingData()
        got.ParseFromString(raw)
        assert got.malformed is None and got.code == code and got.tensor_part is None
        assert WireAveragingData(code=code).SerializeToString() == raw


@pytest.mark.parametrize("compression", [NoCompression(), Float16Compression(), Uniform8BitQuantization()])
def test_encode_values_gives_hiveminds_bytes(compression):
    values = torch.randn(4096) * 3
    values[:4] = torch.tensor([1e6, -1e6, 65519.0, 65521.0])  # past fp16's range: clamped alike
    ours = encode_values(values, compression)
    theirs = compression.compress(values, CompressionInfo.from_tensor(values), False)
    assert bytes(ours.buffer) == theirs.buffer
    assert (ours.size, ours.dtype, ours.compression) == (tuple(theirs.size), theirs.dtype, theirs.compression)
    wire = WireAveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=ours).SerializeToString()
    assert wire == averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=theirs).SerializeToString()
    back = WireAveragingData()
    back.ParseFromString(wire)
    decoded = decode_values(back.tensor_part, compression)
    assert torch.equal(decoded, deserialize_torch_tensor(theirs).reshape(-1))


@pytest.mark.parametrize("compression", [NoCompression(), Float16Compression(), Uniform8BitQuantization()])
def test_decoding_into_place_gives_the_values_and_their_squares(compression):
    # a 1.25 MiB part of an odd length: a bad value in its very last place must still show
    values = torch.randn((5 << 16) + 3, generator=torch.Generator().manual_seed(0)) * 0.01
    tp = encode_values(values, compression)
    expected = decode_values(tp, compression)
    into = torch.full_like(expected, 7.0)
    squares = decode_into(tp, compression, into)
    assert torch.equal(into, expected)
    # a float32 dot: 8-bit values repeat a few levels, the worst case for its rounding (1.5e-5 seen)
    rel = 1e-4 if isinstance(compression, Uniform8BitQuantization) else 1e-5
    assert squares == pytest.approx(float(expected.double().square().sum()), rel=rel)
    if not isinstance(compression, Uniform8BitQuantization):  # (8-bit has no NaN/Inf to carry)
        for bad in (float("nan"), float("inf")):  # written into the bytes: fp16 encoding would clamp inf
            tainted = encode_values(values.clone(), compression)
            dtype = np.float16 if isinstance(compression, Float16Compression) else np.float32
            np.frombuffer(tainted.buffer, dtype=dtype)[-1] = bad
            assert not np.isfinite(decode_into(tainted, compression, into))


@pytest.mark.parametrize("cancels", [1, 2])
def test_a_cancelled_decode_is_waited_for_before_the_cancellation_arrives(cancels):
    # a thread writing into the output buffers must be done before the next attempt may reuse them;
    # an abort and a timeout may both cancel the same attempt: a second cancel must not end the wait
    started, writes = threading.Event(), []

    def slow_write():
        started.set()
        time.sleep(0.3)
        writes.append("done")

    async def main():
        task = asyncio.create_task(in_thread_to_the_end(slow_write))
        while not started.is_set():
            await asyncio.sleep(0.01)
        for i in range(cancels):
            if i:
                await asyncio.sleep(0.05)
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return list(writes)

    assert asyncio.run(main()) == ["done"]


def test_decoded_values_are_views_of_the_received_bytes():
    values = torch.arange(256, dtype=torch.float32)
    raw = WireAveragingData(tensor_part=encode_values(values, NoCompression())).SerializeToString()
    got = WireAveragingData()
    got.ParseFromString(raw)
    decoded = decode_values(got.tensor_part, NoCompression())
    assert torch.equal(decoded, values)
    start = np.frombuffer(raw, dtype=np.uint8).ctypes.data
    assert start <= decoded.data_ptr() < start + len(raw)  # no copy was made


def _malformed(raw: bytes) -> str | None:
    got = WireAveragingData()
    got.ParseFromString(raw)
    if got.malformed is not None:
        assert got.tensor_part is None and got.code == 0  # nothing half-read is left behind
    return got.malformed


def test_made_up_bytes_are_refused_with_what_is_wrong():
    good = _pb_message(torch.randn(8), code=averaging_pb2.PART_FOR_AVERAGING, weight=1.0).SerializeToString()
    assert _malformed(good) is None
    cases = {
        good[:-3]: "past the end",  # cut inside the weight
        good[:20]: "declares",  # cut inside the tensor
        good + b"\x08\x05": "appears twice",  # a second code
        good + b"\x30\x01": "unknown field 6",
        b"\x0a\x00": "wire type 2, expected 0",  # code sent as bytes
        b"\x22\x02\x38\x01": "tensor_part has unknown field 7",
        b"\x22\x03\x12\x01\x80": "past the end",  # an unfinished varint inside the packed sizes
        b"\x08" + b"\xff" * 11: "longer than ten bytes",
        b"\x22\x02\x18\x02": "not a bool",
        b"\x22\x04\x22\x02\xff\xfe": "not UTF-8",
        b"\x22\x06\x12\x04" + b"\x80\x80\x80\x80": "past the end",
        b"\x22\x07\x12\x05" + b"\xff\xff\xff\xff\x1f": "out of range for a uint32",
        b"\x22\x0b\x12\x09" + b"\x01" * 9: "more than 8 dimensions",
        b"\x08" + b"\xff" * 9 + b"\x01": None,  # a ten-byte varint: -1, a valid (negative) int32 enum
    }
    for raw, expected in cases.items():
        problem = _malformed(raw)
        if expected is None:
            assert problem is None, raw
        else:
            assert problem is not None and expected in problem, (raw, problem)


def test_double_and_negative_fields_match_protobuf():
    raw = averaging_pb2.AveragingData(code=-1, weight=struct.unpack("<d", b"\x01" * 8)[0]).SerializeToString()
    got = WireAveragingData()
    got.ParseFromString(raw)
    assert got.malformed is None and got.code == -1
    assert WireAveragingData(code=-1, weight=got.weight).SerializeToString() == raw


def test_sum_of_squares_keeps_crafted_small_values_from_vanishing_in_rounding():
    # a few large values, then millions of small ones: one float32 dot over the whole 16 MiB part
    # (the largest part size) loses 4e-4 of the squares, past the fp32 bound's 1e-4 tolerance
    values = torch.full((4 << 20,), 0.01)
    values[:16] = 250.0
    exact = float(values.double().square().sum())
    assert abs(float(torch.dot(values, values)) - exact) / exact > 1e-4  # what the rows prevent
    assert sum_of_squares(values) == pytest.approx(exact, rel=1e-6)
    odd = values[: (3 << 12) + 5]  # rows and a tail
    assert sum_of_squares(odd) == pytest.approx(float(odd.double().square().sum()), rel=1e-6)
    for bad in (float("nan"), float("inf")):
        tainted = odd.clone()
        tainted[-1] = bad  # in the tail
        assert not np.isfinite(sum_of_squares(tainted))
        tainted = odd.clone()
        tainted[7] = bad  # in a row
        assert not np.isfinite(sum_of_squares(tainted))


_FAULTS_SCRIPT = """
import json, resource, torch
from grpo_swarm.node.swarm.part_codec import sum_of_squares
torch.set_num_threads(1)
values = torch.randn(16 << 20)  # 64 MiB, past any allocator cache
def faults(fn):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
sum_of_squares(values)
ours = faults(lambda: [sum_of_squares(values) for _ in range(3)])
rows = values.view(-1, 4096)
vecdot = faults(lambda: torch.linalg.vecdot(rows, rows).sum())
print(json.dumps(dict(pages=values.numel() * 4 // 4096, ours=ours, vecdot=vecdot)))
"""


def test_sum_of_squares_reads_the_values_without_a_temporary_of_their_size():
    # the local gradient's check runs it over every tensor each round: a temporary as large as the
    # input (linalg.vecdot multiplies first, then sums) is fresh pages every call (bench/RESULTS.md,
    # session 20: 0.4 s a round at SmolLM2 size). Measured in a fresh process: one that earlier tests
    # left holding freed memory would reuse it without faults, and tell nothing.
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["vecdot"] > got["pages"] // 2, got  # the control: a temporary of the input's size faults in
    assert got["ours"] < got["pages"] // 20, f"{got['ours']} page faults for 3 sums over {got['pages']} pages"
