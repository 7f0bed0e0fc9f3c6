"""The ban-by-reports rule (grpo_swarm.protocol.peers.PeerReports) on its own: distinct first-hand
reporters of a round's participants, counted over a window of rounds, in either order of arrival;
one reporter never becomes a majority however often it reports."""

from grpo_swarm.protocol.peers import REPORT_WINDOW_ROUNDS, STRIKE_WINDOW_ROUNDS, PeerReports, ban_payload

A, B, C, D, M = (f"{i:032x}" for i in range(1, 6))


def not_banned(_node: str) -> bool:
    return False


def world(rounds: int, members=(A, B, C)) -> PeerReports:
    peers = PeerReports()
    for r in range(rounds):
        peers.round_closed(r, members)
    return peers


def test_first_hand_reports_from_different_rounds_make_a_majority():
    peers = world(12)
    peers.record(A, 2, C, log_index=10)  # A caught C in round 2; B did not see it then
    assert not peers.tally(2, C, not_banned).majority
    peers.record(B, 5, C, log_index=11)  # B caught it in round 5; A did not
    tally = peers.tally(5, C, not_banned)
    assert tally.majority and tally.reporters == (A, B) and (tally.others, tally.needed) == (2, 2)


def test_a_late_report_for_an_earlier_round_counts_too():
    peers = world(12)
    peers.record(B, 5, C, log_index=11)
    peers.record(A, 2, C, log_index=12)  # arrives after B's, for an earlier round
    assert peers.tally(2, C, not_banned).reporters == (A, B)
    assert peers.decisive_tally(2, C, not_banned).majority


def test_reports_outside_the_window_do_not_add_up():
    peers = world(2 * REPORT_WINDOW_ROUNDS + 2)
    peers.record(A, 0, C, log_index=1)
    peers.record(B, REPORT_WINDOW_ROUNDS, C, log_index=2)
    assert peers.tally(REPORT_WINDOW_ROUNDS, C, not_banned).reporters == (B,)
    assert peers.tally(0, C, not_banned).reporters == (A,)
    peers.record(B, REPORT_WINDOW_ROUNDS - 1, C, log_index=3)  # the last round that still counts with 0
    assert peers.tally(0, C, not_banned).majority


def test_one_hostile_reporter_never_bans_however_often_it_reports():
    peers = world(20, members=(A, B, M))
    for r in range(20):
        peers.record(M, r, A, log_index=r)
        assert not peers.tally(r, A, not_banned).majority


def test_only_the_rounds_participants_count_for_it():
    peers = PeerReports()
    for r in range(4):
        peers.round_closed(r, (A, B, C))
    peers.round_closed(4, (A, C, D))  # B is not in round 4
    peers.record(B, 3, C, log_index=1)
    peers.record(A, 4, C, log_index=2)
    assert peers.tally(4, C, not_banned).reporters == (A,)  # B's word is not one of round 4's
    # both were in round 3: A's report for round 4 completes round 3's majority
    decisive = peers.decisive_tally(4, C, not_banned)
    assert decisive.majority and decisive.round <= 3 and decisive.reporters == (A, B)
    assert not peers.decisive_tally(4, C, lambda n: n == B).majority  # a banned reporter no longer counts


WITHHELD = "AUDIT_WITHHELD: no reveal within 20.0 s"


def test_withheld_reveals_ban_at_the_second_strike_within_the_window():
    """A majority whose every report is for a withheld audit reveal (a crash between a node's
    reduction and its reveal looks the same) is a strike: the second within STRIKE_WINDOW_ROUNDS bans.
    A strike's reports stop counting, so the second takes a majority of its own."""
    peers = PeerReports(withheld_audit_strikes=2)
    world_rounds = STRIKE_WINDOW_ROUNDS + 40
    for r in range(world_rounds):
        peers.round_closed(r, (A, B, C))
    peers.record(A, 3, C, log_index=1, reason=WITHHELD)
    peers.record(B, 3, C, log_index=2, reason=WITHHELD)
    first = peers.after_report(3, C, not_banned)
    assert first.reported and first.withheld_only and not first.majority  # a strike, no ban
    assert peers.strikes[C] == [3] and peers.tally(3, C, not_banned).reporters == ()
    assert peers.reported(A, 3, C) == 1  # still logged once: a repeat is refused as before
    peers.record(A, 30, C, log_index=3, reason=WITHHELD)  # one report of a later round is no majority
    assert not peers.after_report(30, C, not_banned).reported
    peers.record(B, 30, C, log_index=4, reason=WITHHELD)
    second = peers.after_report(30, C, not_banned)
    assert second.majority and second.strikes == (3,)
    payload = ban_payload(second, 4)
    assert payload["strikes"] == [3] and payload["reason"].startswith("withheld its share-audit reveal")


def test_a_strike_outside_the_window_is_forgotten_and_one_setting_bans_at_once():
    peers = PeerReports(withheld_audit_strikes=2)
    for r in range(STRIKE_WINDOW_ROUNDS + 40):
        peers.round_closed(r, (A, B, C))
    for reporter, index in ((A, 1), (B, 2)):
        peers.record(reporter, 3, C, log_index=index, reason=WITHHELD)
    assert not peers.after_report(3, C, not_banned).majority
    later = 3 + STRIKE_WINDOW_ROUNDS + 2 * REPORT_WINDOW_ROUNDS  # (a tally names the first round of its window)
    for reporter, index in ((A, 3), (B, 4)):
        peers.record(reporter, later, C, log_index=index, reason=WITHHELD)
    assert not peers.after_report(later, C, not_banned).majority  # the first strike is too old
    assert len(peers.strikes[C]) == 2
    at_once = world(12)  # PeerReports() and logs written before the rule: one majority bans
    for reporter, index in ((A, 1), (B, 2)):
        at_once.record(reporter, 3, C, log_index=index, reason=WITHHELD)
    assert at_once.after_report(3, C, not_banned).majority


def test_any_finding_in_the_majority_bans_at_once():
    """Only a majority of withheld-reveal reports alone is a strike: one report of a finding (a wrong
    average, invalid parts) among them bans as before."""
    peers = PeerReports(withheld_audit_strikes=2)
    for r in range(12):
        peers.round_closed(r, (A, B, C))
    peers.record(A, 3, C, log_index=1, reason=WITHHELD)
    peers.record(B, 4, C, log_index=2, reason="WRONG_AVERAGE: its average of share 2 is off by 0.4 > 1e-05")
    tally = peers.after_report(4, C, not_banned)
    assert tally.majority and not tally.withheld_only and "strikes" not in ban_payload(tally, 2)
