"""hivemind matchmaking without premature partial groups.

In hivemind 1.1.12 a peer that is looking for a group treats its *first* declaration in the DHT as
"my time is up" (``PotentialLeaders.pop_next_leader`` raises ``TimeoutError`` whenever the peer
(re)declares itself), so a peer that already accepted one follower at that instant assembles a
group of two at once — with ``target_group_size=3`` and all three peers starting within 0.1 s,
the swarm tests saw two-peer groups form in ~2 of 22 rounds, splitting the round into two
averages. :class:`PatientMatchmaking` assembles a partial group only once the step's scheduled time
(start + ``min_matchmaking_time``) has passed; a full group still starts at once, and a group of
at least ``min_group_size`` still starts when the time is really up.
"""

from __future__ import annotations

import asyncio

from hivemind.averaging.control import StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.utils import get_dht_time


class PatientMatchmaking(Matchmaking):
    async def _request_join_potential_leaders(self, step: StepControl) -> GroupInfo:
        """hivemind's loop, except that a partial group waits for the scheduled time."""
        assert self.is_looking_for_group
        async with self.potential_leaders.begin_search(step, self.group_key_manager, declare=not self.client_mode):
            while True:
                try:
                    next_leader = await self.potential_leaders.pop_next_leader()  # TimeoutError on (re)declaring
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
