"""SIGTERM leaves the swarm the way Ctrl-C does.

``docker stop``, ``systemctl stop`` and a plain ``kill`` send SIGTERM to the node's main process
alone. By default that ends it at once, with no clean-up: its DHT and averager processes, p2pd
(holding the node's ports, so that a restart on the same port fails to start its daemon) and
torch's shared-memory manager ran on as orphans. :func:`leave_on_sigterm` turns SIGTERM in the main
process into :class:`Terminated`, a KeyboardInterrupt, so the same path stops them. A forked child
inherits the handler; there it does what SIGTERM did before (hivemind stops its children with it).
"""
from __future__ import annotations

import os
import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: leave as after a Ctrl-C."""


def leave_on_sigterm() -> None:
    """Install the handler (from the main thread of the node's main process)."""
    main_pid = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() != main_pid:  # a forked child (the DHT's, the averager's): die as before
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)
