"""`grpo-node join` as a container's PID 1: an init that outlives the node long enough for its goodbye.

In a container whose entrypoint is `grpo-node` (docker/Dockerfile), the node is PID 1, and when PID 1
dies the kernel kills every other process of the container at once: its goodbye watcher
(:mod:`.goodbye_watcher`) with it, before it can speak. So a node that finds itself PID 1 forks
first: the child runs the node (in a process group of its own, the terminal's foreground one when
there is a terminal), and PID 1 stays behind as a small init. It forwards the signals a container
gets (``docker stop``'s SIGTERM, ``docker kill -s ...``) to the node, reaps orphans, and once the node
exited waits up to :data:`LINGER_S` for the rest (the watcher's goodbye) before exiting with the
node's status (128 + N for a node killed by signal N, as a shell reports it).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from .goodbye_watcher import GOODBYE_TIMEOUT_S

LINGER_S = GOODBYE_TIMEOUT_S + 2.0  # the watcher's goodbye, with its gRPC import
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def become_init_if_pid1() -> None:
    """Return at once unless this process is PID 1; if it is, return in a forked child (the node)
    and never return in PID 1 (the init, which exits with the node's status)."""
    if os.getpid() != 1:
        return
    child = os.fork()
    if child == 0:
        _become_foreground_group()
        return
    try:  # (both sides set it, as shells do: a signal forwarded before the child did reaches its group)
        os.setpgid(child, child)
    except OSError:
        pass  # the child did it first, or is gone
    sys.exit(_supervise(child))


def _become_foreground_group() -> None:
    """The node's own process group, which a terminal's Ctrl-C reaches directly (as without an init)."""
    os.setpgid(0, 0)
    try:
        if os.isatty(0):
            held = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # (a background group may not take the terminal)
            try:
                os.tcsetpgrp(0, os.getpgrp())
            finally:
                signal.signal(signal.SIGTTOU, held)
    except OSError:
        pass  # no controlling terminal: signals come through the init


def _supervise(child: int) -> int:
    def forward(signum, _frame):
        try:  # a Ctrl-C reaches the node's whole group (its DHT, averager, p2pd), as from a terminal
            (os.killpg if signum == signal.SIGINT else os.kill)(child, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    status = None
    deadline = None
    while True:
        try:
            pid, raw = os.waitpid(-1, 0 if status is None else os.WNOHANG)
        except ChildProcessError:  # nobody left
            break
        if pid == child:
            status = os.waitstatus_to_exitcode(raw)
            deadline = time.monotonic() + LINGER_S
        elif pid == 0:  # (after the node: others still run)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    if status is None:
        return 1
    return 128 - status if status < 0 else status
