"""The coordinator's run state machine, without gRPC: registration, heartbeats and staleness,
proof verification and admission tickets, rounds, snapshot publication. :mod:`.service` puts it
behind the gRPC API; tests drive it directly too.

Everything that changes the run goes through :class:`~grpo_swarm.protocol.recorder.RunRecorder` into
the protocol log (``<data-dir>/protocol.sqlite``, SQLite WAL, ``synchronous=FULL``) before a reply
leaves: an acknowledged submission is on disk. A restart rebuilds the state from that log
(:meth:`RunRecorder.resume`) and the salts in ``coordinator.sqlite`` (:mod:`.store`).

Data directory::

    coordinator.key        Ed25519 key (0600): signs the log, manifests, tickets
    protocol.sqlite        the hash-chained signed protocol log
    coordinator.sqlite     salts, node heartbeats
    snapshots/             <sha>.safetensors + <sha>.manifest (see .snapshots)

Rounds: a round closes when the swarm's accepted samples in it reach ``swarm.samples_per_round``
(the submission that crosses it gets ``round_closed``), or, once it has any accepted sample, when
every live node has submitted its whole assignment (:meth:`Coordinator._all_live_submitted`) or it has
been open ``swarm.round_timeout_s`` (checked at each heartbeat and submission; its start is
the time of the log entry that opened it, so a restart keeps it) — but not while the version the last
closed round produced is being uploaded, moving and due within a round's timeout
(:meth:`Coordinator._publication_streaming`):
closing would drop the reports behind that upload; the upload's publication then closes it. Nor
does it close while the last closed round's ticket holders may still be averaging it
(:meth:`Coordinator._last_round_settled`: not published, less than half of its weight has started
the open round, and its averaging budget has not passed).
Staleness: with current version v a node may sample with versions >= v - η (heartbeats tell it,
``may_sample``); older proofs are rejected ``STALE_VERSION`` by the verifier.

Publication (:mod:`grpo_swarm.protocol.publication`): after round r closes, its participants
average their gradients into version current + 1 and report its state-dict hash in a Heartbeat
(``computed``; each new or changed report is logged as ``hash_reported`` with the reporter's weight
in round r). UploadSnapshot is accepted only from a node that reported the hash, when reports from
more than ``swarm.publish_quorum`` (0.5) of round r's verified sample weight back it; refusals are
logged as ``upload_refused``. Fresh keys have no weight, so sybils add nothing.

Swarm (:mod:`grpo_swarm.protocol.peers`): nodes report the libp2p multiaddrs they announce (Register,
Heartbeat; kept in ``coordinator.sqlite``) and every reply hands them the live peers' addresses
(seen within 3 heartbeat intervals, not banned, the caller excluded, at most 32: peers with verified work
in the open or a recent round first, then the newest others).
When a round closes each participant gets a final admission ticket (samples and completion tokens
as recorded in ``round_closed``), returned by its next Heartbeat. A participant that excluded
another from the round's averaging reports it (ReportPeer, logged ``peer_reported``); reports from
more than half of the round's other participants ban it. The operator bans and unbans through the
Admin method, signed with the coordinator's own key (``grpo-coordinator ban/unban``).

Keys without verified work: what they have logged is bounded per key (a round's groups, a version's
reports and refused uploads) and charged to their network's allowance (:mod:`.networks`: the service
passes each request's :class:`~.networks.Charge`); they count once per network toward ``min_peers``.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.assignment import assign_prompts
from grpo_swarm.protocol.errors import ProtocolError
from grpo_swarm.protocol.peers import (
    MAX_ADMIN_REASON_CHARS,
    MAX_PEERS,
    MAX_REPORT_EVIDENCE_BYTES,
    MAX_REPORT_REASON_CHARS,
    PEER_TTL_INTERVALS,
    PREFERRED_CANDIDATES,
    ReportRefused,
    check_multiaddrs,
)
from grpo_swarm.protocol.recorder import RunRecorder
from grpo_swarm.protocol.run_spec import AuditHooks
from grpo_swarm.protocol.identity import Identity, node_id_from_public_key
from grpo_swarm.protocol.log import LogError, ProtocolLog
from grpo_swarm.protocol.proofs import now_ms
from grpo_swarm.protocol.publication import PublicationRefused, Tally
from grpo_swarm.protocol.rpc import DEFAULT_CHUNK_SIZE, sign_ticket, upload_seconds_left

from .config import ConfigError, RunConfig
from .instances import Instances
from .liveness import Liveness
from .metrics import CoordinatorMetrics
from .networks import Charge
from .snapshots import SnapshotError, SnapshotFiles, check_readable, snapshot_state_sha256
from .store import CoordinatorStore
from .uploads import PROGRESSING_S, InFlightUploads

KEY_FILE = "coordinator.key"
LOG_FILE = "protocol.sqlite"
STORE_FILE = "coordinator.sqlite"
SNAPSHOT_DIR = "snapshots"


class RequestError(Exception):
    """A request the coordinator refuses as a whole; ``status`` names the gRPC status code
    (``"INVALID_ARGUMENT"``, ``"NOT_FOUND"``, ...)."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class RunSetup:
    """What the coordinator derives from the model and the dataset once, at start."""

    dataset_size: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    hooks: AuditHooks
    initial_snapshot: Callable[[Path], tuple[Path, bytes]]  # snapshot dir -> (file, state-dict sha)


def model_setup(cfg: RunConfig, *, spot_check: bool = True) -> Callable[[dict, Path], RunSetup]:
    """The default :class:`RunSetup` factory: loads the run's model (CPU, float32) and dataset with
    grpo_swarm.node, and the verifier hooks (rewards, tokenizer; spot-checks unless disabled)."""

    def build(run_payload_for: Callable[[int, tuple, int], dict], snapshot_dir: Path) -> RunSetup:
        from grpo_swarm.node.data import load_dataset_spec
        from grpo_swarm.node.models import load_model
        from grpo_swarm.node.proving import audit_hooks, save_snapshot
        from grpo_swarm.node.rollout import eos_and_pad_ids

        d = cfg.data
        examples = load_dataset_spec(d.dataset, split=d.split, seed=cfg.run.seed, size=d.size or 10000)
        loaded = load_model(cfg.model.name)
        eos, _ = eos_and_pad_ids(loaded.model, loaded.tokenizer)
        vocab = int(loaded.model.config.vocab_size)
        payload = run_payload_for(len(examples), tuple(eos), vocab)
        hooks = audit_hooks(payload, model=cfg.model.name if spot_check else None, snapshots=str(snapshot_dir),
                            allow_plugin_rewards=True)

        def initial(directory: Path) -> tuple[Path, bytes]:
            sha = save_snapshot(loaded.model, directory)
            return directory / f"{sha.hex()}.safetensors", sha

        return RunSetup(len(examples), tuple(eos), vocab, hooks, initial)

    return build


# a node's averaging attempts per round (node/swarm/averaging.py's default): how long the last round's
# ticket holders may still be averaging it (see Coordinator._last_round_settled)
AVERAGING_ATTEMPTS = 3
MAX_BAN_REASON_SHOWN = 300  # characters of a ban's reason in the refusal (a ban by reports names every reporter)
# a live node that took part in one of this many last rounds is waited for until the round times out
# (a slow node that missed one is still waited for); other live keys only for a while
# (Coordinator._all_live_submitted): one round of real work buys at most this many such waits
WORKED_ROUNDS = 2
# every group a node submits is logged, a refused one with its proofs as evidence, and keys are free: a
# node with verified work may have this many times its assignment (prompts_per_round groups) recorded
# in a round, room to resubmit after lost replies; a key without any, half as many (Coordinator.submit)
GROUPS_PER_ASSIGNMENT = 4
MAX_VERSION_GROWTH = 4  # an uploaded version's size against the current one's (weights -> + AdamW moments)
VERSION_SLACK_BYTES = 512 << 20  # ... plus this (headers, a small model's first version)


def _elapsed_ms(mono: float | None, wall_ms: int | None) -> float | None:
    """Milliseconds since an event: on the monotonic clock when this process saw it (``mono``), else
    (after a restart) on the wall clock from its logged time; None when there was none. A wall clock
    that steps, or a paused machine, must not end a round or spend a budget at once."""
    if mono is not None:
        return 1000 * (time.monotonic() - mono)
    return None if wall_ms is None else float(max(0, now_ms() - wall_ms))


class Coordinator:
    """One run's coordinator state. Thread-safe: every method takes the instance lock."""

    def __init__(self, cfg: RunConfig, data_dir: str | os.PathLike, *, setup=None, keep_snapshots: int = 3,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, metrics: CoordinatorMetrics | None = None,
                 identity: Identity | None = None):
        self.cfg = cfg
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.identity = identity or Identity.load_or_create(self.dir / KEY_FILE)
        self.metrics = metrics or CoordinatorMetrics()
        self.keep_snapshots = max(keep_snapshots, cfg.swarm.max_staleness + 1)
        self.lock = threading.RLock()
        self.store = CoordinatorStore(self.dir / STORE_FILE)
        ttl_s = PEER_TTL_INTERVALS * cfg.swarm.heartbeat_interval_s
        self.liveness = Liveness(ttl_s)
        self.instances = Instances()  # one running node process per key
        self.liveness.restore(self.store.last_seen(now_ms() - int(1000 * ttl_s)))
        self.log = ProtocolLog(self.dir / LOG_FILE)
        self.snapshots = SnapshotFiles(self.dir / SNAPSHOT_DIR, self.identity, cfg.run.id, chunk_size)
        self.uploads = InFlightUploads()  # the UploadSnapshot streams being received

        def payload_for(dataset_size: int, eos: tuple, vocab: int) -> dict:
            return cfg.run_spec(dataset_size, eos_token_ids=eos, vocab_size=vocab).to_payload()

        self.setup: RunSetup = (setup or model_setup(cfg))(payload_for, self.snapshots.dir)
        spec = cfg.run_spec(self.setup.dataset_size, eos_token_ids=self.setup.eos_token_ids,
                            vocab_size=self.setup.vocab_size)
        if len(self.log) == 0:
            self.recorder = RunRecorder(self.log, self.identity, spec, hooks=self.setup.hooks,
                                        on_salt=self.store.put_salt)
        else:
            self.recorder = RunRecorder.resume(self.log, self.identity, salts=self.store.salts(), hooks=self.setup.hooks,
                                               on_salt=self.store.put_salt)
            _check_same_run(self.recorder.spec.to_payload(), spec.to_payload(), self.dir)
        self.spec = self.recorder.spec
        self.state = self.recorder.state
        self.round_started_ms = _round_start_ms(self.log)
        # the same start on this process's monotonic clock (None after a restart: the logged wall-clock
        # start is all there is): a wall clock that steps or a paused machine must not time a round out
        self._round_started_mono: float | None = None
        # (monotonic time, round's age in ms) when the last live worker's assignment of the open round was in
        self._workers_in: tuple[float, float] | None = None
        # when this process closed the last round, on its monotonic clock (None after a restart: the
        # logged wall-clock close is all there is), for the last round's averaging budget
        self._closed_mono: float | None = None
        # node -> groups recorded (accepted or refused) in the open round: the budget of GROUPS_PER_ASSIGNMENT
        self._groups_recorded: dict[str, int] = {}
        # node -> the group ids it submitted in the open round, accepted or not (after a restart,
        # the accepted ones, from the log)
        self.round_groups: dict[str, set[str]] = _round_groups(self.log, self.state.current_round)
        self._restore_snapshots()
        self._refresh_gauges()

    # -- start-up
    def _restore_snapshots(self) -> None:
        st = self.state
        for version in sorted(st.snapshots):
            self.snapshots.load(version, st.snapshots[version])
        if not st.snapshots:  # a new run (or a crash before the first snapshot was logged)
            path, sha = self.setup.initial_snapshot(self.snapshots.dir)
            self.snapshots.add(path, 0, sha)
            self.recorder.publish_snapshot(0, sha)
            self.metrics.snapshots_published.inc()
        if self.snapshots.manifest(st.current_version) is None:
            raise SnapshotError(f"the files of the current snapshot (version {st.current_version}, "
                                f"{st.snapshots[st.current_version].hex()[:16]}...) are missing from "
                                f"{self.snapshots.dir}")

    def close(self) -> None:
        with self.lock:
            self.log.close()
            self.store.close()

    # -- views
    @property
    def current(self) -> pb.PolicySnapshotRef:
        st = self.state
        return pb.PolicySnapshotRef(version=st.current_version, sha256=st.snapshots[st.current_version])

    def round_samples(self) -> int:
        return sum(self.recorder.round_accepted.values())

    def node_id_of(self, public_key: bytes) -> str | None:
        return self.state.node_for_key(public_key)

    def is_banned(self, node_id: str) -> bool:
        return self.state.is_banned(node_id)

    def banned_detail(self, node_id: str) -> str:
        """What a banned node is told: why (its ban's logged reason) and who can lift it."""
        reason = self.state.ban_reason(node_id)
        if len(reason) > MAX_BAN_REASON_SHOWN:
            reason = reason[:MAX_BAN_REASON_SHOWN] + "..."
        return (f"node {node_id} is banned ({reason or 'no reason logged'}). If it was a mistake (a node killed "
                f"after its reduction and before its audit reveal is reported like one that withholds it: a second "
                f"time within 100 rounds bans it), the "
                f"coordinator's operator can lift it: grpo-coordinator unban {node_id}")

    def _multiaddrs(self, public_key: bytes, addrs) -> list[str]:
        try:
            return check_multiaddrs(list(addrs), public_key)
        except ProtocolError as e:
            raise RequestError("INVALID_ARGUMENT", e.detail) from None

    def peers(self, node_id: str | None) -> list[pb.PeerAddress]:
        """The live peers' addresses (see the module docstring), ``node_id`` excluded."""
        live = self.liveness.live()
        self.metrics.nodes_active.set(len(live))
        workers = sorted(self.recorder.round_accepted) + self.recorder.peers.recent_participants(PREFERRED_CANDIDATES)
        verified = set(workers[:PREFERRED_CANDIDATES])
        live_set = set(live)
        order = [n for n in dict.fromkeys(workers[:PREFERRED_CANDIDATES] + live)
                 if n in live_set and n != node_id and not self.state.is_banned(n)]
        return [pb.PeerAddress(node_id=n, multiaddrs=addrs, last_seen_ms=self.liveness.last_seen_ms(n),
                               verified=n in verified)
                for n, addrs in self.store.multiaddrs(order, limit=MAX_PEERS)]

    def _verified(self, node_id: str) -> bool:
        """Whether ``node_id`` has verified work: accepted in the open round, or a part in a closed one."""
        return node_id in self.recorder.round_accepted or node_id in self.recorder.peers.last_round

    def _take(self, charge: Charge | None, what: str, entries: int = 1) -> bool:
        """Charge ``entries`` to the request's network (True without a charge); a refusal is counted."""
        if charge is None or charge.take(entries):
            return True
        self.metrics.newcomers_refused.labels(what).inc()
        return False

    def has_verified_work(self, public_key: bytes) -> bool:
        """Whether the node of ``public_key`` (registered or not) has verified work (:meth:`_verified`)."""
        with self.lock:
            node_id = self.state.node_for_key(public_key)
            return node_id is not None and not self.state.is_banned(node_id) and self._verified(node_id)

    def live_nodes(self) -> int:
        """Nodes seen within the peer TTL, banned ones not counted, and keys without verified work once
        per network they came from (.networks; keys are free, networks are not): what ``swarm.min_peers``
        is held against before a round starts."""
        networks: set[str] = set()
        count = 0
        for n in self.liveness.live():
            if self.state.is_banned(n):
                continue
            net = self.liveness.network(n)
            if net is None or self._verified(n):
                count += 1
            elif net not in networks:  # keys without verified work count once per network
                networks.add(net)
                count += 1
        return count

    def _refresh_gauges(self) -> None:
        m, st = self.metrics, self.state
        m.nodes.set(len(st.keys))
        m.version.set(st.current_version)
        m.round.set(st.current_round)
        m.round_samples.set(self.round_samples())

    # -- requests
    def register(self, public_key: bytes, request: pb.RegisterRequest,
                 charge: Charge | None = None) -> pb.RegisterResponse:
        """``charge`` (for this and the other requests): the request's network's allowance for keys without
        verified work (.networks); None charges nothing (a trusted or in-process caller)."""
        if request.run_id and request.run_id != self.spec.run_id:
            raise RequestError("FAILED_PRECONDITION", f"this coordinator serves run {self.spec.run_id!r}, "
                                                      f"not {request.run_id!r}")
        addrs = self._multiaddrs(public_key, request.multiaddrs)
        with self.lock:
            node_id = self.state.node_for_key(public_key)
            new = node_id is None
            if new:
                if not self._take(charge, "register"):
                    raise RequestError("RESOURCE_EXHAUSTED", charge.spent("no new key is registered"))
                node_id = self.recorder.register(public_key)
            elif self.state.is_banned(node_id):
                raise RequestError("PERMISSION_DENIED", self.banned_detail(node_id))
            self._check_instance(node_id, request.instance)
            self.store.node_registered(node_id, public_key,
                                       request.hardware if request.HasField("hardware") else None)
            self.liveness.seen(node_id, None if charge is None else charge.net)
            if addrs:
                self.store.set_multiaddrs(node_id, addrs)
            self._refresh_gauges()
            return pb.RegisterResponse(
                run_id=self.spec.run_id, node_id=node_id,
                run_config_json=json.dumps(self.cfg.model_dump(mode="json"), sort_keys=True),
                run_spec_json=json.dumps(self.spec.to_payload(), sort_keys=True), current=self.current,
                current_round=self.state.current_round, coordinator_public_key=self.identity.public_key_bytes,
                newly_registered=new, peers=self.peers(node_id))

    def _check_instance(self, node_id: str, instance: bytes) -> None:
        refused = self.instances.refusal(node_id, instance)
        if refused is not None:
            raise RequestError(*refused)

    def heartbeat(self, node_id: str, request: pb.HeartbeatRequest, public_key: bytes | None = None,
                  charge: Charge | None = None, signed_ms: int | None = None) -> pb.HeartbeatResponse:
        """``signed_ms``: the request envelope's signed time (None: an in-process caller). A heartbeat
        signed before the node's goodbye but handled after it (in flight as the node stopped) does not
        make it live again."""
        eta = self.spec.max_staleness
        with self.lock:
            self._check_instance(node_id, request.instance)
            if request.leaving and request.sample:
                raise RequestError("INVALID_ARGUMENT", "a leaving heartbeat cannot ask for the round's assignment: "
                                                       "sample must be false")
            if request.multiaddrs and public_key is None:
                public_key = next(k for k, n in self.state.keys.items() if n == node_id)
            addrs = self._multiaddrs(public_key, request.multiaddrs) if request.multiaddrs else []
            st = self.state
            charged = None if charge is None or self._verified(node_id) else charge  # (workers are never charged)
            cur = st.current_version
            v = request.policy_version
            lag = max(0, cur - v)
            if v > cur:
                staleness = pb.STALENESS_AHEAD
            elif lag > eta or v not in st.snapshots:
                staleness = pb.STALENESS_TOO_STALE
            else:
                staleness = pb.STALENESS_CURRENT if lag == 0 else pb.STALENESS_BEHIND
            if request.HasField("computed"):
                c = request.computed
                if c.version != cur + 1 or len(c.sha256) != 32:  # only current + 1 can be published next
                    raise RequestError("INVALID_ARGUMENT", f"computed must name the next version {cur + 1} "
                                                           "and a 32-byte state-dict hash")
                self.recorder.report_hash(node_id, c.version, bytes(c.sha256),  # logged when new or changed
                                          may_log=None if charged is None else lambda: self._take(charged, "report"))
            for name in ("completions_per_s", "tokens_per_s"):
                x = getattr(request, name)
                if not (x >= 0 and x < float("inf")):
                    raise RequestError("INVALID_ARGUMENT", f"{name} must be a finite number >= 0, got {x}")
            gone = request.leaving or self.liveness.left_since(node_id, signed_ms)
            self.store.heartbeat(node_id, v, request.completions_per_s, request.tokens_per_s,
                                 request.hardware if request.HasField("hardware") else None, leaving=gone)
            if request.leaving:  # no round waits for its work from now on, nor a TTL later
                self.liveness.leave(node_id, signed_ms)
                self.metrics.nodes_left.inc()
            elif not gone:
                self.liveness.seen(node_id, None if charge is None else charge.net)
            if addrs:
                self.store.set_multiaddrs(node_id, addrs)
            self.metrics.staleness.labels("heartbeat").observe(lag)
            self._maybe_close_round()  # (a full round closes at the submission that fills it, unless held)
            live = self.live_nodes()
            may = staleness in (pb.STALENESS_CURRENT, pb.STALENESS_BEHIND) and not st.is_banned(node_id) and (
                live >= self.cfg.swarm.min_peers or st.dispatched_version(node_id, st.current_round) is not None)
            # the first Heartbeat of a round binds the version its prompts must be sampled with, so
            # that a node cannot sample with each of the η + 1 allowed versions and keep the best
            if may and request.sample:
                if st.dispatched_version(node_id, st.current_round) is None and not self._take(charged, "dispatch"):
                    raise RequestError("RESOURCE_EXHAUSTED", charged.spent(f"round {st.current_round} is not "
                                                                           f"assigned to node {node_id}"))
                bound = self.recorder.dispatch(node_id, st.current_round, v)
                if self.round_started_ms is None:  # the round's clock starts when a node starts sampling it
                    self.round_started_ms, self._round_started_mono = now_ms(), time.monotonic()
            else:  # a liveness or report heartbeat: binds nothing (tells the binding if there is one)
                bound = st.dispatched_version(node_id, st.current_round) or 0
            prompts = assign_prompts(self.spec.run_seed, node_id, st.current_round, self.spec.dataset_size,
                                     self.spec.prompts_per_round)
            reply = pb.HeartbeatResponse(
                current=self.current, current_round=st.current_round, lag=lag, staleness=staleness,
                min_version=max(0, cur - eta), may_sample=may, prompt_indices=prompts,
                round_samples_accepted=self.round_samples(), round_samples_target=self.cfg.swarm.samples_per_round,
                sample_version=bound, peers=self.peers(node_id), live_nodes=live, min_peers=self.cfg.swarm.min_peers)
            holders = self.recorder.final_tickets
            reply.round_participants.extend(sorted(bytes(t.node_public_key) for t in holders.values()))
            reply.round_moved_on.extend(sorted(bytes(t.node_public_key) for n, t in holders.items()
                                               if self._moved_on(n)))
            ticket = holders.get(node_id)
            if ticket is not None:  # its final ticket of the last closed round
                reply.round_ticket.CopyFrom(ticket)
            reply.benched = self.recorder.benched.get(node_id, "")
            upload = self.uploads.progress(cur + 1)
            if upload is not None:
                reply.upload.CopyFrom(upload)
            return reply

    def manifest(self, version: int | None) -> pb.SnapshotManifest:
        with self.lock:
            v = self.state.current_version if version is None else version
            m = self.snapshots.manifest(v)
            if m is None:
                kept = self.snapshots.versions()
                raise RequestError("NOT_FOUND", f"no snapshot of version {v} is kept (kept: {kept})")
            return m

    def snapshot_file(self, version: int) -> Path:
        with self.lock:
            self.manifest(version)
            return self.snapshots.file_of(version)

    def submit(self, public_key: bytes, proofs, charge: Charge | None = None) -> pb.SubmitProofsResponse:
        node_id = node_id_from_public_key(public_key)
        sizes: dict[str, int] = {}
        for i, p in enumerate(proofs):
            if bytes(p.node_public_key) != bytes(public_key):
                raise RequestError("INVALID_ARGUMENT", f"proofs[{i}] is signed by another node key than the request")
            sizes[p.group_id] = sizes.get(p.group_id, 0) + 1
        # (what the log would keep as evidence: a group past the run's size proves nothing more than
        # its first group_size + 1 proofs, and an unbounded one filled the log at the sender's rate)
        group_size = self.spec.group_size
        over = next((g for g, n in sizes.items() if n > group_size), None)
        if over is not None:
            raise RequestError("INVALID_ARGUMENT", f"group {over[:64]!r} has {sizes[over]} proofs; the run's groups "
                                                   f"have {group_size}: nothing of this request was recorded")
        with self.lock:
            st = self.state
            verified = self._verified(node_id)
            budget = GROUPS_PER_ASSIGNMENT * self.spec.prompts_per_round // (1 if verified else 2)
            recorded = self._groups_recorded.get(node_id, 0)
            if recorded + len(sizes) > budget:
                why = (f"{GROUPS_PER_ASSIGNMENT} x prompts_per_round" if verified else
                       f"{GROUPS_PER_ASSIGNMENT // 2} x prompts_per_round: it has no accepted work yet")
                raise RequestError("RESOURCE_EXHAUSTED", f"node {node_id} has had {recorded} group(s) recorded in "
                                                         f"round {st.current_round}, and this request brings "
                                                         f"{len(sizes)}: at most {budget} a round ({why}); nothing "
                                                         "of this request was recorded")
            if not verified and not self._take(charge, "groups", len(sizes)):
                raise RequestError("RESOURCE_EXHAUSTED", charge.spent(f"the {len(sizes)} group(s) of node {node_id} "
                                                                      "were not recorded"))
            self._groups_recorded[node_id] = recorded + len(sizes)
            round_index, cur = st.current_round, st.current_version
            out = pb.SubmitProofsResponse()
            last_index = None
            for group, verdict, entry in self.recorder.submit_logged(proofs, now_ms=now_ms()):
                last_index = entry.index
                if group and group[0].round_index == round_index:
                    self.round_groups.setdefault(node_id, set()).add(group[0].group_id)
                out.verdicts.add(group_id=group[0].group_id if group else "", proof_count=len(group),
                                 accepted=verdict.accepted, code="" if verdict.accepted else verdict.code.value,
                                 detail=verdict.detail, member=-1 if verdict.member is None else verdict.member,
                                 log_index=entry.index, sequences=[p.sequence for p in group])
                if verdict.accepted:
                    self.metrics.proofs_accepted.inc(len(group))
                    for p in group:
                        self.metrics.staleness.labels("proof").observe(cur - p.policy.version)
                else:
                    self.metrics.proofs_rejected.labels(verdict.code.value).inc(len(group))
            count = self.recorder.round_accepted.get(node_id, 0)
            if count:
                if last_index is None:
                    last_index = self.log.head()[0] - 1
                out.ticket.CopyFrom(sign_ticket(pb.AdmissionTicket(
                    run_id=self.spec.run_id, round_index=round_index, node_id=node_id, node_public_key=public_key,
                    accepted_samples=count, accepted_tokens=self.recorder.round_tokens.get(node_id, 0),
                    policy_version=cur, time_ms=now_ms(), log_index=last_index, final=False), self.identity))
            out.round_closed = self._maybe_close_round()
            out.current_round = st.current_round
            self._refresh_gauges()
            return out

    def _maybe_close_round(self) -> bool:
        samples = self.round_samples()
        full = samples >= self.cfg.swarm.samples_per_round
        late = samples > 0 and self._round_age_ms() >= self.cfg.swarm.round_timeout_s * 1000  # (0 before a dispatch)
        if not (full or late or (samples > 0 and self._all_live_submitted())) or self._publication_streaming() \
                or not self._last_round_settled():
            return False
        self.recorder.close_round()
        self._closed_mono = time.monotonic()
        self.round_groups.clear()
        self._groups_recorded.clear()
        self.round_started_ms = self._round_started_mono = None  # the next round's clock starts at its first dispatch
        self._workers_in = None
        self.metrics.rounds_closed.inc()
        self._refresh_gauges()
        return True

    def _all_live_submitted(self) -> bool:
        """Whether every live node (seen within the peer TTL, not banned) has submitted each of its
        ``prompts_per_round`` groups of the open round, accepted or not (``swarm.close_when_all_submitted``):
        nobody is left to fill the round, so waiting for ``samples_per_round`` would only wait out
        ``round_timeout_s`` — what a swarm smaller than the run was sized for, or one whose node went
        away, did every round. Nodes heartbeat while they sample and average (node/swarm/heartbeats.py),
        so a slow one stays live and is waited for — if it has verified work (accepted proofs in the
        open round, or a participant of one of the last WORKED_ROUNDS rounds), or in the run's first
        round (its nodes are still starting up). Once only keys without any are left, a later round
        waits for them as long again as it took until then (at least PEER_TTL_INTERVALS heartbeat
        intervals), then closes: a key costs nothing, and one that heartbeats but never submits held
        every round for ``round_timeout_s``."""
        if not self.cfg.swarm.close_when_all_submitted:
            return False
        live = [n for n in self.liveness.live() if not self.state.is_banned(n)]
        need = self.spec.prompts_per_round
        pending = [n for n in live if len(self.round_groups.get(n, ())) < need]
        if not live or not pending:
            return bool(live)
        since_round = self.state.current_round - WORKED_ROUNDS
        worked = {n for n, r in self.recorder.peers.last_round.items() if r >= since_round}
        if self.state.current_round == 0 or any(n in worked or n in self.recorder.round_accepted for n in pending):
            self._workers_in = None  # (a run's first round waits for all: its nodes are still starting)
            return False
        # only keys without verified work are left: newcomers, or keys that never work (free to make,
        # each could hold every round until round_timeout_s). They are waited for as long again as the
        # round took, and at least as long as a node that went silent is (PEER_TTL_INTERVALS)
        now = time.monotonic()
        if self._workers_in is None:
            self._workers_in = now, self._round_age_ms()
        since, took = self._workers_in
        wait = max(took, PEER_TTL_INTERVALS * self.cfg.swarm.heartbeat_interval_s * 1000)
        return 1000 * (now - since) >= wait

    def _moved_on(self, node_id: str) -> bool:
        """Whether a participant of the last closed round has left its averaging: it started sampling
        the open round, or said it is leaving the swarm (either costs it only a request of its own)."""
        return self.state.dispatched_version(node_id, self.state.current_round) is not None \
            or self.liveness.has_left(node_id)

    def _round_age_ms(self) -> float:
        """Milliseconds since the open round's first dispatch (0 before it)."""
        return _elapsed_ms(self._round_started_mono, self.round_started_ms) or 0.0

    def _last_round_settled(self) -> bool:
        """Whether the last closed round's ticket holders are done averaging it: its version was
        published, or participants holding more than half of its weight (those the stall rule sat
        out count: they do not average) have moved on (:meth:`_moved_on`), or its averaging
        budget (``AVERAGING_ATTEMPTS`` x (matchmaking + averaging timeouts)) has passed since it
        closed. Until then the open round does not close, full or timed out: closing it would make
        it the producing round, and a ticket holder that left the averaging at once (or many keys of
        one) could close it alone while the others still average, and then publish any weights it
        likes with all of that round's weight behind it."""
        pub = self.recorder.publication
        if pub.round is None:  # published since, or nothing produced yet
            return True
        moved = [n for n in pub.weights if n in pub.benched or self._moved_on(n)]
        total = math.fsum(pub.weights[n] for n in sorted(pub.weights))
        if math.fsum(pub.weights[n] for n in sorted(moved)) > 0.5 * total:
            return True
        budget_ms = 1000 * AVERAGING_ATTEMPTS * (self.cfg.swarm.matchmaking_timeout_s + self.cfg.swarm.averaging_timeout_s)
        since_close = _elapsed_ms(self._closed_mono, self.recorder.closed_ms)
        return since_close is None or since_close >= budget_ms

    def _publication_streaming(self) -> bool:
        """Whether the version the last closed round produced is being uploaded, moving, and due
        within ``round_timeout_s`` at its rate. The open round then stays open: closing it would make
        it the producing round and drop the reports behind that upload (a slow link's minutes of it,
        and the round's verified work). A trickle is not waited for."""
        if self.recorder.publication.round is None:
            return False
        flight = self.uploads.progress(self.state.current_version + 1)
        if flight is None or flight.idle_ms >= 1000 * PROGRESSING_S:
            return False
        left = upload_seconds_left(flight)
        return left is None or left <= self.cfg.swarm.round_timeout_s

    # -- peers and operators
    def report_peer(self, node_id: str, envelope: pb.SignedEnvelope, report: pb.PeerReport) -> pb.PeerReportResponse:
        """A participant's report against another participant of a closed round (see
        :mod:`grpo_swarm.protocol.peers` for the rule); RequestError when refused (nothing logged)."""
        if len(report.reason) > MAX_REPORT_REASON_CHARS:
            raise RequestError("INVALID_ARGUMENT", f"reason is longer than {MAX_REPORT_REASON_CHARS} characters")
        if len(report.evidence) > MAX_REPORT_EVIDENCE_BYTES:
            raise RequestError("INVALID_ARGUMENT", f"evidence is larger than {MAX_REPORT_EVIDENCE_BYTES} bytes")
        with self.lock:
            if report.round_index >= self.state.current_round:
                raise RequestError("FAILED_PRECONDITION", f"round {report.round_index} has not closed (the open "
                                                          f"round is {self.state.current_round})")
            try:
                index, tally, repeated = self.recorder.report_peer(node_id, report, envelope)
            except ReportRefused as refused:
                raise RequestError(refused.status, refused.detail) from None
            banned = self.state.is_banned(report.peer_node_id)
            return pb.PeerReportResponse(log_index=index, reporters=len(tally.reporters), needed=tally.needed,
                                         banned=banned, repeated=repeated)

    def admin(self, request: pb.AdminRequest) -> pb.AdminResponse:
        """An operator's ban or unban (the caller checked that the coordinator's key signed it)."""
        node_id, reason = request.node_id, request.reason
        if len(reason) > MAX_ADMIN_REASON_CHARS:
            raise RequestError("INVALID_ARGUMENT", f"reason is longer than {MAX_ADMIN_REASON_CHARS} characters")
        with self.lock:
            if node_id not in self.state.keys.values():
                raise RequestError("NOT_FOUND", f"no registered node {node_id[:64]!r}")
            banned = self.state.is_banned(node_id)
            if request.action == pb.ADMIN_BAN:
                if not reason.strip():
                    raise RequestError("INVALID_ARGUMENT", "a ban needs a reason")
                if banned:
                    raise RequestError("FAILED_PRECONDITION", f"node {node_id} is already banned")
                entry = self.recorder.ban(node_id, f"operator: {reason}", by="operator")
                return pb.AdminResponse(log_index=entry.index, detail=f"banned {node_id}")
            if request.action == pb.ADMIN_UNBAN:
                if not banned:
                    raise RequestError("FAILED_PRECONDITION", f"node {node_id} is not banned")
                entry = self.recorder.unban(node_id, reason)
                return pb.AdminResponse(log_index=entry.index, detail=f"unbanned {node_id}")
            raise RequestError("INVALID_ARGUMENT", f"unknown admin action {request.action}")

    # -- snapshot upload
    def check_upload(self, node_id: str, header: pb.UploadSnapshotHeader, charge: Charge | None = None) -> Tally:
        """RequestError unless ``node_id`` may upload this version now (a refusal by the publication
        rule is logged, FAILED_PRECONDITION); the tally of its hash."""
        ref = header.snapshot
        if len(ref.sha256) != 32 or len(header.file_sha256) not in (0, 32):
            raise RequestError("INVALID_ARGUMENT", "snapshot.sha256 must be 32 bytes, file_sha256 32 or none")
        if header.total_bytes <= 0:
            raise RequestError("INVALID_ARGUMENT", "total_bytes must be > 0")
        with self.lock:
            tally = self._publication_tally(node_id, ref.version, bytes(ref.sha256), charge)
            # the same tensors every version (version 0 without the optimizer's moments): a stream may
            # not reserve the disk for much more than that
            current = self.snapshots.manifest(self.state.current_version).total_bytes
            limit = MAX_VERSION_GROWTH * current + VERSION_SLACK_BYTES
            if header.total_bytes > limit:
                raise RequestError("INVALID_ARGUMENT", f"total_bytes {header.total_bytes} is more than {limit} "
                                                       f"({MAX_VERSION_GROWTH} x the current version's {current} "
                                                       f"bytes + {VERSION_SLACK_BYTES >> 20} MiB)")
            return tally

    def _publication_tally(self, node_id: str, version: int, sha256: bytes, charge: Charge | None = None) -> Tally:
        """The rule's tally, or the refusal logged (evidence of who tried what) and raised."""
        try:
            return self.recorder.check_publication(version, sha256, node_id)
        except PublicationRefused as refused:
            charged = None if charge is None or self._verified(node_id) else charge
            may_log = None if charged is None else lambda: self._take(charged, "upload_refusal")
            self.recorder.refuse_upload(node_id, version, sha256, refused, may_log=may_log)
            raise RequestError("FAILED_PRECONDITION", refused.detail) from None

    def publish_upload(self, node_id: str, header: pb.UploadSnapshotHeader, path: Path, *,
                       chunk_hashes: tuple[list[bytes], bytes, int] | None = None,
                       state_sha256: bytes | None = None) -> pb.UploadSnapshotResponse:
        """Publish a fully received upload (its size and file hash already checked by the caller;
        ``chunk_hashes``: the file's :func:`~grpo_swarm.protocol.rpc.file_chunk_hashes`, and
        ``state_sha256``: its state-dict hash, when the caller took them as the bytes arrived — a
        canonical version file's; otherwise the file is read again to hash it)."""
        try:
            if state_sha256 is None:
                sha = snapshot_state_sha256(path)  # outside the lock: reads the whole file
            else:
                check_readable(path)  # (a canonical file is a valid safetensors file: this checks it is)
                sha = state_sha256
        except SnapshotError:  # the uploader's bytes, not our failure (the message would name our file)
            raise RequestError("INVALID_ARGUMENT", "the upload is not a readable safetensors file") from None
        if sha != bytes(header.snapshot.sha256):
            raise RequestError("INVALID_ARGUMENT", f"the uploaded tensors hash to {sha.hex()[:16]}..., not the "
                                                   f"claimed {header.snapshot.sha256.hex()[:16]}...")
        with self.lock:
            version = header.snapshot.version
            # again: another upload may have been published, or a round closed, while this one streamed
            tally = self._publication_tally(node_id, version, sha)
            self.snapshots.add(path, version, sha, chunk_hashes=chunk_hashes)
            index = self.recorder.publish_snapshot(version, sha, uploader=node_id).index
            self._maybe_close_round()  # one held open by this upload
            self.snapshots.prune(self.keep_snapshots)
            self.metrics.snapshots_published.inc()
            self._refresh_gauges()
            return pb.UploadSnapshotResponse(published=pb.PolicySnapshotRef(version=version, sha256=sha),
                                             log_index=index, supporting_reports=len(tally.reporters),
                                             total_reports=tally.reports)


def _round_start_ms(log: ProtocolLog) -> int | None:
    """When the open round's clock started: its first round_dispatched entry (a node started
    sampling it), None while no node has. A round's timeout counts from there, not from the
    previous close, so a round nobody worked on does not time out the moment a node shows up."""
    from grpo_swarm.protocol.log import ROUND_CLOSED, ROUND_DISPATCHED, RUN_STARTED

    opened = log.last(ROUND_CLOSED, RUN_STARTED)
    for entry in log.entries(opened.index if opened is not None else 0):
        if entry.kind == ROUND_DISPATCHED:
            return entry.time_ms
    return None


def _round_groups(log: ProtocolLog, round_index: int) -> dict[str, set[str]]:
    """node -> the group ids of its groups accepted in the open round, from the log (what a restarted
    coordinator knows of who has submitted; a rejected group is not counted, so such a node's
    assignment looks unfinished and the round closes full or timed out, as before)."""
    from grpo_swarm.protocol.log import PROOFS_ACCEPTED, ROUND_CLOSED, RUN_STARTED

    opened = log.last(ROUND_CLOSED, RUN_STARTED)
    out: dict[str, set[str]] = {}
    for entry in log.entries(opened.index if opened is not None else 0):
        if entry.kind == PROOFS_ACCEPTED and entry.payload.get("round") == round_index:
            out.setdefault(entry.payload["node_id"], set()).add(entry.payload["group_id"])
    return out


def _check_same_run(logged: dict, configured: dict, data_dir: Path) -> None:
    logged = {k: v for k, v in logged.items() if k != "spot_check_commitment"}
    configured = {k: v for k, v in configured.items() if k != "spot_check_commitment"}
    if logged != configured:
        diff = sorted(k for k in set(logged) | set(configured) if logged.get(k) != configured.get(k))
        raise ConfigError(f"{data_dir} holds run {logged.get('run_id')!r} started with other settings "
                          f"({', '.join(diff)} differ); use a new --data-dir or the original run config")


__all__ = ["Coordinator", "RequestError", "RunSetup", "model_setup", "LogError", "SnapshotError"]
