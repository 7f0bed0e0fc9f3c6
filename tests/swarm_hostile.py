"""Test-only hostile averagers: a :class:`VerifiedAverager` that misbehaves on the wire.

Its behaviour is chosen per round (``behaviours``: round index -> name, set before the averager
process is forked). It skips the checks of its own ticket and gradient, and — in the rounds where
its own verdict would leave it out — of its groupmates' gather entries, so it joins and sends
whatever the behaviour says; the honest peers must cope:

* ``claimed_weight``  — honest parts, but every message claims weight 1e6
* ``nan``             — NaN in every part it sends
* ``inf_fp16``        — an infinity in every part, sent through Float16Compression (→ ±65504)
* ``shape1``          — a shape-[1] part instead of its first part (it would broadcast)
* ``float64``         — parts sent as float64
* ``fp16_on_none``    — Float16Compression parts to an uncompressed averager
* ``norm_lie``        — a gradient 3 x larger than the norm it commits to (values stay plausible)
* ``over_bound``      — a huge gradient (1e5 x), honestly committed: its norm is above the bound
* ``wrong_average``   — reduces honestly, then returns its share's average shifted by a few
  percent of its norm (the same wrong bytes to everyone; plausible norm and values)
* ``sketch_lie``      — honest parts and average, but in the share audit it lies about its sketch
  of the parts it sent to another reducer (framing that reducer)
* ``sketch_equivocate`` — honest parts and average, but it signs two different sketch entries: the
  honest one for the reducer it frames, one that makes that reducer's average look wrong for the
  other members (what it answers them with too)
* ``withhold_sketch`` — reduces honestly, reveals its nonce, then sends no sketch (what a cheating
  reducer would do on learning that the revealed rows would catch it)
* ``withhold_reveal`` — reduces honestly, then never reveals its nonce (a reducer holding the others'
  nonces would know the seed, and whether the rows catch it, before choosing to stay silent)
* ``hang_in_audit`` — a runtime fault, not an attack: reduces honestly, reveals its nonce, then writes
  ``stall_marker`` and hangs before its sketch (the test kills the node there, as the out-of-memory
  killer would)
* ``false_accusation`` — hangs up in its first attempt (a first attempt that names anyone is not
  believed), then accuses ``accuse_target`` (a member it never saw misbehave) of NON_FINITE parts,
  saying it caught it first; honest parts
* ``accuse_all``      — the same, but accuses every other member
* ``reordered_view``  — in its first attempt of the round it holds the group in another slot order
  (as a member would that a hostile leader sent a different group); honest otherwise
* ``malformed``       — its last part's message is bytes that do not parse (a tensor field longer
  than the message); ``malformed_first``: its first (no readable group id)
* ``stall``           — sends its first part, writes ``stall_marker`` and hangs (the test kills it)
* ``stall_always``    — in every attempt, sends its first part and then nothing, its connection open
* ``drip``            — in every attempt, sends its parts ``drip_gap`` apart (just under the reducers'
  sender timeout), so that its share of a reducer's work outlasts the all-reduce timeout
* ``drip_hang_up``    — in every attempt, sends two parts ``drip_gap`` apart, then hangs up: under the
  two sender timeouts after which a sender that hung up is named for the time it held a share up
* ``drip_average`` — sends honest parts, but as a reducer returns each average 0.8 reducer timeouts
  after the last, so that the others' results from it outlast the all-reduce timeout
* ``hang_up``         — in every attempt, aborts as the all-reduce begins (CANCELLED to every stream), as
  an honest member does when a groupmate's abort reaches it; its later gathers say ``accuse_target``
  failed first for it
* ``hang_up_lead``    — ``hang_up`` (blaming nobody), and it leads a group as soon as one member joins
  it, with :data:`LEAD_ATTEMPTS` short attempts a round: back first after each attempt it broke, it is the
  first leader the others find, and in a group of two one member's pointer cannot leave it out. A
  round of three fails (the honest members spend their attempts in groups of two with it): what
  the coordinator's stall rule (protocol/stalls.py) is for
* ``not_in_group``    — in every attempt, answers BAD_GROUP_ID to every stream of the group and sends
  nothing (as a member does that the leader counted in after its own matchmaking gave up on the
  group), then drops the attempt without a word; it names nobody in its later gathers
* ``lost_cancel``     — a runtime fault, not an attack: the cancel of its search in this round is
  lost once, as Python 3.11's ``asyncio.wait_for`` loses one that arrives with the awaited result,
  and the search then runs on until it finds a leader (``lost_cancel_marker`` written when it was
  lost)
* ``die_then_wedge``  — runtime faults, not attacks: the first time it reaches an all-reduce its
  averager process kills itself (SIGKILL, ``<stall_marker>.died`` written first); the first time
  after that (a new averager, so another process), its all-reduce swallows every cancel and never
  ends (``<stall_marker>.wedged``); honest from then on

Ticket misbehaviours (forged, another round's, another node's) only change the ticket bytes the
peer script passes in; the averager itself then behaves honestly but is not allowed to check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import signal
from pathlib import Path
from typing import AsyncIterator  # typing's: hivemind's handler registry reads its _name

import numpy as np
import torch
from hivemind.compression import CompressionInfo, Float16Compression, NoCompression
from hivemind.averaging.group_info import GroupInfo
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2

from grpo_swarm.node.swarm.averaging import VerifiedAverager
from grpo_swarm.node.swarm.part_codec import encode_values
from grpo_swarm.node.swarm.reduction import VerifiedAllReduceRunner
from grpo_swarm.node.swarm.refusals import refuse
from grpo_swarm.node.swarm.wire import WireAveragingData, WireTensor
from grpo_swarm.node.swarm.share_audit import AUDIT_POLL_S, PHASE_REVEAL, PHASE_SKETCH, encode_entry
from grpo_swarm.node.swarm.gather import decode_gather, decode_hivemind_entry
from grpo_swarm.node.swarm.reasons import Reason
from grpo_swarm.node.swarm.tickets import TicketClaims, parse_ticket
from grpo_swarm.node.swarm.verdicts import SlotVerdict
from grpo_swarm.protocol import grpo_swarm_pb2 as pb

NORM_LIE_FACTOR = 3.0  # per-value magnitudes stay plausible: only the norm check can catch it
OVER_BOUND_FACTOR = 1e5
WRONG_AVERAGE_SHIFT = 0.03  # x mean |value|, alternating sign: ~2-3 % of the share's norm
BREAKS_ITS_FIRST_ATTEMPT = {"false_accusation", "accuse_all"}  # so that their later accusations can follow a failure
NOT_IN_GROUP_S = 1.0  # how long a ``not_in_group`` runner waits before it drops its attempt
# ``hang_up_lead``: enough attempts to meet each of two honest members' three, each given up after a
# short matchmaking wait, so that it is back for the next round with them (a staller late for every
# other round fails only every other one)
LEAD_ATTEMPTS, LEAD_MATCHMAKING_S = 6, 3.0
SKIPS_CHECKS = {"forged_ticket", "other_round_ticket", "other_node_ticket", "over_bound"}


def _lose_one_cancel(matchmaking, round_index: int, marker: str | None) -> None:
    """The next cancel that reaches a wait for the next leader in round ``round_index`` is dropped,
    once (``marker`` then written), and from then on the search never sees its time run out (as one
    kept busy asking leaders does not): it goes on until it finds a leader or its step's own deadline
    cancels it, as the search seen in a full-suite run went on into a later round. Never in another
    round: armed but not fired in its round, it once dropped a later round's routine cancel (hivemind
    cancels the search after every group), and that search then ran on for good."""
    potential_leaders = matchmaking.potential_leaders
    pop, lost = potential_leaders.pop_next_leader, []

    def in_its_round() -> bool:
        return matchmaking.round_index == round_index

    async def pop_next_leader():
        while True:
            try:
                return await pop()
            except asyncio.CancelledError:
                if lost or not in_its_round():
                    raise
                lost.append(True)
                if marker:
                    Path(marker).write_text("lost")
            except asyncio.TimeoutError:  # hivemind's "re-declared: the time may be up"
                if not lost:
                    raise

    potential_leaders.pop_next_leader = pop_next_leader


class _Garbled:
    """A message whose bytes are given (hivemind's P2P sends what SerializeToString returns)."""

    def __init__(self, raw: bytes, tensor_part):
        self.raw, self.tensor_part = raw, tensor_part

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf method hivemind calls
        return self.raw


class HostileRunner(VerifiedAllReduceRunner):
    def __init__(self, *, behaviour: str, stall_marker: str | None, drip_gap: float = 0.0, **kwargs):
        self.behaviour, self.stall_marker, self.drip_gap = behaviour, stall_marker, drip_gap
        super().__init__(**kwargs)

    def _corrupt(self, part: torch.Tensor, info: CompressionInfo, first: bool):
        b = self.behaviour
        if b == "nan":
            part = part.clone()
            part[::7] = float("nan")
        elif b == "inf_fp16":
            part = part.clone()
            part[0] = float("inf")
            return Float16Compression().compress(part, info)
        elif b == "shape1" and first:
            return NoCompression().compress(torch.tensor([1e-3]), info)
        elif b == "float64":
            return NoCompression().compress(part.double(), info)
        elif b == "fp16_on_none":
            return Float16Compression().compress(part, info)
        return self.compression.compress(part, info)

    async def _serialized_result(self, part_index: int, averaged: torch.Tensor):
        if self.behaviour == "drip_average":  # every caller (each sender's stream) waits its gap
            await asyncio.sleep(0.8 * self.reducer_timeout)
        if self.behaviour in ("nan_average", "inf_average", "short_average") and part_index not in self._results:
            # the average's bytes themselves lie (the encoder would clamp an fp16 inf: written in after)
            tp = encode_values(averaged.clone(), self.output_compression)
            if self.behaviour == "short_average":  # its header still declares every value
                tp = WireTensor(tp.buffer[:-4], tp.size, tp.dtype, tp.compression)
            else:
                dtype = np.float16 if isinstance(self.output_compression, Float16Compression) else np.float32
                np.frombuffer(tp.buffer, dtype=dtype)[::7] = math.nan if self.behaviour == "nan_average" else math.inf
            future = asyncio.get_running_loop().create_future()
            future.set_result(WireAveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=tp).encoded())
            self._results[part_index] = future
        if self.behaviour == "wrong_average" and part_index not in self._results:
            shift = torch.ones_like(averaged)
            shift[1::2] = -1
            averaged = averaged + WRONG_AVERAGE_SHIFT * averaged.abs().mean() * shift
        return await super()._serialized_result(part_index, averaged)

    async def _communicate_with_peer(self, peer_id):
        if self.behaviour == "not_in_group":  # opens no stream (it is not running the group, it says)
            await asyncio.sleep(NOT_IN_GROUP_S)
            self.abort("not in the group")  # nothing open: nobody hears of it
            return
        await super()._communicate_with_peer(peer_id)

    async def _generate_input_for_peer(self, peer_index: int):
        parts = list(self.tensor_part_container._input_parts_by_peer[peer_index])
        self.tensor_part_container._inputs_consumed_by_peer[peer_index] = True
        if self.behaviour == "hang_up":  # gives up at once on everyone, as an honest member passing an abort on
            # does (aborting at the first stream would cancel the others before they open: hanging up on
            # one member only, which in a group of three costs that member the round)
            self._hanging_up = getattr(self, "_hanging_up", set()) | {peer_index}
            remote = {i for i, p in enumerate(self.ordered_peer_ids)
                      if p != self.peer_id and self.tensor_part_container.num_parts_by_peer[i]}
            if self._hanging_up >= remote:
                self.abort("hung up")
            while not self.aborted:
                await asyncio.sleep(0.005)
            return
        weight = 1e6 if self.behaviour == "claimed_weight" else self.weight
        for i, (part, info) in enumerate(parts):
            msg = averaging_pb2.AveragingData(tensor_part=self._corrupt(part, info, i == 0), weight=weight)
            if i == 0:
                msg.code, msg.group_id = averaging_pb2.PART_FOR_AVERAGING, self.group_id
            if (self.behaviour, i) in (("malformed", len(parts) - 1), ("malformed_first", 0)):
                # its tensor's declared length overruns the message
                msg = _Garbled(msg.SerializeToString()[:-5], msg.tensor_part)
            yield msg
            if self.behaviour == "stall":
                if self.stall_marker:
                    Path(self.stall_marker).write_text("stalled")
                await asyncio.sleep(3600)
            elif self.behaviour == "stall_always":
                await asyncio.sleep(3600)
            elif self.behaviour == "drip":
                await asyncio.sleep(self.drip_gap)
            elif self.behaviour == "drip_hang_up":  # hangs up before its parts held anyone up two sender timeouts
                await asyncio.sleep(self.drip_gap)
                if i == 1:
                    self.abort("hung up")
                    return


class HostileAverager(VerifiedAverager):
    """Same wire name as the honest class (handlers are ``VerifiedAverager.rpc_*``)."""

    runner_class = HostileRunner

    def __init__(self, *args, behaviours: dict[int, str], stall_marker: str | None = None,
                 lost_cancel_marker: str | None = None, accuse_target: bytes = b"", accuse_all: tuple[bytes, ...] = (),
                 **kwargs):
        self.behaviours = {int(k): v for k, v in behaviours.items()}
        self.stall_marker, self.lost_cancel_marker = stall_marker, lost_cancel_marker
        self.accuse_target, self.accuse_all = accuse_target, tuple(accuse_all)
        if "hang_up_lead" in self.behaviours.values():
            kwargs.update(max_attempts=LEAD_ATTEMPTS, matchmaking_timeout=LEAD_MATCHMAKING_S, round_timeout=None)
        super().__init__(*args, **kwargs)

    def behaviour(self, round_index: int) -> str:
        return self.behaviours.get(int(round_index), "honest")

    async def _set_round(self, round_index, expected_keys, group_size):
        await super()._set_round(round_index, expected_keys, group_size)
        if self.behaviour(round_index) == "lost_cancel":
            _lose_one_cancel(self._matchmaking, int(round_index), self.lost_cancel_marker)
        if self.behaviour(round_index) == "hang_up_lead":  # a group of two is full to it: it starts at once
            self._round_target = 2  # (each attempt's _set_retry restores the round's)
            self._matchmaking.target_group_size = self._matchmaking.potential_leaders.target_group_size = 2
            self._matchmaking.min_group_size = 2

    # -- caller side: no checks of its own ticket or gradient; the committed norm may lie
    def check_own_ticket(self, ticket_bytes, rules):
        return TicketClaims.from_ticket(parse_ticket(ticket_bytes, self.ticket_type))

    def load_local_gradient(self, grads):
        out = [g.detach().float() for g in grads]
        with self.get_tensors() as buffers:
            for buf, g in zip(buffers, out):
                buf.copy_(g)
        norm = self.commit_norm(out)
        if self.behaviour(self._round_for_commit) == "norm_lie":
            norm /= NORM_LIE_FACTOR  # the caller multiplied its gradient: commit to the honest-looking norm
        return norm

    def gather_entry(self, claim):
        if self.behaviour(claim.round_index) == "false_accusation" and claim.attempt > 0:
            claim = dataclasses.replace(claim, accusations=((self.accuse_target, "NON_FINITE"), *claim.accusations),
                                        first_failed=(self.accuse_target, "NON_FINITE"))
        elif self.behaviour(claim.round_index) == "hang_up" and claim.attempt > 0:  # and blames its victim
            claim = dataclasses.replace(claim, first_failed=(self.accuse_target, "REDUCER_FAILED"))
        elif self.behaviour(claim.round_index) == "accuse_all" and claim.attempt > 0:
            claim = dataclasses.replace(claim, accusations=tuple((p, "NON_FINITE") for p in self.accuse_all),
                                        first_failed=(self.accuse_all[0], "NON_FINITE"))
        return super().gather_entry(claim)

    def average(self, round_index, ticket_bytes, grads, **kwargs):
        self._round_for_commit = round_index
        return super().average(round_index, ticket_bytes, grads, **kwargs)

    # -- averager process: where its own verdict would leave it out, every slot is fine by it (it
    # then sends anyway); otherwise it reduces honestly, except as ``wrong_average`` says
    def verdicts(self, group_info, rules):
        if self.behaviour(rules.round_index) not in SKIPS_CHECKS:
            return super().verdicts(group_info, rules)
        return [SlotVerdict(peer_id=p.to_bytes(), ok=True, weight=1.0, committed_norm=float("inf"))
                for p in group_info.peer_ids]

    def _sketch_round(self, runner, projections, inputs, outputs):
        mine, my_outputs, norms = super()._sketch_round(runner, projections, inputs, outputs)
        self._sketched_with = runner
        if self.behaviour(self._rules.round_index) == "sketch_lie":
            own = runner.ordered_peer_ids.index(runner.peer_id)
            j = next(j for j, s in enumerate(mine) if s is not None and j != own)
            mine[j] = mine[j] + 0.2 * np.linalg.norm(mine[j]) / math.sqrt(len(mine[j]))
        return mine, my_outputs, norms

    async def _exchange(self, group_id, phase, body, keys, servers, deadline, found):
        if phase == PHASE_SKETCH and self.behaviour(self._rules.round_index) == "hang_in_audit":
            Path(self.stall_marker).write_text("revealed, not sketched")
            await asyncio.sleep(3600)
        if phase == PHASE_REVEAL and self.behaviour(self._rules.round_index) == "withhold_reveal":
            found.fail(self.peer_id.to_bytes(), Reason.AUDIT_FAILED, "withheld its reveal")
            return {}
        if phase == PHASE_SKETCH and self.behaviour(self._rules.round_index) == "withhold_sketch":
            found.fail(self.peer_id.to_bytes(), Reason.AUDIT_FAILED, "withheld its sketch")
            return {}
        if phase == PHASE_SKETCH and self.behaviour(self._rules.round_index) == "sketch_equivocate":
            return await self._equivocate(group_id, body, keys, servers, found)
        return await super()._exchange(group_id, phase, body, keys, servers, deadline, found)

    async def _equivocate(self, group_id, body, keys, servers, found):
        """Push the honest entry to the framed reducer, the framing one to every other reducer (and
        answer each caller the same way: :meth:`rpc_share_audit`)."""
        target = min(servers, key=lambda p: p.to_bytes())
        j = self._sketched_with.ordered_peer_ids.index(target)
        inputs, outputs = body
        v = np.asarray(inputs[j])
        framed = list(inputs)
        framed[j] = [float(x) for x in v + 0.2 * np.linalg.norm(v) / math.sqrt(len(v))]
        honest = encode_entry(self.identity, group_id, PHASE_SKETCH, body)
        framing = encode_entry(self.identity, group_id, PHASE_SKETCH, [framed, outputs])
        self._equivocation = (bytes(group_id), target.to_bytes(), honest, framing)
        store = self._audit_store(group_id, PHASE_SKETCH, create=True)
        store.expect(keys)
        store.add(honest)
        for peer in servers:
            request = pb.ShareAuditExchange(group_id=group_id, phase=PHASE_SKETCH,
                                            entries=[honest if peer == target else framing])
            try:
                stub = type(self).get_stub(self._p2p, peer, namespace=self.prefix)
                await asyncio.wait_for(stub.rpc_share_audit(request), self.request_timeout + AUDIT_POLL_S)
            except Exception:  # noqa: BLE001 - the others read us anyway
                pass
        found.fail(self.peer_id.to_bytes(), Reason.AUDIT_FAILED, "equivocated")
        return store.bodies()

    async def rpc_share_audit(self, request: pb.ShareAuditExchange, context: P2PContext) -> pb.ShareAuditExchange:
        response = await super().rpc_share_audit(request, context)
        group_id, target, honest, framing = getattr(self, "_equivocation", (None,) * 4)
        if bytes(request.group_id) == group_id and context.remote_id.to_bytes() != target:
            entries = [framing if e == honest else e for e in response.entries]
            response = pb.ShareAuditExchange(group_id=request.group_id, phase=request.phase, entries=entries)
        return response

    async def rpc_aggregate_part(self, stream: AsyncIterator[WireAveragingData], context: P2PContext
                                 ) -> AsyncIterator[WireAveragingData]:
        if self._rules is not None and self.behaviour(self._rules.round_index) == "not_in_group":
            await stream.__anext__()
            async for message in refuse(averaging_pb2.BAD_GROUP_ID, stream):  # as an honest member refuses
                yield message
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def _aggregate_with_group(self, group_info, min_vector_size, **kwargs):
        own = group_info.gathered[group_info.peer_ids.index(self.peer_id)]
        self._attempt = decode_gather(decode_hivemind_entry(own)[2])[2].attempt
        if self.behaviour(self._rules.round_index) == "die_then_wedge":
            await self._die_then_wedge()
        if self.behaviour(self._rules.round_index) == "reordered_view" and \
                self._rules.round_index not in getattr(self, "_reordered", set()):
            self._reordered = getattr(self, "_reordered", set()) | {self._rules.round_index}
            rotated = lambda xs: tuple(xs[1:]) + tuple(xs[:1])  # noqa: E731
            group_info = GroupInfo(group_info.group_id, rotated(group_info.peer_ids), rotated(group_info.gathered))
        return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)

    async def _die_then_wedge(self) -> None:
        died, wedged = Path(f"{self.stall_marker}.died"), Path(f"{self.stall_marker}.wedged")
        if not died.exists():
            died.write_text(f"round {self._rules.round_index}, pid {os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        if not wedged.exists():
            wedged.write_text(f"round {self._rules.round_index}, pid {os.getpid()}\n")
            while True:  # a task that loses every cancel: its step can never finish
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    continue

    def make_runner(self, **kwargs):
        behaviour = self.behaviour(self._rules.round_index)
        if (behaviour in BREAKS_ITS_FIRST_ATTEMPT and self._attempt == 0) or behaviour == "hang_up_lead":
            behaviour = "hang_up"
        return HostileRunner(behaviour=behaviour, stall_marker=self.stall_marker,
                             drip_gap=0.8 * kwargs["sender_timeout"], keep_parts=self.audit_reducers, **kwargs)

