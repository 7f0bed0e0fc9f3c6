"""Which nodes are live: seen (registered or heartbeat) within the peer TTL, timed on this process's
monotonic clock. A wall clock that steps (NTP, a paused or resumed machine) must neither make every
node look silent at once (no live node: ``min_peers`` unmet, the round's liveness rule blind) nor keep
silent ones live. The store keeps each node's wall-clock last-seen time for operators; after a restart
it seeds this (that one reading is all there is). Each entry also keeps the network the node was last
seen from (.networks), for counting keys without verified work once per network. A node that says it
is leaving (``HeartbeatRequest.leaving``) stops being live at once instead of a TTL later, and is
remembered as gone until it is seen again in a request signed after its goodbye: one signed before it
and still in flight as the node stopped (its round loop's, interrupted by the Ctrl-C) is handled
after it as often as not, and made the node live again for a TTL."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Iterable

from grpo_swarm.protocol.proofs import now_ms

MAX_LEFT = 4096


class Liveness:
    """Last-seen times, most recent last; entries older than the TTL are dropped as they age out, so
    memory stays with the keys seen within one TTL."""

    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] = now_ms):
        self.ttl_s = float(ttl_s)
        self._clock, self._wall_ms = clock, wall_ms
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._network: dict[str, str | None] = {}  # (the same keys as _seen)
        self._left: OrderedDict[str, int | None] = OrderedDict()  # goodbye's signed ms, not seen since

    def restore(self, rows: Iterable[tuple[str, int]]) -> None:
        """Seed from the store's (node id, wall-clock last seen ms) rows after a restart; a stamp in the
        future counts as now."""
        now, wall = self._clock(), self._wall_ms()
        ages = sorted(((max(0.0, (wall - seen_ms) / 1000), node_id) for node_id, seen_ms in rows), reverse=True)
        for age, node_id in ages:
            if age <= self.ttl_s:
                self._seen[node_id] = now - age
                self._seen.move_to_end(node_id)
                self._network[node_id] = None  # (not stored: unknown until the node is seen again)

    def seen(self, node_id: str, network: str | None = None) -> None:
        """``network``: what the request came from (None: a trusted or in-process caller)."""
        self._seen[node_id] = self._clock()
        self._seen.move_to_end(node_id)
        self._network[node_id] = network
        self._left.pop(node_id, None)
        self._expire()

    def leave(self, node_id: str, signed_ms: int | None = None) -> None:
        """The node said it is leaving, in a request signed at ``signed_ms``: no longer live from now on
        (not a TTL later). Only the most recent MAX_LEFT leavers are remembered as gone (keys are
        cheap); one forgotten is merely no longer listed as having left."""
        self._seen.pop(node_id, None)
        self._network.pop(node_id, None)
        self._left[node_id] = signed_ms
        self._left.move_to_end(node_id)
        while len(self._left) > MAX_LEFT:
            self._left.popitem(last=False)

    def has_left(self, node_id: str) -> bool:
        """Whether the node said it is leaving and has not been seen since."""
        return node_id in self._left

    def left_since(self, node_id: str, signed_ms: int | None) -> bool:
        """Whether a request of the node signed at ``signed_ms`` predates its goodbye (it then does not
        make the node live again). A node can only date its own requests."""
        bye = self._left.get(node_id)
        return bye is not None and signed_ms is not None and signed_ms <= bye

    def network(self, node_id: str) -> str | None:
        return self._network.get(node_id)

    def live(self) -> list[str]:
        """The live nodes' ids, most recently seen first."""
        self._expire()
        return list(reversed(self._seen))

    def last_seen_ms(self, node_id: str) -> int:
        """When ``node_id`` was last seen, as a wall-clock time (for the peer listing's information)."""
        return int(self._wall_ms() - 1000 * (self._clock() - self._seen[node_id]))

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl_s
        while self._seen and next(iter(self._seen.values())) < cutoff:
            node_id, _ = self._seen.popitem(last=False)
            self._network.pop(node_id, None)
