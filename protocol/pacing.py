"""A client's own pace: it waits rather than have the coordinator refuse it for its rate.

The coordinator allows each key ``rate_per_s`` signed requests a second in bursts up to ``burst``
(token bucket; ``grpo-coordinator serve --rate/--burst``, 20/s and 100 by default) and answers the
next one RESOURCE_EXHAUSTED, which fails the node's round. A node's requests a round are few
(about eight), but on a small model rounds are short, and its polls wait only as long as the
answer takes (node/swarm/polling.py). :class:`RequestPacer` is the same bucket on the client's
side, set inside the server's (:data:`NODE_PACE`): when the node would go over, it sleeps instead.
"""

from __future__ import annotations

import threading
import time

NODE_PACE = (18.0, 60)  # (requests/s, burst) a node keeps to: inside the coordinator's default 20/s, 100


class RequestPacer:
    """Token bucket of ``rate_per_s`` with ``burst`` tokens; :meth:`wait` takes one, sleeping until
    one is there. ``rate_per_s <= 0``: no pacing. Shared by the client's threads."""

    def __init__(self, rate_per_s: float, burst: int, *, clock=time.monotonic, sleep=time.sleep):
        if rate_per_s > 0 and burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst}")
        self.rate, self.burst = float(rate_per_s), int(burst)
        self._clock, self._sleep = clock, sleep
        self._tokens, self._last = float(burst), clock()
        self._lock = threading.Lock()

    def wait(self) -> float:
        """Take a token, sleeping first if none is left; the seconds slept."""
        if self.rate <= 0:
            return 0.0
        with self._lock:  # a token is reserved at once, so that threads waiting together queue up
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            delay = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if delay > 0:
            self._sleep(delay)
        return delay
