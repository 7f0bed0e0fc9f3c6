"""The node's waits between polls (node/swarm/polling.py) and its request pace (protocol/pacing.py),
on a fake clock."""

from __future__ import annotations

import threading

import pytest

from grpo_swarm.coordinator.service import ServerLimits
from grpo_swarm.node.swarm.polling import FIRST_POLL_S, PollBackoff
from grpo_swarm.protocol.pacing import NODE_PACE, RequestPacer


def test_polls_start_short_and_double_up_to_the_nodes_interval():
    polls = PollBackoff(0.2)
    assert [polls.next() for _ in range(6)] == [FIRST_POLL_S, 0.05, 0.1, 0.2, 0.2, 0.2]
    assert [PollBackoff(0.01).next() for _ in range(2)] == [0.01, 0.01]  # a shorter interval wins


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_the_pacer_lets_a_burst_through_then_keeps_to_its_rate():
    clock = FakeClock()
    pacer = RequestPacer(10.0, 3, clock=clock, sleep=clock.sleep)
    assert [pacer.wait() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert pacer.wait() == pytest.approx(0.1)
    start = clock.now
    for _ in range(20):
        pacer.wait()
    assert clock.now - start == pytest.approx(2.0)  # 10/s once the burst is spent
    clock.now += 60.0  # a quiet minute refills the burst, not more
    assert [pacer.wait() for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.1)]


def test_threads_sharing_a_pacer_queue_up():
    clock = FakeClock()  # (standing still: each thread's wait is what it reserved)
    pacer = RequestPacer(50.0, 1, clock=clock, sleep=lambda s: None)
    pacer.wait()
    waits = []
    threads = [threading.Thread(target=lambda: waits.append(pacer.wait())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(waits) == pytest.approx([0.02, 0.04, 0.06, 0.08])


def test_no_pace_never_waits_and_a_node_stays_inside_the_coordinators_default():
    pacer = RequestPacer(0.0, 1)
    assert all(pacer.wait() == 0.0 for _ in range(1000))
    rate, burst = NODE_PACE
    served = ServerLimits()  # grpo-coordinator serve's --rate and --burst defaults
    assert rate < served.rate_per_s and burst < served.burst
    with pytest.raises(ValueError, match="burst"):
        RequestPacer(5.0, 0)


def test_a_pacer_fits_inside_a_lower_announced_limit_and_never_above_its_own():
    clock = FakeClock()
    pacer = RequestPacer(*NODE_PACE, clock=clock, sleep=clock.sleep)
    pacer.fit(5.0, 10)  # an operator's `serve --rate 5 --burst 10`
    assert (pacer.rate, pacer.burst) == (pytest.approx(4.5), 6)
    assert [pacer.wait() for _ in range(6)] == [0.0] * 6  # the burst is cut to the new one at once
    assert pacer.wait() == pytest.approx(1 / 4.5)
    pacer.fit(1000.0, 10_000)  # a higher limit: back to its own pace, not above it
    assert (pacer.rate, pacer.burst) == NODE_PACE
    pacer.fit(0.0, 0)  # none announced: its own pace
    assert (pacer.rate, pacer.burst) == NODE_PACE
    off = RequestPacer(0.0, 1)
    off.fit(5.0, 10)  # a client that does not pace itself is not made to
    assert off.rate == 0.0 and off.wait() == 0.0
