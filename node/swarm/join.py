"""``grpo-node join``: one swarm peer's loop.

Per round (synchronous: every peer samples with the version the swarm holds, the round's accepted
work is averaged, every honest peer takes the same step)::

    heartbeat ─ assignment, bound version ─► sample (keyed noise) ─► proofs ─► SubmitProofs
        ─► wait for the round to close ─► final ticket ─► gradient of the accepted groups
        ─► verified averaging with the round's other ticket holders ─► AdamW step ─► version + 1
        ─► report its parameter hash ─► wait for the publication (the designated peer uploads; the
           others, one rank at a time, race it only when it stalls or crawls: :mod:`.publication`)
        ─► a peer whose hash differs from the published one loads the snapshot

A peer without a final ticket (nothing accepted, late, voided) skips the averaging and loads the
new version once it is published. An averaging round that fails (too few peers, timeouts, a
peer caught cheating) takes no step: the swarm samples the next round with the same version.
Peers that the averaging excluded are reported to the coordinator (``ReportPeer``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.client import CoordinatorClient, CoordinatorError
from grpo_swarm.protocol.errors import ProtocolError
from grpo_swarm.protocol.identity import Identity
from grpo_swarm.protocol.pacing import NODE_PACE

from ..trainer import ScoredBatch
from .dht import connect_peers, connected_peers, visible_maddrs
from .heartbeats import HeartbeatKeeper
from .goodbye_watcher import GoodbyeWatcher
from .round_batch_file import FILE_NAME as ROUND_BATCH_FILE, drop_round_batch, load_round_batch, save_round_batch
from .shared_memory import prepare_shared_memory
from .participant import Participant
from .peer_dialing import MAX_BOOTSTRAP_PEERS, DialBackoff, addresses, dial_candidates, peer_id
from .polling import PollBackoff
from .publication import GRACE_S, PublicationFollower, upload_rank
from .share_sketch import DEFAULT_AUDIT_FRACTION
from .sit_outs import DEFAULT_SIT_OUT_LIMIT

log = logging.getLogger(__name__)
COMPRESSIONS = ("none", "fp16", "8bit")
MIN_STRAGGLER_WAIT_S = 2.0  # the averager's min_matchmaking_time: the wait when gradients take no time
PART_SIZE_LIMITS = (64 << 10, 16 << 20)  # --part-size: larger parts cost less CPU, smaller ones pipeline better
MAX_SWARM_RESTARTS = 5  # rounds in a row that restarted the DHT / averager and still did not average: stop
RESUMED = "resumed after a restart"  # the note of a round a restarted node averaged from its saved batch
PEERS_POLL_S = 1.0  # while waiting for swarm.min_peers live nodes, how often the coordinator is asked


def compression_named(name: str):
    """hivemind compression for ``--compression``: fp32, fp16, or 8-bit parts with fp16 averages."""
    from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization

    kinds = {"none": NoCompression, "fp16": Float16Compression, "8bit": Uniform8BitQuantization}
    if name not in kinds:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {name!r}")
    return kinds[name]()


class SwarmSideRestartFailed(RuntimeError):
    """The DHT, its p2p daemon or the averager could not be started again after one of them died."""


class SwarmSideFailing(Exception):
    """The node restarted its swarm side in MAX_SWARM_RESTARTS rounds in a row (or could not) without
    averaging once: something on this machine keeps killing or wedging it, and retrying forever
    would only fail rounds the others wait for. Not a RuntimeError, so the round loop lets it out."""


class NodeSuperseded(RuntimeError):
    """Another process of this node's key registered or reported in after this one (this node restarted
    elsewhere, or a copied key): the coordinator refuses this one, and one key runs one node."""


class NodeBanned(RuntimeError):
    """The coordinator refuses this node: it was banned (by reports of its round's members or by the
    operator). Retrying cannot help; the run's operator can lift it (``grpo-coordinator unban``)."""


@dataclass
class JoinOptions:
    coordinator: str
    identity_path: Path
    workdir: Path
    overrides: Sequence[str] = ()
    host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: Sequence[str] | None = None
    initial_peers: Sequence[str] = ()
    client_mode: bool = False
    compression: str = "none"  # none | fp16 | 8bit (see COMPRESSIONS)
    part_size_bytes: int | None = None  # averaging part size (None: the averager's, 1 MiB); see PART_SIZE_LIMITS
    norm_bound: float = 1e4
    audit_fraction: float = DEFAULT_AUDIT_FRACTION  # rows the share audit reads (share_sketch.py)
    rounds: int | None = None  # stop after this many rounds (None: until interrupted)
    poll_s: float = 0.2


@dataclass
class RoundRecord:
    """What one round did, for the live view and ``swarm.jsonl``."""

    round: int
    version: int
    reward_mean: float | None = None
    samples: int = 0
    accepted: int = 0
    averaged: bool = False
    peers: int = 0
    excluded: dict = field(default_factory=dict)
    published: bool = False
    resynced: bool = False
    lag: int = 0
    dht_peers: int = 0  # peers this node's DHT is connected to
    averaging_s: float = 0.0  # time in the verified averaging (0 when it took no part)
    audit_s: float = 0.0  # of which the share audit of the attempt that decided the round (reveal, sketch, ...)
    grads_in_place: bool = False  # the gradient was computed in the averager's buffers (no copies)
    bytes_sent: int = 0  # gradient parts and averages this node sent in the averaging (all attempts)
    bytes_received: int = 0
    upload_bytes: int = 0  # bytes this node streamed to the coordinator uploading versions
    restarted: str = ""  # why this node restarted its DHT and averager in this round (.liveness), if it did
    seconds: float = 0.0
    held_version: int = -1  # the version this node holds when the round ends
    sha256: str = ""  # hash of the weights + optimizer state it holds then (what the publication names)
    ended: float = 0.0  # wall-clock time (Unix seconds) the round ended at
    note: str = ""
    # seconds in each step (meet, sync, sample, submit, wait, gradient, averaging, step, publish; restart)
    phases: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(self.__dict__)


class PhaseClock:
    """Seconds a round spends in each of its steps, lap by lap."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, phase: str) -> None:
        """Add the time since the last lap (or the start) to ``phase``."""
        now = time.monotonic()
        self.phases[phase] = round(self.phases.get(phase, 0.0) + now - self._last, 3)
        self._last = now


class SwarmPeer:
    """A participant, its DHT and its verified averager, and the round loop that drives them."""

    # builds the averager (VerifiedAverager's keyword arguments); None: VerifiedAverager itself.
    # Tests put a misbehaving averager here (tests/swarm_join_node.py)
    averager_factory: Callable[..., object] | None = None

    def __init__(self, opts: JoinOptions, *, on_round: Callable[[RoundRecord], None] | None = None):
        prepare_shared_memory()  # first, before any child is forked (.shared_memory says why)
        self._goodbye = GoodbyeWatcher.off()  # (started once the node is registered and announced)
        self.opts, self.on_round = opts, on_round
        self.identity = Identity.load_or_create(opts.identity_path)
        # a fresh instance id per process: a restart of this node takes over its key at once, and a
        # second process of the key (another machine) is told so (coordinator/instances.py)
        self.client = CoordinatorClient(opts.coordinator, self.identity, timeout_s=60, instance=os.urandom(16),
                                         pace=NODE_PACE)
        self.participant = p = Participant(self.client, opts.workdir, overrides=opts.overrides)
        swarm = p.run["swarm"]
        self._held: tuple | None = None  # (snapshot ref, version, state hash) of what this node holds
        self._timeouts = timeouts = averaging_timeouts(swarm)
        self._last_result = None  # the last averaging's result: says whether its averager wedged or died
        self._dials = DialBackoff()  # listed peers this node could not reach, and when to try again
        self._start_swarm_side(p.reply.peers)
        self.round_timeout_s = float(swarm.get("round_timeout_s", 600.0))
        self.sender_timeout_s = timeouts["sender_timeout"]
        self.straggler_wait = float(swarm.get("straggler_wait", 1.0))
        self.matchmaking_timeout_s = timeouts["matchmaking_timeout"]
        self._publication = PublicationFollower(p, self.heartbeat, timeout_s=self.round_timeout_s, poll_s=opts.poll_s,
                                                grace_s=float(swarm.get("upload_grace_s", GRACE_S)))
        self._clock = PhaseClock()
        self._round_batch_path = p.workdir / ROUND_BATCH_FILE
        self._last_hb: pb.HeartbeatResponse | None = None  # the latest reply (its round_moved_on: _gone)
        # liveness while sampling, computing the gradient or averaging (see .heartbeats)
        self._keeper = HeartbeatKeeper(lambda: self.participant.heartbeat(multiaddrs=self.maddrs, sample=False),
                                       float(swarm.get("heartbeat_interval_s", 10.0)))
        self.heartbeat()  # announce the DHT addresses
        self._keeper.start()
        # says this node's goodbye if it dies without one (killed, out of memory): no round waits for it
        self._goodbye = GoodbyeWatcher.start(
            address=opts.coordinator, private_key_pem=self.identity.private_key_pem(),
            coordinator_key=bytes(p.reply.coordinator_public_key), instance=self.client.instance,
            round_batch=self._round_batch_path, version=p.snapshot.version, live=self._last_hb.live_nodes)

    # -- the swarm side: DHT, p2p daemon, averager
    def _start_swarm_side(self, listed: Sequence[pb.PeerAddress]) -> tuple[float, float]:
        """Start the DHT (joined through the listed peers worth dialling: :mod:`.peer_dialing`) and the
        averager; the seconds each took."""
        from .liveness import start_swarm_side

        started = time.monotonic()
        dht_ready = started

        def start_dht():
            nonlocal dht_ready
            dht = self._start_dht(addresses(dial_candidates(listed)[:MAX_BOOTSTRAP_PEERS]))
            dht_ready = time.monotonic()
            return dht

        self.dht, self.averager = start_swarm_side(start_dht, self._build_averager)
        own = self.identity.peer_id_base58
        # the coordinator takes at most 8, each ending in this node's own peer id
        self.maddrs = [a for a in visible_maddrs(self.dht) if a.endswith(f"/p2p/{own}")][:8]
        return dht_ready - started, time.monotonic() - dht_ready

    def _build_averager(self, dht):
        """This node's averager on ``dht``, not started yet."""
        from .averaging import VerifiedAverager
        from .tickets import weight_mode_for_loss

        p, opts = self.participant, self.opts
        return (self.averager_factory or VerifiedAverager)(
            p.trainer.trainable, dht=dht, prefix=f"{_safe(p.run_id)}-grads", identity=self.identity,
            coordinator_key=bytes(p.reply.coordinator_public_key), run_id=p.run_id,
            weight_mode=weight_mode_for_loss(p.train_cfg.grpo.loss_type), norm_bound=opts.norm_bound,
            compression=compression_named(opts.compression), part_size_bytes=opts.part_size_bytes,
            audit_fraction=opts.audit_fraction, require_final_ticket=True, min_group_size=1, min_contributors=1,
            client_mode=opts.client_mode, keep_freed_memory=p.train_cfg.run.keep_freed_memory,
            sit_out_limit=int(p.run["swarm"].get("sit_out_limit", DEFAULT_SIT_OUT_LIMIT)), start=False,
            **self._timeouts)

    def _ensure_swarm_side(self, hb: pb.HeartbeatResponse) -> str:
        """Restart the DHT, its p2p daemon and the averager when one of them died, or the last
        averaging step wedged (:mod:`.liveness`): otherwise every later round would fail the same way
        until the user restarted the node. Same key, so the same peer id, on fresh ports, announced
        with the next heartbeat. Returns why it restarted ("" when all was well)."""
        from .liveness import stop_swarm_side, swarm_fault

        why = swarm_fault(self.averager, self.dht, self._last_result)
        if why is None:
            return ""
        log.warning("restarting this node's DHT and averager: %s", why)
        self._last_result = None
        started = time.monotonic()
        memory = getattr(self.averager, "break_memory", None)  # whom this node saw break: kept across the restart
        stop_swarm_side(self.averager, self.dht)
        stopped = time.monotonic()
        try:
            seconds = self._start_swarm_side(hb.peers)
            if memory is not None and hasattr(self.averager, "break_memory"):
                self.averager.break_memory = memory
        except Exception as e:  # noqa: BLE001 - the round loop waits and the next round tries again
            raise SwarmSideRestartFailed(f"could not restart this node's DHT and averager ({why}): "
                                         f"{type(e).__name__}: {e}") from e
        self.heartbeat()  # the new addresses
        self._clock.lap("restart")
        log.warning("restarted in %.1f s (stopping %.1f s, DHT %.1f s, averager %.1f s)",
                    time.monotonic() - started, stopped - started, *seconds)
        return why[:200]

    def _dht_peers(self) -> int:
        """How many peers this node's DHT is connected to, for the view; -1 when the DHT cannot say (its
        daemon died: the averaging's check restarts it, and the round goes on)."""
        try:
            return len(connected_peers(self.dht))
        except Exception as e:  # noqa: BLE001 - a number in the live view
            log.warning("could not ask the DHT for its peers: %s", e)
            return -1

    def _start_dht(self, listed: Sequence[str]):
        """This node's DHT, joined through ``--initial-peer`` and the peers the coordinator listed. When
        only listed peers were tried and none answered, they may just have left (the coordinator lists
        peers seen within the last few heartbeats): the node starts a DHT of its own and each round
        dials the peers then listed (:meth:`_meet`), saying what to check should none ever answer.
        Peers the user named must answer: that failure ends the join."""
        from .dht import DHTStartError, start_dht

        opts = self.opts
        start = functools.partial(start_dht, self.identity, host_maddrs=opts.host_maddrs,
                                  announce_maddrs=opts.announce_maddrs, client_mode=opts.client_mode)
        try:
            # listed peers alone get one try: the fallback below (and every round's _meet) follows it
            return start(initial_peers=list(opts.initial_peers) + list(listed),
                         **({} if opts.initial_peers else {"attempts": 1}))
        except DHTStartError as e:
            if opts.initial_peers or not listed:
                raise
            log.warning("none of the %d address(es) the coordinator listed answered (%s); starting this node's "
                        "own DHT — every round dials the peers the coordinator lists then, and the live view's "
                        "dht column shows who was reached", len(listed), e)
            return start(initial_peers=[])

    # -- coordinator
    def heartbeat(self, sample: bool = False, **kw) -> pb.HeartbeatResponse:
        """A heartbeat; only ``sample=True`` (just before sampling) binds the round's version."""
        reply = self.participant.heartbeat(multiaddrs=self.maddrs, sample=sample, **kw)
        self._keeper.sent()
        self._last_hb = reply
        self._goodbye.live(reply.live_nodes)
        return reply

    def _gone(self, round_index: int) -> frozenset[bytes]:
        """Round ``round_index``'s participants that the coordinator's latest reply lists as moved on
        (sampling the next round, or gone with a goodbye): its averaging does not wait for them. The
        reply comes from the round's close and from each failed attempt's question whether the round
        went on (:meth:`_round_went_on`), so this asks nothing itself."""
        hb = self._last_hb
        if hb is None or hb.current_round != round_index + 1:
            return frozenset()
        return frozenset(bytes(k) for k in hb.round_moved_on)

    def _left_now(self, round_index: int) -> frozenset[bytes]:
        """:meth:`_gone` after asking the coordinator (a heartbeat): asked while the averaging's reduction
        or audit runs long, so that it stops waiting for a member whose goodbye the coordinator heard."""
        try:
            self.heartbeat()
        except Exception as e:  # noqa: BLE001 - the averaging then waits as it would
            log.debug("could not ask the coordinator who left round %d: %s", round_index, e)
        return self._gone(round_index)

    def _meet(self, hb: pb.HeartbeatResponse) -> None:
        """Dial the listed peers worth dialling (:mod:`.peer_dialing`: verified ones, not backing off)
        that this DHT is not connected to, all at once (connected ones are skipped there)."""
        todo = [c for c in dial_candidates(hb.peers) if self._dials.due(c)]
        if not todo:
            return
        try:
            reached = set(connect_peers(self.dht, addresses(todo)))
        except Exception as e:  # noqa: BLE001 - the next round retries
            log.warning("could not dial listed peers: %s", e)
            return
        for c in todo:
            self._dials.record(c, peer_id(c) in reached)

    def close(self, leave: bool = True) -> None:
        """Stop the heartbeats, say this node is leaving (``leave``: not once the coordinator refuses
        it, banned or superseded), stop the DHT and averager. Without the goodbye the open round
        waits for this node's work until it counts it as gone, 3 heartbeat intervals later. Once it
        is said, the round in progress is dropped with its saved batch: the coordinator lists this
        node as moved on, so its groupmates average without it, and a restart that resumed the round
        would only be told it was left out."""
        if getattr(self, "_goodbye", None) is not None:
            self._goodbye.close()  # (this node says it, or must not: the watcher stays silent)
        if getattr(self, "_keeper", None) is not None:
            self._keeper.stop()
        if leave:
            try:
                self.client.leave(self.participant.snapshot.version)
                drop_round_batch(self._round_batch_path)
            except Exception as e:  # noqa: BLE001 - leaving anyway: as after a crash, the coordinator finds out
                log.info("could not tell the coordinator this node is leaving (%s): it counts the node as gone "
                         "3 heartbeat intervals after its last one, and a restart resumes the round", e)
        for part in (self.averager, self.dht):
            try:
                part.shutdown()
            except Exception:  # noqa: BLE001 - leaving anyway
                pass
        self.client.close()

    # -- the loop
    def run(self) -> None:
        done, failures, sick, why = 0, 0, 0, ""
        while self.opts.rounds is None or done < self.opts.rounds:
            try:
                record = self.round()
                failures = 0
                if record.averaged or not record.restarted:  # (a round that dies restarts at the next one's start)
                    sick = 0
                else:
                    sick, why = sick + 1, record.restarted
            except (CoordinatorError, ProtocolError, RuntimeError, ValueError, ArithmeticError, OSError) as e:
                if _is_ban(e):
                    raise NodeBanned(f"the coordinator refuses this node: {e.detail}") from None
                if _is_superseded(e):
                    raise NodeSuperseded(e.detail) from None
                if isinstance(e, SwarmSideRestartFailed):
                    sick, why = sick + 1, str(e)
                # a volunteer node rides out a coordinator restart, a bad round or a full disk warning
                # instead of exiting; the loop resynchronises at the next round's heartbeat
                failures += 1
                record = RoundRecord(-1, self.participant.snapshot.version,
                                     note=f"error: {type(e).__name__}: {e}"[:200])
                log.warning("round failed (%d in a row): %s", failures, e)
                time.sleep(min(30.0, 2.0 * failures))
            done += 1
            record.held_version, record.sha256 = self._held_state()
            record.ended = time.time()
            if self.on_round is not None:
                self.on_round(record)
            if sick >= MAX_SWARM_RESTARTS:
                raise SwarmSideFailing(
                    f"this node restarted its DHT and averager in {sick} rounds in a row without averaging once "
                    f"(the last time: {why}). Something on this machine keeps killing or wedging them: check "
                    "free memory (`dmesg` for the out-of-memory killer), other programs on the node's ports, "
                    "and the warnings above; a smaller --part-size needs less memory")

    def round(self) -> RoundRecord:
        p, t0 = self.participant, time.monotonic()
        self._clock = PhaseClock()  # the round's steps, lapped by the methods below too
        self._goodbye.version(p.snapshot.version)
        hb = self.heartbeat()
        restarted = self._ensure_swarm_side(hb)
        self._meet(hb)
        self._clock.lap("meet")
        resumed = self._resume_closed_round(hb, t0, restarted)
        if resumed is not None:
            return resumed
        resynced = False
        if hb.current.version != p.snapshot.version:  # sample with the swarm's current policy
            p.sync()
            resynced = True
            self._clock.lap("sync")
        hb = self._wait_for_peers(self.heartbeat(sample=True))
        if not hb.may_sample:
            self._clock.lap("meet")
            return RoundRecord(hb.current_round, p.snapshot.version, resynced=resynced, seconds=time.monotonic() - t0,
                               restarted=restarted, note=f"may not sample ({pb.Staleness.Name(hb.staleness)})",
                               phases=self._clock.phases)
        work = p.sample(hb)
        self._clock.lap("sample")
        # checked again before submitting: a restart now holds the round's close back with it, so this
        # node still reaches the averaging with the others; after the close it would arrive late by the
        # restart's seconds and be left out
        restarted = self._ensure_swarm_side(hb) or restarted
        p.submit(work)
        batch = p.accepted_batch(work)
        if batch is not None:  # until the round's averaging is over: a restart still averages it
            save_round_batch(self._round_batch_path, work.round_index, work.version, batch)
        self._clock.lap("submit")
        record = RoundRecord(work.round_index, work.version, samples=sum(len(g) for g in work.groups),
                             accepted=work.accepted_samples, lag=hb.lag, resynced=resynced,
                             reward_mean=float(work.scored.rewards.total.mean()), restarted=restarted,
                             dht_peers=self._dht_peers(), phases=self._clock.phases)
        closed = self._wait_for_close(work.round_index)
        self._clock.lap("wait")
        closed_at = time.monotonic()  # the straggler wait is measured from here
        ticket = closed.round_ticket if closed.HasField("round_ticket") else None
        self._participants = [bytes(k) for k in closed.round_participants]
        if closed.benched and closed.current_round == work.round_index + 1:
            # the coordinator's stall rule: rounds this node held a ticket in kept publishing nothing.
            # It goes on to the next round at once (sampling with the version it holds, within η): a
            # round that fails would otherwise keep it waiting for a publication for a round timeout
            record.note = f"sits out round {work.round_index}: {closed.benched}"[:200]
            log.warning("the coordinator sits this node out of round %d's averaging: it %s. Its work stays "
                        "accepted; if this repeats, check this node's link and the averaging warnings above",
                        work.round_index, closed.benched)
        elif ticket is None or ticket.round_index != work.round_index:
            record.note = "no final ticket (nothing accepted): waiting for the next version"
            self._follow_publication(p.snapshot.version + 1, None, record, round_index=work.round_index)
        else:
            if closed.current.version != p.snapshot.version:
                # sampled with an older version (allowed within η): the gradient is taken at the swarm's
                # current weights, like every other participant's, the behaviour log-probs correcting it
                p.sync()
                record.resynced = True
                self._clock.lap("sync")
            # (a process that died while this node waited for the close is restarted before the averaging)
            record.restarted = self._ensure_swarm_side(closed) or record.restarted
            # the round's participants are verified now: in a run's first round, peers that started
            # DHTs of their own at once (none listed the other yet) meet here, before they average
            self._meet(closed)
            self._clock.lap("meet")
            self._average_or_resync(work.round_index, batch, ticket, record, closed_at)
        drop_round_batch(self._round_batch_path)
        record.seconds = time.monotonic() - t0
        return record

    def _resume_closed_round(self, hb: pb.HeartbeatResponse, t0: float, restarted: str) -> RoundRecord | None:
        """Average the round this node submitted to before it was restarted (:mod:`.round_batch_file`),
        when the coordinator is still on that round's version and gave this node a final ticket in it;
        None (and the saved batch dropped) otherwise."""
        path = self._round_batch_path
        saved = load_round_batch(path)
        if saved is None:
            return None
        ticket = hb.round_ticket if hb.HasField("round_ticket") else None
        if (ticket is None or ticket.round_index != saved.round_index or hb.current_round != saved.round_index + 1
                or hb.current.version != saved.version or hb.benched):
            drop_round_batch(path)  # averaged without this node, published, or never ticketed: gone
            return None
        p = self.participant
        log.warning("resuming round %d, which closed with this node's work while it was down: computing its "
                    "gradient and joining the round's averaging", saved.round_index)
        record = RoundRecord(saved.round_index, saved.version, samples=saved.batch.rollouts.num_completions,
                             accepted=saved.batch.rollouts.num_completions, restarted=restarted,
                             reward_mean=float(saved.batch.rewards.total.mean()),
                             dht_peers=self._dht_peers())
        if p.snapshot.version != saved.version:
            p.sync()
            record.resynced = True
            self._clock.lap("sync")
        self._participants = [bytes(k) for k in hb.round_participants]
        try:
            self._average_or_resync(saved.round_index, saved.batch, ticket, record, time.monotonic())
        finally:
            drop_round_batch(path)
            record.note = f"{RESUMED}; {record.note}"[:200] if record.note else RESUMED
        record.phases, record.seconds = self._clock.phases, time.monotonic() - t0
        return record

    def _wait_for_peers(self, hb: pb.HeartbeatResponse) -> pb.HeartbeatResponse:
        """While the coordinator starts no round for want of live nodes (``swarm.min_peers``), ask
        again every PEERS_POLL_S (these heartbeats keep this node counted as live), dialling the
        peers as they appear; returns the first answer that is not such a wait."""
        since = None
        while (not hb.may_sample and hb.live_nodes < hb.min_peers
               and hb.staleness in (pb.STALENESS_CURRENT, pb.STALENESS_BEHIND)):
            if since is None:
                since = time.monotonic()
                log.warning("waiting for peers: %d of the %d live nodes the run needs before a round starts "
                            "(swarm.min_peers) have been seen lately", hb.live_nodes, hb.min_peers)
            time.sleep(PEERS_POLL_S)
            hb = self.heartbeat(sample=True)
            self._meet(hb)
        if since is not None:
            log.info("%d nodes are live after %.0f s: the round starts", hb.live_nodes, time.monotonic() - since)
            self._clock.lap("peers")
        return hb

    def _straggler_wait(self, own_s: float) -> float:
        """How long a partial group waits for the round's missing peers: ``swarm.straggler_wait`` times
        this node's own time from the round's close to its averaging (a resync and the gradient), within
        [MIN_STRAGGLER_WAIT_S, matchmaking_timeout_s / 2]. Peers get their final tickets together but
        reach the averaging as far apart as their gradients take (SmolLM2 on a shared 2-core machine:
        7-10 s); one that misses the group loses its verified work and the round's step."""
        cap = self.matchmaking_timeout_s / 2
        return min(max(MIN_STRAGGLER_WAIT_S, self.straggler_wait * max(own_s, 0.0)), cap)

    def _round_went_on(self, round_index: int, version: int) -> bool:
        """Whether round ``round_index``'s averaging is over for this node: the coordinator serves a
        version after ``version`` (the one the gradient was taken at: averaged and published without
        this node), a later round closed (this one can no longer be published), or so many of its
        participants started sampling the open round that those left cannot make up the strict
        majority an attempt needs (a partner that restarted or quit: retrying would wait out every
        attempt for nobody, and the next round waits for this node), or this node is banned (a retry's
        group no longer waits for a member it left out, so a banned one would search alone) or
        superseded by another process of its key. False
        when the coordinator cannot be asked (the averager then retries as it would)."""
        try:
            hb = self.heartbeat()
        except Exception as e:  # noqa: BLE001 - a retry costs time, not correctness
            if _is_ban(e) or _is_superseded(e):
                return True  # nothing left to average for: the round loop's next call says so and stops
            log.warning("could not ask the coordinator whether the round went on: %s", e)
            return False
        if hb.current.version > version or hb.current_round > round_index + 1:
            return True
        participants = set(self._participants)
        if hb.current_round != round_index + 1 or not participants:
            return False
        left = len(participants - {bytes(k) for k in hb.round_moved_on})
        return left < len(participants) // 2 + 1

    def _bind_gradients(self, params) -> bool:
        """On the CPU, make the averager's input buffers the parameters' ``.grad`` (zeroed), so that the
        backward pass writes the gradient where the round reads it: no copy in, and (with the result
        buffers as ``out``) none out — two passes over the gradient a round. False (copies) when any
        parameter is not a float32 CPU tensor of the buffers' shape, or the averager has no buffers."""
        buffers = getattr(self.averager, "gradient_buffers", None)
        if buffers is None:
            return False
        buffers = buffers()
        if len(buffers) != len(params) or not all(
                t.device.type == "cpu" and t.dtype == b.dtype and t.shape == b.shape for t, b in zip(params, buffers)):
            return False
        with torch.no_grad():
            for t, b in zip(params, buffers):
                if t.grad is None or t.grad.data_ptr() != b.data_ptr():
                    t.grad = b.zero_()  # (an already bound one was zeroed with the others)
        return True

    def _wait_for_close(self, round_index: int) -> pb.HeartbeatResponse:
        deadline = time.monotonic() + self.round_timeout_s + 30.0
        polls = PollBackoff(self.opts.poll_s)
        while True:
            hb = self.heartbeat()
            if hb.current_round > round_index or time.monotonic() > deadline:
                return hb
            time.sleep(polls.next())

    def _average_or_resync(self, round_index: int, batch: ScoredBatch | None, ticket: pb.AdmissionTicket,
                           record: RoundRecord, closed_at: float) -> None:
        """:meth:`_average_and_step`; a refused report or upload takes the swarm's version instead."""
        try:
            self._average_and_step(round_index, batch, ticket, record, closed_at)
        except CoordinatorError as e:
            if _is_superseded(e) or _is_ban(e):  # refused for good: no version to take (run() stops)
                raise
            record.note = f"{e.method}: {e.code}: {e.detail}"[:200]
            self.participant.sync()
            record.resynced = True
            self._clock.lap("sync")

    def _average_and_step(self, round_index: int, batch: ScoredBatch | None, ticket: pb.AdmissionTicket,
                          record: RoundRecord, closed_at: float) -> None:
        """The gradient of ``batch`` (this node's accepted groups), the round's verified averaging, the
        step, the hash report and the publication."""
        p = self.participant
        trainer = p.trainer
        trainer.optimizer.zero_grad(set_to_none=False)
        bound = record.grads_in_place = self._bind_gradients(trainer.trainable)
        for t in trainer.trainable:
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        if batch is not None:
            trainer.compute_gradients(trainer.prepare(batch))
        grads = [t.grad for t in trainer.trainable]
        self._clock.lap("gradient")
        started = time.monotonic()
        result = self.averager.average(round_index, ticket.SerializeToString(), grads,
                                       expected_peers=list(self._participants) or None,
                                       out=self.averager.result_buffers() if bound else grads,
                                       straggler_wait=self._straggler_wait(started - closed_at),
                                       round_over=lambda: self._round_went_on(round_index, p.snapshot.version),
                                       gone=lambda: self._gone(round_index),
                                       left_now=lambda: self._left_now(round_index))
        self._last_result = result
        drop_round_batch(self._round_batch_path)  # the round's averaging is over: nothing left to resume
        if bound and result.ok:  # the step reads the average where the round left it
            for t, averaged in zip(trainer.trainable, result.grads, strict=True):
                t.grad = averaged
        record.averaging_s = time.monotonic() - started
        self._clock.lap("averaging")
        record.bytes_sent, record.bytes_received = result.bytes_sent, result.bytes_received
        last = result.last
        record.audit_s = sum(last.audit_seconds.values()) if last is not None else 0.0
        record.peers = len(last.weights) if last is not None else 0
        record.excluded = result.reportable()
        self._report_excluded(round_index, record.excluded)
        if not result.ok:
            trainer.optimizer.zero_grad(set_to_none=False)
            record.note = f"averaging failed: {result.error}"
            if result.left_out_as_stalled:
                log.warning(STALLED_ADVICE, self.sender_timeout_s)
            elif result.left_out_as_breaker:
                log.warning(BROKE_ADVICE)
            elif result.sat_out:
                log.warning(SAT_OUT_ADVICE)
            return
        trainer.apply_gradients()
        record.averaged = True
        version = trainer.version
        sha = p.state_sha256()  # weights and optimizer state: what every honest peer computed alike
        try:
            p.report(version, sha)
        except CoordinatorError as e:
            # a majority's reports suffice: when they published this version before ours came in, the
            # report is refused (only the next version can be reported); the publication says whether
            # the published bytes are ours
            if self.heartbeat().current.version < version:
                raise
            log.info("report of v%d came after its publication: %s", version, e.detail)
        self._clock.lap("step")
        if not self._follow_publication(version, sha, record, rank=self._upload_rank(result)):
            # the swarm did not publish this step: back to the published weights and moments (a
            # version file holds both; version 0's none means a fresh optimizer)
            p.sync()
            record.resynced = True
            self._clock.lap("sync")

    def _upload_rank(self, result) -> int:
        """This node's rank among the round's averaging contributors by node id (0 uploads at once)."""
        ids = [n for n in (_node_id_of_peer(peer) for peer in result.last.weights) if n is not None]
        return upload_rank(ids, self.participant.node_id)

    def _follow_publication(self, version: int, sha: bytes | None, record: RoundRecord, *,
                            rank: int = 1, round_index: int | None = None) -> bool:
        """Wait for ``version`` to be published (uploading it as :mod:`.publication` says when this
        node computed it: ``sha``); load it unless this node computed the same bytes. False when no
        upload progressed for a round's timeout."""
        p, follower = self.participant, self._publication
        try:
            published = follower.follow(version, sha, rank=rank, round_index=round_index)
        finally:
            record.upload_bytes += follower.bytes_sent
            self._clock.lap("publish")
        if published is None:
            record.note = follower.note
            return False
        record.published = True
        if sha is not None and published.version == version and bytes(published.sha256) == sha:
            p.snapshot = pb.PolicySnapshotRef(version=version, sha256=sha)
            self._held = (p.snapshot, version, sha)  # computed just now: no need to hash it again
        else:
            p.sync()
            record.resynced = True
        return True

    def _held_state(self) -> tuple[int, str]:
        """(version, hex hash of the weights + optimizer state) this node holds now. Hashed again only
        when the state changed (a step, a loaded snapshot), else the last hash is reused."""
        p = self.participant
        try:
            key = (p.snapshot, p.trainer.version)
            if self._held is None or self._held[0] is not key[0] or self._held[1] != key[1]:
                self._held = (*key, p.state_sha256())
            return key[1], self._held[2].hex()
        except Exception as e:  # noqa: BLE001 - only the record lacks it
            log.warning("could not hash the held state: %s", e)
            return p.trainer.version, ""

    def _report_excluded(self, round_index: int, excluded: dict) -> None:
        for peer, reason in excluded.items():
            node_id = _node_id_of_peer(peer)
            if node_id is None or node_id == self.participant.node_id:
                continue
            try:
                self.client.report_peer(round_index, node_id, str(reason)[:256])
            except CoordinatorError as e:
                log.info("report of %s: %s", node_id, e)


BROKE_ADVICE = ("the other peers saw this node's streams fail first in the last averaging attempt and left it out of "
                "this round: check this machine's connection (dropped or reset connections, a NAT or firewall "
                "closing streams) and the log above for the averager's own error")
SAT_OUT_ADVICE = ("the other peers remember this node breaking an earlier round's averaging (its streams failed "
                  "first, or the peer that broke blamed it) and left it out of this round; a node that breaks again "
                  "sits out twice as many rounds, up to swarm.sit_out_limit: " + BROKE_ADVICE.split(": ", 1)[1])
STALLED_ADVICE = ("the other peers saw this node fall silent for longer than swarm.sender_timeout_s (%g s) while "
                  "averaging and left it out of this round: check this machine's uplink and load, try a smaller "
                  "--part-size, or ask the run's host to raise swarm.sender_timeout_s")


def averaging_timeouts(swarm: dict) -> dict[str, float]:
    """The averager's timeouts from the run's ``[swarm]`` section: every peer takes the same, so that a
    member waiting on a silent peer times out before anyone waiting on that member."""
    sender = float(swarm.get("sender_timeout_s", 5.0))
    return dict(matchmaking_timeout=float(swarm.get("matchmaking_timeout_s", 30.0)),
                allreduce_timeout=float(swarm.get("averaging_timeout_s", 120.0)),
                sender_timeout=sender, reducer_timeout=2 * sender)


def _is_superseded(e: BaseException) -> bool:
    """Whether ``e`` is the coordinator refusing this process: another process of this key took over."""
    return isinstance(e, CoordinatorError) and e.code == "FAILED_PRECONDITION" and e.detail.startswith("superseded")


def _is_ban(e: BaseException) -> bool:
    """Whether ``e`` is the coordinator refusing this node because it is banned."""
    return isinstance(e, CoordinatorError) and e.code == "PERMISSION_DENIED" and "banned" in e.detail


def _node_id_of_peer(peer: str) -> str | None:
    """The node id of an Ed25519 libp2p peer id (base58), None if it is not one."""
    from grpo_swarm.protocol.identity import public_key_from_peer_id, node_id_from_public_key

    try:
        return node_id_from_public_key(public_key_from_peer_id(peer))
    except Exception:  # noqa: BLE001 - not an Ed25519 peer id
        return None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
