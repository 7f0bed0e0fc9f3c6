"""Start torch's shared-memory manager with SIGINT held back.

hivemind shares memory between a node and its DHT / averager processes through torch's
``file_system`` strategy, whose first use starts the ``torch_shm_manager`` process and reads its
socket name from a pipe. torch retries that read on EINTR by re-testing the failed result instead of
reading again, so a signal that lands there (a Ctrl-C while the node starts up) spins the main thread
forever: the node neither starts nor leaves (found stopping `bench/swarm_rounds.py` nodes 3 s in).
:func:`start_shm_manager` makes that first use with SIGINT blocked; a Ctrl-C in that window is
delivered, as a KeyboardInterrupt, right after. Forked children inherit the started manager.
"""
from __future__ import annotations

import signal


def start_shm_manager() -> None:
    """Start torch's shared-memory manager (once per process; later calls cost one small tensor)."""
    import hivemind.utils.mpfuture  # noqa: F401 - sets the sharing strategy hivemind uses (file_system)
    import torch

    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        torch.empty(1).share_memory_()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
