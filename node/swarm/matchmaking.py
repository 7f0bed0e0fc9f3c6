"""hivemind matchmaking without premature partial groups.

In hivemind 1.1.12 a peer that is looking for a group treats its *first* declaration in the DHT as
"my time is up" (``PotentialLeaders.pop_next_leader`` raises ``TimeoutError`` whenever the peer
(re)declares itself), so a peer that already accepted one follower at that instant assembles a
group of two at once — with ``target_group_size=3`` and all three peers starting within 0.1 s,
the swarm tests saw two-peer groups form in ~2 of 22 rounds, splitting the round into two
averages. :class:`PatientMatchmaking` assembles a partial group only once the step's scheduled time
(start + ``min_matchmaking_time``) has passed; a full group still starts at once, and a group of
at least ``min_group_size`` still starts when the time is really up.

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

from hivemind.averaging.control import StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time

from grpo_swarm.protocol.errors import ProtocolError
from grpo_swarm.protocol.identity import public_key_from_peer_id

from .tickets import gather_round


class PatientMatchmaking(Matchmaking):
    round_keys: frozenset[bytes] | None = None  # node public keys of the round's peers; None: anyone
    round_index: int | None = None  # the round this node averages now; None: not set yet

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
                    if not self.is_round_peer(next_leader):
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
