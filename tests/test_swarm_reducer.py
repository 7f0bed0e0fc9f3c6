"""The reducer's arithmetic on its own: ticket weights, claimed weights ignored, and the average it
forms without hivemind's zeroed accumulator (node/swarm/part_reducer.py, ValidatingReducer)."""

import asyncio
import time

import pytest
import torch

from grpo_swarm.node.swarm.part_reducer import PartRejected, ValidatingReducer


def reducer(weights, shapes=((5,), (3,))):
    return ValidatingReducer([torch.Size(s) for s in shapes], len(weights), weights=weights,
                             committed_norms=[1e3] * len(weights), local_index=0, tolerance=1e-4)


def parts(seed, shapes=((5,), (3,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def test_the_average_is_the_ticket_weighted_mean_whatever_the_order_and_claims():
    async def run():
        weights = [3.0, 5.0, 7.0]
        red = reducer(weights)
        inputs = [parts(i) for i in range(3)]
        # senders arrive out of order, claim weight 100, and part 1 is sent before part 0 is done
        tasks = [asyncio.create_task(red.accumulate_part(s, p, inputs[s][p], weight=100.0))
                 for p in (1, 0) for s in (2, 0, 1)]
        results = await asyncio.gather(*tasks)
        for (p, s), got in zip([(p, s) for p in (1, 0) for s in (2, 0, 1)], results):
            expected = sum(w * x[p] for w, x in zip(weights, inputs)) / sum(weights)
            assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7), (p, s)
        assert red.finished.is_set()
        # every sender of a part gets the very same tensor (one average, encoded once)
        assert results[0] is results[1] is results[2] and results[3] is results[4] is results[5]

    asyncio.run(run())


def test_a_remote_part_that_breaks_the_rules_is_refused_before_it_is_added():
    async def run():
        red = reducer([1.0, 1.0])
        with pytest.raises(PartRejected):
            await red.accumulate_part(1, 0, torch.tensor([float("nan")] * 5))
        assert red.accumulator is None and red.current_part_accumulated_from == 0
        with pytest.raises(PartRejected):
            await red.accumulate_part(1, 0, torch.ones(1))  # would broadcast
        local = asyncio.create_task(red.accumulate_part(0, 0, torch.ones(5)))
        remote = asyncio.create_task(red.accumulate_part(1, 0, torch.full((5,), 3.0)))
        assert torch.equal(await local, torch.full((5,), 2.0)) and (await remote) is (await local)

    asyncio.run(run())


def test_a_first_hand_failure_outranks_a_relayed_one_as_the_attempts_first():
    """A member's first failure (named in its next gather) is the first it saw, except that a refusal
    or a finding of its own, seen before its abort, outranks an earlier CANCELLED or end: those a
    groupmate's abort also causes, and a groupmate that began earlier passes the breaker on first."""
    from grpo_swarm.node.swarm.reduction import VerifiedAllReduceRunner
    from grpo_swarm.node.swarm.reasons import Reason

    def runner():
        r = object.__new__(VerifiedAllReduceRunner)  # only the bookkeeping under test
        r.peer_id, r.first_failure, r._first_is_first_hand = "me", None, False
        return r

    r = runner()
    r._note_first("B", Reason.REDUCER_FAILED)  # B answered CANCELLED: it aborted, passing something on
    r._note_first("C", Reason.SENDER_FAILED)  # another end: the first stays
    assert r.first_failure == ("B", Reason.REDUCER_FAILED)
    r._note_first("H", Reason.NOT_IN_GROUP, first_hand=True)  # H refused us itself
    assert r.first_failure == ("H", Reason.NOT_IN_GROUP)
    r._note_first("C", Reason.MALFORMED_PART, first_hand=True)  # a later first-hand one does not replace it
    r._note_first("me", Reason.REDUCER_FAILED, first_hand=True)  # nor does this member itself
    assert r.first_failure == ("H", Reason.NOT_IN_GROUP)
    r = runner()
    r._note_first("H", Reason.NOT_IN_GROUP, first_hand=True)
    r._note_first("B", Reason.REDUCER_FAILED)
    assert r.first_failure == ("H", Reason.NOT_IN_GROUP)


def test_a_relayed_failure_waits_for_the_unanswered_reducers_before_aborting():
    """After a CANCELLED (another member's relay) and the grace, the abort waits — up to ``hear_out_s`` —
    for the reducers that have neither answered this member nor opened a stream to it: one of them
    may be the refuser whose own answer names it first-hand. It stops waiting once they all answered,
    or a first-hand failure came, or the time is up."""
    from types import SimpleNamespace

    from grpo_swarm.node.swarm.reduction import VerifiedAllReduceRunner
    from grpo_swarm.node.swarm.reasons import Reason

    def runner():
        r = object.__new__(VerifiedAllReduceRunner)
        r.peer_id, r.ordered_peer_ids = "me", ["me", "B", "H"]
        r.tensor_part_container = SimpleNamespace(num_parts_by_peer=[1, 1, 1])
        r.abort_grace, r.hear_out_s = 0.05, 0.4
        r.first_failure, r._first_is_first_hand, r._heard, r.failures = None, False, set(), {"B": ("x", "y")}
        r.active_senders = set()
        r._future = SimpleNamespace(done=lambda: False)
        r.aborted_at = None
        r.abort = lambda reason: setattr(r, "aborted_at", time.monotonic())
        return r

    async def run(r, meanwhile):
        start = time.monotonic()
        await asyncio.gather(r._abort_once_heard("B answered CANCELLED"), meanwhile(r))
        return r.aborted_at - start

    async def nothing(r):
        pass

    async def h_answers(r):
        await asyncio.sleep(0.12)
        r._heard.add("H")

    async def h_refuses(r):
        await asyncio.sleep(0.12)
        r._note_first("H", Reason.NOT_IN_GROUP, first_hand=True)

    assert 0.43 <= asyncio.run(run(runner(), nothing)) < 0.6  # H never answers: grace + hear_out_s
    assert 0.11 <= asyncio.run(run(runner(), h_answers)) < 0.3
    assert 0.11 <= asyncio.run(run(runner(), h_refuses)) < 0.3
    r = runner()
    r._heard.add("H")  # everyone answered already: the grace alone
    assert asyncio.run(run(r, nothing)) < 0.15
    r = runner()
    r.active_senders.add("H")  # H sends us its part: in the group, it answers once it aborts in turn
    assert asyncio.run(run(r, nothing)) < 0.15
