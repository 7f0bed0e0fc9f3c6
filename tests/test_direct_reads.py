"""Direct reads of large stream messages: same bytes as StreamReader, over real unix sockets, on both loops."""

import asyncio
import os
import socket

import pytest
import uvloop

from grpo_swarm.node.swarm.direct_reads import MessageTooLarge, read_directly

MAX = 8 << 20

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(loop_name, coro_fn):
    loop = LOOPS[loop_name]()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro_fn(), 30))
    finally:
        loop.close()


async def stream_pair(limit=2 ** 16):
    """Two connected streams; keep both writers referenced (a dropped StreamWriter closes its socket)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ra, wa = await asyncio.open_unix_connection(sock=a, limit=limit)
    rb, wb = await asyncio.open_unix_connection(sock=b, limit=limit)
    return (ra, wa), (rb, wb)


def framed(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(8, "big") + payload


async def part_of_a_message(size: int, sent: int):
    """A direct-reading stream whose peer has sent the first ``sent`` bytes of a ``size``-byte message."""
    (reader, keep), (_, writer) = await stream_pair()
    read_directly(reader, MAX)
    writer.write(framed(os.urandom(size))[:sent])
    await writer.drain()
    return reader, writer, keep


async def read_framed(reader):
    marker = await reader.readexactly(1)
    size = int.from_bytes(await reader.readexactly(8), "big")
    return marker, await reader.readexactly(size)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_messages_of_every_size_arrive_intact_between_small_reads(loop_name):
    rng = __import__("random").Random(5)
    sizes = [0, 1, 65535, 65536, 65537, 200_000, 1 << 20, 3 * (1 << 20) + 7, 70_000, 5]
    payloads = [rng.randbytes(n) for n in sizes]

    async def main():
        (reader, keep), (_, writer) = await stream_pair()
        read_directly(reader, MAX)

        async def send():
            for p in payloads:
                # odd write sizes so message boundaries fall anywhere in what one recv returns
                data = framed(p)
                for i in range(0, len(data), 77_777):
                    writer.write(data[i:i + 77_777])
                    await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        got = [await read_framed(reader) for _ in payloads]
        await sender
        assert await reader.read() == b""
        return got

    got = run(loop_name, main)
    assert [m for m, _ in got] == [b"\x00"] * len(payloads)
    assert [bytes(p) for _, p in got] == payloads
    # large reads come back in their own buffer, small ones from the StreamReader
    assert [isinstance(p, memoryview) for _, p in got] == [n >= 65536 for n in sizes]


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_message_already_held_by_the_reader_is_not_lost(loop_name):
    payload = os.urandom(300_000)

    async def main():
        (reader, keep), (_, writer) = await stream_pair(limit=1 << 20)
        writer.write(framed(payload) + framed(b"tail"))
        await writer.drain()
        await asyncio.sleep(0.05)  # the StreamReader buffers what arrived before the read
        read_directly(reader, MAX)
        return await read_framed(reader), await read_framed(reader)

    (m1, p1), (m2, p2) = run(loop_name, main)
    assert bytes(p1) == payload and p2 == b"tail"


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_announced_but_unsent_bytes_commit_no_memory(loop_name):
    """Streams that announce the largest allowed message and send almost nothing cost what they send
    (a zero-filled buffer would commit every announced byte at once)."""
    import psutil

    async def main():
        rss = psutil.Process().memory_info().rss
        streams = [await part_of_a_message(MAX, 1000) for _ in range(8)]  # 64 MiB announced
        reads = [asyncio.create_task(read_framed(reader)) for reader, _, _ in streams]
        await asyncio.sleep(0.2)
        grown = psutil.Process().memory_info().rss - rss
        for task in reads:
            task.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        return grown, [t.cancelled() for t in reads]

    grown, cancelled = run(loop_name, main)
    assert cancelled == [True] * 8  # all eight were still waiting for their message
    assert grown < 16 << 20, grown


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_stream_closed_mid_message_raises_incomplete_read(loop_name):
    async def main():
        reader, writer, keep = await part_of_a_message(500_000, 200_000)
        writer.close()
        with pytest.raises(asyncio.IncompleteReadError) as e:
            await read_framed(reader)
        return e.value

    error = run(loop_name, main)
    assert error.expected == 500_000


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_read_cancelled_mid_message_leaves_the_stream_unreadable(loop_name):
    async def main():
        reader, writer, keep = await part_of_a_message(500_000, 300_000)
        task = asyncio.create_task(read_framed(reader))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        writer.write(os.urandom(300_000))  # the rest of the message arrives after the cancel
        await writer.drain()
        with pytest.raises(ConnectionAbortedError):
            await reader.readexactly(1)
        return reader._transport.get_protocol()

    protocol = run(loop_name, main)
    assert isinstance(protocol, asyncio.StreamReaderProtocol)  # handed back to the stream


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_both_directions_at_once_do_not_stall(loop_name):
    """Writing flow control reaches the stream while a direct read holds the transport."""
    blob = os.urandom(4 << 20)

    async def main():
        (ra, wa), (rb, wb) = await stream_pair()
        read_directly(ra, MAX)
        read_directly(rb, MAX)

        async def pump(writer, n):
            for _ in range(n):
                writer.write(framed(blob))
                await writer.drain()

        async def drain(reader, n):
            return [bytes(p) == blob for _, p in [await read_framed(reader) for _ in range(n)]]

        results = await asyncio.gather(pump(wa, 6), pump(wb, 6), drain(ra, 6), drain(rb, 6))
        return results[2] + results[3]

    assert run(loop_name, main) == [True] * 12


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_an_announced_length_over_the_limit_is_refused_before_allocating(loop_name):
    import resource

    async def main():
        (reader, keep), (_, writer) = await stream_pair()
        read_directly(reader, MAX)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        writer.write(b"\x00" + (1 << 40).to_bytes(8, "big") + b"x" * 1000)  # "a terabyte follows"
        await writer.drain()
        with pytest.raises(MessageTooLarge, match="1099511627776 bytes"):
            await read_framed(reader)
        with pytest.raises(MessageTooLarge):  # the stream stays given up
            await reader.readexactly(1)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before

    grown_kib = run(loop_name, main)
    assert grown_kib < 64 << 10


def test_through_hiveminds_p2p_parts_arrive_and_oversized_ones_are_refused():
    """Two real p2pd daemons: a streaming handler with direct reads on both ends echoes 1 MiB tensor
    parts intact; a message over the cap never reaches the handler."""
    from hivemind.p2p import P2P
    from hivemind.proto import runtime_pb2

    from grpo_swarm.node.swarm.direct_reads import install_direct_reads

    blobs = [os.urandom(1 << 20) for _ in range(3)]

    async def main():
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                  initial_peers=[f"{a}/p2p/{server.peer_id}" for a in await server.get_visible_maddrs()])
        seen = []
        try:
            async def echo(stream, context):
                async for part in stream:
                    seen.append(len(part.buffer))
                    yield runtime_pb2.Tensor(buffer=part.buffer[::-1])

            await server.add_protobuf_handler("echo", echo, runtime_pb2.Tensor, stream_input=True, stream_output=True)
            install_direct_reads(server, ["echo"], max_size=2 << 20)
            install_direct_reads(client, [], max_size=2 << 20)

            async def parts(sizes):
                for blob in sizes:
                    yield runtime_pb2.Tensor(buffer=blob)

            echoed = [r.buffer async for r in await client.iterate_protobuf_handler(
                server.peer_id, "echo", parts(blobs), runtime_pb2.Tensor)]
            assert echoed == [b[::-1] for b in blobs]
            with pytest.raises(Exception):
                async for _ in await client.iterate_protobuf_handler(
                        server.peer_id, "echo", parts([os.urandom(3 << 20)]), runtime_pb2.Tensor):
                    pass
            return list(seen)
        finally:
            await client.shutdown()
            await server.shutdown()

    assert asyncio.run(asyncio.wait_for(main(), 60)) == [1 << 20] * 3
