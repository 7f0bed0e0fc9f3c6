"""The coordinator's stall rule (grpo_swarm.protocol.stalls.StallRule) on its own: a peer that fails
every round it holds a ticket in is found within a few rounds and sits out; one that picks which
rounds to fail, knowing the rule, fails at most n + 1 rounds in any window; an honest swarm's one
failed round costs nothing; nobody sits out when the rest could not publish without it."""

import collections
import random

import pytest

from grpo_swarm.protocol.stalls import DEFAULT_WINDOW_ROUNDS, MIN_FAILED_ROUNDS, StallRule

A, B, C, D, H = (f"{i:032x}" for i in range(1, 6))


def play(rule: StallRule, rounds: int, members, fails, start: int = 0):
    """Close ``rounds`` rounds with ``members`` as participants (equal weights); a round fails when
    ``fails(round, holders)`` says so, else it publishes. Returns [(round, benched, failed)]."""
    out = []
    for r in range(start, start + rounds):
        benched = rule.benched(r, {n: 1 / len(members) for n in members})
        holders = [n for n in members if n not in benched]
        rule.round_closed(r, holders, benched)
        failed = len(holders) >= 2 and fails(r, holders)
        if not failed:
            rule.published(r)
        out.append((r, set(benched), failed))
    return out


def staller(r, holders):
    return H in holders


def test_a_peer_failing_every_round_it_is_in_is_found_after_n_plus_one_failures():
    rule = StallRule(16)
    played = play(rule, 16, (A, B, H), staller)
    failed = [r for r, _, f in played if f]
    assert len(failed) <= 3 + 1, played  # two before the rule acts, then at most one probe per other suspect
    benched = [b for _, b, _ in played]
    assert benched[:MIN_FAILED_ROUNDS] == [set(), set()]  # one failed round alone benches nobody
    found = failed[-1] + 1
    assert all(b == {H} for b in benched[found:]), benched  # found: it sits out, the others publish
    assert rule.found == {H: 1} and rule.sits_out_until[H] == found + 16
    assert f"sits out rounds {found}-{found + 15}" in rule.benched(16, {A: .3, B: .3, H: .4})[H]


def test_each_time_it_comes_back_it_sits_out_twice_as_long():
    rule = StallRule(8)
    played = play(rule, 120, (A, B, C, H), staller)
    failed = [r for r, _, f in played if f]
    for start in range(120):  # any 8 consecutive rounds
        assert sum(start <= r < start + 8 for r in failed) <= 4 + 1, failed
    assert rule.found[H] == 4 and len(failed) <= 4 * 5, failed  # sat out 8, 16, 32, then 64 rounds
    assert rule.sits_out_until[H] > 120 + 8


@pytest.mark.parametrize("seed", range(6))
def test_a_staller_that_picks_its_rounds_fails_at_most_n_plus_one_in_any_window(seed):
    """It knows the rule and the rotation; whatever it picks, every round it fails while a probe holds
    another suspect out drops that suspect, and it never leaves the suspects itself."""
    rng = random.Random(seed)
    rule, window = StallRule(8), 8
    members = (A, B, C, H)
    played = play(rule, 80, members, lambda r, holders: H in holders and rng.random() < 0.6)
    failed = [r for r, _, f in played if f]
    for start in range(80):
        assert sum(start <= r < start + window for r in failed) <= len(members) + 1, (seed, failed)
    # the honest members never fail a round among themselves, so H is in every suspect set: replayed
    replay = StallRule(8)
    for r, benched, failed_r in played:
        _, suspects = replay.suspects(r)
        assert not suspects or H in suspects, (r, suspects)
        if len(suspects) == 1:
            assert benched == {H}
        replay.round_closed(r, [n for n in members if n not in benched], benched)
        if not failed_r:
            replay.published(r)


def test_an_honest_swarm_pays_for_two_failed_rounds_not_one():
    rule = StallRule(16)
    once = play(rule, 20, (A, B, C), lambda r, holders: r == 3)
    assert all(not b for _, b, _ in once)
    rule = StallRule(16)
    twice = play(rule, 30, (A, B, C), lambda r, holders: r in (3, 5))
    benched = [(r, b) for r, b, _ in twice if b]
    # one member sits out each round, in turn, until the failures leave the window
    assert [r for r, _ in benched] == list(range(6, 20)) and all(len(b) == 1 for _, b in benched)
    assert {n for _, b in benched for n in b} == {A, B, C}


def test_nobody_sits_out_when_the_rest_could_not_publish_without_it():
    rule = StallRule(16)
    played = play(rule, 10, (A, H), staller)  # two members: the one left would hold half
    assert all(not b for _, b, _ in played)
    rule = StallRule(16)
    rule.round_closed(0, (A, B, H))
    rule.round_closed(1, (A, H), benched=(B,))  # a probe sat B out
    rule.round_closed(2, (B, H), benched=(A,))  # all three failed: H is found at the next close
    assert rule.benched(3, {A: 0.2, B: 0.2, H: 0.6}) == {}  # A and B hold 0.4: not more than half
    assert set(rule.benched(3, {A: 0.3, B: 0.3, H: 0.4})) == {H}
    assert rule.benched(3, {A: 0.5, B: 0.5}) == {}  # H did no work this round: nobody to sit out


def test_rounds_with_one_ticket_holder_and_published_rounds_are_not_failures():
    rule = StallRule(4)
    rule.round_closed(0, (A,))
    rule.round_closed(1, (A, B))
    rule.published(1)
    rule.round_closed(2, (A, B))
    assert rule.failed_rounds(3) == [2]
    rule.round_closed(3, (A, B))
    assert rule.failed_rounds(4) == [2, 3] and rule.suspects(4)[1] == {A, B}
    assert rule.failed_rounds(7) == [3] and rule.suspects(7)[1] == frozenset()  # round 2 left the window
    assert len(rule.holders) <= 4 + 1  # a long run keeps only the window


def test_the_rule_is_off_with_a_window_of_zero_and_checks_its_window():
    rule = StallRule(0)
    assert all(not b for _, b, _ in play(rule, 10, (A, B, H), staller))
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError):
            StallRule(bad)
    assert DEFAULT_WINDOW_ROUNDS == StallRule().window


# ---- the recorder, a restart and the audit, with real proofs --------------------------------------------
WINDOW = 4


@pytest.fixture(scope="module")
def stalled_run(tmp_path_factory):
    """Three nodes with accepted work every round; every round the staller holds a ticket in fails (no
    hash reports), every other round publishes a real GRPO step reported by its ticket holders. The
    recorder restarts from its log halfway."""
    import torch

    from grpo_swarm.protocol.log import ProtocolLog
    from grpo_swarm.protocol.recorder import RunRecorder

    from protocol_world import COORDINATOR, World, identity

    torch.set_num_threads(1)
    world = World(group_size=2, prompts_per_round=1, max_staleness=0)
    tmp = tmp_path_factory.mktemp("stalls")
    salts: dict[int, bytes] = {}
    log = ProtocolLog(tmp / "log.sqlite")
    rec = RunRecorder(log, COORDINATOR, world.run_spec(stall_window_rounds=WINDOW), hooks=world.hooks,
                      on_salt=salts.__setitem__)
    honest, staller = [identity(0), identity(1)], identity(2)
    nodes = [*honest, staller]
    for n in nodes:
        rec.register(n.public_key_bytes)
    rec.publish_snapshot(0, world.shas[0])
    rounds, sequence = [], 0
    for r in range(10):
        if r == 3:  # a restart: the rule's state comes back from the log
            before = rec.stalls
            log.close()
            log = ProtocolLog(tmp / "log.sqlite")
            rec = RunRecorder.resume(log, COORDINATOR, salts=salts, hooks=world.hooks, on_salt=salts.__setitem__)
            for attr in ("window", "holders", "published_rounds", "found", "sits_out_until", "reasons", "last_out", "members"):
                assert getattr(rec.stalls, attr) == getattr(before, attr), attr
        for n in nodes:
            assert all(v.accepted for v in rec.submit(world.groups(n, r, sequence)[0])), r
        sequence += 2
        entry = rec.close_round()
        holders = sorted(rec.final_tickets)
        assert holders == [n for n in entry.payload["participants"] if n not in entry.payload["benched"]]
        published = None
        if staller.node_id not in holders:
            sha = world.train_step(world.assigned(honest[0], r))
            for n in holders:
                assert rec.report_hash(n, world.version, sha).payload["weight"] == pytest.approx(1 / 3)
            # the one sitting out reports too: its report counts 0, its weight stays in the total
            assert rec.report_hash(staller.node_id, world.version, sha).payload["weight"] == 0.0
            published = rec.publish_snapshot(world.version, sha, uploader=holders[0]).payload
        rounds.append({"benched": entry.payload["benched"], "holders": holders, "published": published})
    log.close()
    return {"rounds": rounds, "entries": list(ProtocolLog(tmp / "log.sqlite")), "world": world,
            "staller": staller.node_id}


def test_the_coordinator_finds_the_staller_and_the_others_publish(stalled_run):
    rounds, staller = stalled_run["rounds"], stalled_run["staller"]
    failed = [r for r, x in enumerate(rounds) if x["published"] is None]
    found = next(r for r, x in enumerate(rounds) if "found" in x["benched"].get(staller, ""))
    first = [r for r in failed if r < found]
    assert 2 <= len(first) <= 3 + 1 and first[-1] == found - 1, failed
    after = rounds[found:found + WINDOW]
    assert all(list(x["benched"]) == [staller] and x["published"] for x in after), after
    assert failed[len(first)] == found + WINDOW and not rounds[found + WINDOW]["benched"]  # back after its stint
    assert all(x["published"]["total_weight"] == pytest.approx(1.0) and x["published"]["support_weight"]
               == pytest.approx(2 / 3) for x in after)  # the bar stays at more than half of all the work
    assert "found 1 time(s)" in after[0]["benched"][staller]


def test_the_audit_replays_who_sat_out_and_pinpoints_a_forged_bench(stalled_run):
    from grpo_swarm.protocol.audit import audit
    from grpo_swarm.protocol.report import node_rows

    from protocol_world import COORDINATOR
    from test_snapshot_quorum import rechain

    entries, staller = stalled_run["entries"], stalled_run["staller"]
    result = audit(entries, stalled_run["world"].hooks, trusted_signers=[COORDINATOR.public_key_bytes])
    assert result.ok, result.problem
    sat_out = collections.Counter(n for x in stalled_run["rounds"] for n in x["benched"])
    assert result.replayed["benched"] == sum(sat_out.values()) and sat_out[staller] >= WINDOW
    assert {row["node_id"]: row["benched_rounds"] for row in node_rows(result) if row["benched_rounds"]} == sat_out
    close = [e for e in entries if e.kind == "round_closed"][6]  # the staller sits it out
    assert list(close.payload["benched"]) == [staller]
    honest = next(n for n in close.payload["participants"] if n != staller)
    for forged in ({}, {honest: "forged"}):  # let it in; sit out an honest node instead
        result = audit(rechain(entries, {close.index: {**close.payload, "benched": forged}}),
                       trusted_signers=[COORDINATOR.public_key_bytes])
        assert result.problem is not None and result.problem.index == close.index, result.problem
        assert "stall rule" in result.problem.reason


def fresh(i: int) -> str:
    return f"{0xF0000 + i:032x}"


@pytest.mark.parametrize("rotate", ["when_sat_out", "every_round"])
def test_a_staller_switching_to_fresh_keys_never_makes_an_honest_member_the_suspect(rotate):
    """Its new keys are newcomers: they sit out while the old key's failures are in the window, and a
    failed round a newcomer held a ticket in does not clear the old key. Without that, a round failed by
    a new key (the old one away) left only honest members in the intersection, and a probe of one of
    them then made the other the only suspect."""
    rule, window, honest = StallRule(8), 8, (A, B)
    keys = (fresh(i) for i in range(1000))
    key, failed = next(keys), []
    for r in range(120):
        members = (*honest, key)
        benched = rule.benched(r, {n: 1 / 3 for n in members})
        holders = [n for n in members if n not in benched]
        rule.round_closed(r, holders, benched)
        if key in holders and len(holders) >= 2:
            failed.append(r)
        else:
            rule.published(r)
        assert not set(rule.found) & set(honest), (r, rule.found)
        if rotate == "every_round" or key in benched:
            key = next(keys)
    for start in range(120):  # per window: at most n + 1 before a key is found, then its successors wait
        assert sum(start <= r < start + 2 * window for r in failed) <= 2 * (3 + 1), failed
    assert len(failed) < 120 // 3, failed


def test_keys_that_did_work_before_and_stayed_away_are_newcomers_too():
    """Two keys of the attacker did honest work in rounds 0-2, then stayed away; it stalls with a third
    from round 10 and brings the two back in turn, each failing the rounds it is in while the others
    are away: they sit out as newcomers, and no honest member is ever found."""
    rule, honest = StallRule(8), (A, B)
    prepositioned = (fresh(1), fresh(2))
    plan = {r: (*honest, *prepositioned) for r in range(3)}
    plan.update({r: honest for r in range(3, 10)})
    plan.update({r: (*honest, (H, *prepositioned)[r % 3]) for r in range(10, 60)})
    failed = []
    for r in range(60):
        members = plan[r]
        benched = rule.benched(r, {n: 1 / len(members) for n in members})
        holders = [n for n in members if n not in benched]
        rule.round_closed(r, holders, benched)
        hostile = [n for n in holders if n == H or n in prepositioned]
        if r >= 10 and hostile and len(holders) >= 2:
            failed.append(r)
        else:
            rule.published(r)
        assert not set(rule.found) & set(honest), (r, rule.found, benched)
    assert H in rule.found and set(rule.found) <= {H, *prepositioned}
    for start in range(60):  # three ticket holders a round: at most n + 1 failed rounds in any window
        assert sum(start <= r < start + 8 for r in failed) <= 3 + 1, failed
