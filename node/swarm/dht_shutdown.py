"""hivemind's DHT process, stopping at once when its p2p daemon died first.

A Ctrl-C in the node's terminal reaches every process of its group, p2pd included, which exits
while the DHT process (which ignores SIGINT) waits to be told to stop. hivemind's stop then removes
the DHT's handlers from the daemon first, and a unary handler's removal waits on the daemon's
persistent connection for an answer that never comes: every Ctrl-C ended with "DHT did not shut down
within the grace period; terminating it the hard way" 3 s later. :class:`NodeDHT` skips the removal
when the daemon has exited, and gives it :data:`HANDLER_REMOVAL_S` otherwise (a live daemon answers in
milliseconds), then stops the daemon as usual.
"""

from __future__ import annotations

import asyncio
import logging

import hivemind

logger = logging.getLogger(__name__)

HANDLER_REMOVAL_S = 1.0


class NodeDHT(hivemind.DHT):
    async def _shutdown(self) -> None:
        node = self._node
        node.is_alive = False
        if not daemon_exited(node.p2p):  # (an exited daemon took its handlers with it)
            try:
                await asyncio.wait_for(node.protocol.shutdown(), HANDLER_REMOVAL_S)
            except (OSError, asyncio.TimeoutError) as e:  # the daemon is gone: so are its handlers
                logger.debug(f"p2pd did not answer the DHT's handler removal ({e!r}): it is gone")
        if node._should_shutdown_p2p:
            await node.p2p.shutdown()


def daemon_exited(p2p) -> bool:
    """Whether the p2p daemon this process started has exited (False for a replica: not its child)."""
    child = getattr(p2p, "_child", None)
    return child is not None and child.returncode is not None
