"""Starting an averaging step without trusting the averager process to be there.

hivemind's ``DecentralizedAverager.step`` hands the step to the averager process through its pipe and
then waits, with no timeout, for that process to take it up (``future_for_init.result()``). An
averager killed just before or during that hand-over (the kernel's out-of-memory killer, a crash)
never answers, and the node's main thread hung there for good: no heartbeat, no restart, deaf to
Ctrl-C. :func:`start_step` does what hivemind's ``step(wait=False)`` does, but waits for the hand-over
in short polls, asking whether the process is still alive, and gives up after ``limit`` seconds.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.control import StepControl
from hivemind.utils import MPFuture
from hivemind.utils.timed_storage import get_dht_time

POLL_S = 0.5  # how often the hand-over wait asks whether the averager process is alive


class StepNotTaken(RuntimeError):
    """The averager process did not take the step up: ``gone`` when it died, else it kept silent
    past the limit (its event loop wedged)."""

    def __init__(self, message: str, *, gone: bool):
        super().__init__(message)
        self.gone = gone


def start_step(averager: DecentralizedAverager, *, gather, weight: float, timeout: float, scheduled_time: float,
               alive: Callable[[], bool], limit: float) -> StepControl:
    """hivemind's ``averager.step(gather=..., weight=..., timeout=..., scheduled_time=...,
    allow_retries=True, wait=False)``: the running step's control, its all-reduce allowed. Raises
    StepNotTaken when the process dies before taking the step up, or has not within ``limit`` s."""
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
    give_up_at = time.monotonic() + limit
    while True:
        try:
            trigger_and_cancel = future_for_init.result(timeout=POLL_S)
            break
        except TimeoutError:
            if alive() and time.monotonic() <= give_up_at:
                continue
            future_for_init.cancel()
            step.attach(MPFuture(), MPFuture())  # (hivemind warns when a step it never attached is dropped)
            step.cancel()
            if not alive():
                raise StepNotTaken("it died before taking the step up", gone=True) from None
            raise StepNotTaken(f"it did not take the step up within {limit:.0f} s", gone=False) from None
    step.attach(*trigger_and_cancel)
    step.allow_allreduce()
    return step
