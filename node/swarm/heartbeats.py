"""Heartbeats while the round loop is busy elsewhere.

The round loop heartbeats at each step it waits on the coordinator, but it is silent while it
samples, computes its gradient or averages: on a slow machine that is minutes. The coordinator
counts a node as live for a few heartbeat intervals after its last one, and closes a round as soon
as every live node has submitted its assignment (``swarm.close_when_all_submitted``): a node silent
for longer would look gone, and the round close without its work. :class:`HeartbeatKeeper` sends a
liveness heartbeat (it binds nothing) whenever none went out for an interval.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class HeartbeatKeeper:
    """A daemon thread calling ``send()`` whenever neither it nor :meth:`sent` was called for
    ``interval_s``. A failed send is logged and tried again an interval later: the round loop's own
    calls say what is wrong with the coordinator."""

    def __init__(self, send: Callable[[], object], interval_s: float):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._send, self.interval_s = send, float(interval_s)
        self._last = time.monotonic()
        self._stop = threading.Event()
        self.sent_count = 0  # by this thread
        self._thread = threading.Thread(target=self._run, name="heartbeat-keeper", daemon=True)

    def start(self) -> HeartbeatKeeper:
        self._thread.start()
        return self

    def sent(self) -> None:
        """The round loop just heartbeat: the next one from here is due an interval later."""
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stop.wait(max(0.0, self._last + self.interval_s - time.monotonic())):
            if time.monotonic() - self._last < self.interval_s:
                continue  # the round loop heartbeat meanwhile
            self._last = time.monotonic()  # (a failed send too: one try an interval)
            try:
                self._send()
                self.sent_count += 1
            except Exception as e:  # noqa: BLE001 - liveness only; the round loop reports coordinator trouble
                log.debug("background heartbeat failed: %s", e)
