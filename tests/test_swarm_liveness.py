"""node/swarm/liveness.py on real processes: a hivemind DHT (with its p2pd) and a hivemind averager
forked from this process. What each fault is called, and that a stop leaves nothing running behind
(the full restart inside `grpo-node join` is tests/test_swarm_join.py's)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from grpo_swarm.node.swarm.averaging import AVERAGER_DIED, STEP_STUCK
from grpo_swarm.node.swarm.dht import connected_peers
from grpo_swarm.node.swarm.liveness import daemon_processes, stop_swarm_side, swarm_fault
from grpo_swarm.node.swarm.round_report import AttemptReport, RoundResult
from grpo_swarm.node.swarm.shared_memory import prepare_shared_memory
from grpo_swarm.node.swarm.child_calls import ChildSilent, start_step
from hivemind_children import started_averager, started_dht


@pytest.fixture
def swarm_side():
    from hivemind.averaging import DecentralizedAverager

    prepare_shared_memory()  # as a node does: a child killed mid-MPFuture cannot leave a lock held here
    dht = started_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    # (no state sharing, as VerifiedAverager: an idle averager then has no DHT call in flight, and the
    # kill below cannot take the DHT process down with it, which a call's pipe hand-over can do)
    averager = started_averager(DecentralizedAverager, [torch.zeros(8)], dht, prefix="liveness",
                                target_group_size=2, allow_state_sharing=False)
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


def _start(averager, limit: float):
    from hivemind.utils.timed_storage import get_dht_time

    return start_step(averager, gather=b"entry", weight=1.0, timeout=5.0, scheduled_time=get_dht_time() + 1.0,
                      limit=limit)


def test_hiveminds_step_hangs_on_a_dead_averager_and_ours_gives_up(swarm_side):
    """hivemind's step waits with no timeout for the averager process to take the step up: a node
    whose averager was killed just before (or during) a step's hand-over hung there for good, with no
    heartbeat and deaf to Ctrl-C (found in the kill-averager bench, 1 run in 6). start_step gives up."""
    averager, _ = swarm_side
    control = _start(averager, limit=30.0)  # alive: taken up at once
    control.cancel()
    os.kill(averager.pid, signal.SIGKILL)
    averager.join(10)
    stock = threading.Thread(target=averager.step, kwargs=dict(gather=b"x", timeout=5.0, wait=False), daemon=True)
    stock.start()
    stock.join(3.0)
    assert stock.is_alive()  # hivemind's: still waiting (the thread is a daemon: it dies with the tests)
    started = time.monotonic()
    with pytest.raises(ChildSilent, match="handed a step, died before answering") as caught:
        _start(averager, limit=30.0)
    assert caught.value.gone and time.monotonic() - started < 3.0


def test_a_step_an_alive_but_silent_averager_never_takes_up_gives_up_at_its_limit(swarm_side):
    averager, _ = swarm_side
    os.kill(averager.pid, signal.SIGSTOP)  # alive, its event loop frozen: what a wedged averager looks like
    try:
        started = time.monotonic()
        with pytest.raises(ChildSilent, match="handed a step, did not answer within 2 s") as caught:
            _start(averager, limit=2.0)
        assert not caught.value.gone and 2.0 <= time.monotonic() - started < 4.0
    finally:
        os.kill(averager.pid, signal.SIGCONT)


def test_asking_a_dead_dht_for_its_peers_gives_up_instead_of_hanging(swarm_side):
    """hivemind's DHT.run_coroutine waits with no timeout as well: the live view's peer count (asked
    every round) would hang the node on a DHT killed mid-call."""
    _, dht = swarm_side
    assert connected_peers(dht) == []  # alive: answers (no peers here)
    os.kill(dht.pid, signal.SIGKILL)
    dht.join(10)
    started = time.monotonic()
    with pytest.raises(ChildSilent, match="the DHT process died before answering") as caught:
        connected_peers(dht)
    assert caught.value.gone and time.monotonic() - started < 3.0


def _slow_averagers(base):
    """Two averagers of class ``base`` whose all-reduce starts 2 s after their group formed, on two
    connected DHTs: a step cancelled in those 2 s has left matchmaking and still runs its all-reduce."""
    import asyncio

    class Slow(base):
        async def _aggregate_with_group(self, group_info, min_vector_size, **kwargs):
            await asyncio.sleep(2.0)
            return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)

    first = started_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = started_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[str(a) for a in first.get_visible_maddrs()])
    # (hivemind's 3 s request timeout: in a loaded full run the follower once gave up on the leader's
    # answer while the leader went on with it, "could not find a group")
    return [(started_averager(Slow, [torch.full((8,), float(i))], dht, prefix="cancelled-step", target_group_size=2,
                              min_group_size=2, request_timeout=10.0, min_matchmaking_time=12.0,
                              allow_state_sharing=False), dht) for i, dht in enumerate((first, second))]


@pytest.mark.parametrize("quiet", [True, False], ids=["ours", "hiveminds"])
def test_a_step_cancelled_as_its_group_forms_ends_quietly(capfd, quiet):
    """The join loop cancels a step that is still looking for a group once the round went on. In the
    instant a group forms, hivemind's step runs the all-reduce anyway and then fails to set the
    cancelled step's result: asyncio logs an InvalidStateError never retrieved (a node that slept
    through its round, bench/churn.py). CancelledStepsQuiet drops that report (hivemind's own class, run
    the same way, shows the error: the scenario is real)."""
    import logging
    import sys

    from hivemind.averaging import DecentralizedAverager
    from hivemind.averaging.control import AveragingStage

    from grpo_swarm.node.swarm.averaging import CancelledStepsQuiet

    class Quiet(CancelledStepsQuiet, DecentralizedAverager):
        pass

    prepare_shared_memory()
    # the averager processes log to this test's captured stderr (they are forked with these handlers)
    handler = logging.StreamHandler(os.fdopen(os.dup(2), "w", buffering=1))
    loggers = [logging.getLogger(name) for name in ("asyncio", "grpo_swarm.node.swarm.averaging")]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    sides = []
    try:
        sides = _slow_averagers(Quiet if quiet else DecentralizedAverager)
        controls = [av.step(gather=b"g", timeout=30.0, wait=False, allow_retries=False) for av, _ in sides]
        deadline = time.monotonic() + 30.0
        while controls[0].stage != AveragingStage.RUNNING_ALLREDUCE:
            assert time.monotonic() < deadline, f"no group within 30 s (stage {controls[0].stage})"
            time.sleep(0.02)
        controls[0].cancel()  # what _step_result does once the round went on
        controls[1].result(timeout=30.0)  # the groupmate's all-reduce completes: ours ran too
        time.sleep(1.0)
        for av, _ in sides:
            av.shutdown()  # (the never-retrieved task is logged when the averager's loop lets it go)
    finally:
        for av, dht in sides:
            stop_swarm_side(av, dht)
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()
    err = capfd.readouterr().err
    sys.stderr.write(err[-3000:])
    if quiet:
        assert "InvalidStateError" not in err
        assert "its report is dropped" in err
    else:
        assert "InvalidStateError" in err


def test_an_averager_shut_down_mid_round_ends_its_groups_without_a_traceback():
    """The averager process's shutdown with a group registered (a node stopped mid-round): hivemind's
    own calls ``finalize`` on the future the group is registered as, and a stopped node printed an
    AttributeError traceback; ours aborts and cancels the running all-reduce (aborted, the round's
    step reports it without the traceback of an unexpected failure) and leaves a group still forming."""
    import asyncio
    from types import SimpleNamespace

    from hivemind.averaging import DecentralizedAverager

    from grpo_swarm.node.swarm.averaging import VerifiedAverager

    async def shut_down(shutdown) -> list:
        loop = asyncio.get_running_loop()
        finalized = []
        running, forming = loop.create_future(), loop.create_future()
        running.set_result(SimpleNamespace(finalize=lambda **kw: finalized.append(kw),
                                           abort=lambda reason: finalized.append(reason)))

        async def no_linger(_s: float) -> None:
            return None

        me = SimpleNamespace(client_mode=True, shutdown_timeout=5.0, _linger_for_audits=no_linger,
                             _running_groups={b"running": running, b"forming": forming})
        await shutdown(me, 1.0)
        return finalized

    assert asyncio.run(shut_down(VerifiedAverager._shutdown)) == [
        "this averager is shutting down (the node is stopping)", {"cancel": True}]
    with pytest.raises(AttributeError, match="finalize"):
        asyncio.run(shut_down(DecentralizedAverager._shutdown))


def test_a_ctrl_c_while_the_averager_takes_a_step_up_drops_the_step_quietly(monkeypatch):
    """Ctrl-C lands while start_step waits for the averager to take the step up: the interrupt goes on,
    and the dropped step says nothing as it is collected (hivemind's StepControl, never attached,
    raised in ``__del__``: an "Exception ignored" traceback at a node's Ctrl-C)."""
    import gc
    import sys
    from types import SimpleNamespace

    from hivemind.averaging.allreduce import AveragingMode
    from hivemind.utils import MPFuture, MSGPackSerializer
    from hivemind.utils.timed_storage import get_dht_time

    def interrupted() -> bool:
        raise KeyboardInterrupt

    averager = SimpleNamespace(mode=AveragingMode.NODE, serializer=MSGPackSerializer, bandwidth=None,
                               _outer_pipe=SimpleNamespace(send=lambda message: None), is_alive=interrupted)
    MPFuture()  # (hivemind's backend set up as a node's is: a StepControl first sets it up on itself alone)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(KeyboardInterrupt):
        start_step(averager, gather=b"entry", weight=1.0, timeout=5.0, scheduled_time=get_dht_time() + 1.0, limit=5.0)
    gc.collect()
    assert [u.exc_value for u in unraisable] == []
