"""Following a new version to its publication: who uploads it, when another contributor races, when
to give up.

Every contributor of a round computes the same version and reports its hash; one upload of its
bytes publishes it. The designated contributor (rank 0 of :func:`upload_rank`: the smallest node id)
uploads at once. The others wait and watch the coordinator's view of the upload in flight
(``HeartbeatResponse.upload``); rank k may start its own after k grace periods (so that when the
designated one fails, one other races at a time, not all of them), and then only when none
streams, when it has stalled, or when at its rate so
far it would end more than ``RACE_FACTOR`` times later than their own would at their measured
upload rate (:func:`should_race`) — so on a slow home uplink they let the designated upload run
instead of all sending the same gigabytes at once, and a designated peer that stalls or trickles
(it may be hostile) holds the swarm back by at most that factor. The first complete upload
publishes; the coordinator refuses the others mid-stream, and an uploader that sees another upload
ending before its own cancels it (:func:`should_abandon`; once a version, so that a peer showing
a fast upload that then stalls costs the others one stall at most).

A node learns its own upload rate from its uploads, raced or not (:class:`UploadRate`); before the
first it assumes ``ASSUMED_BYTES_PER_S``, so it races a slow designated uploader once and then knows.
The wait gives up only after ``timeout_s`` in which no upload made progress.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.errors import CoordinatorError
from grpo_swarm.protocol.rpc import upload_seconds_left
from grpo_swarm.protocol.upload_call import DEFAULT_STALL_S, UploadCall

from .participant import Participant
from .polling import PollBackoff

log = logging.getLogger(__name__)

GRACE_S = 10.0  # how long each contributor before a node (by rank) has to upload before it may race
MAX_RANK = 6  # contributors ranked further wait as long as this one
STALL_S = 20.0  # an upload in flight that received nothing for this long has stalled
RACE_FACTOR = 2.0  # race an upload in flight only when it would end this many times later than ours
ASSUMED_BYTES_PER_S = 50e6  # this node's upload rate before it has measured one
RETRY_S = 0.5  # a refused upload (the others' reports not in yet) is tried again after this, doubling
MAX_RETRY_S = 10.0
MIN_MEASURED_S = 2.0  # an upload shorter than this says little about the link (gRPC's buffers)
MAX_POLL_S = 2.0  # heartbeats while a long upload runs: a 100-node swarm waiting minutes need not poll at 5 Hz


def upload_rank(contributors: list[str], node_id: str) -> int:
    """``node_id``'s place among the contributors by node id: 0 uploads at once (also when the list
    is empty), k waits k grace periods before it may race (at most ``MAX_RANK``)."""
    ids = sorted(set(contributors))
    return min(ids.index(node_id) if node_id in ids else len(ids), MAX_RANK)


def measured_rate(call: UploadCall) -> float | None:
    """Bytes per second ``call`` has sent so far; None before ``MIN_MEASURED_S`` of sending."""
    elapsed = call.last_progress - call.started
    return call.sent / elapsed if call.sent > 0 and elapsed >= MIN_MEASURED_S else None


class UploadRate:
    """This node's upload rate in bytes per second, from its own uploads (the latest counts most)."""

    def __init__(self, assumed: float = ASSUMED_BYTES_PER_S):
        self.measured: float | None = None
        self.assumed = assumed

    def observe(self, call: UploadCall) -> None:
        rate = measured_rate(call)
        if rate is not None:
            self.measured = rate if self.measured is None else 0.5 * (self.measured + rate)

    @property
    def bytes_per_s(self) -> float:
        return self.measured if self.measured is not None else self.assumed


def should_race(flight: pb.UploadProgress | None, total_bytes: int, own_bytes_per_s: float, *,
                stall_s: float = STALL_S, race_factor: float = RACE_FACTOR) -> bool:
    """Whether a contributor starts an upload now (a designated one at once, the others after the
    grace period): none streams; it stalled; or at its rate so far it would end more than
    ``race_factor`` times later than ours would at ``own_bytes_per_s``."""
    if flight is None:
        return True
    if flight.idle_ms >= 1000 * stall_s:
        return True
    left_s = upload_seconds_left(flight)
    if left_s is None:
        return flight.elapsed_ms >= 1000 * stall_s  # opened but nothing arrived: stalled from the start
    return left_s > race_factor * total_bytes / own_bytes_per_s


def should_abandon(own: UploadCall, flight: pb.UploadProgress | None, node_id: str) -> bool:
    """Whether to cancel our upload in flight: another one (the coordinator reports the one that will
    end first) will end before ours, both rates measured over ``MIN_MEASURED_S`` at least. Only
    the first complete upload publishes; the rest of ours would be spent for nothing."""
    if flight is None or flight.node_id == node_id or flight.elapsed_ms < 1000 * MIN_MEASURED_S:
        return False
    ours, theirs = measured_rate(own), upload_seconds_left(flight)
    return ours is not None and theirs is not None and theirs < (own.total_bytes - own.sent) / ours


def poll_interval(flight: pb.UploadProgress | None, poll_s: float) -> float:
    """Seconds to the next heartbeat while waiting: ``poll_s``, up to ``MAX_POLL_S`` while an upload
    in flight has more than 20 times that left (its end is seen at most 5 % of its time late)."""
    left = None if flight is None else upload_seconds_left(flight)
    return poll_s if left is None else min(MAX_POLL_S, max(poll_s, left / 20))


def round_gave_up(hb: pb.HeartbeatResponse, round_index: int, flight: pb.UploadProgress | None) -> bool:
    """Whether round ``round_index`` will publish nothing more: a later round closed, or every one of
    its ticket holders started sampling the next round with no upload of its version in flight (a
    contributor waits for its version's publication before it samples again; one whose averaging
    failed samples at once). A node without a ticket otherwise waited ``timeout_s`` for nothing while
    the next round, which now waits for every live node's work, waited for it."""
    if hb.current_round > round_index + 1:
        return True
    holders = {bytes(k) for k in hb.round_participants}
    return (hb.current_round == round_index + 1 and bool(holders) and flight is None
            and holders <= {bytes(k) for k in hb.round_moved_on})


class PublicationFollower:
    """Waits for a version's publication, uploading it when this node should (see the module)."""

    def __init__(self, participant: Participant, heartbeat: Callable[[], pb.HeartbeatResponse], *,
                 timeout_s: float, poll_s: float = 0.2, rate: UploadRate | None = None, grace_s: float = GRACE_S,
                 stall_s: float = STALL_S, upload_stall_s: float = DEFAULT_STALL_S):
        self.participant, self.heartbeat = participant, heartbeat
        self.timeout_s, self.poll_s, self.grace_s, self.stall_s = timeout_s, poll_s, grace_s, stall_s
        self.upload_stall_s = upload_stall_s
        self.rate = rate or UploadRate()
        self.bytes_sent = 0  # by this node's uploads in the last follow()
        self.uploads = 0  # uploads this node started in the last follow()
        self.gave_way = False  # whether it cancelled one because another would end first
        self.note = ""

    def follow(self, version: int, sha: bytes | None, *, rank: int = 1,
               round_index: int | None = None) -> pb.PolicySnapshotRef | None:
        """Wait until ``version`` (or a later one) is published and return what was; None after
        ``timeout_s`` without progress. With ``sha`` (this node computed the version) upload it as
        the module says: at once at ``rank`` 0, else after ``rank`` grace periods when
        :func:`should_race`; an upload of ours that another will beat is cancelled
        (:func:`should_abandon`). ``round_index``: the round that produces ``version``; None as soon
        as that round is over without it (:func:`round_gave_up`), instead of after the timeout."""
        p = self.participant
        start = last_progress = time.monotonic()
        next_try, pause = start + min(rank, MAX_RANK) * self.grace_s, RETRY_S
        total = None
        call: UploadCall | None = None
        polls = PollBackoff(self.poll_s)
        self.bytes_sent, self.uploads, self.gave_way, self.note = 0, 0, False, ""
        try:
            while True:
                hb = self.heartbeat()
                if hb.current.version >= version:
                    return hb.current
                now = time.monotonic()
                flight = hb.upload if hb.HasField("upload") and hb.upload.version == version else None
                if round_index is not None and round_gave_up(hb, round_index, flight):
                    self.note = f"v{version} was not published: round {round_index}'s contributors moved on without it"
                    return None
                if flight is not None and flight.idle_ms < 1000 * self.stall_s:
                    last_progress = now  # an upload moves (ours shows here too, once accepted)
                if call is not None:
                    # once: a peer that shows a fast upload and then stalls must not stall us twice
                    beaten = not self.gave_way and should_abandon(call, flight, p.node_id)
                    if beaten:
                        self.gave_way = True
                        log.info("v%d: %s will end first; cancelling this node's upload", version, _why(flight))
                        call.cancel()
                    if beaten or call.done() or call.stalled():
                        self._finish(call, version, quiet=beaten)
                        call, next_try, pause = None, now + pause, min(2 * pause, MAX_RETRY_S)
                        continue
                elif sha is not None and now >= next_try:
                    if total is None:
                        total = sum(t.nbytes for t in p.training_state().values())
                    if should_race(flight, total, self.rate.bytes_per_s, stall_s=self.stall_s):
                        if flight is not None or self.uploads:
                            log.info("v%d: %s; uploading it", version, _why(flight))
                        call = p.start_upload(version, sha, stall_s=self.upload_stall_s)
                        self.uploads += 1
                        continue
                if now - last_progress > self.timeout_s:
                    self.note = f"v{version} was not published: no upload progressed for {self.timeout_s:.0f} s"
                    return None
                time.sleep(poll_interval(flight, polls.next()))
        finally:
            if call is not None:
                if not call.done():
                    call.cancel()  # another peer's upload published it first
                self._finish(call, version, quiet=True)

    def _finish(self, call: UploadCall, version: int, quiet: bool = False) -> None:
        self.rate.observe(call)
        self.bytes_sent += call.sent
        try:
            call.result(poll_s=0.0)
        except CoordinatorError as e:  # no quorum yet, another peer published first, a stall
            if not quiet:
                log.info("upload of v%d: %s: %s", version, e.code, e.detail)


def _why(flight: pb.UploadProgress | None) -> str:
    if flight is None:
        return "no upload of it in flight"
    return (f"the upload in flight from {flight.node_id[:12]} has {flight.bytes_received} of "
            f"{flight.total_bytes} bytes after {flight.elapsed_ms / 1000:.0f} s "
            f"(idle {flight.idle_ms / 1000:.0f} s)")
