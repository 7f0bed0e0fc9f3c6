"""node/swarm/heartbeats.py: liveness heartbeats while the round loop is silent, none while it is not."""

import time

import pytest

from grpo_swarm.node.swarm.heartbeats import HeartbeatKeeper


def test_it_heartbeats_while_the_loop_is_silent_and_not_while_the_loop_does():
    calls = []
    keeper = HeartbeatKeeper(lambda: calls.append(time.monotonic()), interval_s=0.1).start()
    try:
        time.sleep(0.55)  # silent: about one every interval
        silent = len(calls)
        assert 3 <= silent <= 6, calls
        t_end = time.monotonic() + 0.5
        while time.monotonic() < t_end:  # the loop heartbeats itself every 30 ms
            keeper.sent()
            time.sleep(0.03)
        assert len(calls) <= silent + 1  # (one may have been on its way)
    finally:
        keeper.stop()
    stopped = len(calls)
    time.sleep(0.3)
    assert len(calls) == stopped  # stop() ends the thread


def test_a_failing_send_is_tried_again_an_interval_later():
    tries = []

    def send():
        tries.append(time.monotonic())
        raise ConnectionError("coordinator down")

    keeper = HeartbeatKeeper(send, interval_s=0.1).start()
    time.sleep(0.45)
    keeper.stop()
    assert 2 <= len(tries) <= 5 and keeper.sent_count == 0
    assert all(b - a >= 0.09 for a, b in zip(tries, tries[1:]))  # not a busy retry


def test_an_interval_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="interval_s"):
        HeartbeatKeeper(lambda: None, interval_s=0)
