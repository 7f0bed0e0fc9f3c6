"""node/swarm/liveness.py on real processes: a hivemind DHT (with its p2pd) and a hivemind averager
forked from this process. What each fault is called, and that a stop leaves nothing running behind
(the full restart inside `grpo-node join` is tests/test_swarm_join.py's)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from grpo_swarm.node.swarm.averaging import AVERAGER_DIED, STEP_STUCK
from grpo_swarm.node.swarm.liveness import daemon_processes, stop_swarm_side, swarm_fault
from grpo_swarm.node.swarm.round_report import AttemptReport, RoundResult


@pytest.fixture
def swarm_side():
    import hivemind
    from hivemind.averaging import DecentralizedAverager

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    # (no state sharing, as VerifiedAverager: an idle averager then has no DHT call in flight, and the
    # kill below cannot take the DHT process down with it, which a call's pipe hand-over can do)
    averager = DecentralizedAverager([torch.zeros(8)], dht, prefix="liveness", target_group_size=2,
                                     allow_state_sharing=False, start=True)
    yield averager, dht
    stop_swarm_side(averager, dht)


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_each_dead_process_is_named(swarm_side):
    averager, dht = swarm_side
    assert swarm_fault(averager, dht) is None
    os.kill(averager.pid, signal.SIGKILL)
    averager.join(10)  # (a killed process shows as a zombie before its threads are gone and it can be reaped)
    assert swarm_fault(averager, dht).startswith("the averager process is gone (exit code -9: killed, often by the "
                                                 "kernel's out-of-memory killer")
    (daemon,) = daemon_processes(dht)
    daemon.kill()
    assert _gone(daemon.pid)
    assert "p2p daemon (p2pd)" in swarm_fault(averager, dht)  # checked before the averager: it needs the daemon
    os.kill(dht.pid, signal.SIGKILL)
    dht.join(10)
    assert swarm_fault(averager, dht).startswith("the DHT process is gone")


def test_a_wedged_or_orphaned_step_is_named_from_the_round_result(swarm_side):
    averager, dht = swarm_side
    failed = lambda error: RoundResult(False, 3, None, [AttemptReport(error="ok then"), AttemptReport(error=error)], 1.0)  # noqa: E731
    assert swarm_fault(averager, dht, failed("TimeoutError: no group")) is None
    assert swarm_fault(averager, dht, failed(f"{STEP_STUCK} after 41 s (cancelled)")).startswith(STEP_STUCK)
    assert swarm_fault(averager, dht, failed(f"{AVERAGER_DIED} (mid-step)")).startswith(AVERAGER_DIED)


def test_a_stop_kills_all_three_and_removes_the_daemons_socket(swarm_side):
    averager, dht = swarm_side
    (daemon,) = daemon_processes(dht)
    (listen,) = [a for a in daemon.cmdline() if a.startswith("-listen=/unix/")]
    socket = Path(listen.split("=/unix", 1)[1])
    assert socket.exists()
    started = time.monotonic()
    stop_swarm_side(averager, dht)
    assert time.monotonic() - started < 5.0  # killed, not shut down through its grace periods
    assert not averager.is_alive() and not dht.is_alive()
    assert _gone(daemon.pid, within_s=0.5)
    assert not socket.exists()
