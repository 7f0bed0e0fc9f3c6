"""Request admission: replay protection for signed request nonces and per-key rate limits.

:class:`NonceWindow` accepts a (signer, nonce) pair once, and only when the envelope's ``time_ms``
is within ``window_ms`` of the server's clock and not older than the server's start (so a request
captured before a restart cannot be replayed after it, without storing nonces on disk).
:class:`RateLimiter` is a token bucket per signer key. Both are thread-safe and pure in-memory.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class NonceWindow:
    def __init__(self, window_ms: int = 120_000, *, start_ms: int | None = None, clock=time.time):
        self.window_ms = window_ms
        self._clock = clock
        self.start_ms = int(clock() * 1000) if start_ms is None else start_ms
        self._seen: OrderedDict[tuple[bytes, int], int] = OrderedDict()  # (key, nonce) -> time_ms, by arrival
        self._lock = threading.Lock()

    def check(self, key: bytes, nonce: int, time_ms: int) -> str | None:
        """None when fresh (and now remembered), else why not."""
        now = int(self._clock() * 1000)
        if abs(now - time_ms) > self.window_ms:
            return f"request time {time_ms} is {abs(now - time_ms) / 1000:.0f}s from the server's clock " \
                   f"(allowed: {self.window_ms / 1000:.0f}s); check the node's clock"
        if time_ms < self.start_ms - 1000:
            return "request is older than the server's start (re-sign it with a fresh nonce)"
        with self._lock:
            # forget pairs that the time window rejects anyway
            while self._seen:
                t = next(iter(self._seen.values()))
                if now - t <= 2 * self.window_ms:
                    break
                self._seen.popitem(last=False)
            if (key, nonce) in self._seen:
                return f"nonce {nonce} was already used (replayed request)"
            self._seen[(key, nonce)] = time_ms
        return None


class RateLimiter:
    """Token bucket per key: ``rate`` requests per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic, max_keys: int = 100_000):
        self.rate, self.burst, self._clock, self.max_keys = rate, burst, clock, max_keys
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()  # key -> (tokens, last)
        self._lock = threading.Lock()

    def allow(self, key: bytes, cost: float = 1.0) -> bool:
        if self.rate <= 0:
            return True
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            ok = tokens >= cost
            if ok:
                tokens -= cost
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return ok
