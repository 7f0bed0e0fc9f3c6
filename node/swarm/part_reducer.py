"""The reducer's side of one share: each remote sender's part checked, then added with its ticket weight.

:class:`ValidatingReducer` is hivemind's ``TensorPartReducer`` made strict (the runner in
:mod:`.reduction` feeds it): a remote part must be a finite float32 tensor of the expected shape
whose running norm stays within what its sender committed to in its signed gather, or
:class:`PartRejected` names the reason before anything is added. The claimed weight on a message is
ignored: the weights come from the verified tickets. Parts are reduced in lockstep, one part index at
a time, as hivemind's are; each average starts from the first sender's part times weight / total
(no zeroed accumulator, no final division), and the time each sender held a part index up is kept
to name one that drips its parts.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

import torch
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer

from .part_codec import sum_of_squares
from .reasons import Reason
from .wire import WireTensor

class PartRejected(BannedException):
    """A part broke the rules; raised before it is accumulated. ``reason`` is a :class:`Reason`."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason, self.detail = reason, detail


def part_limit(norm: float, tolerance: float) -> float:
    """The most a norm committed as ``norm`` may measure on arrival (float32 sums in another order)."""
    return norm * (1.0 + tolerance) + 1e-30


class ValidatingReducer(TensorPartReducer):
    """A TensorPartReducer that accumulates with the ticket weights and checks every remote part."""

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, *, weights: Sequence[float],
                 committed_norms: Sequence[float], local_index: int, tolerance: float, keep_parts: bool = False):
        super().__init__(part_shapes, num_senders)
        # the parts each remote sender sent, as received (serialised: fp16 / 8-bit stay small), kept
        # for the share audit, which checks each sender's sketch against them (filled by the runner)
        self.received: list[dict[int, WireTensor]] | None = (
            [{} for _ in range(num_senders)] if keep_parts else None)
        assert len(weights) == len(committed_norms) == num_senders
        self.weights = [float(w) for w in weights]
        self.limits = [part_limit(float(n), tolerance) for n in committed_norms]
        self.squares = [0.0] * num_senders  # float64 running sum of squares of each sender's parts
        self.local_index = local_index
        self.total_weight = sum(self.weights)
        # seconds each sender held this share up: how long after the other remote senders' part its own
        # came, summed over the parts (a sender dripping its parts just under the timeouts stands out)
        self.held_up = [0.0] * num_senders
        self.arrivals: dict[int, float] = {}  # sender index -> when its part of the current index came

    def reset_accumulators(self):
        """Move on to the next part (hivemind's, without the accumulator: hivemind zeroes a new one for
        every part, adds each sender's part weighted and divides at the end; here the first sender's
        part, times weight / total, becomes it and the others are added to it: two passes over every
        part fewer, the same average up to rounding)."""
        if self.current_part_index >= self.num_parts - 1:
            self.finalize()
            return
        self.current_part_index += 1
        self.current_part_accumulated_from = 0
        self.current_part_future = asyncio.Future()
        self.num_current_senders = sum(self.current_part_index < failed for failed in self.sender_failed_after)
        self.accumulator = None
        self.denominator = 0.0

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        if self.finished.is_set():
            raise AllreduceException("the reducer was finalized")
        if not 0 <= sender_index < self.num_senders:
            raise AllreduceException(f"unknown sender index {sender_index}")
        if sender_index != self.local_index:
            self.check_part(sender_index, part_index, tensor_part)
        # hivemind's accumulate_part, with the accumulation above; the claimed ``weight`` is ignored:
        # the ticket's weight is the only one that counts
        weight = self.weights[sender_index]
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            finished = asyncio.create_task(self.finished.wait())
            await asyncio.wait({self.current_part_future, finished}, return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            if self.finished.is_set():
                raise AllreduceException("the reducer was finalized")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        if part_index != self.current_part_index:
            raise AllreduceException(f"part {part_index} came after the reducer moved past it")
        future = self.current_part_future
        scale = weight / self.total_weight if self.total_weight else 0.0
        if self.accumulator is None:
            self.accumulator = torch.mul(tensor_part, scale)
        else:
            self.accumulator.add_(tensor_part, alpha=scale)
        self.current_part_accumulated_from += 1
        self.denominator += weight
        self.arrivals[sender_index] = time.monotonic()
        self.check_current_part_finished()
        return await future

    def missing_senders(self) -> list[int]:
        """Remote senders the current part still waits for while another remote sender's is in; none
        while no remote part is in (this member's own link may be the slow one)."""
        if not 0 <= self.current_part_index < self.num_parts or not any(i != self.local_index for i in self.arrivals):
            return []
        return [i for i in range(self.num_senders) if i != self.local_index and i not in self.arrivals
                and self.sender_failed_after[i] == float("inf")]

    def seconds_held_up_by(self, sender_index: int) -> float:
        """How long ``sender_index`` has held this share up so far: its past parts' delays plus, while
        the current part waits for it (:meth:`missing_senders`), the time since the latest remote
        sender's part of that index came."""
        held = self.held_up[sender_index]
        if sender_index in self.missing_senders():
            held += time.monotonic() - max(t for i, t in self.arrivals.items() if i != self.local_index)
        return held

    def _charge_the_last_sender(self) -> None:
        remote = {i: t for i, t in self.arrivals.items() if i != self.local_index}
        if len(remote) >= 2:
            last = max(remote, key=remote.get)
            self.held_up[last] += remote[last] - max(t for i, t in remote.items() if i != last)
        self.arrivals = {}

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            average = self.accumulator
            if self.current_part_accumulated_from < self.num_senders and self.denominator > 0:  # (a sender left)
                average = average.mul_(self.total_weight / self.denominator)
            self.current_part_future.set_result(average)
            self._charge_the_last_sender()
            self.reset_accumulators()

    def check_part(self, sender_index: int, part_index: int, part: torch.Tensor) -> None:
        """PartRejected unless ``part`` is a finite float32 tensor of the expected shape whose values
        and (running) norm stay within the sender's committed norm."""
        if not 0 <= part_index < self.num_parts:
            raise PartRejected(Reason.BAD_SHAPE, f"part {part_index} beyond the {self.num_parts} parts of this share")
        expected = self.part_shapes[part_index]
        if not isinstance(part, torch.Tensor) or part.shape != expected:
            shape = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
            raise PartRejected(Reason.BAD_SHAPE, f"part {part_index} has shape {shape}, expected {tuple(expected)}")
        if part.dtype != torch.float32:
            raise PartRejected(Reason.BAD_DTYPE, f"part {part_index} is {part.dtype}, expected torch.float32")
        if part.requires_grad:
            raise PartRejected(Reason.MALFORMED_PART, f"part {part_index} requires grad")
        if part.numel() == 0:
            return
        # one pass: a NaN/inf anywhere makes the norm non-finite (so do values whose squares overflow
        # float32, ~1.8e19: far above any bound), and a norm within the limit bounds every value too
        squared = sum_of_squares(part.reshape(-1))
        if not math.isfinite(squared):
            raise PartRejected(Reason.NON_FINITE, f"part {part_index} holds NaN or infinite values (or values "
                                                  "whose squares overflow float32)")
        limit = self.limits[sender_index]
        squares = self.squares[sender_index] + squared
        if math.sqrt(squares) > limit:
            peak = float(part.abs().max())
            if peak > limit:
                raise PartRejected(Reason.MAGNITUDE, f"part {part_index} has a value of magnitude {peak:.6g} > the "
                                                     f"committed norm {limit:.6g}")
            raise PartRejected(Reason.NORM_EXCEEDED, f"parts up to {part_index} have norm {math.sqrt(squares):.6g} > "
                                                     f"the committed norm {limit:.6g}")
        self.squares[sender_index] = squares
