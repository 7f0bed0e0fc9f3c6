"""When a round closes below ``samples_per_round``: once every live node has submitted each group of
its assignment (``swarm.close_when_all_submitted``). A real coordinator on loopback, real nodes
(tests/coordinator_world.py): a swarm smaller than the run was sized for, and one whose node went
away, no longer wait out ``round_timeout_s``; a slow node that keeps heartbeating is waited for."""

import time

import pytest

from coordinator_world import HonestNode, Served, flat
from grpo_swarm.protocol.peers import PEER_TTL_INTERVALS

INTERVAL_S = 0.4  # heartbeat interval: a node silent for 3 of them is no longer live
GONE_S = PEER_TTL_INTERVALS * INTERVAL_S + 0.3


def _serve(tmp_path, **kw) -> Served:
    return Served(tmp_path, samples_per_round=64, round_timeout_s=3600.0, heartbeat_interval_s=INTERVAL_S,
                  **({"close_when_all_submitted": True} | kw))


def test_the_round_closes_at_the_submission_that_completes_every_live_nodes_assignment(tmp_path):
    s = _serve(tmp_path)
    try:
        a, b = HonestNode(s.address, tmp_path / "a"), HonestNode(s.address, tmp_path / "b")
        (_, ga), (_, gb) = a.round_proofs(), b.round_proofs()
        assert len(ga) == len(gb) == 2  # prompts_per_round; 2 x 2 x G=4 = 16 samples, far below 64
        first = a.client.submit_proofs(flat(ga[:1]))
        assert not first.round_closed  # a's assignment is half in
        second = a.client.submit_proofs(flat(ga[1:]))
        assert not second.round_closed and second.current_round == 0  # b is live and has submitted nothing
        last = b.client.submit_proofs(flat(gb))
        assert last.round_closed and last.current_round == 1
        closed = [e for e in a.client.get_log() if e.kind == "round_closed"]
        assert closed[0].payload["samples"] == {a.identity.node_id: 8, b.identity.node_id: 8}
    finally:
        s.stop()


def test_a_node_gone_silent_is_not_waited_for_and_its_late_work_is_refused(tmp_path):
    s = _serve(tmp_path)
    try:
        a, b, c = (HonestNode(s.address, tmp_path / n) for n in "abc")
        (_, ga), (_, gb), (_, gc) = a.round_proofs(), b.round_proofs(), c.round_proofs()
        a.client.submit_proofs(flat(ga))
        assert not b.client.submit_proofs(flat(gb)).round_closed  # c was dispatched and is still live
        started = time.monotonic()
        while a.client.heartbeat(0, sample=False).current_round == 0:  # c says nothing from here on
            assert time.monotonic() - started < GONE_S + 5.0, "the round waited for a node that went silent"
            time.sleep(INTERVAL_S / 2)
        assert time.monotonic() - started >= PEER_TTL_INTERVALS * INTERVAL_S - 0.2  # not before c counted as gone
        closed = [e for e in a.client.get_log() if e.kind == "round_closed"]
        assert sorted(closed[0].payload["participants"]) == sorted([a.identity.node_id, b.identity.node_id])
        late = c.client.submit_proofs(flat(gc))  # back after the close: round 0 is over
        assert not any(v.accepted for v in late.verdicts)
    finally:
        s.stop()


def test_a_slow_node_that_keeps_heartbeating_is_waited_for(tmp_path):
    """A node with verified work (here: a participant of round 0) is waited for while it heartbeats."""
    s = _serve(tmp_path)
    try:
        a, slow = HonestNode(s.address, tmp_path / "a"), HonestNode(s.address, tmp_path / "slow")
        (_, ga), (_, gs) = a.round_proofs(), slow.round_proofs()
        a.client.submit_proofs(flat(ga))
        assert slow.client.submit_proofs(flat(gs)).round_closed  # round 0: both participate
        (_, ga), (_, gs) = a.round_proofs(), slow.round_proofs()
        a.client.submit_proofs(flat(ga))
        for _ in range(int(2 * GONE_S / (INTERVAL_S / 2))):  # twice as long as silence would take
            slow.client.heartbeat(0, sample=False)  # what node/swarm/heartbeats.py sends while sampling
            assert a.client.heartbeat(0, sample=False).current_round == 1
            time.sleep(INTERVAL_S / 2)
        reply = slow.client.submit_proofs(flat(gs))
        assert reply.round_closed and all(v.accepted for v in reply.verdicts)
    finally:
        s.stop()


def test_a_worker_that_stops_submitting_is_waited_for_only_while_its_work_is_recent(tmp_path, monkeypatch):
    """As an attacker: I does one round of real work, then only heartbeats. Work in one of the last
    WORKED_ROUNDS rounds (1 here) makes a live node waited for; after that it is a key like any other."""
    from grpo_swarm.coordinator import core

    monkeypatch.setattr(core, "WORKED_ROUNDS", 1)
    s = _serve(tmp_path)
    try:
        a, b, idle = (HonestNode(s.address, tmp_path / n) for n in ("a", "b", "idle"))
        groups = [n.round_proofs()[1] for n in (a, b, idle)]
        a.client.submit_proofs(flat(groups[0]))
        b.client.submit_proofs(flat(groups[1]))
        assert idle.client.submit_proofs(flat(groups[2])).round_closed  # round 0: all three worked

        def next_round(expect_wait: float) -> float:
            current = a.client.heartbeat(0, sample=False).current_round
            groups = [n.round_proofs()[1] for n in (a, b)]
            idle.client.heartbeat(0, sample=True)  # takes its assignment
            a.client.submit_proofs(flat(groups[0]))
            assert not b.client.submit_proofs(flat(groups[1])).round_closed
            t0 = time.monotonic()
            while a.client.heartbeat(0, sample=False).current_round == current:
                idle.client.heartbeat(0, sample=False)  # live all along, never submitting
                if time.monotonic() - t0 > expect_wait + 2.0:
                    return time.monotonic() - t0
                time.sleep(INTERVAL_S / 4)
            return time.monotonic() - t0

        # round 1: I took part in round 0, so it is waited for (here until the test gives up)
        assert next_round(2 * GONE_S) > 2 * GONE_S
        for _ in range(int(GONE_S / (INTERVAL_S / 4)) + 4):  # I goes silent: round 1 closes without it
            if a.client.heartbeat(0, sample=False).current_round == 2:
                break
            time.sleep(INTERVAL_S / 4)
        assert a.client.heartbeat(0, sample=False).current_round == 2
        # round 2: its work is older than WORKED_ROUNDS: waited for like a fresh key, then left out
        assert next_round(PEER_TTL_INTERVALS * INTERVAL_S) < PEER_TTL_INTERVALS * INTERVAL_S + 2.0
    finally:
        s.stop()


def test_keys_without_verified_work_hold_a_round_back_only_so_long(tmp_path):
    """As an attacker: twelve fresh keys register and keep heartbeating, never submitting (before, each
    held every round until round_timeout_s: an hour here). Once the workers' assignments are in, the
    round waits for keys without verified work as long again as it took, at least as long as for a
    node gone silent (PEER_TTL_INTERVALS heartbeat intervals), then closes without them. A newcomer
    that submits within that wait is in the round."""
    s = _serve(tmp_path)
    try:
        a, b = HonestNode(s.address, tmp_path / "a"), HonestNode(s.address, tmp_path / "b")
        (_, ga), (_, gb) = a.round_proofs(), b.round_proofs()
        a.client.submit_proofs(flat(ga))
        assert b.client.submit_proofs(flat(gb)).round_closed  # round 0: a and b have verified work now
        fresh = [s.client() for _ in range(12)]
        for c in fresh:
            c.register()
        newcomer = HonestNode(s.address, tmp_path / "newcomer")
        round_start = time.monotonic()
        (_, ga), (_, gb), (_, gn) = a.round_proofs(), b.round_proofs(), newcomer.round_proofs()
        time.sleep(0.3)  # the round took a while
        a.client.submit_proofs(flat(ga))
        assert not b.client.submit_proofs(flat(gb)).round_closed  # the fresh keys and the newcomer are live
        workers_in = time.monotonic()
        assert newcomer.client.submit_proofs(flat(gn)).verdicts[0].accepted  # within the wait: in the round
        wait = max(workers_in - round_start, PEER_TTL_INTERVALS * INTERVAL_S)
        while a.client.heartbeat(0, sample=False).current_round == 1:
            for c in fresh:  # live all along
                c.heartbeat(0, sample=False)
            assert time.monotonic() - workers_in < wait + 3.0, "keys that never work held the round back"
            time.sleep(INTERVAL_S / 4)
        assert time.monotonic() - workers_in >= wait - 0.2
        closed = [e for e in a.client.get_log() if e.kind == "round_closed"][1].payload
        assert sorted(closed["participants"]) == sorted(n.identity.node_id for n in (a, b, newcomer))
        for c in fresh:
            c.close()
    finally:
        s.stop()


@pytest.mark.parametrize("switch", [False, True])
def test_the_switch_off_keeps_the_round_open_until_full_or_timed_out(tmp_path, switch):
    s = _serve(tmp_path, close_when_all_submitted=switch)
    try:
        a = HonestNode(s.address, tmp_path / "a")
        _, ga = a.round_proofs()
        assert a.client.submit_proofs(flat(ga)).round_closed is switch  # a is the only live node
    finally:
        s.stop()


def test_a_restarted_coordinator_still_knows_who_has_submitted(tmp_path):
    """The accepted groups of the open round come back from the log, so the round still closes at the
    submission that completes every live node's assignment after a coordinator restart."""
    from grpo_swarm.protocol.identity import Identity

    ids = {n: Identity.generate() for n in "ab"}
    s = _serve(tmp_path)
    try:
        a, b = (HonestNode(s.address, tmp_path / n, identity=ids[n]) for n in "ab")
        (_, ga), (_, gb) = a.round_proofs(), b.round_proofs()
        assert not a.client.submit_proofs(flat(ga)).round_closed
    finally:
        s.stop()
    s = _serve(tmp_path)  # the same data directory
    try:
        b = HonestNode(s.address, tmp_path / "b", identity=ids["b"])
        HonestNode(s.address, tmp_path / "a", identity=ids["a"])  # a is back too: live, its work in the log
        reply = b.client.submit_proofs(flat(gb))
        assert reply.round_closed and all(v.accepted for v in reply.verdicts)
    finally:
        s.stop()


def test_rejected_work_and_fresh_keys_cannot_close_a_round_early_only_hold_it_back(tmp_path):
    """As an attacker: M submits its assignment with inflated rewards, re-signed with its own key,
    twice (a retry). Its groups count as submitted but are rejected, and the round does not close
    while honest B, live, has submitted nothing. Then twelve fresh keys register and say nothing:
    once A, B and M submit the next round, it stays open (they hold the early close back, as any live node
    that has not submitted does, for a while: test_keys_without_verified_work_hold_a_round_back_only_so_long)."""
    from grpo_swarm.node import proving

    s = _serve(tmp_path)
    try:
        a, b, m = (HonestNode(s.address, tmp_path / n) for n in "abm")
        (_, ga), (_, gb), (_, gm) = a.round_proofs(), b.round_proofs(), m.round_proofs()
        forged = []
        for p in flat(gm):
            p.reward_total += 1.0
            forged.append(proving.sign_proof(p, m.identity))
        for _ in range(2):
            reply = m.client.submit_proofs(forged)
            assert not any(v.accepted for v in reply.verdicts) and not reply.round_closed
        assert not a.client.submit_proofs(flat(ga)).round_closed  # B has not submitted
        closing = b.client.submit_proofs(flat(gb))
        assert closing.round_closed  # every live node's assignment is in: M's rejected groups count as its own
        closed = [e for e in a.client.get_log() if e.kind == "round_closed"][0].payload
        assert sorted(closed["participants"]) == sorted([a.identity.node_id, b.identity.node_id])

        fresh = [s.client() for _ in range(12)]
        for c in fresh:
            c.register()
        (_, ga), (_, gb), (_, gm) = a.round_proofs(), b.round_proofs(), m.round_proofs()
        a.client.submit_proofs(flat(ga))
        m.client.submit_proofs(flat(gm))
        # the silent fresh keys are live: they hold the round back, for a while (the test below)
        assert not b.client.submit_proofs(flat(gb)).round_closed
        assert a.client.heartbeat(0, sample=False).current_round == 1
        for c in fresh:
            c.close()
    finally:
        s.stop()


def test_a_wall_clock_that_jumps_does_not_time_a_round_out(tmp_path, monkeypatch):
    """A coordinator whose wall clock steps forward (NTP, or a paused machine: a demo run lost a round to
    it) keeps the open round open: ``round_timeout_s``, liveness and the last round's averaging budget run
    on the monotonic clock. The timeout still comes when its time has passed."""
    from grpo_swarm.coordinator import core, store

    s = Served(tmp_path, samples_per_round=64, round_timeout_s=4.0, heartbeat_interval_s=INTERVAL_S,
               close_when_all_submitted=True)
    try:
        a, b = HonestNode(s.address, tmp_path / "a"), HonestNode(s.address, tmp_path / "b")
        started = time.monotonic()
        (_, ga), (_, gb) = a.round_proofs(), b.round_proofs()
        a.client.submit_proofs(flat(ga))  # b is live and has submitted nothing: the round stays open
        real_core, real_store = core.now_ms, store._now_ms
        monkeypatch.setattr(core, "now_ms", lambda: real_core() + 3_600_000)  # an hour ahead, at once
        monkeypatch.setattr(store, "_now_ms", lambda: real_store() + 3_600_000)
        assert s.coordinator.live_nodes() == 2  # nobody looks silent: liveness runs on the monotonic clock too
        for _ in range(3):
            b.client.heartbeat(0, sample=False)
            assert a.client.heartbeat(0, sample=False).current_round == 0
            time.sleep(INTERVAL_S / 2)
        assert time.monotonic() - started < 4.0
        while a.client.heartbeat(0, sample=False).current_round == 0:
            b.client.heartbeat(0, sample=False)
            assert time.monotonic() - started < 12.0, "the round never timed out"
            time.sleep(INTERVAL_S / 2)
        assert time.monotonic() - started >= 4.0 - 0.2
        # round 0's tickets may still be averaged: its budget counts from the close on the monotonic clock,
        # so the hour's step does not spend it at once
        assert s.coordinator.recorder.publication.round == 0 and not s.coordinator._last_round_settled()
    finally:
        s.stop()
