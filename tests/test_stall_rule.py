"""The coordinator's stall rule (grpo_swarm.protocol.stalls.StallRule) on its own: a peer that fails
every round it holds a ticket in is found within a few rounds and sits out; one that picks which
rounds to fail, knowing the rule, fails at most n + 1 rounds in any window; an honest swarm's one
failed round costs nothing; nobody sits out when the rest could not publish without it."""

import collections
import math
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
    # from the last failure on it sits out and the others publish: first as the lone suspect's probe (a
    # round without it must publish before it is found: A and B, probed first here, were not cleared
    # that way), then found
    assert all(b == {H} for b in benched[failed[-1] + 1:]), benched
    found = failed[-1] + 2
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
    assert len(rule.holders) <= 2 * 4 + 1  # a long run keeps two windows


def test_the_rule_is_off_with_a_window_of_zero_and_checks_its_window():
    rule = StallRule(0)
    assert all(not b for _, b, _ in play(rule, 10, (A, B, H), staller))
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError):
            StallRule(bad)
    assert DEFAULT_WINDOW_ROUNDS == StallRule().window


def _members(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)  # ids in a random order: the rule's order must not favour any key
    return [f"{rng.getrandbits(128):032x}" for _ in range(n)]


@pytest.mark.parametrize("n", [5, 7])
@pytest.mark.parametrize("seed", range(3))
def test_two_colluding_stallers_sit_out_together_and_the_others_publish(n, seed):
    """Two stallers that fail every round either holds a ticket in: single probes drop each in turn (the
    other fails the round), so the intersection empties — before, rounds failed for good and the last
    honest node probed was found. Now a group probe finds a group holding both within C(n, m) failed
    rounds, it sits out while the others publish, and no honest node is ever found."""
    members = _members(n, seed)
    stallers = set(members[:2])
    rule = StallRule(16)
    played = play(rule, 160, members, lambda r, holders: bool(stallers & set(holders)))
    failed = [r for r, _, f in played if f]
    cap = (n - 1) // 2  # the most the quorum lets sit out: the rest must hold more than half
    search = MIN_FAILED_ROUNDS + n + math.comb(n, cap)  # the incident, single probes, then group probes
    first_publish = next(r for r, _, f in played if not f)
    assert first_publish <= search, failed
    assert played[first_publish][1] >= stallers  # a group holding both
    assert not set(rule.found) - stallers, rule.found  # no honest node found
    # from then on: the group sits out while rounds publish; each time the failures leave the window the
    # incident ends, and the stallers fail two rounds before the group sits out again
    later = [r for r in failed if r > first_publish]
    for start in range(first_publish, 160):
        assert sum(start <= r < start + 16 for r in later) <= MIN_FAILED_ROUNDS, failed
    assert len(failed) <= search + MIN_FAILED_ROUNDS * (160 // 16), failed  # before: every one of the 160


def test_stallers_closing_a_round_alone_do_not_make_the_others_newcomers():
    """Seen in a real 5-node swarm (bench/join_stallers.py): the two stallers, back first from a round
    they broke, closed the next one with only their own work in it. With the incumbents taken from that
    first failed round alone, the three honest nodes were newcomers, too many to sit out, so no later
    failed round counted and the probes alternated between the two stallers for a whole window. The
    ticket holders of the last round that published before it are incumbents too."""
    members = _members(5, 7)
    stallers = set(members[:2])
    rule, window, failed = StallRule(16), 16, []
    for r in range(48):
        present = sorted(stallers) if r == 2 else members
        benched = rule.benched(r, {m: 1 / len(present) for m in present})
        holders = [m for m in present if m not in benched]
        rule.round_closed(r, holders, benched)
        if r >= 2 and len(holders) >= 2 and stallers & set(holders):
            failed.append(r)
        else:
            rule.published(r)
    first = next(r for r in range(3, 48) if r not in failed)
    assert first <= 3 + MIN_FAILED_ROUNDS + 5 + math.comb(5, 2), failed  # before: not before round 19
    assert not set(rule.found) - stallers, rule.found
    assert sum(first < r < first + window for r in failed) <= MIN_FAILED_ROUNDS, failed


def test_colluders_failing_some_of_their_rounds_still_let_most_rounds_publish():
    """Two stallers that each fail a round they hold a ticket in with some probability (a strategy the
    rule cannot read): most rounds still publish. They can get an honest node found this way (stated in
    the rule's docstring), so this bounds the failed rounds only."""
    failed_share = []
    for seed in range(6):
        rng = random.Random(100 + seed)
        members = _members(7, seed)
        stallers = set(members[:2])
        played = play(StallRule(16), 160, members,
                      lambda r, holders: bool(stallers & set(holders)) and rng.random() < 0.6)
        failed_share.append(sum(f for *_, f in played) / 160)
    assert sum(failed_share) / len(failed_share) < 0.35, failed_share  # before: 0.6 of the rounds


def test_a_group_probe_searches_a_bounded_number_of_groups(monkeypatch):
    """With many incumbents (C(30, 14) groups of the largest size) each close tries at most
    MAX_GROUPS_TRIED of them, and a group it returns meets every rule: within the quorum, meeting
    every failed round's holders, not inside a group a failed round sat out."""
    from grpo_swarm.protocol import stalls

    members = _members(30, 0)
    rule = StallRule(16)
    rule.round_closed(0, members)
    for r, out in enumerate((members[:14], members[14:28]), start=1):  # two failed group probes
        rule.round_closed(r, [m for m in members if m not in out], out)
    weights = {m: 1 / 30 for m in members}
    assert not rule.suspects(3)[1] & set(members[:28])  # no single suspect left among them
    group = rule.group_probe(3, weights, {})
    assert len(group) == 14 and not group <= set(members[:14]) and not group <= set(members[14:28]), group
    assert all(group & rule.holders[r] for r in range(3))
    monkeypatch.setattr(stalls, "MAX_GROUPS_TRIED", 0)
    assert rule.group_probe(3, weights, {}) == frozenset()  # the cap holds: nobody sits out this round


# ---- the recorder, a restart and the audit, with real proofs --------------------------------------------
WINDOW = 4


def _run_with_stallers(tmp, n_honest: int, n_stallers: int, rounds: int, window: int, restart_at: int) -> dict:
    """``n_honest`` + ``n_stallers`` nodes with accepted work every round; every round a staller holds a
    ticket in fails (no hash reports), every other round publishes a real GRPO step reported by its
    ticket holders. The recorder restarts from its log at ``restart_at``."""
    import torch

    from grpo_swarm.protocol.log import ProtocolLog
    from grpo_swarm.protocol.recorder import RunRecorder

    from protocol_world import COORDINATOR, World, identity

    torch.set_num_threads(1)
    world = World(group_size=2, prompts_per_round=1, max_staleness=0)
    salts: dict[int, bytes] = {}
    log = ProtocolLog(tmp / "log.sqlite")
    rec = RunRecorder(log, COORDINATOR, world.run_spec(stall_window_rounds=window), hooks=world.hooks,
                      on_salt=salts.__setitem__)
    honest = [identity(i) for i in range(n_honest)]
    stallers = [identity(n_honest + i) for i in range(n_stallers)]
    nodes = [*honest, *stallers]
    for n in nodes:
        rec.register(n.public_key_bytes)
    rec.publish_snapshot(0, world.shas[0])
    played, sequence = [], 0
    for r in range(rounds):
        if r == restart_at:  # a restart: the rule's state comes back from the log
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
        if not {s.node_id for s in stallers} & set(holders):
            sha = world.train_step(world.assigned(honest[0], r))
            for n in holders:
                assert rec.report_hash(n, world.version, sha).payload["weight"] == pytest.approx(1 / len(nodes))
            # those sitting out report too: their reports count 0, their weight stays in the total
            for n in entry.payload["benched"]:
                assert rec.report_hash(n, world.version, sha).payload["weight"] == 0.0
            published = rec.publish_snapshot(world.version, sha, uploader=holders[0]).payload
        played.append({"benched": entry.payload["benched"], "holders": holders, "published": published})
    log.close()
    return {"rounds": played, "entries": list(ProtocolLog(tmp / "log.sqlite")), "world": world,
            "staller": stallers[0].node_id, "stallers": {s.node_id for s in stallers}}


@pytest.fixture(scope="module")
def stalled_run(tmp_path_factory):
    """Two honest nodes and one staller, window 4, the recorder restarted at round 3."""
    return _run_with_stallers(tmp_path_factory.mktemp("stalls"), 2, 1, rounds=10, window=WINDOW, restart_at=3)


def test_the_coordinator_finds_the_staller_and_the_others_publish(stalled_run):
    rounds, staller = stalled_run["rounds"], stalled_run["staller"]
    failed = [r for r, x in enumerate(rounds) if x["published"] is None]
    found = next(r for r, x in enumerate(rounds) if "found" in x["benched"].get(staller, ""))
    first = [r for r in failed if r < found]
    # (the round before the finding: the staller's probe, when the others were probed before it — a
    # round without it publishes before it is found)
    assert 2 <= len(first) <= 3 + 1 and first[-1] in (found - 1, found - 2), failed
    assert all(list(x["benched"]) == [staller] and x["published"] for x in rounds[first[-1] + 1:found])
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


COLLUDED_WINDOW = 8


@pytest.fixture(scope="module")
def colluded_run(tmp_path_factory):
    """Three honest nodes and two stallers, window 8, the recorder restarted in the group probes."""
    return _run_with_stallers(tmp_path_factory.mktemp("colluded"), 3, 2, rounds=24, window=COLLUDED_WINDOW,
                              restart_at=12)


def test_the_coordinator_sits_two_colluding_stallers_out_together(colluded_run):
    """Through the recorder (real proofs, a restart): single probes, then group probes, until the group
    holding both stallers sits out; from then on the honest three publish while it does (each time the
    failures leave the window the stallers fail two rounds again), and no honest node is found."""
    rounds, stallers = colluded_run["rounds"], colluded_run["stallers"]
    first = next(r for r, x in enumerate(rounds) if x["published"])
    assert first <= MIN_FAILED_ROUNDS + 5 + math.comb(5, 2), first
    assert set(rounds[first]["benched"]) == stallers  # two may sit out of five: exactly the stallers
    assert all("group" in why for why in rounds[first]["benched"].values()), rounds[first]["benched"]
    later = [r for r, x in enumerate(rounds) if r > first and not x["published"]]
    for start in range(first, len(rounds)):
        assert sum(start <= r < start + COLLUDED_WINDOW for r in later) <= MIN_FAILED_ROUNDS, later
    assert sum(bool(x["published"]) for x in rounds[first:]) >= len(rounds[first:]) - 2 * MIN_FAILED_ROUNDS
    assert not any("found" in why for x in rounds for n, why in x["benched"].items() if n not in stallers)


def test_the_audit_replays_the_group_probes_and_pinpoints_a_forged_one(colluded_run):
    from grpo_swarm.protocol.audit import audit

    from protocol_world import COORDINATOR
    from test_snapshot_quorum import rechain

    entries, stallers = colluded_run["entries"], colluded_run["stallers"]
    result = audit(entries, colluded_run["world"].hooks, trusted_signers=[COORDINATOR.public_key_bytes])
    assert result.ok, result.problem
    assert result.replayed["benched"] == sum(len(x["benched"]) for x in colluded_run["rounds"])
    group_closes = [e for e in entries if e.kind == "round_closed" and set(e.payload["benched"]) == stallers]
    close = group_closes[0]
    one = sorted(stallers)[0]
    result = audit(rechain(entries, {close.index: {**close.payload, "benched": {one: close.payload["benched"][one]}}}),
                   trusted_signers=[COORDINATOR.public_key_bytes])  # let one of the two back in
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
    assert rule.found and set(rule.found) <= {H, *prepositioned}, rule.found
    for start in range(60):  # three ticket holders a round: at most n + 1 failed rounds in any window
        assert sum(start <= r < start + 8 for r in failed) <= 3 + 1, failed
