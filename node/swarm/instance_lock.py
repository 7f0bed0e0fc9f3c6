"""One running node per key and per work directory on a machine.

Two `grpo-node join` processes started with one key (the same command twice, or a copied work
directory) would be one identity in the swarm twice: one libp2p peer id on two hosts, one
assignment sampled twice, one ticket in two averaging groups, and both writing the same round files.
:func:`hold` takes an exclusive lock on a file beside the key and one in the work directory before
anything else, and refuses with :class:`NodeAlreadyRunning`, naming the process that holds it.

The locks are POSIX record locks (``lockf``), which belong to the process that took them: the DHT
and averager processes a node forks do not inherit them, so a node killed with -9 frees its key at
once for its restart, even while its children are still winding down.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator


class NodeAlreadyRunning(RuntimeError):
    """Another live process holds the key's or the work directory's lock."""


def _lock(path: Path, what: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that wrote no pid"
        os.close(fd)
        raise NodeAlreadyRunning(
            f"another grpo-node join is using this {what} ({holder}; lock file {path}). Two nodes with one key "
            "would be one identity in the swarm twice: stop the other, or start this one with its own "
            "--identity and --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    return fd


@contextmanager
def hold(key_path: Path, workdir: Path) -> Iterator[None]:
    """Hold this machine's locks on ``key_path`` (``<key>.lock`` beside it) and on ``workdir``
    (``node.lock`` in it) for the block; NodeAlreadyRunning if another process holds either."""
    key_path, workdir = Path(key_path).expanduser(), Path(workdir).expanduser()
    with ExitStack() as stack:
        for path, what in ((key_path.with_name(key_path.name + ".lock"), "key"), (workdir / "node.lock", "work directory")):
            fd = _lock(path, what)
            stack.callback(os.close, fd)  # closing the descriptor releases the lock
        yield
