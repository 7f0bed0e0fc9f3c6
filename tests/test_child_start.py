"""Starting a DHT or averager process (node/swarm/child_calls.py: start_child, launch_child). hivemind
waits for a child to say it is ready with no limit: a child that died or wedged as it started hung its
caller for good (a CI run hung until its 90 minutes were up, most likely so). Ours gives up on a dead child at once and on a silent
one at its limit, and a node starts a fresh process in its place."""

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
    dht = launch_child(lambda: hivemind.DHT(start=False, host_maddrs=LOOPBACK), limit=60.0, what="DHT")
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
