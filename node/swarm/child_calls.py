"""Calls from a node's main thread into its DHT and averager processes that cannot hang it, starting
them included.

hivemind hands such a call to the child process through a pipe and waits for the answer with no
timeout: ``DHT.run_coroutine`` and ``DecentralizedAverager.step`` (which waits for the averager to
take the step up, ``future_for_init.result()``). A child killed just before or during the call (the
kernel's out-of-memory killer, a crash) never answers, and the node's main thread hung there for good:
no heartbeat, no restart, deaf to Ctrl-C. Here every such wait polls, asks whether the process is
still alive, and gives up after a limit; the caller then restarts the swarm side (:mod:`.liveness`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.control import StepControl
from hivemind.utils import MPFuture
from hivemind.utils.timed_storage import get_dht_time

from .fork_locks import install_fork_safe_locks

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a wait asks whether the child process is alive


class ChildSilent(RuntimeError):
    """A child process did not answer a call: ``gone`` when it died, else it kept silent past the
    limit (its event loop wedged)."""

    def __init__(self, message: str, *, gone: bool):
        super().__init__(message)
        self.gone = gone


def result_while_alive(future: MPFuture, *, alive: Callable[[], bool], limit: float, what: str) -> Any:
    """``future.result()``, given up (the future cancelled, ChildSilent raised) once ``alive()`` says
    the process that should answer it died, or after ``limit`` seconds."""
    give_up_at = time.monotonic() + limit
    while True:
        try:
            return future.result(timeout=POLL_S)
        except TimeoutError:
            if alive() and time.monotonic() <= give_up_at:
                continue
            future.cancel()
            if not alive():
                raise ChildSilent(f"{what} died before answering", gone=True) from None
            raise ChildSilent(f"{what} did not answer within {limit:.0f} s", gone=False) from None


def start_child(process, *, limit: float, what: str) -> None:
    """Start ``process``, a hivemind DHT or averager built with ``start=False``, and wait until it is
    ready: hivemind's own wait has no limit, so a child that died or wedged while starting hung its
    caller for good. Raises ChildSilent, the process killed, when it dies first or is not ready within
    ``limit`` s; the error the child itself reports when it fails to start is raised as it is."""
    install_fork_safe_locks()  # (else a child killed holding one of hivemind's locks wedges this one)
    process.run_in_background(await_ready=False)
    try:
        result_while_alive(process._ready, alive=process.is_alive, limit=limit, what=f"the {what} process, starting,")
    except BaseException:
        if process.is_alive():
            process.kill()
        process.join(5.0)
        raise


def launch_child(build: Callable[[], Any], *, limit: float, what: str, attempts: int = 3) -> Any:
    """``build()`` (a hivemind DHT or averager, built with ``start=False``), started with
    :func:`start_child`; a process that dies or stays silent while starting is replaced by a fresh one,
    at most ``attempts`` times in all (CI saw a forked DHT child die with SIGSEGV, and once a test hang
    on one that never came up: rare, and gone in a fresh fork). Raises the last ChildSilent."""
    for attempt in range(1, attempts + 1):
        process = build()
        try:
            start_child(process, limit=limit, what=what)
            return process
        except ChildSilent as e:
            if attempt == attempts:
                raise
            log.warning("the %s process %s (exit code %s): starting a fresh one (%d/%d)",
                        what, "died while starting" if e.gone else "did not start in time", process.exitcode,
                        attempt + 1, attempts)
    raise AssertionError("unreachable")


def run_in_dht(dht, coro, *, limit: float) -> Any:
    """``dht.run_coroutine(coro)``, raising ChildSilent instead of hanging."""
    return result_while_alive(dht.run_coroutine(coro, return_future=True), alive=dht.is_alive, limit=limit,
                              what="the DHT process")


def start_step(averager: DecentralizedAverager, *, gather, weight: float, timeout: float, scheduled_time: float,
               limit: float) -> StepControl:
    """hivemind's ``averager.step(gather=..., weight=..., timeout=..., scheduled_time=...,
    allow_retries=True, wait=False)``: the running step's control, its all-reduce allowed. Raises
    ChildSilent when the averager dies before taking the step up, or has not within ``limit`` s."""
    if averager.mode == AveragingMode.AUX:
        raise ValueError("an auxiliary averager sends no gradient: it takes no verified step")
    if not (weight >= 0 and scheduled_time < get_dht_time() + timeout):
        raise ValueError(f"a step needs a weight >= 0 ({weight!r}) and a start within its timeout")
    data_for_gather = averager.serializer.dumps([averager.bandwidth, averager.mode.value,
                                                 averager.serializer.dumps(gather)])
    step = StepControl(scheduled_time=scheduled_time, deadline=get_dht_time() + timeout, allow_retries=True,
                       weight=weight, data_for_gather=data_for_gather)
    future_for_init = MPFuture()
    averager._outer_pipe.send(("_step", [], dict(step=step, future_for_init=future_for_init)))
    try:
        trigger, cancel = result_while_alive(future_for_init, alive=averager.is_alive, limit=limit,
                                             what="the averager process, handed a step,")
    except BaseException:  # ChildSilent, or Ctrl-C meanwhile
        # (hivemind's StepControl warns when a step it never attached is dropped, and one with no trigger
        # at all raised in __del__: "Exception ignored" tracebacks at a node's Ctrl-C)
        step.attach(MPFuture(), MPFuture())
        step.cancel()
        raise
    step.attach(trigger, cancel)
    step.allow_allreduce()
    return step
