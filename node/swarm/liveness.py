"""Whether a node's swarm side still works, stopping it, and starting it (again).

A node's swarm side is three processes: the hivemind DHT, the p2p daemon (p2pd) the DHT spawned,
and the averager (forked by :class:`~.averaging.VerifiedAverager`, a client of that daemon). Any of
them can die (out of memory, a crash) or wedge (a task that never ends holds a lock every later
step needs); the round loop would then fail every round until the user restarts the node.
:func:`swarm_fault` names what is wrong; :func:`stop_swarm_side` kills what is left, so that the
caller can start all of it again (:func:`start_swarm_side`).

Why all of it: p2pd keeps the stream handlers a client registered until that same client removes
them, and refuses the same names from another client ("handler ... already set"). A new averager
process cannot take over a dead one's handlers, so it needs a new daemon, and the daemon belongs to
the DHT process.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from .averaging import START_LIMIT_S, averager_unusable
from .child_calls import start_child

log = logging.getLogger(__name__)

DAEMON_NAME = "p2pd"
STOP_TIMEOUT_S = 10.0  # how long a killed process may take to be gone


def daemon_processes(dht) -> list[psutil.Process]:
    """The p2p daemons under the DHT's process (one while it runs)."""
    try:
        children = psutil.Process(dht.pid).children(recursive=True)
    except (psutil.Error, TypeError, ValueError):  # no such process, or never started (pid None)
        return []
    return [child for child in children if _named(child, DAEMON_NAME) and _running(child)]


def _named(process: psutil.Process, name: str) -> bool:
    try:
        return process.name() == name
    except psutil.Error:
        return False


def process_fault(averager, dht) -> str | None:
    """What of the swarm side is no longer running, None when all three processes are."""
    if not dht.is_alive():
        return f"the DHT process is gone{_exit(dht.exitcode)}"
    if not daemon_processes(dht):
        return f"the p2p daemon ({DAEMON_NAME}) under the DHT is gone"
    if not averager.is_alive():
        return f"the averager process is gone{_exit(averager.exitcode)}"
    return None


def _exit(code: int | None) -> str:
    if code == -signal.SIGKILL:  # what a user should check first
        return " (exit code -9: killed, often by the kernel's out-of-memory killer: see `dmesg`)"
    return f" (exit code {code})"


def step_fault(result) -> str | None:
    """Why a round's averaging says its averager no longer works (an attempt stuck past every
    timeout, or the process gone mid-step), None otherwise."""
    return next((a.error for a in getattr(result, "attempts", ()) if averager_unusable(a.error)), None)


def swarm_fault(averager, dht, last_result=None) -> str | None:
    """Why the swarm side must restart before the next averaging, or None."""
    return process_fault(averager, dht) or (step_fault(last_result) if last_result is not None else None)


def stop_swarm_side(averager, dht, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Kill the averager, the DHT and its p2p daemon, and remove the daemon's socket file. No
    graceful shutdown: it would unregister handlers through a daemon that may be gone and wait on
    tasks that may never end, only to be killed after its grace period anyway. Never raises."""
    daemons = daemon_processes(dht)  # listed first: killing the DHT orphans them
    sockets = [path for d in daemons for path in _unix_sockets(d)]
    for part in (averager, dht):
        try:
            if part is not None and part.is_alive():
                part.kill()
            if part is not None:
                part.join(timeout_s)
        except Exception as e:  # noqa: BLE001 - a restart goes on regardless
            log.warning("stopping %s: %s", type(part).__name__, e)
    for daemon in daemons:
        try:
            daemon.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    # orphaned by the DHT's death, a daemon is nobody's child to reap (psutil's wait would poll for
    # seconds): a zombie has let go of its ports, which is all a new daemon needs
    deadline = time.monotonic() + timeout_s
    while any(_running(d) for d in daemons) and time.monotonic() < deadline:
        time.sleep(0.01)
    for path in sockets:
        Path(path).unlink(missing_ok=True)


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone
        return False


def _unix_sockets(daemon: psutil.Process) -> list[str]:
    """The unix socket paths a p2pd listens on (its ``-listen=/unix/...`` argument)."""
    try:
        args = daemon.cmdline()
    except psutil.Error:
        return []
    return [a.split("=/unix", 1)[1] for a in args if a.startswith("-listen=/unix/")]


def start_swarm_side(start_dht: Callable[[], object], build_averager: Callable[[object], object], *,
                     attempts: int = 3, limit: float = START_LIMIT_S) -> tuple[object, object]:
    """A running DHT (``start_dht()``) and averager (``build_averager(dht)``, built with ``start=False``).
    An averager that fails to start (it died, stayed silent for ``limit`` s, or reported an error) is
    killed, and the DHT and its daemon with it: a dead averager may have set its handlers on that
    daemon already, which then refuses their names to a fresh averager. Both start afresh, ``attempts``
    times in all; the last failure is raised."""
    for attempt in range(1, attempts + 1):
        dht = start_dht()
        averager = None
        try:
            averager = build_averager(dht)
            start_child(averager, limit=limit, what="averager")
            return dht, averager
        except Exception as e:
            stop_swarm_side(averager, dht)
            if attempt == attempts or averager is None:  # (a refused build fails the same way again)
                raise
            log.warning("the averager did not start (%s: %s): starting the DHT and averager afresh (%d/%d)",
                        type(e).__name__, e, attempt + 1, attempts)
    raise AssertionError("unreachable")
