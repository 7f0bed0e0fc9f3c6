"""A client's own pace: it waits rather than have the coordinator refuse it for its rate.

The coordinator allows each key ``rate_per_s`` signed requests a second in bursts up to ``burst``
(token bucket; ``grpo-coordinator serve --rate/--burst``, 20/s and 100 by default) and answers the
next one RESOURCE_EXHAUSTED, which fails the node's round. A node's requests a round are few
(about eight), but on a small model rounds are short, and its polls wait only as long as the
answer takes (node/swarm/polling.py). :class:`RequestPacer` is the same bucket on the client's
side, set inside the server's (:data:`NODE_PACE`; inside the limit a coordinator announces when the
node registers, should its operator have set a lower one): when the node would go over, it sleeps
instead.
"""

from __future__ import annotations

import threading
import time

NODE_PACE = (18.0, 60)  # (requests/s, burst) a node keeps to: inside the coordinator's default 20/s, 100
# the share of a coordinator's announced limit (RegisterResponse.request_rate_per_s / request_burst) a
# pacing client keeps to: NODE_PACE's share of the default
RATE_SHARE, BURST_SHARE = 0.9, 0.6


class RequestPacer:
    """Token bucket of ``rate_per_s`` with ``burst`` tokens; :meth:`wait` takes one, sleeping until
    one is there. ``rate_per_s <= 0``: no pacing. Shared by the client's threads."""

    def __init__(self, rate_per_s: float, burst: int, *, clock=time.monotonic, sleep=time.sleep):
        if rate_per_s > 0 and burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst}")
        self.rate, self.burst = float(rate_per_s), int(burst)
        self._own = (self.rate, self.burst)  # as asked for: :meth:`fit` never goes above it
        self._clock, self._sleep = clock, sleep
        self._tokens, self._last = float(burst), clock()
        self._lock = threading.Lock()

    def fit(self, server_rate_per_s: float, server_burst: int) -> None:
        """Keep inside the limit a coordinator announced (RATE_SHARE of its rate, BURST_SHARE of its
        burst), or to this pacer's own pace where that is lower; a limit of 0 (not announced) leaves the
        own pace. A pacer that does not pace stays so."""
        own_rate, own_burst = self._own
        if own_rate <= 0:
            return
        rate, burst = own_rate, own_burst
        if server_rate_per_s > 0:
            rate = min(own_rate, RATE_SHARE * float(server_rate_per_s))
        if server_burst > 0:
            burst = max(1, min(own_burst, int(BURST_SHARE * int(server_burst))))
        with self._lock:
            self.rate, self.burst = rate, burst
            self._tokens = min(self._tokens, float(burst))

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
