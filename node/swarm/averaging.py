"""Verified gradient averaging over hivemind: :class:`VerifiedAverager`.

One round, as the join loop sees it::

    averager = VerifiedAverager(model.parameters(), dht=dht, prefix="run42-grads", identity=identity,
                                coordinator_key=coordinator_key, run_id="run42",
                                weight_mode=weight_mode_for_loss(cfg.grpo.loss_type), norm_bound=1e4)
    trainer.compute_gradients(batch)                     # this node's gradient in param.grad
    result = averager.average(round_index, ticket_bytes, [p.grad for p in trainer.trainable])
    if result.ok:
        result.copy_to([p.grad for p in trainer.trainable])  # the swarm's gradient, the same bytes everywhere
        trainer.apply_gradients()
    else:
        ...  # result.attempts say who was excluded, accused or failed; the local gradient is untouched

A trainer on the CPU can skip both copies: bind ``param.grad`` to :meth:`VerifiedAverager.gradient_buffers`
before the backward pass (the round then only checks them), and pass ``out=averager.result_buffers()``
(the join loop does both, :mod:`.join`).

How a round goes (hivemind 1.1.12's DecentralizedAverager underneath, not a home-made all-reduce):

1. :meth:`VerifiedAverager.average` checks this node's own ticket and gradient (shapes, finite,
   norm ≤ ``norm_bound``), copies the gradient into the averager's buffers and puts a signed gather
   entry in ``step()`` (:mod:`.gather`): ticket bytes, round, attempt, committed norm, accusations.
   Matchmaking uses a group key per round, so peers of different rounds never group, and with the
   round's peers known it admits only their keys (:mod:`.matchmaking`): a fresh key cannot take a slot.
2. In the averager process, :meth:`VerifiedAverager._aggregate_with_group` runs *before any part is
   reduced*: every member checks every slot (:func:`.verdicts.group_verdicts`) and plans the group
   from the verdicts alone (:class:`.group_plan.GroupPlan`): contributors reduce equal shares,
   excluded members are auxiliary with share 0 and their parts are refused. Every honest member
   reaches the same verdicts, so nobody waits for an excluded peer.
3. :class:`.reduction.VerifiedAllReduceRunner` reduces with ticket weights, validates every part,
   and hands every peer the same bytes for every share. A timeout, ban or failed reducer aborts the
   attempt everywhere and it is reported as failed — a partial average is never a success. Averages
   are written into separate output buffers, never over the local gradient, which the caller gets
   only after a success.
4. **The share audit** (:mod:`.share_audit`, its RPC side in :mod:`.share_audit_rpc`): before anyone takes the result, the members reveal
   the nonces they committed to in their gather, and check every reducer's average against the
   senders' sketches in a secret projection drawn from those nonces. A wrong average (the same
   wrong values to everyone) fails the attempt and its reducer is accused.
5. Peers caught sending invalid data are accused in the next attempt's gather (up to
   ``max_attempts`` per round) and excluded there by everyone, so the retry is the average of the
   remaining valid members. So are peers this member saw stall (a wait on them timed out while the
   attempt was live: STALLED), or one member stalling every attempt would fail the round; they are
   not reported to the coordinator, since a dropped link looks the same.

Three hivemind 1.1.12 behaviours that broke rounds in the swarm tests are worked around here:
a peer assembled a partial group at its first DHT declaration (:mod:`.matchmaking`); a groupmate
hanging up before the runner existed cancelled the group's runner future for everyone
(:meth:`VerifiedAverager.rpc_aggregate_part` awaits it through ``shield``); a late part for a group
already left waited for the *next* group to register (it is answered CANCELLED at once). A fourth,
p2pd dropping the last messages of a stream at close, is handled in :mod:`.reduction`.

Everything the averager process returns crosses hivemind's MPFuture by pickling, so the reports are
plain dataclasses of str/int/float/dict (peer ids in base58). No data a peer sent is unpickled:
tickets are protobuf, gather entries msgpack, tensor parts hivemind's protobuf.

Timeouts are always set (hivemind's defaults are ``None``: a silent peer would hang the group):
``matchmaking_timeout`` bounds finding a group, ``sender_timeout`` the wait for a sender's next
part, ``reducer_timeout`` (> sender_timeout) the wait for a reducer's next average,
``allreduce_timeout`` one attempt's reduction, ``round_timeout`` the whole :meth:`average` call.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import gc
import hashlib
import logging
import math
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import AsyncIterator  # typing's, not collections.abc's: hivemind's handler registry reads its _name

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.compression import CompressionBase, NoCompression
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import achain, anext, as_aiter, cancel_and_wait, enter_asynchronously

from grpo_swarm.node import allocator
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.identity import Identity, base58_decode, base58_encode, peer_id_from_public_key

from .dht_shutdown import HANDLER_REMOVAL_S
from .direct_reads import install_direct_reads
from .fork_locks import DeathSafeLock
from .matchmaking import PatientMatchmaking
from .group_plan import GroupPlan
from .part_codec import NORM_TOLERANCE, check_compression, sum_of_squares
from .reduction import VerifiedAllReduceRunner
from .refusals import refuse
from .round_report import SELF_EXCLUDED, AttemptReport, RoundResult, withdrawn_wrong_averages
from .share_audit import AuditStore, Findings, commitment, nonce_for
from .share_audit_rpc import ShareAuditRPC
from .share_sketch import DEFAULT_AUDIT_FRACTION, check_audit_fraction
from .sit_outs import DEFAULT_SIT_OUT_LIMIT, BreakMemory
from .child_calls import ChildSilent, start_child, start_step
from .gather import GatherClaim, encode_gather
from .reasons import Reason
from .tickets import WEIGHT_MODES, is_valid_public_key
from .verdicts import (
    GROUP_VIEW_BYTES,
    RoundRules,
    SlotVerdict,
    accusation_list,
    breakers_outside,
    check_own_ticket,
    group_view,
    group_verdicts,
    next_first_failed,
    struck_breakers,
)
from .wire import WireAveragingData

logger = logging.getLogger(__name__)

WIRE_NAME = "VerifiedAverager"  # RPC handler names: "{prefix}::VerifiedAverager.rpc_*", whatever the Python class
# bytes per part (hivemind's default: 512 KiB). Parts travel without protobuf copies (.wire), so larger
# parts cost less CPU, but over a capped home link smaller ones keep the uplink busier (bench/RESULTS.md)
PART_SIZE_BYTES = 1 << 20
LOAD_CHUNK = 1 << 16  # values copied, then measured, at a time: 256 KiB of float32, still in L2 for the norm
STEP_MARGIN_S = 10.0  # past its matchmaking, all-reduce and audit timeouts and this, a step is stuck
STEP_STUCK = "the averaging step did not finish within its timeouts"
AVERAGER_DIED = "the averager process is gone"
LIVENESS_POLL_S = 1.0  # while a step runs, how often the averager process is checked to be alive
START_LIMIT_S = 60.0  # an averager process not ready by then (it died or wedged as it started) is killed
ALLREDUCE_GRACE_S = 5.0  # hivemind's own all-reduce timeout sits this far behind ours, as a backstop
ROUND_WENT_ON = "the round went on without this node (no retry)"
ROUND_OVER_POLL_S = 3.0  # while looking for a group, how often the caller's round_over is asked


class LocalGradientError(ValueError):
    """This node's own gradient cannot enter a round (shape, dtype, NaN/inf, norm above the bound)."""


def _is_buffer(t: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether ``t`` is exactly ``buf``'s memory (same place, shape, dtype, layout): nothing to copy."""
    return (t.device.type == "cpu" and t.dtype == buf.dtype and t.shape == buf.shape and t.is_contiguous()
            and t.data_ptr() == buf.data_ptr())


def tensors_sha256(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the tensors' raw bytes, in order (what must be equal on every honest peer)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _await_chain(awaitable) -> list[str]:
    """Where a coroutine waits: its frame, the frame of what it awaits, and so on down."""
    def first(*names):  # coroutines, generators and async generators name the same things differently
        return next((v for v in (getattr(awaitable, n, None) for n in names) if v is not None), None)

    out = []
    while awaitable is not None:
        frame = first("cr_frame", "gi_frame", "ag_frame")
        if frame is None:
            out.append(type(awaitable).__name__)
            break
        out.append(f"{frame.f_code.co_name} ({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})")
        awaitable = first("cr_await", "gi_yieldfrom", "ag_await")
    return out


def averager_unusable(error: str | None) -> bool:
    """Whether an attempt's error says its averager process can take no further step: stuck past every
    timeout, or gone. A retry would wait on that same process; the caller restarts it (.liveness)."""
    return (error or "").startswith((STEP_STUCK, AVERAGER_DIED))


RETRY_RULE_PEERS = 5  # the smallest round whose retries wait for expected members and shun left-out leaders


def retry_members(expected_keys: frozenset[bytes] | None, attempts: Sequence[AttemptReport],
                  accusations: Iterable[tuple[bytes, str]], first_failed: tuple[bytes, str] | None = None,
                  sit_out: Iterable[bytes] = ()) -> tuple[frozenset[bytes] | None, frozenset[bytes]]:
    """(the peer ids a retry's partial group waits for, those it does not follow as leader) for
    :class:`.matchmaking.PatientMatchmaking`. After an attempt that failed in a group, it does not
    follow the peers that the attempt's verdicts excluded or this node accuses, and waits for the
    round's other peers but the one it saw fail first (``first_failed``, likely the breaker). Members
    that only heard of the failure through others' aborts (in a larger group, those reducing no
    share the failing peer sent to) end their attempt up to the hear-out later than one that saw it
    first-hand, and would find the retry's group formed without them. (None, nothing) for a first
    attempt, and for rounds of fewer than RETRY_RULE_PEERS peers or whose peers are not known: with
    three or four every member reduces a share of every sender's and sees a failure first-hand, and
    the rule only made retries slower and a staller miss the verdict that tells it why (bench/RESULTS.md,
    session 33). In rounds of RETRY_RULE_PEERS or more, no attempt follows a peer this node lists as
    sitting out (``sit_out``, :mod:`.sit_outs`): one that breaks first attempts and leads the retries'
    groups otherwise spends every round's first attempt."""
    last = attempts[-1] if attempts else None
    if expected_keys is None or len(expected_keys) < RETRY_RULE_PEERS:
        return None, frozenset()
    if last is None or last.ok or not last.members:
        return None, frozenset(map(bytes, sit_out))
    gone = frozenset({base58_decode(p) for p in last.excluded} | {bytes(p) for p, _ in accusations} |
                     set(map(bytes, sit_out)))
    skip = gone | ({bytes(first_failed[0])} if first_failed is not None else set())
    return frozenset(pid for pid in map(peer_id_from_public_key, expected_keys) if pid not in skip), gone


def left_peers(expected_keys: frozenset[bytes] | None, gone: Callable[[], Iterable[bytes]] | None) -> frozenset[bytes]:
    """The round's peers (node public keys) that ``gone()`` says have left its averaging; nothing when
    the round's peers are not known, or ``gone`` fails (it asks the coordinator: a retry then waits
    as it would)."""
    if expected_keys is None or gone is None:
        return frozenset()
    try:
        return frozenset(map(bytes, gone())) & expected_keys
    except Exception as e:  # noqa: BLE001 - only a shortcut: the attempt goes on without it
        logger.debug(f"could not tell which peers left the round: {e!r}")
        return frozenset()


def group_target(expected_keys: frozenset[bytes] | None, left: frozenset[bytes], min_group_size: int) -> int | None:
    """The size at which an attempt's group is full and starts at once: the round's peers but those
    that ``left`` (never below the strict majority of all of them an attempt needs, nor
    ``min_group_size``). None: the round's own (nobody left, or the round's peers are not known)."""
    if expected_keys is None or not left:
        return None
    size = len(expected_keys)
    return max(round_min_size(size, min_group_size), size - len(left & expected_keys))


def round_min_size(size: int, min_group_size: int) -> int:
    """The fewest of a round's ``size`` peers an attempt's group may have: a strict majority of them
    (two disjoint groups can never both succeed in one round), at least ``min_group_size``."""
    return min(max(min_group_size, size // 2 + 1), size)


def _b58(peer_id: PeerID | bytes) -> str:
    return base58_encode(peer_id.to_bytes() if isinstance(peer_id, PeerID) else bytes(peer_id))


def rebuild_thread_pool_after_fork() -> None:
    """Rebuild torch's intra-op thread pool in a forked process, from one thread. torch rebuilds it
    lazily in the first thread that needs it, and two threads doing so at once can find none
    ("Invalid thread pool!", about one fork in seven here) — the audit sketches in two threads."""
    torch.set_num_threads(torch.get_num_threads())


class CancelledStepsQuiet:
    """hivemind's step without its one noisy race (mixed into :class:`VerifiedAverager`): the join loop
    cancels a step still looking for a group once the round went on (:meth:`VerifiedAverager._step_result`),
    and a group found in that instant runs its all-reduce anyway. hivemind then sets the cancelled
    step's result, which raises ``InvalidStateError`` out of the step's task, and asyncio logs it as a
    task exception never retrieved (seen after a node slept through its round, bench/churn.py). The
    caller has reported the attempt already: the report is dropped, and said so at INFO."""

    async def _step(self, *, step: StepControl, future_for_init) -> None:
        try:
            await super()._step(step=step, future_for_init=future_for_init)
        except concurrent.futures.InvalidStateError:
            if not step.cancelled():
                raise
            logger.info("a step cancelled while its group formed finished its all-reduce; its report is dropped")


class VerifiedAverager(CancelledStepsQuiet, ShareAuditRPC, DecentralizedAverager):
    """Averages this node's gradient with the round's other ticket-holders (see the module docstring).

    :param tensors: parameters or gradient tensors; only their shapes are used (the averager keeps
      float32 CPU buffers of its own, shared with its background process)
    :param dht: a started hivemind DHT whose peer id is ``identity``'s (:func:`.dht.start_dht`)
    :param prefix: the swarm's averaging namespace (no dots), the same on every peer of the run
    :param identity: this node's key: signs the gather entries
    :param coordinator_key: the coordinator's Ed25519 public key (32 bytes): signs the tickets
    :param run_id: tickets of other runs are refused
    :param weight_mode: ``sequences`` (grpo, dr_grpo) or ``tokens`` (bnpo, dapo), see
      :func:`.tickets.weight_mode_for_loss`
    :param norm_bound: no member may commit to (or send) a gradient with a larger L2 norm
    :param compression: ``NoCompression()`` or ``Float16Compression()``
    :param ticket_type: protobuf class tickets parse as (an extended schema in tests until the
      coordinator's ticket carries ``accepted_tokens``)
    :param require_final_ticket: only count tickets the coordinator marked final
    :param min_contributors: an attempt with fewer valid members fails (the same everywhere)
    :param max_attempts: attempts per round (a retry excludes peers accused in earlier attempts; a
      third lets an accusation withdrawn in a dispute count no more: :func:`.round_report.withdrawn_wrong_averages`)
    :param audit_reducers: run the share audit after each reduction (:mod:`.share_audit`)
    :param audit_timeout: seconds for the audit's two exchanges together
    :param audit_fraction: the share of each share's rows the audit reads, asked for in the gather (the
      group takes its contributors' largest; :mod:`.share_sketch`)
    :param sit_out_limit: the longest a peer that broke an earlier round's averaging is listed as sitting
      out, in rounds (:mod:`.sit_outs`; 0: nobody is listed)
    :param direct_reads: read large stream messages straight into their buffers (:mod:`.direct_reads`)
    :param keep_freed_memory: the averager process keeps freed memory for reuse (node/allocator.py)
    """

    # each class collects its own RPC handlers (ServicerBase caches them per class, by name)
    _rpc_handlers = None
    _stub_type = None
    runner_class = VerifiedAllReduceRunner

    def __init__(
        self,
        tensors: Iterable[torch.Tensor],
        *,
        dht,
        prefix: str,
        identity: Identity,
        coordinator_key: bytes,
        run_id: str,
        weight_mode: str,
        norm_bound: float,
        compression: CompressionBase | None = None,
        ticket_type: type = pb.AdmissionTicket,
        require_final_ticket: bool = False,
        target_group_size: int | None = None,
        min_group_size: int = 2,
        min_contributors: int = 2,
        min_matchmaking_time: float = 2.0,
        request_timeout: float = 1.0,
        matchmaking_timeout: float = 30.0,
        sender_timeout: float = 5.0,
        reducer_timeout: float | None = None,
        allreduce_timeout: float = 60.0,
        round_timeout: float | None = None,
        max_attempts: int = 3,
        part_size_bytes: int | None = None,
        audit_reducers: bool = True,
        audit_timeout: float | None = None,
        audit_fraction: float = DEFAULT_AUDIT_FRACTION,
        sit_out_limit: int = DEFAULT_SIT_OUT_LIMIT,
        direct_reads: bool = True,
        keep_freed_memory: bool = True,
        client_mode: bool | None = None,
        start: bool = True,
        **kwargs,
    ):
        compression = NoCompression() if compression is None else compression
        check_compression(compression)
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
        if not is_valid_public_key(coordinator_key):
            raise ValueError("coordinator_key must be a 32-byte Ed25519 public key")
        if not (math.isfinite(norm_bound) and norm_bound > 0):
            raise ValueError("norm_bound must be a positive finite number")
        reducer_timeout = 2 * sender_timeout if reducer_timeout is None else reducer_timeout
        if not 0 < sender_timeout < reducer_timeout:
            raise ValueError("timeouts must satisfy 0 < sender_timeout < reducer_timeout")
        if not 0 < request_timeout < min_matchmaking_time < matchmaking_timeout:
            raise ValueError("timeouts must satisfy 0 < request_timeout < min_matchmaking_time < matchmaking_timeout")
        if allreduce_timeout <= reducer_timeout:
            raise ValueError("allreduce_timeout must exceed reducer_timeout")
        if max_attempts < 1 or min_contributors < 1:
            raise ValueError("max_attempts and min_contributors must be >= 1")
        if dht.peer_id.to_bytes() != identity.peer_id:
            raise ValueError(f"the DHT runs as {dht.peer_id}, not as this identity ({identity.peer_id_base58}): "
                             "start it with grpo_swarm.node.swarm.dht.start_dht(identity)")
        buffers = [torch.zeros(tuple(t.shape), dtype=torch.float32) for t in tensors]
        if not buffers:
            raise ValueError("nothing to average")
        # the averages are written here, never over the local gradient (hivemind's in-place way): the
        # gradient stays intact for the audit and for a retry, and nothing needs restoring after a
        # failed attempt. Shared with the averager process (forked after this).
        self._output_buffers = [torch.zeros_like(b).share_memory_() for b in buffers]
        # set before DecentralizedAverager.__init__: the background process is forked from this state
        self.identity = identity
        self.coordinator_key = bytes(coordinator_key)
        self.run_id = run_id
        self.weight_mode = weight_mode
        self.norm_bound = float(norm_bound)
        self.ticket_type = ticket_type
        self.require_final_ticket = require_final_ticket
        self.min_contributors = min_contributors
        self.min_group_size, self.target_group_size = min_group_size, target_group_size
        self._round_target = target_group_size  # (the averager process's, set by each round: _set_round)
        self.matchmaking_timeout = matchmaking_timeout
        self.verified_allreduce_timeout = allreduce_timeout
        self.max_attempts = max_attempts
        self.round_timeout = (round_timeout if round_timeout is not None
                              else max_attempts * (matchmaking_timeout + allreduce_timeout))
        self.tolerance = NORM_TOLERANCE[type(compression)]
        self.audit_reducers = audit_reducers
        self.audit_fraction = check_audit_fraction(audit_fraction)
        self.break_memory = BreakMemory(sit_out_limit)  # the caller's side: rounds are made there
        self.direct_reads = direct_reads
        self.keep_freed_memory = keep_freed_memory
        self.audit_timeout = 2 * reducer_timeout if audit_timeout is None else audit_timeout
        self._audit_secret = os.urandom(32)  # nonces derive from it in both processes (forked after this)
        self._audit_stores: dict[tuple[bytes, int], AuditStore] = {}  # (group, phase) -> entries held
        self._background_calls: set = set()
        self._last_audit: tuple | None = None  # (group, the other contributors, deadline): _linger_for_audits
        self._gone_peers: frozenset[bytes] = frozenset()  # the round's peers known to have left (_set_gone)
        # set by the averager process while its share audit waits on a member: only then does the node
        # ask the coordinator who left (a reduction of a large model runs for minutes: no polling then)
        self._audit_waiting = mp.Value(ctypes.c_bool, False, lock=False)
        self._rules: RoundRules | None = None  # the current round's rules, in the background process
        self._finished_groups: dict[bytes, None] = {}  # recently left group ids (insertion-ordered)
        self._round_lock = threading.Lock()
        super().__init__(
            buffers, dht, start=False, prefix=prefix, target_group_size=target_group_size,
            min_group_size=min_group_size, min_matchmaking_time=min_matchmaking_time,
            request_timeout=request_timeout, part_size_bytes=part_size_bytes or PART_SIZE_BYTES,
            allreduce_timeout=allreduce_timeout + ALLREDUCE_GRACE_S, next_chunk_timeout=sender_timeout,
            sender_timeout=sender_timeout, reducer_timeout=reducer_timeout, compression=compression,
            client_mode=client_mode, allow_state_sharing=False, **kwargs)
        # held by the averager process through each all-reduce, and by this one to load a gradient:
        # hivemind's semaphore stayed held when the averager was killed holding it (.fork_locks)
        self.lock_averaged_tensors = DeathSafeLock()
        if start:
            start_child(self, limit=START_LIMIT_S, what="averager")

    def __del__(self):
        if hasattr(self, "_parent_pid"):  # __init__ may have refused its arguments before hivemind's
            super().__del__()

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        handle_name = f"{WIRE_NAME}.{method_name}"
        return f"{namespace}::{handle_name}" if namespace is not None else handle_name

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        """hivemind's, which ignores SIGINT in the calling process so that the forked averager inherits
        that: it then left the node itself deaf to Ctrl-C for good. The averager still starts with
        SIGINT ignored (the node stops it); the caller's handler is put back once it has started."""
        held = signal.getsignal(signal.SIGINT)
        try:
            super().run_in_background(await_ready=await_ready, timeout=timeout)
        finally:
            if held is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, held)

    def run(self):
        """The averager process (hivemind's): with ``keep_freed_memory``, its malloc keeps the part buffers
        a round frees for the next round (node/allocator.py; a forked averager inherits the caller's
        setting, a bench's or a spawned one would not). Everything the fork inherited is moved out of the
        garbage collector's sight: a full collection scanning it pauses a member's round start by about a
        tenth of a second, and the whole group waits for that member."""
        if self.keep_freed_memory:
            allocator.keep_freed_memory()
        rebuild_thread_pool_after_fork()
        gc.freeze()
        super().run()

    async def add_p2p_handlers(self, p2p, wrapper=None, *, namespace: str | None = None, **kwargs) -> None:
        before = set(p2p._client.control.handlers)
        await super().add_p2p_handlers(p2p, wrapper, namespace=namespace, **kwargs)
        if p2p is self._p2p:  # the averager's own replica, not one lent by a caller
            self._install_direct_reads(sorted(set(p2p._client.control.handlers) - before))

    def _install_direct_reads(self, handler_names: list[str] = ()) -> None:
        """Once per replica: our streams (and in client mode, with no handlers, our calls) read
        large parts directly while `direct_reads` is on."""
        if not getattr(self._p2p, "_direct_reads", False):
            # the largest honest message: an average of an 8-bit part, sent back in fp16 (2x the part)
            max_message = 4 * self.allreduce_kwargs["part_size_bytes"] + (1 << 20)
            install_direct_reads(self._p2p, list(handler_names), max_message, enabled=lambda: self.direct_reads)
            self._p2p._direct_reads = True

    # ------------------------------------------------------------------ the caller's side
    def round_rules(self, round_index: int, expected_peers: Iterable[bytes] | None = None) -> RoundRules:
        expected = None
        if expected_peers is not None:
            expected = frozenset(bytes(k) for k in expected_peers)
            if not all(is_valid_public_key(k) for k in expected):
                raise ValueError("expected_peers must be 32-byte node public keys")
        return RoundRules(coordinator_key=self.coordinator_key, run_id=self.run_id, round_index=int(round_index),
                          norm_bound=self.norm_bound, weight_mode=self.weight_mode, expected_keys=expected,
                          require_final=self.require_final_ticket, ticket_type=self.ticket_type,
                          min_contributors=self._min_contributors(None if expected is None else len(expected)))

    def _min_contributors(self, group_size: int | None) -> int:
        """Valid members an attempt needs: with the round's peers known, a strict majority of them, so
        that two disjoint groups can never both succeed in one round."""
        if group_size is None:
            return self.min_contributors
        return min(max(self.min_contributors, group_size // 2 + 1), group_size)

    def load_local_gradient(self, grads: Sequence[torch.Tensor]) -> float:
        """Copy ``grads`` into the averager's buffers and return their L2 norm; LocalGradientError if
        they cannot enter a round. Own tensors are checked here because reducers never check their own
        sender's parts. The norm is taken of each chunk just after copying it, while it is in cache:
        one read of the gradient for the copy and the check together."""
        if len(grads) != len(self._averaged_tensors):
            raise LocalGradientError(f"expected {len(self._averaged_tensors)} tensors, got {len(grads)}")
        for i, (g, buf) in enumerate(zip(grads, self._averaged_tensors)):
            if g is None or tuple(g.shape) != tuple(buf.shape) or not torch.is_floating_point(g):
                raise LocalGradientError(f"tensor {i} must be a floating tensor of shape {tuple(buf.shape)}")
        squares = 0.0
        with self.get_tensors() as buffers, torch.no_grad():
            for i, (g, buf) in enumerate(zip(grads, buffers)):
                dst = buf.view(-1)
                in_place = _is_buffer(g, buf)  # computed in the buffers (gradient_buffers): checked, not copied
                if not in_place and g.device.type != "cpu":  # one transfer straight into the buffer, checked there
                    buf.copy_(g.detach())
                    in_place = True
                if in_place:  # whole-tensor calls: each torch call from a thread waits for the GIL anew
                    tensor_squares = sum_of_squares(dst)  # NaN/inf (or squares past float32) too
                else:  # (copy_ converts bf16 & co. a chunk at a time)
                    src, tensor_squares = g.detach().reshape(-1), 0.0
                    for start in range(0, dst.numel(), LOAD_CHUNK):
                        chunk = dst[start: start + LOAD_CHUNK]
                        chunk.copy_(src[start: start + LOAD_CHUNK])
                        tensor_squares += float(torch.dot(chunk, chunk))
                if not math.isfinite(tensor_squares):
                    raise LocalGradientError(f"tensor {i} holds NaN or infinite values (or overflows float32)")
                squares += tensor_squares
        norm = math.sqrt(squares)
        if not norm <= self.norm_bound:
            raise LocalGradientError(f"gradient norm {norm:.6g} is above norm_bound {self.norm_bound:g}")
        return norm

    def gradient_buffers(self) -> list[torch.Tensor]:
        """The averager's input tensors (float32, CPU, shared with its process). A trainer on the CPU can
        compute its gradient straight into them (bound as ``param.grad``): :meth:`average` then checks
        them where they are instead of copying them in. Nothing may write them while a round runs."""
        return list(self._averaged_tensors)

    def result_buffers(self) -> list[torch.Tensor]:
        """Where the last successful round's average is (float32, CPU), until the next round starts:
        as :meth:`average`'s ``out``, the result is these tensors and nothing is copied."""
        return list(self._output_buffers)

    @staticmethod
    def commit_norm(grads: Sequence[torch.Tensor]) -> float:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def gather_entry(self, claim: GatherClaim) -> bytes:
        return encode_gather(self.identity, claim)

    def average(self, round_index: int, ticket_bytes: bytes, grads: Sequence[torch.Tensor], *,
                expected_peers: Iterable[bytes] | None = None, max_attempts: int | None = None,
                out: Sequence[torch.Tensor] | None = None, straggler_wait: float = 0.0,
                round_over: Callable[[], bool] | None = None,
                gone: Callable[[], Iterable[bytes]] | None = None,
                left_now: Callable[[], Iterable[bytes]] | None = None) -> RoundResult:
        """Average ``grads`` with this round's peers; see the module docstring.

        ``ticket_bytes``: this node's serialized AdmissionTicket for ``round_index``.
        ``expected_peers``: the round's node public keys, when the coordinator lists them: others are
        excluded, matchmaking waits for all of them (``min_matchmaking_time`` or ``straggler_wait`` for
        stragglers), and an attempt needs a strict majority of them as valid contributors — two
        disjoint groups can then never both succeed in one round (without the list,
        ``min_group_size`` / ``min_contributors`` apply, and a split swarm can average in two groups).
        ``max_attempts``: overrides the constructor's for this round.
        ``straggler_wait``: seconds a partial group waits for the rest when longer than
        ``min_matchmaking_time`` (a full group still starts at once): the round's peers reach the
        averaging as far apart as their gradients take, and one left out loses its verified work.
        ``round_over``: asked after a failed attempt and every few seconds while looking for a group;
        True (e.g. the coordinator already published the round's version) ends the round at once,
        without a retry.
        ``gone``: asked before each attempt: the round's peers (node public keys) known to have left
        its averaging (the coordinator's ``round_moved_on``: they started sampling the next round or
        said they are leaving). The attempt's group counts as full without them, so nobody waits
        the straggler or retry wait for a peer that will not come; an attempt still needs the same
        strict majority of all the round's peers.
        ``left_now``: asked every ``LIVENESS_POLL_S`` while an attempt's share audit waits on a member
        for longer than ``AUDIT_WAITING_S``: the round's peers known to have left now (node public keys; it
        may ask the coordinator). The audit waits for a departed member's entries one call more, not its
        full timeout: a node killed mid-audit (its goodbye said by its watcher) holds nobody.
        ``out``: tensors (e.g. the gradients themselves) to write the average into on success, which
        the result then holds (:meth:`result_buffers`: no copy); by default the result holds new tensors.
        ``grads`` may be :meth:`gradient_buffers` themselves (computed in place): checked, not copied.
        Raises LocalGradientError / ProtocolError / ValueError for this node's own bad input (nothing
        is sent then); a failed round is a result with ``ok=False``, never an exception.
        """
        if not (isinstance(straggler_wait, (int, float)) and math.isfinite(straggler_wait) and straggler_wait >= 0):
            raise ValueError(f"straggler_wait must be a finite number of seconds >= 0, got {straggler_wait!r}")
        with self._round_lock:
            started = time.monotonic()
            if not self.is_alive():  # (its buffers' lock may have died with it: nothing to wait for)
                report = AttemptReport(error=f"{AVERAGER_DIED} (exit code {self.exitcode})")
                return RoundResult(False, round_index, None, [report], 0.0, error=report.error)
            rules = self.round_rules(round_index, expected_peers)
            claims = self.check_own_ticket(ticket_bytes, rules)
            weight = claims.weight(self.weight_mode)
            norm = self.load_local_gradient(grads)  # a round never writes these buffers: retries reuse them
            group_size = len(rules.expected_keys) if rules.expected_keys is not None else None
            self._outer_pipe.send(("_set_round", [round_index, rules.expected_keys, group_size], {}))
            sit_out = self.break_memory.sitting_out(round_index, self.peer_id.to_bytes(), rules.expected_peer_ids)
            attempts: list[AttemptReport] = []
            try:
                return self._attempts(round_index, ticket_bytes, rules, weight, norm, sit_out, attempts, started,
                                      max_attempts, out, straggler_wait, round_over, gone, left_now)
            finally:
                self.break_memory.record(round_index, attempts)

    def _attempts(self, round_index: int, ticket_bytes: bytes, rules: RoundRules, weight: float, norm: float,
                  sit_out: tuple[bytes, ...], attempts: list[AttemptReport], started: float, max_attempts: int | None,
                  out: Sequence[torch.Tensor] | None, straggler_wait: float,
                  round_over: Callable[[], bool] | None, gone: Callable[[], Iterable[bytes]] | None,
                  left_now: Callable[[], Iterable[bytes]] | None = None) -> RoundResult:
        """The attempts of :meth:`average`'s round, each appended to ``attempts`` as it ends."""
        deadline = started + self.round_timeout
        accusations: tuple[tuple[bytes, str], ...] = ()
        first_failed: tuple[bytes, str] | None = None
        for attempt in range(max_attempts or self.max_attempts):
            remaining = deadline - time.monotonic()
            if remaining <= self.matchmaking_kwargs["min_matchmaking_time"]:
                break
            nonce = nonce_for(self._audit_secret, round_index, attempt)
            claim = GatherClaim(bytes(ticket_bytes), int(round_index), attempt, norm, accusations, commitment(nonce),
                                self.audit_fraction, first_failed, sit_out)
            entry = self.gather_entry(claim)
            timeout = min(self.matchmaking_timeout, remaining)
            wait = self._matchmaking_wait(attempts, timeout, straggler_wait)
            members, shunned = retry_members(rules.expected_keys, attempts, accusations, first_failed, sit_out)
            left = left_peers(rules.expected_keys, gone)
            if members is not None and left:
                members = members - {peer_id_from_public_key(k) for k in left}
            target = group_target(rules.expected_keys, left, self.min_group_size)
            self._outer_pipe.send(("_set_retry", [members, shunned, target], {}))
            report = self._attempt(entry, weight, timeout, wait, round_over, self._gone_teller(rules, left_now))
            report.attempt = attempt
            attempts.append(report)
            if report.ok:
                with self.get_tensors(), torch.no_grad():
                    if out is None:
                        averaged = [b.clone() for b in self._output_buffers]
                    else:
                        averaged = list(out)
                        for dst, b in zip(averaged, self._output_buffers, strict=True):
                            if not _is_buffer(dst, b):
                                dst.copy_(b)
                return RoundResult(True, round_index, averaged, attempts, time.monotonic() - started)
            accusations = accusation_list([*accusations, *report.accused_pairs()])
            first_failed = next_first_failed(first_failed, report.first_failed_pair())
            withdrawn = {base58_decode(p) for p in withdrawn_wrong_averages(attempts, self.peer_id.to_base58())}
            accusations = tuple((p, r) for p, r in accusations
                                if not (p in withdrawn and r == Reason.WRONG_AVERAGE.value))
            if (report.error or "").startswith(SELF_EXCLUDED):
                break  # the verdicts are deterministic: a retry in this round would exclude us again
            if averager_unusable(report.error):
                break
            if ROUND_WENT_ON not in (report.error or "") and round_over is not None and round_over():
                report.error = f"{report.error or 'failed'}; {ROUND_WENT_ON}"
            if ROUND_WENT_ON in (report.error or ""):
                break  # the others averaged without us: a retry would wait a matchmaking timeout for nobody
        last = attempts[-1].error if attempts else "no time left for an attempt"
        return RoundResult(False, round_index, None, attempts, time.monotonic() - started,
                           error=last or "the round did not complete")

    def check_own_ticket(self, ticket_bytes: bytes, rules: RoundRules):
        return check_own_ticket(ticket_bytes, self.identity, rules)

    def _matchmaking_wait(self, attempts: Sequence[AttemptReport], timeout: float, straggler_wait: float = 0.0
                          ) -> float:
        """Seconds a partial group waits for the rest (a full group starts at once): the larger of
        ``min_matchmaking_time`` and ``straggler_wait``. After an attempt that failed on timeouts or
        cancels, with nobody accused, its other members come back only once their own timeouts expire
        (up to a reducer timeout after us): a retry that started without them would leave honest peers
        out of the round."""
        wait = max(self.matchmaking_kwargs["min_matchmaking_time"], straggler_wait)
        last = attempts[-1] if attempts else None
        if last is not None and last.members and last.failed and not last.accused:
            wait += self.allreduce_kwargs["reducer_timeout"]
        return min(wait, 0.8 * timeout)

    def _gone_teller(self, rules: RoundRules, left_now: Callable[[], Iterable[bytes]] | None
                     ) -> Callable[[], None] | None:
        """For :meth:`_step_result`: while the share audit waits on a member, asks ``left_now`` and
        passes the round's peers newly known gone to the averager process (``_set_gone``)."""
        if left_now is None or rules.expected_keys is None:
            return None
        told: set[bytes] = set()

        def tell() -> None:
            if not self._audit_waiting.value:
                return
            new = left_peers(rules.expected_keys, left_now) - told
            if new:
                told.update(new)
                self._outer_pipe.send(("_set_gone", [frozenset(peer_id_from_public_key(k) for k in new)], {}))
        return tell

    def _attempt(self, entry: bytes, weight: float, timeout: float, wait: float,
                 round_over: Callable[[], bool] | None = None, tell_gone: Callable[[], None] | None = None
                 ) -> AttemptReport:
        try:
            # a step runs its matchmaking, then its all-reduce and audit under hivemind's timeout: past
            # all of that (and a margin) it is stuck, and the node must not wait on it forever
            limit = timeout + self._allreduce_timeout + self.audit_timeout + STEP_MARGIN_S
            control = start_step(self, gather=entry, weight=weight, timeout=timeout,
                                 scheduled_time=get_dht_time() + wait, limit=STEP_MARGIN_S)
            report = self._step_result(control, round_over, limit, alive=self.is_alive, tell_gone=tell_gone)
            if isinstance(report, AttemptReport) and (report.error or "").startswith(STEP_STUCK):
                self._outer_pipe.send(("_log_tasks", [report.error], {}))  # where it waits: for the log
        except ChildSilent as e:
            return AttemptReport(error=f"{AVERAGER_DIED if e.gone else STEP_STUCK}: {e}")
        except Exception as e:  # noqa: BLE001 - no group, timeouts: a failed attempt, reported
            return AttemptReport(error=f"{type(e).__name__}: {e}"[:500])
        if not isinstance(report, AttemptReport):
            return AttemptReport(error=f"unexpected step result {type(report).__name__}")
        return report

    @staticmethod
    def _step_result(control: StepControl, round_over: Callable[[], bool] | None, limit: float | None = None,
                     alive: Callable[[], bool] | None = None, tell_gone: Callable[[], None] | None = None):
        """The step's result. With ``round_over``: asked every ROUND_OVER_POLL_S while the step is still
        looking for a group; True cancels the search (hivemind's StepControl.cancel, which ends its
        matchmaking) and waits for the step to wind down, so the next round's step never meets a
        search still running. Once the round's version is out, no group this node could find would
        hold a majority of the round's peers, so nothing is lost. With ``limit``: a step still
        unfinished after that many seconds is cancelled and reported as a failed attempt. With
        ``alive``: asked every LIVENESS_POLL_S; False (the averager process died: nothing will ever
        answer the step) reports the attempt failed at once. With ``tell_gone``: called at each poll
        (every LIVENESS_POLL_S) while the step reduces and audits (see ``left_now``)."""
        deadline = None if limit is None else time.monotonic() + limit
        # the shorter poll that is asked for (LIVENESS_POLL_S < ROUND_OVER_POLL_S)
        poll = LIVENESS_POLL_S if alive is not None else ROUND_OVER_POLL_S if round_over is not None else None
        ask_round_at = time.monotonic() + ROUND_OVER_POLL_S  # (a heartbeat to the coordinator: not every poll)
        while True:
            if alive is not None and not alive() and not control.done():
                return AttemptReport(error=f"{AVERAGER_DIED} (mid-step)")
            wait = poll
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    control.cancel()
                    return AttemptReport(error=f"{STEP_STUCK} after {limit:.0f} s (cancelled)")
                wait = remaining if wait is None else min(wait, remaining)
            try:
                return control.result(timeout=wait)
            except TimeoutError:
                if tell_gone is not None and control.stage == AveragingStage.RUNNING_ALLREDUCE:
                    tell_gone()  # (asks the coordinator only while the share audit waits on a member)
                if round_over is None or time.monotonic() < ask_round_at:
                    continue
                ask_round_at = time.monotonic() + ROUND_OVER_POLL_S
                if control.stage == AveragingStage.LOOKING_FOR_GROUP and round_over():
                    control.cancel()
                    deadline = time.monotonic() + ROUND_OVER_POLL_S
                    while control.stage != AveragingStage.FINISHED and time.monotonic() < deadline:
                        time.sleep(0.05)
                    return AttemptReport(error=f"cancelled while looking for a group; {ROUND_WENT_ON}")

    # ------------------------------------------------------------------ the averager process
    async def _shutdown(self, timeout: float | None) -> None:
        """hivemind's shutdown, after the groupmates of our last audit have read our entries (bounded:
        the parent waits ``shutdown_timeout`` for this process, then terminates it)."""
        await self._linger_for_audits(max(0.0, self.shutdown_timeout - 2.0))
        if not self.client_mode:
            try:  # (a live daemon answers in milliseconds; a dead one's persistent connection never does)
                await asyncio.wait_for(self.remove_p2p_handlers(self._p2p, namespace=self.prefix), HANDLER_REMOVAL_S)
            except (OSError, asyncio.TimeoutError) as e:  # a Ctrl-C stops p2pd too, often first: its handlers went with it
                logger.debug(f"p2pd is gone, so are this averager's handlers ({e!r})")
        # hivemind's own ends with `finalize` called on the futures its groups are registered as (and the
        # None it returns added to a set): a node stopped mid-round printed an AttributeError traceback.
        # An abort first: the round's step then reads the ended reduction as aborted, not as a failure
        # to log with its traceback ("the reduction failed unexpectedly", seen at a churn run's Ctrl-C)
        for registered in list(self._running_groups.values()):
            if registered.done() and not registered.cancelled() and registered.exception() is None:
                registered.result().abort("this averager is shutting down (the node is stopping)")
                registered.result().finalize(cancel=True)

    async def _log_tasks(self, why: str) -> None:
        """Log where each task of the averager's loop waits (a step stuck past its timeouts: the
        stacks say on what, for the user's report)."""
        me, chains = asyncio.current_task(), collections.Counter()
        for task in asyncio.all_tasks():
            if task is not me:
                chains[" -> ".join(_await_chain(task.get_coro()))] += 1
        # hivemind leaves many idle waiters on events: one line per distinct chain, with its count
        lines = [f"  {n} x {chain}" for chain, n in sorted(chains.items(), key=lambda kv: kv[1])]
        logger.warning("%s; the averager's tasks:\n%s", why, "\n".join(lines))

    async def _set_round(self, round_index: int, expected_keys: frozenset[bytes] | None, group_size: int | None):
        """Runs in the averager process before a round's steps (the control pipe keeps the order)."""
        self._rules = self.round_rules(round_index, expected_keys)
        self._gone_peers = frozenset()
        if type(self._matchmaking) is Matchmaking:  # hivemind builds it inside _run_internal: swap the class
            self._matchmaking.__class__ = PatientMatchmaking
        self._matchmaking.round_keys = expected_keys  # only the round's peers may take a slot in its groups
        self._matchmaking.round_index = int(round_index)  # a search of an earlier round ends, and is refused
        self._matchmaking.end_leftover_search()
        # a group key per round: peers still in another round can never join this one's groups
        self._matchmaking.group_key_manager.prefix = f"{self.prefix}_r{int(round_index)}"
        # with the round's peers known: wait for all of them, and never average fewer than a strict
        # majority of them, so that two disjoint groups can never both succeed in one round
        if group_size is None:
            target, min_size = self.target_group_size, self.min_group_size
        else:
            target, min_size = group_size, round_min_size(group_size, self.min_group_size)
        self._round_target = target
        self._matchmaking.target_group_size = self._matchmaking.potential_leaders.target_group_size = target
        self._matchmaking.min_group_size = min_size

    async def _set_retry(self, members: frozenset[bytes] | None, shunned: frozenset[bytes], target: int | None = None):
        """Runs in the averager process before each attempt: whom a retry waits for and whom it does not
        follow (:func:`retry_members`), and the size at which its group is full (:func:`group_target`;
        None: the round's)."""
        self._matchmaking.retry_members, self._matchmaking.shunned_leaders = members, shunned
        full = self._round_target if target is None else target
        self._matchmaking.target_group_size = self._matchmaking.potential_leaders.target_group_size = full

    async def _set_gone(self, peer_ids: frozenset[bytes]) -> None:
        """Runs in the averager process: the round's peers (peer ids) the node learned have left it; a
        running share audit stops waiting for their entries (:meth:`ShareAuditRPC._exchange`)."""
        self._gone_peers = self._gone_peers | frozenset(map(bytes, peer_ids))

    def verdicts(self, group_info: GroupInfo, rules: RoundRules) -> list[SlotVerdict]:
        return group_verdicts([p.to_bytes() for p in group_info.peer_ids], group_info.gathered, rules)

    def _refuse_group(self, group_id: bytes, reason: str) -> None:
        """Resolve the group's runner future with an error, so that parts a groupmate sends early are
        answered at once instead of waiting on a future nobody will set."""
        future = self._running_groups.get(group_id)
        if future is not None and not future.done():
            future.set_exception(RuntimeError(reason))
            future.exception()  # retrieved: no "never retrieved" warning

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs) -> AttemptReport:
        # never raise: hivemind would retry with another group inside the same step, and the caller
        # would not learn what happened; every outcome is a report
        report = AttemptReport(group_id=group_info.group_id.hex(), members=[_b58(p) for p in group_info.peer_ids])
        started = time.monotonic()
        self._install_direct_reads()  # client mode registers no handlers
        try:
            await self._verified_round(group_info, report, **kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported, with the traceback in the log
            logger.exception("verified averaging round failed")
            report.ok = False
            report.error = f"internal error: {type(e).__name__}: {e}"[:500]
            self._refuse_group(group_info.group_id, report.error)
        finally:
            self._finished_groups[group_info.group_id] = None
            while len(self._finished_groups) > 256:
                self._finished_groups.pop(next(iter(self._finished_groups)))
        report.seconds = time.monotonic() - started
        return report

    async def _verified_round(self, group_info: GroupInfo, report: AttemptReport, **kwargs) -> None:
        kwargs.pop("weight", None)  # the sender-chosen step weight: replaced by the ticket's
        try:
            if self._rules is None:
                raise RuntimeError("no round was set")
            verdicts = await asyncio.get_event_loop().run_in_executor(None, self.verdicts, group_info, self._rules)
            plan = GroupPlan.from_verdicts(group_info.peer_ids, verdicts)
        except Exception as e:  # noqa: BLE001 - a malformed group (duplicate peers, ...): refuse it
            report.error = f"group refused: {type(e).__name__}: {e}"
            self._refuse_group(group_info.group_id, report.error)
            return
        for v in plan.verdicts:
            if v.public_key and v.reason != Reason.BAD_GATHER_SIGNATURE:  # an entry signed by its key
                report.accusations_seen[_b58(v.peer_id)] = {_b58(p): r for p, r in v.accusations}
            if v.ok:
                report.weights[_b58(v.peer_id)] = v.weight
            else:
                report.excluded[_b58(v.peer_id)] = f"{v.reason.value}: {v.detail}"
        report.struck = [_b58(p) for p in struck_breakers(plan.verdicts)]
        round_peers = self._rules.expected_peer_ids
        if round_peers is not None:
            report.broke_away = {_b58(p): f"named first by {n} of the round's {len(round_peers) - 1} other peers"
                                 for p, n in breakers_outside(plan.verdicts, round_peers).items()}
        mine = plan.verdict(self.peer_id)
        if not mine.ok:
            report.error = f"{SELF_EXCLUDED}: {mine.reason.value}: {mine.detail}"
        elif len(plan.contributors) < self._rules.min_contributors:
            report.error = f"only {len(plan.contributors)} valid member(s), need {self._rules.min_contributors}"
        elif plan.reducers == 0:
            report.error = "no valid member can reduce (all are in client mode)"
        if report.error is not None:
            self._refuse_group(group_info.group_id, report.error)
            return

        async with enter_asynchronously(self.get_tensors()) as local_tensors:
            runner = self.make_runner(
                plan=plan, compression=kwargs["compression"], tolerance=self.tolerance, p2p=self._p2p,
                servicer_type=type(self), prefix=self.prefix, tensors=local_tensors, outputs=self._output_buffers,
                group_id=group_info.group_id + group_view(group_info.group_id, [p.to_bytes() for p in group_info.peer_ids],
                                                          group_info.gathered),
                weight=mine.weight, sender_timeout=kwargs["sender_timeout"], reducer_timeout=kwargs["reducer_timeout"],
                part_size_bytes=kwargs["part_size_bytes"], tensor_infos=kwargs.get("tensor_infos"))
            audit = None if self.audit_reducers else Findings()
            try:
                self._running_groups[group_info.group_id].set_result(runner)  # shielded: see rpc_aggregate_part
                await self._consume_until(runner, self.verified_allreduce_timeout)
                if self.audit_reducers and runner.succeeded():
                    audit = await self._audit_shares(group_info, plan, runner, local_tensors, self._output_buffers,
                                                     report.audit_seconds)
            except Exception as e:  # noqa: BLE001 - the runner's abort surfaces here: reported below
                if not runner.aborted:
                    logger.warning("the reduction failed unexpectedly", exc_info=True)
                runner.abort(f"{type(e).__name__}: {e}")
                report.error = f"{type(e).__name__}: {e}"[:500]
            finally:
                report.ok = runner.succeeded() and audit is not None and audit.clean
                if not report.ok:  # (the caller reads the output buffers only after a success)
                    runner.abort("the attempt failed")
        reasons = lambda d: {_b58(p): f"{r.value}: {detail}" for p, (r, detail) in d.items()}  # noqa: E731
        report.accused = reasons(runner.accused)
        report.failed = reasons(runner.failures)
        report.stalled = {_b58(p): detail for p, detail in runner.stalled.items() if p not in runner.accused}
        if audit is not None and not audit.clean:
            report.accused.update({_b58(p): f"{r.value}: {d}" for p, (r, d) in audit.accused.items()})
            report.failed.update({_b58(p): f"{r.value}: {d}" for p, (r, d) in audit.failed.items()})
            first = next(iter({**audit.accused, **audit.failed}.items()))
            report.error = f"share audit: {_b58(first[0])} {first[1][0].value}: {first[1][1]}"[:500]
        if not report.ok:
            report.error = report.error or runner.abort_reason or "the reduction did not complete"
        report.refused = {_b58(p): r for p, r in runner.refused.items()}
        if runner.first_failure is not None:
            report.first_failed = f"{_b58(runner.first_failure[0])}: {runner.first_failure[1].value}"
        elif audit is not None and not audit.accused:
            # a member silent in the audit broke the attempt: named so, one silent every attempt is left out
            silent = [(p, r) for p, (r, _) in audit.failed.items()
                      if r in (Reason.SKETCH_WITHHELD, Reason.AUDIT_UNANSWERED) and p != self.peer_id.to_bytes()]
            if silent:
                report.first_failed = f"{_b58(silent[0][0])}: {silent[0][1].value}"
        report.weight_claims_ignored = {_b58(p): w for p, w in runner.weight_claims.items()}
        report.failed_size = runner.tensor_part_container.failed_size
        report.bytes_sent, report.bytes_received = runner.bytes_sent, runner.bytes_received
        runner.release()

    async def _group_expecting(self, peer: PeerID) -> bytes | None:
        """The one running group whose reduction has ``peer`` as a sender (None: none, or several),
        waiting, like a well-formed first part, for the group to register and its runner to exist."""
        if not self._running_groups:
            try:
                await asyncio.wait_for(self._pending_groups_registered.wait(), self.request_timeout)
            except asyncio.TimeoutError:
                return None
        groups = []
        for group_id, future in list(self._running_groups.items()):
            try:
                runner = await asyncio.shield(future)
            except Exception:  # noqa: BLE001 - a refused group expects nobody
                continue
            if peer in runner.sender_peer_ids:
                groups.append(group_id)
        return groups[0] if len(groups) == 1 else None

    async def rpc_aggregate_part(self, stream: AsyncIterator[WireAveragingData], context: P2PContext
                                 ) -> AsyncIterator[WireAveragingData]:
        """hivemind's handler, except that the group's runner future is awaited through ``shield``: in
        hivemind a groupmate that opens a stream before the runner exists and then hangs up cancels
        the handler task, and with it the group's future — the round then fails for everyone (one
        cheap way for any member to sabotage a round; seen in the swarm tests as InvalidStateError)."""
        request = await anext(stream)
        # a sender's first message names the group as hivemind's id followed by its view's digest
        group_id = request.group_id[:-GROUP_VIEW_BYTES] if len(request.group_id) > GROUP_VIEW_BYTES else b""
        if request.malformed is not None:
            # no group id to read: the group whose runner expects this (authenticated) sender gets it
            # and accuses it, as it would a malformed later part
            group_id = await self._group_expecting(context.remote_id)
            if group_id is None:
                async for message in refuse(averaging_pb2.PROTOCOL_VIOLATION, stream):
                    yield message
                return
        if group_id in self._finished_groups:
            # a groupmate still sending to a group we already left (we aborted or finished): tell it
            # now, instead of hivemind's wait for our *next* group to register
            async for message in refuse(averaging_pb2.CANCELLED, stream):
                yield message
            return
        if group_id not in self._running_groups:
            try:  # the leader's BEGIN_ALLREDUCE may reach the sender before us: wait a little for it
                await asyncio.wait_for(self._pending_groups_registered.wait(), self.request_timeout)
            except asyncio.TimeoutError:
                pass
        future = self._running_groups.get(group_id)
        if future is None:
            async for message in refuse(averaging_pb2.BAD_GROUP_ID, stream):
                yield message
            return
        try:
            group = await asyncio.shield(future)
        except Exception:  # noqa: BLE001 - the group was refused (excluded, too few members, ...)
            async for message in refuse(averaging_pb2.CANCELLED, stream):
                yield message
            return
        async for message in group.rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message

    def make_runner(self, **kwargs) -> VerifiedAllReduceRunner:
        return self.runner_class(keep_parts=self.audit_reducers, **kwargs)

    @staticmethod
    async def _consume(runner: VerifiedAllReduceRunner) -> None:
        """Run the reduction: the runner writes each averaged part into the output buffers itself."""
        async for _ in runner:
            pass

    async def _consume_until(self, runner: VerifiedAllReduceRunner, timeout: float) -> None:
        """:meth:`_consume` for at most ``timeout`` seconds. At the deadline the runner first names the
        senders its share still waits for (a sender dripping its parts just under the timeouts), then
        aborts: cancelling the reduction first would finalize it and lose what it was waiting for."""
        task = asyncio.ensure_future(self._consume(runner))
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if done:
            task.result()
            return
        runner.name_laggards()
        runner.abort(f"the reduction did not finish within {timeout} s")
        await cancel_and_wait(task)

    async def _run_allreduce_inplace_(self, *args, **kwargs):
        raise NotImplementedError("VerifiedAverager runs its reduction in _aggregate_with_group")
