"""The locks hivemind shares between a node and every process forked from it, made safe to kill a
holder and to fork while one is held.

hivemind makes these ``multiprocessing.Lock`` s (POSIX semaphores) when it is imported, and each DHT
and averager process forked later shares them with the node:

* ``MPFuture._update_lock``, held while a process writes a result to the pipe of the process that
  waits for it (a DHT process says it is ready so);
* ``MPFuture._initialization_lock``, ``SharedBytes._lock`` and ``_AsyncContextWrapper.EXECUTOR_LOCK``,
  held while a process sets up its own MPFuture backend, shared-memory buffer or executor.

A process killed while it holds one (a node restarting its swarm side kills its children; the
out-of-memory killer) leaves it held for good, and every process that takes it later waits forever:
seen in the tests, where three fresh DHT processes in a row never said they were ready.

The last three guard each process's own state: each process gets its own thread lock, made anew in
a forked child (a copy taken while another thread held it would stay held). The update lock does keep
writers from interleaving on one pipe, across processes: it becomes a :class:`DeathSafeLock`, as does
each averager's tensor lock (:class:`.averaging.VerifiedAverager`).
"""
from __future__ import annotations

import fcntl
import os
import tempfile
import threading

_installed = False


class DeathSafeLock:
    """A lock between a process and the processes forked from it that its holder's death releases: a
    POSIX record lock on an unlinked file (the kernel drops a dead process's record locks), behind a
    thread lock (record locks belong to a process, not to one of its threads)."""

    def __init__(self):
        self._file = tempfile.TemporaryFile()  # unlinked at once; forked children share its inode
        self._threads = threading.Lock()

    def acquire(self) -> bool:
        self._threads.acquire()
        try:
            fcntl.lockf(self._file.fileno(), fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise
        return True

    def release(self) -> None:
        try:
            fcntl.lockf(self._file.fileno(), fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def __enter__(self) -> DeathSafeLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def forked(self) -> None:
        """In a forked child: a fresh thread lock (the record lock itself is never inherited)."""
        self._threads = threading.Lock()


def install_fork_safe_locks() -> None:
    """Replace hivemind's shared locks (once per process; call before any child is forked)."""
    global _installed
    if _installed:  # (a forked child inherits them, and the hook that renews them)
        return
    from hivemind.utils.mpfuture import MPFuture

    MPFuture._update_lock = DeathSafeLock()
    _fresh_thread_locks()
    os.register_at_fork(after_in_child=_after_fork_in_child)
    _installed = True


def _fresh_thread_locks() -> None:
    from hivemind.utils.asyncio import _AsyncContextWrapper
    from hivemind.utils.mpfuture import MPFuture, SharedBytes

    MPFuture._initialization_lock = threading.Lock()
    SharedBytes._lock = threading.Lock()
    _AsyncContextWrapper.EXECUTOR_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    from hivemind.utils.mpfuture import MPFuture

    _fresh_thread_locks()
    if isinstance(MPFuture._update_lock, DeathSafeLock):
        MPFuture._update_lock.forked()
