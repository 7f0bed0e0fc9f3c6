"""How often a node asks the coordinator while it waits for something that usually comes soon (its
round's close, a version's publication): first after ``FIRST_POLL_S``, then twice as long each time
up to the node's ``poll_s``.

On a small model a round is over in well under a second and the wait is mostly the poll itself
(bench/RESULTS.md: a fixed 0.2 s made up a third of the demo's rounds); on a large one the waits are
long, and doubling keeps the extra requests to about three a wait, far under the coordinator's
per-key rate limit (20 requests/s).
"""

from __future__ import annotations

FIRST_POLL_S = 0.025


class PollBackoff:
    """Successive waits between polls: ``first``, doubling up to ``cap`` (``cap`` alone when smaller)."""

    def __init__(self, cap: float, first: float = FIRST_POLL_S):
        self.cap = float(cap)
        self._next = min(float(first), self.cap)

    def next(self) -> float:
        wait = self._next
        self._next = min(2 * wait, self.cap)
        return wait
