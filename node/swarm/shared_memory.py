"""Shared memory between a node and its DHT / averager processes, made safe to interrupt and kill.

Two hazards, both hangs of the node's main thread for good:

* hivemind shares memory through torch's ``file_system`` strategy, whose first use starts the
  ``torch_shm_manager`` process and reads its socket name from a pipe. torch retries that read on
  EINTR by re-testing the failed result instead of reading again, so a signal that lands there (a
  Ctrl-C while the node starts up) spins forever. The first use is made here with SIGINT blocked; a
  Ctrl-C in that window is delivered, as a KeyboardInterrupt, right after.
* hivemind's ``SharedBytes`` (behind every MPFuture) guards its per-process buffer with one
  ``multiprocessing.Lock`` shared by the node and every child forked from it. A child killed while
  holding it (the out-of-memory killer during a step's hand-over) left it held, and the node's next
  MPFuture (a restarted DHT's) waited on it forever. That lock and hivemind's other shared ones are
  replaced (:mod:`.fork_locks`).
"""
from __future__ import annotations

import signal

from .fork_locks import install_fork_safe_locks


def prepare_shared_memory() -> None:
    """Start torch's shared-memory manager and replace hivemind's shared locks (once per process, before
    any child is forked; later calls cost one small tensor)."""
    import torch

    install_fork_safe_locks()  # (its import of hivemind's mpfuture sets hivemind's sharing strategy)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        torch.empty(1).share_memory_()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
