"""Publishing a version over slow links: uploads without a whole-call deadline, the coordinator's
view of the upload in flight, contributors that let a slow upload finish and race a stalled or
crawling one, and uploads that lose the race refused mid-stream (a real coordinator on loopback,
real participants; the slow link is a sender that sleeps between chunks)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from grpo_swarm.coordinator import service as service_module
from grpo_swarm.coordinator.service import ServerLimits
from grpo_swarm.node.swarm.publication import (
    PublicationFollower,
    UploadRate,
    poll_interval,
    should_abandon,
    upload_rank,
    should_race,
)
from grpo_swarm.node.swarm.training_state import version_file
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.audit import audit
from grpo_swarm.protocol.client import CoordinatorError
from grpo_swarm.protocol.run_spec import load_hooks
from grpo_swarm.protocol.upload_call import DEFAULT_STALL_S

from coordinator_world import HonestNode, Served

CHUNK = 1 << 15


class SlowLink(HonestNode):
    """A participant whose uploads send a chunk every ``delay_s``, and pause ``pause_s`` before chunk
    ``pause_at`` (a link that stalls)."""

    delay_s = 0.0
    pause_at: int | None = None
    pause_s = 0.0

    def start_upload(self, version, sha256, *, stall_s=DEFAULT_STALL_S):
        writer, link = version_file(self.training_state()), self

        class Throttled:
            total_bytes = writer.total_bytes

            def chunk_pieces(self, chunk_size):
                for i, item in enumerate(writer.chunk_pieces(chunk_size)):
                    if i == link.pause_at:
                        time.sleep(link.pause_s)
                    time.sleep(link.delay_s)
                    yield item

        return self.client.start_upload_version(Throttled(), pb.PolicySnapshotRef(version=version, sha256=sha256),
                                                chunk_size=CHUNK, stall_s=stall_s)


@pytest.fixture()
def swarm(tmp_path):
    yield from two_contributors(tmp_path)


def two_contributors(tmp_path, **served):
    """A coordinator whose round 0 closed with two contributors, A and B (equal weight), that both
    reported the same version 1: either may publish it, neither alone."""
    s = Served(tmp_path, samples_per_round=16, **served)
    a, b = SlowLink(s.address, tmp_path / "a"), SlowLink(s.address, tmp_path / "b")
    try:
        for node in (a, b):
            submit_round(node)
        assert s.coordinator.state.current_round == 1
        for node in (a, b):
            with torch.no_grad():
                for t in node.model.parameters():
                    t.mul_(1.01)
        sha = a.state_sha256()
        assert b.state_sha256() == sha
        for node in (a, b):
            node.report(1, sha)
        yield s, a, b, sha
    finally:
        for node in (a, b):
            node.client.close()
        s.stop()


def streaming(s, timeout_s: float) -> None:
    """Wait until the coordinator receives an upload of version 1."""
    deadline = time.monotonic() + timeout_s
    while s.coordinator.uploads.progress(1) is None and time.monotonic() < deadline:
        time.sleep(0.02)


def submit_round(node):
    """``node``'s proofs of its assignment in the open round, submitted: the coordinator's reply."""
    _, groups = node.round_proofs()
    return node.client.submit_proofs([p for g in groups for p in g])


def chunks_of(node) -> int:
    return -(-version_file(node.training_state()).total_bytes // CHUNK)


def test_should_race():
    def flight(received, total=1000, elapsed_s=10.0, idle_s=0.0):
        return pb.UploadProgress(version=1, bytes_received=received, total_bytes=total, elapsed_ms=int(elapsed_s * 1000),
                                 idle_ms=int(idle_s * 1000))

    assert should_race(None, 1000, 100.0)  # nothing streams
    # 500 of 1000 bytes in 10 s: 10 s left; ours would take 10 s (at 100 B/s) or 2 s (at 500 B/s)
    assert not should_race(flight(500), 1000, 100.0)
    assert should_race(flight(500), 1000, 500.0)
    assert should_race(flight(500, idle_s=25.0), 1000, 1.0)  # stalled, however slow we are
    assert not should_race(flight(0, elapsed_s=1.0), 1000, 1e9)  # just opened: give it time
    assert should_race(flight(0, elapsed_s=30.0), 1000, 1.0)  # opened, nothing ever came


def test_upload_rank():
    assert upload_rank(["b", "a", "c"], "a") == 0
    assert upload_rank(["b", "a", "c"], "c") == 2
    assert upload_rank([], "a") == 0  # alone: upload at once
    assert upload_rank([f"n{i:02d}" for i in range(20)], "n15") == 6  # ranks past 6 wait as long as 6


def test_poll_interval():
    def flight(received, elapsed_s=10.0):
        return pb.UploadProgress(version=1, bytes_received=received, total_bytes=1000, elapsed_ms=int(elapsed_s * 1000))

    assert poll_interval(None, 0.2) == 0.2
    assert poll_interval(flight(0), 0.2) == 0.2  # no rate yet
    assert poll_interval(flight(999), 0.2) == 0.2  # nearly done: as often as asked
    assert poll_interval(flight(500), 0.2) == 0.5  # 10 s left: a twentieth of it
    assert poll_interval(flight(10), 0.2) == 2.0  # minutes left: every 2 s at most


def test_should_abandon():
    class Own:  # an UploadCall's counters: 200 of 1000 bytes in 4 s, 16 s left
        started, last_progress, sent, total_bytes = 0.0, 4.0, 200, 1000

    def flight(received, elapsed_s, node="other"):
        return pb.UploadProgress(version=1, node_id=node, bytes_received=received, total_bytes=1000,
                                 elapsed_ms=int(elapsed_s * 1000))

    assert should_abandon(Own(), flight(800, 4.0), "me")  # 1 s left against our 16
    assert not should_abandon(Own(), flight(100, 4.0), "me")  # 36 s left
    assert not should_abandon(Own(), flight(800, 4.0, node="me"), "me")  # the one ending first is ours
    assert not should_abandon(Own(), flight(800, 1.0), "me")  # its rate not measured long enough
    assert not should_abandon(Own(), None, "me")
    young = Own()
    young.last_progress = 1.0
    assert not should_abandon(young, flight(800, 4.0), "me")  # ours not measured long enough


def test_an_upload_has_no_call_deadline_but_a_stalled_one_is_cancelled(swarm):
    s, a, _, sha = swarm
    a.client.timeout_s = 1.0  # every other call's deadline: an upload must outlive it
    n = chunks_of(a)
    a.pause_at, a.pause_s = 2, 4.0
    call = a.start_upload(1, sha, stall_s=1.0)
    with pytest.raises(CoordinatorError) as info:
        call.result()
    assert info.value.code == "DEADLINE_EXCEEDED" and "no progress for 1 s" in info.value.detail
    assert 0 < call.sent < call.total_bytes
    deadline = time.monotonic() + 10
    while s.coordinator.uploads.progress(1) is not None and time.monotonic() < deadline:
        time.sleep(0.1)  # the coordinator sees the cancelled stream end
    assert s.coordinator.uploads.progress(1) is None
    assert not [p for p in (s.data_dir / "snapshots").iterdir() if p.name.startswith(".upload")]
    a.pause_at, a.delay_s = None, 2.5 / n  # ~2.5 s in all: longer than the 1 s call timeout
    started = time.monotonic()
    reply = a.start_upload(1, sha, stall_s=2.0).result()
    assert time.monotonic() - started > 1.5
    assert reply.published == pb.PolicySnapshotRef(version=1, sha256=sha)


def test_a_waiting_contributor_lets_a_slow_upload_finish(swarm):
    s, a, b, sha = swarm
    a.delay_s = 4.0 / chunks_of(a)  # ~4 s: longer than B's timeout without progress
    seen: list[pb.UploadProgress] = []

    def b_heartbeat():
        hb = b.heartbeat()
        if hb.HasField("upload"):
            seen.append(pb.UploadProgress.FromString(hb.upload.SerializeToString()))
        return hb

    rate = UploadRate()
    rate.measured = 1000.0  # B measured a link far slower than A's: racing would not help
    fa = PublicationFollower(a, a.heartbeat, timeout_s=2.0, poll_s=0.05)
    fb = PublicationFollower(b, b_heartbeat, timeout_s=2.0, poll_s=0.05, rate=rate, grace_s=0.2)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("a", fa.follow(1, sha, rank=0)))
    t.start()
    published = fb.follow(1, sha)
    t.join(30)
    assert published == pb.PolicySnapshotRef(version=1, sha256=sha) == result["a"]
    assert fb.bytes_sent == 0 and fb.uploads == 0  # B never uploaded
    assert fa.uploads == 1 and not fa.gave_way
    assert fa.bytes_sent >= version_file(a.training_state()).total_bytes
    assert seen and {f.node_id for f in seen} == {a.node_id}
    assert [f.bytes_received for f in seen] == sorted(f.bytes_received for f in seen)
    assert seen[-1].bytes_received > seen[0].bytes_received
    assert not b.heartbeat().HasField("upload")  # nothing of version 2 streams


@pytest.mark.parametrize("link", ["crawls", "stalls"])
def test_a_crawling_or_stalled_upload_is_raced_and_the_loser_refused_mid_stream(swarm, link):
    s, a, b, sha = swarm
    n = chunks_of(a)
    if link == "crawls":
        a.delay_s = 60.0 / n  # a minute: B (assumed 50 MB/s, not measured) would take milliseconds
    else:
        a.pause_at, a.pause_s = 2, 3.0
    slow = a.start_upload(1, sha, stall_s=30.0)
    fb = PublicationFollower(b, b.heartbeat, timeout_s=10.0, poll_s=0.05, grace_s=0.3, stall_s=1.0)
    started = time.monotonic()
    published = fb.follow(1, sha)
    assert published == pb.PolicySnapshotRef(version=1, sha256=sha)
    assert time.monotonic() - started < 5.0
    assert fb.bytes_sent >= version_file(b.training_state()).total_bytes
    with pytest.raises(CoordinatorError) as info:
        slow.result()
    assert info.value.code == "FAILED_PRECONDITION" and "published while this upload streamed" in info.value.detail
    assert slow.sent < slow.total_bytes  # refused at its next chunk, not after sending everything
    assert s.coordinator.log.last("snapshot_published").payload["uploader"] == b.node_id
    metric = s.coordinator.metrics.registry.get_sample_value
    assert metric("grpo_coordinator_uploads_in_flight") == 0
    assert metric("grpo_coordinator_bytes_received_total") > slow.total_bytes  # the refused one's bytes count too


def test_uploads_in_flight_reserve_the_disk(swarm, monkeypatch):
    s, a, b, sha = swarm
    total = version_file(a.training_state()).total_bytes
    # nobody reserves the whole disk by announcing it: at most 4 x the current version + 512 MiB
    current = s.coordinator.manifest(None).total_bytes
    with pytest.raises(CoordinatorError) as info:
        b.client._upload(4 * current + (512 << 20) + 1, b"", lambda: iter(()), pb.PolicySnapshotRef(version=1, sha256=sha),
                         timeout_s=30).result()
    assert info.value.code == "INVALID_ARGUMENT" and "the current version's" in info.value.detail
    real = service_module.shutil.disk_usage

    def tight(path):  # room for one version and a half
        return real(path)._replace(free=int(1.5 * total))

    monkeypatch.setattr(service_module.shutil, "disk_usage", tight)
    a.delay_s = 3.0 / chunks_of(a)
    first = a.start_upload(1, sha)
    streaming(s, 10)
    with pytest.raises(CoordinatorError) as info:
        b.upload(1, sha)
    assert info.value.code == "RESOURCE_EXHAUSTED" and "beside the uploads in flight" in info.value.detail
    assert first.result().published.version == 1


def test_a_designated_uploader_on_a_slow_link_gives_way_to_a_faster_one(swarm):
    s, a, b, sha = swarm
    a.delay_s = 60.0 / chunks_of(a)  # A, designated, on a crawling link
    b.delay_s = 5.0 / chunks_of(b)  # B: 5 s
    fa = PublicationFollower(a, a.heartbeat, timeout_s=30.0, poll_s=0.05)
    fb = PublicationFollower(b, b.heartbeat, timeout_s=30.0, poll_s=0.05, grace_s=0.3)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("a", fa.follow(1, sha, rank=0)))
    started = time.monotonic()
    t.start()
    assert fb.follow(1, sha) == pb.PolicySnapshotRef(version=1, sha256=sha)
    t.join(30)
    assert result["a"] == pb.PolicySnapshotRef(version=1, sha256=sha)
    assert time.monotonic() - started < 15.0
    total = version_file(a.training_state()).total_bytes
    assert fa.gave_way and fa.uploads == 1 and fa.bytes_sent < total / 3  # A cancelled it: B's would end first
    assert fa.rate.measured is not None and fa.rate.measured < fb.rate.measured  # and learned its link is slow
    assert fb.uploads == 1 and fb.bytes_sent >= total
    assert s.coordinator.log.last("snapshot_published").payload["uploader"] == b.node_id


def test_the_coordinator_cancels_an_upload_that_stops_sending(tmp_path):
    world = two_contributors(tmp_path, limits=ServerLimits(upload_idle_s=1.0))
    s, a, b, sha = next(world)
    try:
        a.pause_at, a.pause_s = 1, 6.0  # one chunk, then silence with the stream open
        call = a.start_upload(1, sha, stall_s=30.0)  # the client would wait far longer
        streaming(s, 5)
        assert s.coordinator.uploads.progress(1) is not None and s.coordinator.uploads.reserved_bytes() > 0
        started = time.monotonic()
        while s.coordinator.uploads.progress(1) is not None and time.monotonic() - started < 10:
            time.sleep(0.05)
        assert time.monotonic() - started < 4.0  # freed by the coordinator, not by the sender's return
        assert s.coordinator.uploads.reserved_bytes() == 0
        assert s.coordinator.metrics.registry.get_sample_value("grpo_coordinator_uploads_in_flight") == 0
        assert not [p for p in (s.data_dir / "snapshots").iterdir() if p.name.startswith(".upload")]
        with pytest.raises(CoordinatorError) as info:
            call.result()
        assert info.value.code == "CANCELLED"
        b.delay_s = 0.0
        assert b.upload(1, sha).published.version == 1  # the others publish as usual
    finally:
        world.close()


def test_a_peer_that_shows_a_fast_upload_and_stalls_makes_the_others_give_way_once(swarm):
    """The attack on giving way: B opens a fast upload, stops half-way, and does it again. A gives
    way the first time, races again once B's stream is idle, and does not give way the second time."""
    s, a, b, sha = swarm
    n = chunks_of(b)
    a.delay_s = 8.0 / chunks_of(a)  # A: 8 s for the whole version
    b.delay_s, b.pause_at, b.pause_s = 2.5 / (n // 2), n // 2, 60.0  # B: half of it in 2.5 s, then silence
    fa = PublicationFollower(a, a.heartbeat, timeout_s=30.0, poll_s=0.05, stall_s=1.0)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("a", fa.follow(1, sha, rank=0)))
    started = time.monotonic()
    t.start()
    calls = []
    try:
        calls.append(b.start_upload(1, sha, stall_s=60.0))
        while not fa.gave_way and time.monotonic() - started < 10:
            time.sleep(0.05)
        assert fa.gave_way  # the first time, A believed B
        time.sleep(3.0)  # B silent: A races again; then B shows another fast start
        calls[0].cancel()
        while any(f.node_id == b.node_id for f in s.coordinator.uploads._flights):
            time.sleep(0.02)  # (one stream per node at a time)
        calls.append(b.start_upload(1, sha, stall_s=60.0))
        t.join(30)
    finally:
        for call in calls:
            call.cancel()
    assert result["a"] == pb.PolicySnapshotRef(version=1, sha256=sha)
    assert s.coordinator.log.last("snapshot_published").payload["uploader"] == a.node_id
    assert fa.uploads == 2 and fa.bytes_sent >= version_file(a.training_state()).total_bytes
    assert time.monotonic() - started < 20.0


def test_the_next_round_stays_open_while_the_version_uploads(tmp_path):
    """Nodes that join during a slow publication sample the next round; closing it (full, or timed
    out) would make it the producing round and drop the reports behind the upload in flight."""
    world = two_contributors(tmp_path, round_timeout_s=2.0)
    s, a, b, sha = next(world)
    c, d = HonestNode(s.address, tmp_path / "c"), HonestNode(s.address, tmp_path / "d")
    try:
        a.delay_s = 4.0 / chunks_of(a)
        call = a.start_upload(1, sha, stall_s=30.0)
        streaming(s, 5)
        submit_round(c)
        time.sleep(2.2)  # past round 1's timeout
        assert c.heartbeat().current_round == 1  # held open: the upload moves and ends within 2 s
        reply = submit_round(d)
        assert not reply.round_closed and s.coordinator.round_samples() >= 16  # full, and held
        assert call.result().published == pb.PolicySnapshotRef(version=1, sha256=sha)  # round 0's work counts
        hb = c.heartbeat()
        assert hb.current_round == 2 and hb.current.version == 1  # closed by the publication
        closed = s.coordinator.log.last("round_closed").payload
        assert closed["round"] == 1 and set(closed["weights"]) == {c.node_id, d.node_id}
        entries = list(c.client.get_log())  # the held round replays like any other
        hooks = load_hooks(entries[0].payload, model="tiny", snapshots=str(s.data_dir / "snapshots"),
                           allow_plugin_rewards=True)
        result = audit(entries, hooks, trusted_signers=[c.reply.coordinator_public_key])
        assert result.ok, result.problem
    finally:
        for node in (c, d):
            node.client.close()
        world.close()


def test_a_trickling_upload_does_not_hold_the_next_round(tmp_path):
    """An upload that at its rate would end later than a round's timeout is not waited for: once
    round 0's contributors have moved on to round 1, it closes on time. Before they have, it does
    not close, moving upload or not: the newcomer that did round 1's work alone would hold all of
    the producing round's weight (the lone-round attack, tests/test_snapshot_quorum.py)."""
    world = two_contributors(tmp_path, round_timeout_s=2.0)
    s, a, b, sha = next(world)
    c = HonestNode(s.address, tmp_path / "c")
    try:
        a.pause_at, a.pause_s = 2, 60.0  # two chunks, then a trickle far slower than that
        call = a.start_upload(1, sha, stall_s=30.0)
        streaming(s, 5)
        submit_round(c)
        time.sleep(2.2)
        flight = s.coordinator.uploads.progress(1)
        assert flight is not None and flight.bytes_received > 0 and flight.idle_ms < 20_000  # moving, ...
        assert c.heartbeat().current_round == 1  # ... and round 0's contributors still at it
        for node in (a, b):  # they give up on version 1 and start round 1
            node.heartbeat()
        assert c.heartbeat().current_round == 2  # round 1 closed on time, the trickle not waited for
        call.cancel()
    finally:
        c.client.close()
        world.close()


def test_one_upload_stream_per_node_and_at_most_half_the_workers(tmp_path):
    """Each stream holds a server worker while its sender keeps it moving: one per node, and no more
    than half the workers in all, so heartbeats and submissions are still served."""
    world = two_contributors(tmp_path, limits=ServerLimits(workers=2))
    s, a, b, sha = next(world)
    try:
        a.delay_s = 3.0 / chunks_of(a)
        first = a.start_upload(1, sha)
        streaming(s, 5)
        for node, why in ((a, "already in flight"), (b, "the most this coordinator takes")):
            with pytest.raises(CoordinatorError) as info:
                node.upload(1, sha)
            assert info.value.code == "RESOURCE_EXHAUSTED" and why in info.value.detail
        assert b.heartbeat().upload.node_id == a.node_id  # the other worker still answers
        assert first.result().published.version == 1
    finally:
        world.close()


def test_a_node_without_a_ticket_stops_waiting_once_the_round_gave_up_its_version(swarm, tmp_path):
    """C holds no ticket of round 0 and waits for version 1. While A and B (its ticket holders) may
    still publish it, C waits; once both started sampling round 1 with nothing uploading (their
    averaging failed), C stops at once instead of waiting out the timeout — the next round waits for
    every live node's work, C's included."""
    s, a, b, sha = swarm
    c = HonestNode(s.address, tmp_path / "c")
    follower = PublicationFollower(c, lambda: c.heartbeat(sample=False), timeout_s=30.0, poll_s=0.05)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("c", follower.follow(1, None, round_index=0)))
    t.start()
    time.sleep(0.5)
    assert t.is_alive()  # A and B have not moved on: version 1 may still come
    a.heartbeat()  # A starts sampling round 1 (binds its version): B still may publish
    time.sleep(0.5)
    assert t.is_alive()
    moved = time.monotonic()
    b.heartbeat()
    t.join(10)
    assert not t.is_alive() and result["c"] is None and time.monotonic() - moved < 2.0
    assert "moved on without it" in follower.note
    c.client.close()
