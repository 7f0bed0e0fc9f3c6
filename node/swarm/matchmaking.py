"""hivemind matchmaking without premature partial groups.

In hivemind 1.1.12 a peer that is looking for a group treats its *first* declaration in the DHT as
"my time is up" (``PotentialLeaders.pop_next_leader`` raises ``TimeoutError`` whenever the peer
(re)declares itself), so a peer that already accepted one follower at that instant assembles a
group of two at once — with ``target_group_size=3`` and all three peers starting within 0.1 s,
the swarm tests saw two-peer groups form in ~2 of 22 rounds, splitting the round into two
averages. :class:`PatientMatchmaking` assembles a partial group only once the step's scheduled time
(start + ``min_matchmaking_time``) has passed; a full group still starts at once, and a group of
at least ``min_group_size`` still starts when the time is really up.

A retry's partial group that lacks a member it expects (``retry_members``: the round's peers that
the last attempt's verdicts did not exclude and this node neither accuses nor saw fail first) waits
up to one more ``min_matchmaking_time`` for it: in a larger group, members that heard of the failure
only through others' aborts end their attempt up to a hear-out later than those that saw it, and
would find the retry's group formed without them. (It does not start early once they are all in:
a member the retry leaves out learns why only from the group's verdicts, e.g. a node whose link
stalled, which then logs what to check.) Nor does a retry follow a leader the last
attempt's verdicts excluded or this node accuses (``shunned_leaders``): it would be left out anyway,
and as the leader it decides when the group forms (one that broke the attempt, and so is back first,
would otherwise lead the retry and start it before the members still winding down arrive).

A follower refuses a group smaller than its ``min_group_size`` and looks on (an honest leader, whose
minimum is the same strict majority of the round's peers, never starts one).

It also keeps the round to its peers. hivemind admits any follower that knows the schema hash and
the round's group key, both computable from public facts, and a group counts as full at the round's
number of peers: one fresh key taking a slot would start the group without the last honest peer,
and the verdicts would then exclude the key but not bring that peer back. With the round's node keys
set (``round_keys``), a leader refuses followers whose peer id holds another key, and a follower
never asks such a leader.

And it keeps a search to its round. hivemind cancels a step's search without waiting for it, and a
cancel can be lost on the way (Python 3.11's ``asyncio.wait_for`` drops one that arrives with the
result it awaits): the search then lives on, and once the averager moves to the next round's group
key it joins that round's groups with its old gather entry, whose verdict leaves this node out of
the round. So a search ends as soon as its cancel is seen pending, its step is over, or the round
(``round_index``) went on; a leader refuses followers whose entry is for another round, and refuses
everyone while its own search is such a leftover.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator  # typing's: hivemind's handler registry reads its _name

from hivemind.averaging.control import StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time

from grpo_swarm.protocol.errors import ProtocolError
from grpo_swarm.protocol.identity import public_key_from_peer_id

from .gather import gather_round

logger = logging.getLogger(__name__)
RETRY_WAIT = 1.0  # a retry's partial group waits up to this many min_matchmaking_time past its time for expected members


class PatientMatchmaking(Matchmaking):
    round_keys: frozenset[bytes] | None = None  # node public keys of the round's peers; None: anyone
    round_index: int | None = None  # the round this node averages now; None: not set yet
    retry_members: frozenset[bytes] | None = None  # a retry's expected members (averaging.retry_members)
    shunned_leaders: frozenset[bytes] = frozenset()  # peers a retry does not follow: excluded or accused

    def missing_retry_members(self) -> bool:
        """Whether a retry's leader still lacks a member it expects."""
        if not self.retry_members:
            return False
        here = {self.peer_id.to_bytes(), *(p.to_bytes() for p in self.current_followers)}
        return bool(self.retry_members - here)

    def retry_wait_left(self) -> float:
        """Seconds a retry's partial group still waits past its scheduled time for a missing expected
        member (at most RETRY_WAIT x ``min_matchmaking_time``); 0 when none is missing."""
        if self.step_control is None or not self.missing_retry_members():
            return 0.0
        return max(0.0, self.step_control.scheduled_time + RETRY_WAIT * self.min_matchmaking_time - get_dht_time())

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        """hivemind's leader side of a join (1.1.12), except that a retry's partial group waits
        :meth:`retry_wait_left` past its time."""
        try:
            async with self.lock_request_join_group:
                reason_to_reject = self._check_reasons_to_reject(request, context)
                if reason_to_reject is not None:
                    yield reason_to_reject
                    return
                self.current_followers[context.remote_id] = request
                yield averaging_pb2.MessageFromLeader(code=averaging_pb2.ACCEPTED)
                if (self.target_group_size is not None and len(self.current_followers) + 1 >= self.target_group_size
                        and not self.assembled_group.done()):
                    await self.leader_assemble_group()  # outcome 1: a full group
            while True:  # wait for the group to be assembled or disbanded
                timeout = max(0.0, self.potential_leaders.declared_expiration_time - get_dht_time(),
                              self.retry_wait_left())
                accepted = asyncio.create_task(self.was_accepted_to_group.wait())
                await asyncio.wait({self.assembled_group, accepted}, return_when=asyncio.FIRST_COMPLETED,
                                   timeout=timeout)
                accepted.cancel()
                if self.assembled_group.done() or self.was_accepted_to_group.is_set():
                    break
                async with self.lock_request_join_group:
                    if self.assembled_group.done():
                        break
                    if len(self.current_followers) + 1 >= self.min_group_size and self.is_looking_for_group:
                        if self.retry_wait_left() > 0:
                            continue
                        await self.leader_assemble_group()  # outcome 2: the time is up, run with what we have
                    else:
                        await self.leader_disband_group()
                    break
            if (self.was_accepted_to_group.is_set() or not self.assembled_group.done()
                    or self.assembled_group.cancelled() or context.remote_id not in self.assembled_group.result()):
                # outcome 3: found by a leader with higher priority (send our followers to it), or disbanded
                leader = self.current_leader.to_bytes() if self.current_leader is not None else None
                yield averaging_pb2.MessageFromLeader(code=averaging_pb2.GROUP_DISBANDED, suggested_leader=leader)
                return
            group_info = self.assembled_group.result()
            yield averaging_pb2.MessageFromLeader(
                code=averaging_pb2.BEGIN_ALLREDUCE, group_id=group_info.group_id,
                ordered_peer_ids=[item.to_bytes() for item in group_info.peer_ids], gathered=group_info.gathered)
        except asyncio.CancelledError:
            return
        except Exception as e:
            logger.exception(e)
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.INTERNAL_ERROR)
        finally:  # runs even if the coroutine is destroyed prematurely
            self.current_followers.pop(context.remote_id, None)
            self.follower_was_discarded.set()

    async def follower_assemble_group(self, leader: PeerID, msg: averaging_pb2.MessageFromLeader
                                      ) -> GroupInfo | None:
        """hivemind's, except that a group smaller than our ``min_group_size`` is refused (None: the
        search goes on, and this attempt no longer asks that leader). An honest leader never starts
        one: its minimum is ours, a strict majority of the round's peers. A hostile leader that
        starts groups of two as soon as one member joins would otherwise cost each member it catches
        an attempt (seen with two such peers among five: an honest member lost its share)."""
        if len(msg.ordered_peer_ids) < self.min_group_size:
            logger.debug(f"{self.peer_id} - {leader} started a group of {len(msg.ordered_peer_ids)}, "
                         f"fewer than {self.min_group_size}: not joining it")
            self.shunned_leaders = self.shunned_leaders | {leader.to_bytes()}
            return None
        return await super().follower_assemble_group(leader, msg)

    def is_round_peer(self, peer_id: PeerID) -> bool:
        if self.round_keys is None:
            return True
        try:
            return public_key_from_peer_id(peer_id.to_bytes()) in self.round_keys
        except ProtocolError:  # not an Ed25519 peer id: no node key at all
            return False

    def is_other_round(self, data_for_gather: bytes) -> bool:
        return self.round_index is not None and gather_round(data_for_gather) != self.round_index

    def step_is_over(self, step: StepControl) -> bool:
        """True for a search that must not go on: its step finished or was cancelled, or it carries
        the gather entry of a round this node has left."""
        return step.done() or self.is_other_round(step.data_for_gather)

    def _check_reasons_to_reject(self, request: averaging_pb2.JoinRequest, context: P2PContext
                                 ) -> averaging_pb2.MessageFromLeader | None:
        if not self.is_round_peer(context.remote_id):
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
        if self.step_control is not None and self.step_is_over(self.step_control):
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.NOT_LOOKING_FOR_GROUP)
        if self.is_other_round(request.gather):  # a leftover search of the follower's: its slot would be lost
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.BAD_GROUP_KEY)
        return super()._check_reasons_to_reject(request, context)

    def _search_must_end(self, step: StepControl) -> bool:
        """Asked before every join request: a cancel seen pending (and lost on the way, or this task
        would have stopped) or a step that is over ends the search; a step still live whose round
        went on is cancelled, so that hivemind's step ends too instead of retrying."""
        task = asyncio.current_task()
        if task is not None and getattr(task, "cancelling", lambda: 0)():  # Python >= 3.11 counts cancels
            return True
        if not self.step_is_over(step):
            return False
        if not step.done():
            try:
                step.cancel()
            except Exception:  # noqa: BLE001 - already finishing: nothing left to cancel
                pass
        return True

    async def _request_join_potential_leaders(self, step: StepControl) -> GroupInfo:
        """hivemind's loop, except that a partial group waits for the scheduled time, leaders outside
        the round are skipped, and a search that must end (:meth:`_search_must_end`) stops."""
        assert self.is_looking_for_group
        async with self.potential_leaders.begin_search(step, self.group_key_manager, declare=not self.client_mode):
            while True:
                try:
                    if self._search_must_end(step):
                        break
                    next_leader = await self.potential_leaders.pop_next_leader()  # TimeoutError on (re)declaring
                    if self._search_must_end(step):
                        break
                    if not self.is_round_peer(next_leader) or next_leader.to_bytes() in self.shunned_leaders:
                        continue
                    group = await self._request_join_group(next_leader)
                    if group is not None:
                        return group
                except asyncio.TimeoutError:
                    async with self.lock_request_join_group:
                        if self.assembled_group.done():
                            return self.assembled_group.result()
                        if get_dht_time() < step.scheduled_time - 0.25 * self.min_matchmaking_time:
                            continue  # the first declaration, not the end of the waiting time: keep waiting
                        if len(self.current_followers) + 1 >= self.min_group_size:
                            if self.retry_wait_left() > 0.25 * self.min_matchmaking_time:
                                continue  # a retry: members that heard of the failure after us are still coming
                            return await self.leader_assemble_group()
                        if len(self.current_followers) > 0:
                            await self.leader_disband_group()
                        continue
                except asyncio.CancelledError:
                    break
                except Exception as e:
                    if not self.assembled_group.done():
                        self.assembled_group.set_exception(e)
                    raise e
        # a search that must end ends now: when its step's cancel was lost, hivemind's look_for_group
        # would otherwise await the group until its timeout, holding the next round's search behind it
        if not self.assembled_group.done() and not self.current_followers:
            self.assembled_group.set_result(None)
        return None

    def end_leftover_search(self) -> None:
        """Wake a search of an earlier round waiting for leaders (called as a round begins), so that it
        sees it must end (:meth:`_search_must_end`) instead of at its next re-declaration."""
        if self.is_looking_for_group and self.step_control is not None and self.step_is_over(self.step_control):
            self.potential_leaders.declared_expiration.set()
