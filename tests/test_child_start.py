"""Starting a DHT or averager process (node/swarm/child_calls.py: start_child, launch_child). hivemind
waits for a child to say it is ready with no limit: a child that died or wedged as it started hung its
caller for good (a CI run hung until its 90 minutes were up, most likely so). Ours gives up on a dead
child at once and on a silent one at its limit, and a node starts a fresh process in its place."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import hivemind
import pytest
import torch
from hivemind.averaging import DecentralizedAverager

from grpo_swarm.node.swarm.child_calls import ChildSilent, launch_child, run_in_dht, start_child
from grpo_swarm.node.swarm.shared_memory import prepare_shared_memory
from hivemind_children import started_dht

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


class DiesAtStart(hivemind.DHT):
    def run(self):
        os.kill(os.getpid(), signal.SIGKILL)


class WedgedAtStart(hivemind.DHT):
    def run(self):
        time.sleep(3600)


def test_hiveminds_start_waits_on_a_dead_child_and_ours_gives_up_at_once():
    stock = DiesAtStart(start=False, host_maddrs=LOOPBACK)
    started = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):  # with no timeout (start=True), forever
        stock.run_in_background(await_ready=True, timeout=3.0)
    assert time.monotonic() - started >= 3.0 and not stock.is_alive()

    ours = DiesAtStart(start=False, host_maddrs=LOOPBACK)
    started = time.monotonic()
    with pytest.raises(ChildSilent, match="the DHT process, starting, died before answering") as caught:
        start_child(ours, limit=60.0, what="DHT")
    assert caught.value.gone and time.monotonic() - started < 3.0
    assert ours.exitcode == -signal.SIGKILL


def test_a_child_silent_as_it_starts_is_killed_at_the_limit():
    wedged = WedgedAtStart(start=False, host_maddrs=LOOPBACK)
    started = time.monotonic()
    with pytest.raises(ChildSilent, match="did not answer within 2 s") as caught:
        start_child(wedged, limit=2.0, what="DHT")
    assert not caught.value.gone and 2.0 <= time.monotonic() - started < 10.0
    assert not wedged.is_alive() and wedged.exitcode == -signal.SIGKILL


def test_a_dead_or_silent_start_is_replaced_by_a_fresh_process():
    builds = iter([lambda: DiesAtStart(start=False, host_maddrs=LOOPBACK),
                   lambda: WedgedAtStart(start=False, host_maddrs=LOOPBACK),
                   lambda: hivemind.DHT(start=False, host_maddrs=LOOPBACK)])
    made = []

    def build():
        made.append(next(builds)())
        return made[-1]

    dht = launch_child(build, limit=2.0, what="DHT", attempts=3)
    try:
        assert dht is made[2] and [p.exitcode for p in made[:2]] == [-signal.SIGKILL] * 2
        assert run_in_dht(dht, hivemind.DHT._get_peer_id, limit=30.0) is not None  # it answers
    finally:
        dht.shutdown()
    # out of attempts: the last failure is raised
    with pytest.raises(ChildSilent, match="died before answering"):
        launch_child(lambda: DiesAtStart(start=False, host_maddrs=LOOPBACK), limit=2.0, what="DHT", attempts=2)


def test_an_averager_that_dies_as_it_starts_is_replaced():
    class AveragerDiesAtStart(DecentralizedAverager):
        def run(self):
            os.kill(os.getpid(), signal.SIGKILL)

    prepare_shared_memory()
    dht = started_dht(host_maddrs=LOOPBACK)
    made = []

    def build():
        cls = AveragerDiesAtStart if not made else DecentralizedAverager
        made.append(cls([torch.zeros(4)], dht, start=False, prefix="child-start", target_group_size=2,
                        allow_state_sharing=False))
        return made[-1]

    averager = None
    try:
        averager = launch_child(build, limit=60.0, what="averager")
        assert averager is made[1] and made[0].exitcode == -signal.SIGKILL and averager.is_alive()
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()


class AveragerDiesAfterItsHandlers(DecentralizedAverager):
    """Dies (SIGKILL) once it has set its stream handlers on the DHT's p2p daemon, when ``die``."""
    die = False

    async def add_p2p_handlers(self, p2p, wrapper=None, **kwargs):
        await super().add_p2p_handlers(p2p, wrapper, **kwargs)
        if self.die:
            os.kill(os.getpid(), signal.SIGKILL)


def _averager(dht, *, die: bool):
    averager = AveragerDiesAfterItsHandlers([torch.zeros(4)], dht, start=False, prefix="child-start-h",
                                            target_group_size=2, allow_state_sharing=False)
    averager.die = die
    return averager


def test_an_averager_dead_after_setting_its_handlers_is_replaced_with_its_dht_and_daemon():
    """p2pd keeps a dead averager's handler names and refuses them to a fresh averager on that daemon:
    start_swarm_side starts the DHT (and so its daemon) afresh with the averager."""
    from grpo_swarm.node.swarm.liveness import start_swarm_side, stop_swarm_side

    prepare_shared_memory()
    dht = started_dht(host_maddrs=LOOPBACK)
    try:
        with pytest.raises(ChildSilent, match="died before answering"):
            start_child(_averager(dht, die=True), limit=60.0, what="averager")
        with pytest.raises(Exception, match="already") as refused:  # the same daemon, a fresh averager
            start_child(_averager(dht, die=False), limit=60.0, what="averager")
        print(f"a fresh averager on the same daemon: {type(refused.value).__name__}: {refused.value}")
    finally:
        stop_swarm_side(None, dht)

    dhts, averagers = [], []

    def start_dht():
        dhts.append(started_dht(host_maddrs=LOOPBACK))
        return dhts[-1]

    def build(on):
        averagers.append(_averager(on, die=not averagers))
        return averagers[-1]

    dht, averager = start_swarm_side(start_dht, build)
    try:
        assert (dht, averager) == (dhts[1], averagers[1]) and averager.is_alive() and dht.is_alive()
        assert averagers[0].exitcode == -signal.SIGKILL and not dhts[0].is_alive()
    finally:
        stop_swarm_side(averager, dht)
