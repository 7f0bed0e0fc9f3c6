"""Bounded retries with jitter for coordinator calls that fail transiently.

A coordinator restart (a crash, an upgrade, kill -9) makes every call fail with UNAVAILABLE for
the seconds it takes to come back. :class:`CoordinatorClient` retries such calls: the channel
itself reconnects quickly (:func:`.rpc.channel_options` caps gRPC's reconnect backoff), and each
retry is a new request signed with a fresh nonce (the coordinator refuses a replayed one).

Only UNAVAILABLE is retried: it is what gRPC reports when no connection could be made or it broke.
A deadline, a refusal or an internal error is the answer, and retrying would only repeat it.

Delays grow exponentially from ``base_delay_s`` up to ``max_delay_s``, each drawn uniformly from
[d/2, d] ("equal jitter") so that a swarm of nodes that lost the coordinator together does not
come back in lockstep. A call gives up after ``retries`` retries or when the next attempt would
start more than ``deadline_s`` after the first.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

TRANSIENT_CODES = frozenset({"UNAVAILABLE"})


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 30  # retries after the first attempt (0 = never retry)
    deadline_s: float = 30.0  # no attempt starts later than this after the first (rides out a restart)
    base_delay_s: float = 0.2
    max_delay_s: float = 1.0  # short: a restarted coordinator is found within a second

    def __post_init__(self):
        if self.retries < 0 or not self.deadline_s >= 0 or not 0 < self.base_delay_s <= self.max_delay_s:
            raise ValueError("need retries >= 0, deadline_s >= 0 and 0 < base_delay_s <= max_delay_s")

    def attempts(self) -> Attempts:
        return Attempts(self)


NO_RETRY = RetryPolicy(retries=0)  # one attempt: for a call whose caller must not wait (a goodbye)


@dataclass
class Attempts:
    """The retry budget of one call: :meth:`next_delay` says how long to wait before the next
    attempt, or None once the budget is spent."""

    policy: RetryPolicy
    start: float = field(default_factory=time.monotonic)
    made: int = 1  # attempts so far (the first is under way when this is created)

    def next_delay(self, rng: random.Random | None = None) -> float | None:
        p = self.policy
        if self.made > p.retries:
            return None
        d = min(p.max_delay_s, p.base_delay_s * 2 ** (self.made - 1))
        delay = (rng or random).uniform(d / 2, d)
        if time.monotonic() + delay - self.start > p.deadline_s:
            return None
        self.made += 1
        return delay

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.start
