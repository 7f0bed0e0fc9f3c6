"""The ban-by-reports rule (grpo_swarm.protocol.peers.PeerReports) on its own: distinct first-hand
reporters of a round's participants, counted over a window of rounds, in either order of arrival;
one reporter never becomes a majority however often it reports."""

from grpo_swarm.protocol.peers import REPORT_WINDOW_ROUNDS, PeerReports

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
