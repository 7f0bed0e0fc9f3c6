"""Verified gradient averaging (node/swarm/averaging.py) between real hivemind peers on loopback.

Module-scoped swarms of three peer processes (tests/swarm_peer.py; peer 2 turns hostile in the
later rounds, tests/swarm_hostile.py) play a fixed plan of rounds; each test checks the rounds it
is about from the files the peers wrote (JSON reports and safetensors, never pickles). Two swarms
(same keys, separate DHTs) play the plan's two parts side by side: the rounds made of waits (late
members, stalls, drips, the kill) and the rest; most of those waits leave the cores idle. The peers
ask for different share-audit fractions (0.25, 0.5, 0.125), so every audited round also checks that
the group agrees on one (the largest a contributor signed for):

* rounds 0-7: each peer computes the real GRPO gradient of the tiny model on its own groups; the
  verified average equals the gradient one trainer computes on the union of the groups, for every
  loss type, with 3 and with 2 peers;
* an honest round without compression and one with fp16: every peer holds the same bytes;
* hostile rounds: a forged ticket, another round's ticket, another node's ticket, a claimed weight
  above the ticket's, NaN parts, an infinity through fp16, a shape-[1] part, float64 parts,
  fp16 parts to an uncompressed averager, a gradient 3x its committed norm, a norm above the
  bound, a reducer returning a wrong average (fp32 and fp16): the honest peers end with the
  honest-only weighted mean and report why;
* a member that never reveals its audit nonce: accused (AUDIT_WITHHELD), since nobody has the seed
  without it; one that falls silent after its reveal: judged without its sketch (by the best lie it
  could have told), a failure that nobody reports, and the retry leaves it out;
* a sender lying about its sketch in the share audit: its reducer names it, the other honest peer
  does not report the reducer;
* members that stall every attempt, drip their parts, or (as reducers) drip their averages: named
  STALLED first-hand and left out of the retry;
* members that hang up at once in every attempt, or drip two parts and then hang up: the others saw
  them fail first (BROKE_FIRST) and leave them out of the retry; a member that breaks its first
  attempt and then accuses one groupmate, or both, of what it never saw;
* a member that answers BAD_GROUP_ID to every stream (as one not running the group): named by nobody
  once, then NOT_IN_GROUP_AGAIN, and left out of the third attempt;
* the last round: the hostile peer stalls mid-round and is SIGKILLed; the others fail the round
  cleanly, within the averaging timeout.

Fast unit tests of the gather entries and verdicts, and a DHT start/bootstrap test, come first.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import hivemind
import pytest
import torch

from grpo_swarm.node.swarm import averaging
from grpo_swarm.node.swarm.averaging import (
    AVERAGER_DIED,
    LIVENESS_POLL_S,
    LOAD_CHUNK,
    ROUND_OVER_POLL_S,
    ROUND_WENT_ON,
    SELF_EXCLUDED,
    STEP_STUCK,
    LocalGradientError,
    VerifiedAverager,
    group_target,
    left_peers,
    tensors_sha256,
)
from grpo_swarm.node.swarm.child_calls import run_in_dht
from grpo_swarm.node.swarm.dht import (DHTStartError, _dial_in_dht, check_transports, connect_peers, over_udp,
                                       start_dht, tcp_only)
from grpo_swarm.node.swarm.group_plan import GroupPlan
from grpo_swarm.node.swarm.prefork import ForkedProcess, spawn
from grpo_swarm.node.swarm.gather import decode_gather, decode_hivemind_entry, GatherClaim, encode_gather
from grpo_swarm.node.swarm.reasons import Reason
from grpo_swarm.node.swarm.tickets import TicketClaims, parse_ticket, weight_mode_for_loss
from grpo_swarm.node.swarm.verdicts import RoundRules, group_verdicts, next_first_failed
from grpo_swarm.protocol.identity import Identity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hivemind_children import started_dht
from swarm_world import (
    LOSS_TYPES,
    NORM_BOUND,
    NUM_GROUPS,
    RUN_ID,
    SMALL_SHAPES,
    gradient,
    make_ticket,
    make_trainer,
    small_grads,  # noqa: E402
    ticket_type,
    union_batch,
)

HERE = Path(__file__).resolve().parent
A, B, H = 0, 1, 2
SMALL_WEIGHTS = [3, 5, 7]
# (the audit's exchanges take ~10 ms here: 3 s instead of the default 2 x reducer_timeout shortens each
# round that waits one out, a withheld sketch's and a caught reducer's own, by 9 s)
TIMING = dict(min_matchmaking_time=2.0, request_timeout=1.0, matchmaking_timeout=15.0, sender_timeout=3.0,
              reducer_timeout=6.0, allreduce_timeout=9.0, audit_timeout=3.0, max_attempts=3)
SWARM_TIMEOUT_S = 420.0
KILL_AFTER_STALL_S = 1.0  # the kill round's hostile peer is killed this long after it stalled mid-reduction

# ---- the plan -------------------------------------------------------------------------------------
PLAN: list[dict] = []
GRPO_ROUNDS: dict[tuple[int, str], int] = {}
for _k in (3, 2):
    for _loss in LOSS_TYPES:
        GRPO_ROUNDS[(_k, _loss)] = len(PLAN)
        # (a full group starts at once; the wait is for a peer whose first gradient came late: once, in
        # the first round, peer 2 reached the averaging after the other two had averaged as a pair)
        PLAN.append(dict(round=len(PLAN), kind="grpo", K=_k, loss_type=_loss, participants=list(range(_k)),
                         averager="model_tok" if weight_mode_for_loss(_loss) == "tokens" else "model_seq",
                         behaviour={}, straggler_wait=8.0))


def _small(averager: str, behaviour: str | None = None, **extra) -> int:
    rnd = dict(round=len(PLAN), kind="small", participants=[A, B, H], averager=averager,
               behaviour={str(H): behaviour} if behaviour else {}, **extra)
    PLAN.append(rnd)
    return rnd["round"]


HONEST_ROUNDS = {"none": _small("small_none"), "fp16": _small("small_fp16"), "8bit": _small("small_8bit")}
CLIENT_MODE_ROUND = _small("small_client")  # peer B in client mode
# the coordinator names only A and B; H (a key outside the round, as any fresh key is) goes looking for
# their group anyway: without the key check it could take a slot and start the group without A or B
# (H looks until A and B are done, as a product node would: its round_over; its cancelled search must not
# outlive the cancel into the next round, where H is late by design)
SYBIL_ROUND = _small("small_none", expected=[A, B], max_attempts=1)
# H reaches the averaging 5 s after A and B (a slower gradient); they wait for it up to 8 s
LATE_ROUND = _small("small_none", delay={str(H): 5.0}, straggler_wait=8.0)
# ... and with the default 2 s wait it is left out; told the round went on, it does not retry
LEFT_OUT_ROUND = _small("small_none", delay={str(H): 5.0}, round_over_when_others_done=True)
# ... and once more with the cancel of its search lost on the way (see swarm_hostile's lost_cancel):
# the leftover search must not take H's slot in the next round's group with its old gather entry
LOST_CANCEL_ROUND = _small("small_none", "lost_cancel", delay={str(H): 5.0}, round_over_when_others_done=True)
AFTER_LOST_CANCEL_ROUND = _small("small_none", max_attempts=1)
# excluded before the reduction: the hostile peer gets one attempt (the others need only one)
EXCLUDED_ROUNDS = {
    "forged_ticket": (_small("small_none", "forged_ticket"), Reason.TICKET_BAD_SIGNATURE),
    "other_round_ticket": (_small("small_none", "other_round_ticket"), Reason.TICKET_WRONG_ROUND),
    "other_node_ticket": (_small("small_none", "other_node_ticket"), Reason.TICKET_OF_ANOTHER_NODE),
    "over_bound": (_small("small_none", "over_bound"), Reason.NORM_OVER_BOUND),
}
CLAIMED_WEIGHT_ROUND = _small("small_none", "claimed_weight")
# caught during the reduction: the first attempt fails everywhere, the retry excludes the sender
CAUGHT_ROUNDS = {
    "nan": (_small("small_none", "nan"), Reason.NON_FINITE),
    "inf_fp16": (_small("small_fp16", "inf_fp16"), Reason.MAGNITUDE),
    "shape1": (_small("small_none", "shape1"), Reason.BAD_SHAPE),
    "float64": (_small("small_none", "float64"), Reason.BAD_DTYPE),
    "fp16_on_none": (_small("small_none", "fp16_on_none"), Reason.BAD_COMPRESSION),
    "norm_lie": (_small("small_none", "norm_lie"), Reason.NORM_EXCEEDED),
    "malformed": (_small("small_none", "malformed"), Reason.MALFORMED_PART),  # bytes that do not parse
    "malformed_first": (_small("small_none", "malformed_first"), Reason.MALFORMED_PART),  # before any group id
    # a reducer returning a wrong average for its share, caught by the share audit after the reduction
    "wrong_average": (_small("small_none", "wrong_average"), Reason.WRONG_AVERAGE),
    "wrong_average_fp16": (_small("small_fp16", "wrong_average"), Reason.WRONG_AVERAGE),
    "wrong_average_8bit": (_small("small_8bit", "wrong_average"), Reason.WRONG_AVERAGE),
    # a member that never reveals its nonce: nobody has the seed, so it is accused (AUDIT_WITHHELD)
    "withhold_reveal": (_small("small_none", "withhold_reveal"), Reason.AUDIT_WITHHELD),
    # a reducer whose averages' bytes lie, caught by every receiver as it decodes them into place
    "nan_average": (_small("small_none", "nan_average"), Reason.NON_FINITE),
    "inf_average_fp16": (_small("small_fp16", "inf_average"), Reason.NON_FINITE),
    "short_average": (_small("small_none", "short_average"), Reason.MALFORMED_PART),
}
# a member silent in the audit after its reveal (a crash looks so): judged without its sketch, a failure
WITHHOLD_ROUND = _small("small_none", "withhold_sketch")
# (two attempts: the first settles the test; a third finds the honest member that was named alone,
# looking for a group for a whole matchmaking timeout)
SKETCH_LIE_ROUND = _small("small_none", "sketch_lie", max_attempts=2)
# (a member that finished in the first attempt leaves the other's retry to look for a group alone: as
# a product node would, it stops once the others are done instead of after a matchmaking timeout)
EQUIVOCATE_ROUND = _small("small_none", "sketch_equivocate", round_over_when_others_done=True)
REORDERED_VIEW_ROUND = _small("small_none", "reordered_view")
# H accuses A, who did nothing (B stops once A and H are done, as a product node would: a search of its
# own for a group that H left cost the round two matchmaking timeouts, 30 s)
FALSE_ACCUSATION_ROUND = _small("small_none", "false_accusation", round_over_when_others_done=True)
ACCUSE_ALL_ROUND = _small("small_none", "accuse_all")  # H accuses both A and B
# a ticket holder that joins every attempt (as many as the others make), sends its first part and then nothing
STALL_ROUND = _small("small_none", "stall_always", max_attempts=TIMING["max_attempts"])
# ... and one that sends its parts just under the sender timeout apart: its share outlasts the all-reduce
DRIP_ROUND = _small("small_drip", "drip", max_attempts=TIMING["max_attempts"])
# ... and one that drips two parts, then hangs up (before it has held anyone up two sender timeouts)
DRIP_HANG_UP_ROUND = _small("small_drip", "drip_hang_up", max_attempts=TIMING["max_attempts"])
# ... and a reducer that returns its averages just under the reducer timeout apart
DRIP_AVERAGE_ROUND = _small("small_drip", "drip_average", max_attempts=TIMING["max_attempts"])
# ... and one that aborts as each attempt's all-reduce begins, as if another member's abort had reached it
HANG_UP_ROUND = _small("small_none", "hang_up", max_attempts=TIMING["max_attempts"])
# ... and one that answers BAD_GROUP_ID to every stream and sends nothing, as if not running the group
NOT_IN_GROUP_ROUND = _small("small_none", "not_in_group", max_attempts=TIMING["max_attempts"])
# ... and, the sit-outs on, H (honest now) sits out the next round: A and B remember it breaking that one
# (not the hang-up round's: H blamed A there, and a round of three cannot pin who broke)
SIT_OUT_ROUND = _small("small_none", max_attempts=TIMING["max_attempts"], sit_out_limit=16)
# a plain round between the hostile rounds and the kill: in one full-suite run H, excluded from the
# not_in_group round's last attempt 50 ms before, was counted into the kill round's group by the leader
# while its own search never saw that group (so it never stalled and was never killed)
SETTLE_ROUND = _small("small_none")
KILL_ROUND = _small("small_none", "stall", max_attempts=1)
# H is dead, still one of the round's peers, and listed as gone (as the coordinator lists a peer that said
# goodbye): A and B's group is full without it and starts at once instead of waiting 8 s for it
GONE_ROUND = _small("small_none", straggler_wait=8.0, max_attempts=1, gone=[H])
PLAN[GONE_ROUND]["participants"], PLAN[GONE_ROUND]["expected"] = [A, B], [A, B, H]
# a reducer caught as the others decode its averages: the others retry without it and are done at once,
# so a retry of its own would only look for a group for a matchmaking timeout and hold the next round
HOSTILE_ONE_ATTEMPT = {r for r, _ in EXCLUDED_ROUNDS.values()} | {
    CAUGHT_ROUNDS[name][0] for name in ("nan_average", "inf_average_fp16", "short_average")}


# ---- fast checks without a network ----------------------------------------------------------------
@pytest.fixture(scope="module")
def keys():
    coordinator = Identity.from_seed(bytes(range(32)))
    nodes = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(3)]
    return coordinator, nodes


def _slot(identity: Identity, entry: bytes) -> tuple[bytes, bytes]:
    import msgpack  # hivemind wraps our entry: [bandwidth, mode, msgpack(entry)]

    return identity.peer_id, msgpack.packb([None, 0, msgpack.packb(entry)])


def _rules(coordinator, round_index=4, mode="sequences", **kw) -> RoundRules:
    return RoundRules(coordinator_key=coordinator.public_key_bytes, run_id=RUN_ID, round_index=round_index,
                      norm_bound=NORM_BOUND, weight_mode=mode, ticket_type=ticket_type(), **kw)


def test_verdicts_name_every_bad_slot(keys):
    coordinator, (n0, n1, n2) = keys
    forger = Identity.from_seed(b"\x09" * 32)

    def entry(who, ticket=None, round_index=4, norm=1.0, accusations=(), signer=None, audit_fraction=1.0):
        ticket = make_ticket(coordinator, who.public_key_bytes, 4, 6, 60) if ticket is None else ticket
        attempt = 1 if accusations else 0  # (a first attempt names nobody: ACCUSES_UNPROMPTED)
        return encode_gather(signer or who, GatherClaim(ticket, round_index, attempt, norm, tuple(accusations),
                                                        audit_fraction=audit_fraction))

    good = _slot(n0, entry(n0))
    altered = ticket_type().FromString(make_ticket(coordinator, n1.public_key_bytes, 4, 6))
    altered.accepted_samples = 600  # after the coordinator signed it
    cases = {
        Reason.BAD_GATHER_SIGNATURE: _slot(n1, entry(n1, signer=n2)),
        Reason.TICKET_BAD_SIGNATURE: _slot(n1, entry(n1, altered.SerializeToString())),
        Reason.TICKET_WRONG_SIGNER: _slot(n1, entry(n1, make_ticket(forger, n1.public_key_bytes, 4, 6))),
        Reason.TICKET_WRONG_ROUND: _slot(n1, entry(n1, make_ticket(coordinator, n1.public_key_bytes, 3, 6))),
        Reason.TICKET_WRONG_RUN: _slot(n1, entry(n1, make_ticket(coordinator, n1.public_key_bytes, 4, 6,
                                                                  run_id="other"))),
        Reason.TICKET_OF_ANOTHER_NODE: _slot(n1, entry(n1, make_ticket(coordinator, n2.public_key_bytes, 4, 6))),
        Reason.TICKET_MALFORMED: _slot(n1, entry(n1, b"\xff\xff garbage")),
        Reason.WRONG_ROUND: _slot(n1, entry(n1, round_index=5)),
        Reason.NORM_OVER_BOUND: _slot(n1, entry(n1, norm=2 * NORM_BOUND)),
        Reason.NO_WEIGHT: _slot(n1, entry(n1, make_ticket(coordinator, n1.public_key_bytes, 4, 0))),
        Reason.MALFORMED_GATHER: (n1.peer_id, b"\x93\x01\x02"),
    }
    for reason, bad in cases.items():
        verdicts = group_verdicts([good[0], bad[0]], [good[1], bad[1]], _rules(coordinator))
        assert verdicts[0].ok and verdicts[0].weight == 6.0, reason
        assert not verdicts[1].ok and verdicts[1].reason == reason, (reason, verdicts[1].reason, verdicts[1].detail)
    # nan norm, and the last byte of the gather signature flipped
    v = group_verdicts(*zip(_slot(n1, entry(n1, norm=float("nan")))), _rules(coordinator))[0]
    assert v.reason == Reason.NORM_OVER_BOUND
    raw = entry(n1)
    v = group_verdicts(*zip(_slot(n1, raw[:-1] + bytes([raw[-1] ^ 1]))), _rules(coordinator))[0]
    assert v.reason == Reason.BAD_GATHER_SIGNATURE
    # the audit fraction: a signed float in [2^-10, 1]; the group audits the largest its contributors ask
    for fraction in (0.0, 1.5, float("nan"), -0.25, 2.0 ** -11):
        v = group_verdicts(*zip(_slot(n1, entry(n1, audit_fraction=fraction))), _rules(coordinator))[0]
        assert v.reason == Reason.MALFORMED_GATHER and "audit fraction" in v.detail, (fraction, v.detail)
    slots = [_slot(n0, entry(n0, audit_fraction=0.125)), _slot(n1, entry(n1, audit_fraction=0.5)),
             _slot(n2, entry(n2, norm=2 * NORM_BOUND))]  # excluded: its fraction (1.0) does not count
    verdicts = group_verdicts(*zip(*slots), _rules(coordinator))
    assert [v.ok for v in verdicts] == [True, True, False]
    assert GroupPlan.from_verdicts([p for p, _ in slots], verdicts).audit_fraction == 0.5
    # tokens mode weighs by the ticket's completion tokens; outside the expected peers is excluded
    v0, v1 = group_verdicts(*zip(good, _slot(n1, entry(n1))),
                            _rules(coordinator, mode="tokens", expected_keys=frozenset({n0.public_key_bytes})))
    assert v0.ok and v0.weight == 60.0 and v1.reason == Reason.NOT_IN_ROUND
    # an accusation by a valid member excludes the accused everywhere, whatever order the slots are in
    # (in a round of three, which needs two: it cannot spare the accuser too)
    accusing = _slot(n1, entry(n1, accusations=[(n2.peer_id, "NON_FINITE")]))
    accused = _slot(n2, entry(n2))
    for order in ([good, accusing, accused], [accused, good, accusing]):
        verdicts = {v.peer_id: v for v in group_verdicts(*zip(*order), _rules(coordinator, min_contributors=2))}
        assert verdicts[n2.peer_id].reason == Reason.ACCUSED and verdicts[n0.peer_id].ok and verdicts[n1.peer_id].ok
    # accusing more than half of the group's other members is not believed: the accuser is left out
    everyone = _slot(n1, entry(n1, accusations=[(n0.peer_id, "NON_FINITE"), (n2.peer_id, "NON_FINITE")]))
    verdicts = {v.peer_id: v for v in group_verdicts(*zip(good, everyone, accused), _rules(coordinator))}
    assert verdicts[n1.peer_id].reason == Reason.ACCUSES_MOST, verdicts[n1.peer_id]
    assert verdicts[n0.peer_id].ok and verdicts[n2.peer_id].ok
    # in a group of two, one accusation is half of one other: the accused is left out, as before
    verdicts = {v.peer_id: v for v in group_verdicts(*zip(accusing, accused), _rules(coordinator))}
    assert verdicts[n2.peer_id].reason == Reason.ACCUSED and verdicts[n1.peer_id].ok
    with pytest.raises(ValueError, match="twice"):
        group_verdicts([good[0], good[0]], [good[1], good[1]], _rules(coordinator))


def test_verdicts_leave_out_the_member_that_broke_the_last_attempt_first(keys):
    """A member that most of the others saw fail first, with no finding of its own to show for it, is
    left out of the retry (BROKE_FIRST); the peer it blames goes with it only when the round can
    spare both; a catch it accuses explains it; a minority's word, or that of a member accusing
    most of its group, does not count. The sole accuser of a member goes with it when the round can
    spare both (UNCORROBORATED), and a first attempt that names anyone is not believed at all."""
    coordinator, _ = keys
    ids = [Identity.from_seed(bytes([40 + i]) * 32) for i in range(5)]

    def slot(i, first=None, accusations=(), attempt=1):
        ticket = make_ticket(coordinator, ids[i].public_key_bytes, 4, 6)
        first = None if first is None else (ids[first[0]].peer_id if isinstance(first[0], int) else first[0], first[1])
        claim = GatherClaim(ticket, 4, attempt, 1.0, tuple((ids[j].peer_id, r) for j, r in accusations),
                            first_failed=first)
        return _slot(ids[i], encode_gather(ids[i], claim))

    def verdicts(slots, min_contributors):
        out = group_verdicts(*zip(*slots), _rules(coordinator, min_contributors=min_contributors))
        return [(v.reason.value if v.reason else "ok") for v in out]

    cancelled = "REDUCER_FAILED"
    # three members: both others saw 0 fail first; 0 blames 1, but the round (2 of 3) cannot spare both
    assert verdicts([slot(0, (1, cancelled)), slot(1, (0, cancelled)), slot(2, (0, "SENDER_FAILED"))], 2) == \
        ["BROKE_FIRST", "ok", "ok"]
    # five members: four saw 0 first; 0 blames 1, and the round (3 of 5) can spare both
    five = [slot(0, (1, cancelled))] + [slot(i, (0, cancelled)) for i in range(1, 5)]
    assert verdicts(five, 3) == ["BROKE_FIRST", "BROKE_WITH", "ok", "ok", "ok"]
    assert verdicts(five, 4) == ["BROKE_FIRST", "ok", "ok", "ok", "ok"]
    # 0 caught 3 (its first failure is a finding it accuses): its abort was the catch, not a break; but
    # nobody else saw 3 cheat, so where the round can spare both, 0 goes with 3
    caught = [slot(0, (3, "NON_FINITE"), [(3, "NON_FINITE")])] + [slot(i, (0, cancelled)) for i in range(1, 5)]
    assert verdicts(caught, 4) == ["ok", "ok", "ok", "ACCUSED", "ok"]
    assert verdicts(caught, 3) == ["UNCORROBORATED", "ok", "ok", "ACCUSED", "ok"]
    # two accusers back each other: the accused alone is left out
    backed = [slot(0, (3, "NON_FINITE"), [(3, "NON_FINITE")]), slot(1, (3, "NON_FINITE"), [(3, "NON_FINITE")]),
              slot(2, (0, cancelled)), slot(3, (0, cancelled)), slot(4, (0, cancelled))]
    assert verdicts(backed, 3) == ["ok", "ok", "ok", "ACCUSED", "ok"]
    # a sole accuser that broke nothing goes with the accused too; two sole accusers, while it can spare them
    assert verdicts([slot(0), slot(1, None, [(2, "NON_FINITE")]), slot(2), slot(3), slot(4)], 3) == \
        ["ok", "UNCORROBORATED", "ACCUSED", "ok", "ok"]
    assert verdicts([slot(0, None, [(4, "STALLED")]), slot(1, None, [(2, "NON_FINITE")]), slot(2), slot(3),
                     slot(4)], 1) == ["UNCORROBORATED", "UNCORROBORATED", "ACCUSED", "ok", "ACCUSED"]
    assert verdicts([slot(0, None, [(4, "STALLED")]), slot(1, None, [(2, "NON_FINITE")]), slot(2), slot(3),
                     slot(4)], 2) == ["UNCORROBORATED", "ok", "ACCUSED", "ok", "ACCUSED"]
    # a first attempt of the round that names anyone is not believed
    assert verdicts([slot(0), slot(1, None, [(2, "NON_FINITE")], attempt=0), slot(2)], 1) == \
        ["ok", "ACCUSES_UNPROMPTED", "ok"]
    assert verdicts([slot(0), slot(1, (0, cancelled), attempt=0), slot(2)], 1) == ["ok", "ACCUSES_UNPROMPTED", "ok"]
    # ... which it must accuse, and of a member of this group
    unaccused = [slot(0, (3, "NON_FINITE"))] + [slot(i, (0, cancelled)) for i in range(1, 5)]
    assert verdicts(unaccused, 3) == ["BROKE_FIRST", "ok", "ok", "BROKE_WITH", "ok"]
    stranger = Identity.from_seed(b"\x31" * 32).peer_id
    outside = [slot(0, (stranger, "NON_FINITE"))] + [slot(i, (0, cancelled)) for i in range(1, 5)]
    assert verdicts(outside, 3) == ["BROKE_FIRST", "ok", "ok", "ok", "ok"]
    # a stall it names is a finding too (STALLED goes into the accusations)
    stalled = [slot(0, (2, "STALLED"), [(2, "STALLED")])] + [slot(i, (0, cancelled)) for i in range(1, 5)]
    assert verdicts(stalled, 4) == ["ok", "ok", "ACCUSED", "ok", "ok"]
    # one member's word alone is not enough, even as all of the others (the third member is left out:
    # here its ticket is for another node; in a test run, an honest member the leader counted in
    # whose matchmaking had given up on the group answered BAD_GROUP_ID, and was named so)
    stray = _slot(ids[2], encode_gather(ids[2], GatherClaim(make_ticket(coordinator, ids[3].public_key_bytes, 4, 6),
                                                           4, 1, 1.0)))
    assert verdicts([slot(0), slot(1, (0, cancelled)), stray], 1) == ["ok", "ok", "TICKET_OF_ANOTHER_NODE"]
    # a member that answered BAD_GROUP_ID was not running the group: that names nobody
    absent = [slot(0, (1, cancelled))] + [slot(i, (0, "NOT_IN_GROUP")) for i in range(1, 5)]
    assert verdicts(absent, 3) == ["ok"] * 5
    # ... once: a member naming it so for the second attempt in a row does (next_first_failed)
    again = [slot(0, (1, cancelled))] + [slot(i, (0, "NOT_IN_GROUP_AGAIN")) for i in range(1, 5)]
    assert verdicts(again, 3) == ["BROKE_FIRST", "BROKE_WITH", "ok", "ok", "ok"]
    assert verdicts([slot(0), slot(1, (0, "NOT_IN_GROUP_AGAIN")), slot(2, (0, "NOT_IN_GROUP_AGAIN"))], 2) == \
        ["BROKE_FIRST", "ok", "ok"]
    assert verdicts([slot(0), slot(1, (0, "NOT_IN_GROUP_AGAIN")), slot(2, (0, "NOT_IN_GROUP"))], 2) == ["ok"] * 3
    # two of four others is no majority; nor is a pointer from a member accusing most of its group
    assert verdicts([slot(0), slot(1, (0, cancelled)), slot(2, (0, cancelled)), slot(3), slot(4)], 3) == ["ok"] * 5
    most = slot(1, (0, cancelled), [(2, "NON_FINITE"), (3, "NON_FINITE")])  # 2 of 3: not believed
    assert verdicts([slot(0), most, slot(2, (0, cancelled)), slot(3)], 3) == ["ok", "ACCUSES_MOST", "ok", "ok"]
    # the pointer is signed and strictly decoded
    claim = decode_gather(decode_hivemind_entry(five[1][1])[2])[2]
    assert claim.first_failed == (ids[0].peer_id, cancelled)
    bad = _slot(ids[0], _malformed_first_failed(ids[0], coordinator))[1]
    assert group_verdicts([ids[0].peer_id], [bad], _rules(coordinator))[0].reason == Reason.MALFORMED_GATHER


def test_verdicts_sit_out_a_member_most_of_the_group_remembers_breaking(keys):
    """A member that more than half of the other believed members, and at least two, list as sitting out
    (their memory of earlier rounds' BROKE_FIRST / BROKE_WITH verdicts) is left out from the round's
    first attempt (SITS_OUT), while the round can spare it, the most listed first; a minority's list,
    or the lists of members accusing most of the group, leave nobody out; the list is signed and
    strictly decoded."""
    import msgpack

    from grpo_swarm.node.swarm.gather import GATHER_DOMAIN, GATHER_VERSION, MAX_SIT_OUT

    coordinator, _ = keys
    ids = [Identity.from_seed(bytes([60 + i]) * 32) for i in range(5)]

    def slot(i, sit_out=(), attempt=0, accusations=()):
        claim = GatherClaim(make_ticket(coordinator, ids[i].public_key_bytes, 4, 6), 4, attempt, 1.0,
                            tuple((ids[j].peer_id, r) for j, r in accusations),
                            sit_out=tuple(ids[j].peer_id if isinstance(j, int) else j for j in sit_out))
        return _slot(ids[i], encode_gather(ids[i], claim))

    def verdicts(slots, min_contributors):
        out = group_verdicts(*zip(*slots), _rules(coordinator, min_contributors=min_contributors))
        return [(v.reason.value if v.reason else "ok") for v in out]

    # three of four others list 0 (in the first attempt: a memory of earlier rounds, not an accusation)
    assert verdicts([slot(0), slot(1, [0]), slot(2, [0]), slot(3, [0]), slot(4)], 3) == \
        ["SITS_OUT", "ok", "ok", "ok", "ok"]
    # two of four is no majority: two colluding members cannot sit an honest one out
    assert verdicts([slot(0), slot(1), slot(2), slot(3, [0]), slot(4, [0])], 3) == ["ok"] * 5
    # in a group of three, both others
    assert verdicts([slot(0), slot(1, [0]), slot(2, [0])], 2) == ["SITS_OUT", "ok", "ok"]
    # one member's word alone is never enough, and a member's own listing does not count
    assert verdicts([slot(0, [0]), slot(1, [0])], 1) == ["ok", "ok"]
    # only while the round can spare them: the most listed first, then by peer id
    two = [slot(0, [1]), slot(1, [0]), slot(2, [0, 1]), slot(3, [0, 1]), slot(4, [0, 1])]
    assert verdicts(two, 3) == ["SITS_OUT", "SITS_OUT", "ok", "ok", "ok"]
    assert verdicts(two, 4) == (["SITS_OUT", "ok", "ok", "ok", "ok"] if ids[0].peer_id < ids[1].peer_id
                                else ["ok", "SITS_OUT", "ok", "ok", "ok"])
    more = [slot(0, [1]), slot(1), slot(2, [0, 1]), slot(3, [0, 1]), slot(4, [1])]  # 1: four listers, 0: three
    assert verdicts(more, 4) == ["ok", "SITS_OUT", "ok", "ok", "ok"]
    # the lists of a member accusing most of its group do not count
    most = slot(2, [0], attempt=1, accusations=[(1, "NON_FINITE"), (3, "NON_FINITE"), (4, "NON_FINITE")])
    # (counted, it would make two of the three other believed members)
    assert verdicts([slot(0), slot(1, [0], attempt=1), most, slot(3, attempt=1), slot(4, attempt=1)], 1) == \
        ["ok", "ok", "ACCUSES_MOST", "ok", "ok"]
    # signed and strictly decoded: too many, repeated, or not peer ids
    claim = decode_gather(decode_hivemind_entry(two[2][1])[2])[2]
    assert set(claim.sit_out) == {ids[0].peer_id, ids[1].peer_id}
    with pytest.raises(ValueError, match="sitting out"):
        slot(0, [Identity.from_seed(bytes([90 + i]) * 32).peer_id for i in range(MAX_SIT_OUT + 1)])
    ticket = make_ticket(coordinator, ids[0].public_key_bytes, 4, 6)
    for bad in ([ids[1].peer_id, ids[1].peer_id], ["peer"], [b"x" * 65], b"peer"):
        payload = msgpack.packb([GATHER_VERSION, ticket, 4, 0, 1.0, [], bytes(32), 1.0, [], bad], use_bin_type=True)
        entry = msgpack.packb([payload, ids[0].sign(GATHER_DOMAIN + payload)], use_bin_type=True)
        v = group_verdicts([ids[0].peer_id], [_slot(ids[0], entry)[1]], _rules(coordinator))[0]
        assert v.reason == Reason.MALFORMED_GATHER and "sit_out" in v.detail, (bad, v.detail)
    listed = slot(1, [0])
    raw = listed[1]
    assert group_verdicts([listed[0]], [raw[:-1] + bytes([raw[-1] ^ 1])], _rules(coordinator))[0].reason in (
        Reason.BAD_GATHER_SIGNATURE, Reason.MALFORMED_GATHER)


def test_a_breaker_away_from_the_retry_is_named_by_most_of_the_rounds_peers(keys):
    """A peer that broke the last attempt and then stayed away from the retry (leading groups of its own)
    meets no verdict; the retry group's contributors' pointers still name it: more than half of the
    round's other peers, and at least two, make it a breaker (its sit-out rests on that). Pointers of
    excluded members, a first BAD_GROUP_ID, and peers outside the round do not count."""
    from grpo_swarm.node.swarm.verdicts import breakers_outside

    coordinator, _ = keys
    ids = [Identity.from_seed(bytes([80 + i]) * 32) for i in range(7)]
    round_peers = frozenset(i.peer_id for i in ids[:5])

    def slot(i, first, round_index=4):
        claim = GatherClaim(make_ticket(coordinator, ids[i].public_key_bytes, 4, 6), round_index, 1, 1.0,
                            first_failed=(ids[first[0]].peer_id, first[1]))
        return _slot(ids[i], encode_gather(ids[i], claim))

    def named(slots):
        found = breakers_outside(group_verdicts(*zip(*slots), _rules(coordinator)), round_peers)
        return {ids.index(next(i for i in ids if i.peer_id == p)): n for p, n in found.items()}

    cancelled = "REDUCER_FAILED"
    assert named([slot(0, (4, cancelled)), slot(1, (4, cancelled)), slot(2, (4, "SENDER_FAILED"))]) == {4: 3}
    assert named([slot(0, (4, cancelled)), slot(1, (3, cancelled)), slot(2, (4, cancelled))]) == {}  # 2 of 4
    assert named([slot(0, (4, cancelled)), slot(1, (4, cancelled)), slot(2, (4, "NOT_IN_GROUP"))]) == {}
    assert named([slot(0, (4, cancelled)), slot(1, (4, cancelled)), slot(2, (4, cancelled), round_index=5)]) == {}
    assert named([slot(0, (6, cancelled)), slot(1, (6, cancelled)), slot(2, (6, cancelled))]) == {}  # not a round peer
    assert named([slot(0, (1, cancelled)), slot(1, (0, cancelled)), slot(2, (1, cancelled))]) == {}  # in the group


def test_only_unambiguous_breaks_strike(keys):
    """Later rounds hold against a member only breaks the verdicts can pin: every BROKE_WITH, and a
    BROKE_FIRST that blamed nobody else in the group or went out with the peer it blamed. A breaker
    whose blamed groupmate stayed (a round that cannot spare both) strikes nobody: a peer hanging up
    on one member mirrors an honest member's gathers there."""
    from grpo_swarm.node.swarm.verdicts import struck_breakers

    coordinator, _ = keys
    ids = [Identity.from_seed(bytes([100 + i]) * 32) for i in range(5)]
    stranger = Identity.from_seed(b"\x32" * 32).peer_id

    def slot(i, first=None):
        first = None if first is None else (ids[first[0]].peer_id if isinstance(first[0], int) else first[0], first[1])
        claim = GatherClaim(make_ticket(coordinator, ids[i].public_key_bytes, 4, 6), 4, 1, 1.0, first_failed=first)
        return _slot(ids[i], encode_gather(ids[i], claim))

    def struck(slots, min_contributors):
        verdicts = group_verdicts(*zip(*slots), _rules(coordinator, min_contributors=min_contributors))
        return sorted(ids.index(next(i for i in ids if i.peer_id == p)) for p in struck_breakers(verdicts))

    c = "REDUCER_FAILED"
    assert struck([slot(0, (1, c)), slot(1, (0, c)), slot(2, (0, c))], 2) == []  # 1 stays: one word against another
    five = [slot(0, (1, c))] + [slot(i, (0, c)) for i in range(1, 5)]
    assert struck(five, 3) == [0, 1]  # both out: both strike
    assert struck(five, 4) == []
    assert struck([slot(0)] + [slot(i, (0, c)) for i in range(1, 5)], 4) == [0]  # it blames nobody
    assert struck([slot(0, (stranger, c))] + [slot(i, (0, c)) for i in range(1, 5)], 4) == [0]  # nobody here
    assert struck([slot(0), slot(1, (0, c)), slot(2, (0, c))], 2) == [0]


def test_break_memory_doubles_each_sit_out_and_forgets_old_strikes():
    """A peer left out for breaking (struck: BROKE_FIRST, or BROKE_WITH: blamed by the breaker) sits out the next
    1, 2, 4, ... rounds, one strike a round however many attempts named it, at most the limit; strikes
    older than MEMORY_ROUNDS are forgotten; other exclusions strike nobody; 0 lists nobody."""
    from grpo_swarm.node.swarm.round_report import AttemptReport
    from grpo_swarm.node.swarm.sit_outs import MEMORY_ROUNDS, BreakMemory

    ids = [Identity.from_seed(bytes([70 + i]) * 32) for i in range(4)]
    me, h, x, other = (i.peer_id for i in ids)
    b58 = [i.peer_id_base58 for i in ids]

    def attempt(**excluded):  # as the averager reports it: the exclusions, and which of them strike
        return AttemptReport(excluded={b58[int(k[1:])]: f"{r}: detail" for k, r in excluded.items()},
                             struck=[b58[int(k[1:])] for k, r in excluded.items() if r.startswith("BROKE")])

    memory = BreakMemory(limit=4)
    memory.record(10, [attempt(p1="BROKE_FIRST", p2="BROKE_WITH"), attempt(p1="BROKE_FIRST", p3="ACCUSED")])
    assert [memory.sitting_out(r, me) for r in (10, 11, 12)] == [tuple(sorted((h, x))), tuple(sorted((h, x))), ()]
    assert memory.sits_out_until(h) == 11 and memory.sits_out_until(other) is None
    memory.record(12, [AttemptReport(broke_away={b58[1]: "named first by 3 of the round's 4 other peers"})])
    # (back, broke again, and stayed away from the retry: two rounds)
    assert memory.sits_out_until(h) == 14 and memory.sits_out_until(x) == 11
    memory.record(15, [attempt(p1="BROKE_FIRST")])
    memory.record(20, [attempt(p1="BROKE_FIRST")])
    assert memory.sits_out_until(h) == 24  # 8 rounds, capped at the limit (4)
    assert memory.sitting_out(22, me, peers=[me, x]) == ()  # the round's peers only
    assert memory.sitting_out(22, ids[1].peer_id) == ()  # never itself
    memory.record(20 + MEMORY_ROUNDS - 1, [attempt()])  # strikes of rounds 10-15 forgotten
    assert memory.sits_out_until(h) == 20 + 1 and memory.sits_out_until(x) is None
    memory.record(30 + 2 * MEMORY_ROUNDS, [])
    assert memory.sits_out_until(h) is None
    off = BreakMemory(limit=0)
    off.record(1, [attempt(p1="BROKE_FIRST")])
    assert off.sitting_out(2, me) == ()
    for bad in (-1, MEMORY_ROUNDS + 1, 1.5, True):
        with pytest.raises(ValueError, match="sit-out limit"):
            BreakMemory(limit=bad)


def test_the_next_gathers_pointer_names_a_reducer_refusing_twice_and_outlasts_an_empty_attempt():
    """The pointer of a member's next gather: a BAD_GROUP_ID from a reducer that was also first to fail
    this member in the attempt before (by a refusal or otherwise) becomes NOT_IN_GROUP_AGAIN (which
    counts); another first failure between resets it, an attempt that saw none keeps the last pointer."""
    h, a = b"\x01" * 38, b"\x02" * 38
    refused, again = (h, "NOT_IN_GROUP"), (h, "NOT_IN_GROUP_AGAIN")
    assert next_first_failed(None, refused) == refused
    assert next_first_failed(refused, refused) == again
    assert next_first_failed(again, refused) == again
    assert next_first_failed(refused, (a, "NOT_IN_GROUP")) == (a, "NOT_IN_GROUP")  # another reducer
    # its first refusal reached this member as a broken stream (a full-suite run: the round failed)
    assert next_first_failed((h, "REDUCER_FAILED"), refused) == again
    assert next_first_failed((a, "REDUCER_FAILED"), refused) == refused
    assert next_first_failed(refused, (h, "REDUCER_FAILED")) == (h, "REDUCER_FAILED")
    # an attempt in which it saw nobody fail (no group, a group refused) keeps the last pointer
    assert next_first_failed(refused, None) == refused
    assert next_first_failed((h, "REDUCER_FAILED"), None) == (h, "REDUCER_FAILED")
    assert next_first_failed(None, None) is None


def _malformed_first_failed(who: Identity, coordinator: Identity) -> bytes:
    import msgpack

    from grpo_swarm.node.swarm.gather import GATHER_DOMAIN, GATHER_VERSION

    payload = msgpack.packb([GATHER_VERSION, make_ticket(coordinator, who.public_key_bytes, 4, 6), 4, 1, 1.0, [],
                             bytes(32), 1.0, [b"peer", "REASON", "extra"], []], use_bin_type=True)
    return msgpack.packb([payload, who.sign(GATHER_DOMAIN + payload)], use_bin_type=True)


def test_matchmaking_admits_only_the_rounds_keys(keys):
    """The matchmaking's key check (the swarm test's SYBIL_ROUND shows it in a real round): a peer id
    counts when it holds one of the round's node keys; a sha256 peer id (RSA, no key inside) never
    does; without the round's keys (no coordinator list) anyone does, as in stock hivemind."""
    import hashlib

    from hivemind.p2p import P2PContext, PeerID
    from hivemind.proto import averaging_pb2

    from grpo_swarm.node.swarm.matchmaking import PatientMatchmaking

    _, (n0, n1, n2) = keys
    matchmaking = PatientMatchmaking.__new__(PatientMatchmaking)  # the check reads round_keys only
    rsa_like = PeerID(b"\x12\x20" + hashlib.sha256(b"rsa key").digest())
    assert all(matchmaking.is_round_peer(PeerID(n.peer_id)) for n in (n0, n1, n2)) and matchmaking.is_round_peer(rsa_like)
    matchmaking.round_keys = frozenset({n0.public_key_bytes, n1.public_key_bytes})
    assert matchmaking.is_round_peer(PeerID(n0.peer_id)) and matchmaking.is_round_peer(PeerID(n1.peer_id))
    assert not matchmaking.is_round_peer(PeerID(n2.peer_id)) and not matchmaking.is_round_peer(rsa_like)
    context = P2PContext(handle_name="rpc_join_group", local_id=PeerID(n0.peer_id), remote_id=PeerID(n2.peer_id))
    refusal = matchmaking._check_reasons_to_reject(averaging_pb2.JoinRequest(), context)
    assert refusal is not None and refusal.code == averaging_pb2.PROTOCOL_VIOLATION


def test_matchmaking_keeps_a_search_to_its_round(keys):
    """The matchmaking's round check (the swarm test's LOST_CANCEL_ROUND shows it in a real round): a
    step carrying an earlier round's gather entry, or one already cancelled, is over, and a leader
    refuses a follower whose entry is for another round or does not decode, before hivemind's own
    checks (which here answer NOT_LOOKING_FOR_GROUP: no search is running)."""
    import asyncio

    import msgpack
    from hivemind.averaging.control import StepControl
    from hivemind.p2p import P2PContext, PeerID
    from hivemind.proto import averaging_pb2
    from hivemind.utils.mpfuture import MPFuture

    from grpo_swarm.node.swarm.matchmaking import PatientMatchmaking

    coordinator, (n0, n1, _) = keys
    MPFuture()  # the process's first MPFuture must be a plain one (hivemind sets its backend up on the class)

    def data_for_gather(round_index):
        claim = GatherClaim(make_ticket(coordinator, n1.public_key_bytes, round_index, 6), round_index, 0, 1.0, ())
        return msgpack.packb([None, 0, msgpack.packb(encode_gather(n1, claim))])

    def step(round_index):
        control = StepControl(scheduled_time=0.0, deadline=1e12, allow_retries=True, weight=1.0,
                              data_for_gather=data_for_gather(round_index))
        control.attach(MPFuture(), MPFuture())
        return control

    matchmaking = PatientMatchmaking.__new__(PatientMatchmaking)
    assert not matchmaking.step_is_over(step(6))  # no round set yet: any round's search goes on
    matchmaking.round_index = 7
    current, earlier = step(7), step(6)
    assert not matchmaking.step_is_over(current) and matchmaking.step_is_over(earlier)
    current.cancel()
    assert matchmaking.step_is_over(current)

    matchmaking.step_control, matchmaking.lock_looking_for_group = None, asyncio.Lock()
    context = P2PContext(handle_name="rpc_join_group", local_id=PeerID(n0.peer_id), remote_id=PeerID(n1.peer_id))
    codes = {r: matchmaking._check_reasons_to_reject(averaging_pb2.JoinRequest(gather=g), context).code
             for r, g in ((6, data_for_gather(6)), (7, data_for_gather(7)), ("junk", b"\x93junk"))}
    assert codes == {6: averaging_pb2.BAD_GROUP_KEY, 7: averaging_pb2.NOT_LOOKING_FOR_GROUP,
                     "junk": averaging_pb2.BAD_GROUP_KEY}, codes


def test_a_follower_refuses_a_group_smaller_than_its_minimum(keys, monkeypatch):
    """A leader that starts a group below the follower's min_group_size (a hostile one: an honest leader's
    minimum is the same strict majority of the round's peers) is refused: the search goes on without a
    failed attempt, and the attempt no longer asks that leader. A group of the minimum is joined as in
    hivemind. (With two leaders of groups of two among five peers, an honest member lost attempts, and
    once its share of the round, to such groups.)"""
    import asyncio

    from hivemind.averaging.matchmaking import Matchmaking
    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2

    from grpo_swarm.node.swarm.matchmaking import PatientMatchmaking

    _, (n0, n1, n2) = keys
    joined = []

    async def hiveminds(self, leader, msg):
        joined.append(list(msg.ordered_peer_ids))
        return "group"

    monkeypatch.setattr(Matchmaking, "follower_assemble_group", hiveminds)
    matchmaking = PatientMatchmaking.__new__(PatientMatchmaking)
    matchmaking.min_group_size, matchmaking.peer_id = 3, PeerID(n0.peer_id)
    leader = PeerID(n1.peer_id)

    def begin(*members):
        return averaging_pb2.MessageFromLeader(code=averaging_pb2.BEGIN_ALLREDUCE, group_id=b"g",
                                               ordered_peer_ids=[m.peer_id for m in members])

    assert asyncio.run(matchmaking.follower_assemble_group(leader, begin(n1, n0))) is None
    assert joined == [] and n1.peer_id in matchmaking.shunned_leaders
    assert asyncio.run(matchmaking.follower_assemble_group(PeerID(n2.peer_id), begin(n2, n0, n1))) == "group"
    assert joined == [[n2.peer_id, n0.peer_id, n1.peer_id]]


def test_a_retry_waits_for_the_members_it_expects_and_follows_no_one_it_left_out(keys):
    """After an attempt that failed in a group (bench/hostile_groups.py shows it with 7 peers), a
    retry does not follow the peers the verdicts excluded or this node accuses, and waits for the
    round's other peers but the one it saw fail first: a partial group lacking one waits up to one
    more min_matchmaking_time past its time (an accused member joining instead changes nothing). A
    first attempt, or a round of fewer than five peers, keeps hivemind's rules."""
    from hivemind.averaging.control import StepControl
    from hivemind.p2p import PeerID
    from hivemind.utils import get_dht_time
    from hivemind.utils.mpfuture import MPFuture

    from grpo_swarm.node.swarm.averaging import retry_members
    from grpo_swarm.node.swarm.matchmaking import PatientMatchmaking
    from grpo_swarm.node.swarm.round_report import AttemptReport

    _, (n0, n1, n2) = keys
    extra, breaker = Identity.from_seed(bytes([9]) * 32), Identity.from_seed(bytes([10]) * 32)
    everyone = (n0, n1, n2, extra, breaker)
    round_keys = frozenset(n.public_key_bytes for n in everyone)
    members = [n.peer_id_base58 for n in everyone]
    assert retry_members(round_keys, [], ()) == (None, frozenset())  # a first attempt
    assert retry_members(round_keys, [AttemptReport(ok=False)], ()) == (None, frozenset())  # no group found
    failed = AttemptReport(ok=False, members=members, excluded={extra.peer_id_base58: "TICKET_BAD_SIGNATURE: ..."})
    expected, shunned = retry_members(round_keys, [failed], ((n2.peer_id, "STALLED"),),
                                      (breaker.peer_id, "REDUCER_FAILED"))
    assert expected == {n0.peer_id, n1.peer_id} and shunned == {extra.peer_id, n2.peer_id}
    assert retry_members(None, [failed], ()) == (None, frozenset())  # the round's peers unknown: no rule
    small = frozenset(n.public_key_bytes for n in (n0, n1, n2))  # a round of three: no rule
    assert retry_members(small, [AttemptReport(ok=False, members=members[:3])], ((n2.peer_id, "STALLED"),)) == \
        (None, frozenset())
    # peers this node lists as sitting out: no attempt follows them, and a retry does not wait for them
    assert retry_members(round_keys, [], (), None, [breaker.peer_id]) == (None, {breaker.peer_id})
    waited, avoided = retry_members(round_keys, [failed], (), None, [n1.peer_id])
    assert waited == {n0.peer_id, n2.peer_id, breaker.peer_id} and avoided == {extra.peer_id, n1.peer_id}
    assert retry_members(small, [], (), None, [n1.peer_id]) == (None, frozenset())

    MPFuture()  # the process's first MPFuture must be a plain one (hivemind sets its backend up on the class)
    m = PatientMatchmaking.__new__(PatientMatchmaking)
    m.peer_id, m.current_followers, m.min_matchmaking_time = PeerID(n0.peer_id), {}, 2.0
    m.step_control = StepControl(scheduled_time=get_dht_time(), deadline=1e12, allow_retries=True, weight=1.0,
                                 data_for_gather=b"")
    m.step_control.attach(MPFuture(), MPFuture())
    m.retry_members = None
    assert m.retry_wait_left() == 0.0
    m.retry_members = expected
    assert 1.5 < m.retry_wait_left() <= 2.0  # n1 is missing
    m.current_followers[PeerID(n2.peer_id)] = None  # an accused member joining does not stand in for it
    assert m.missing_retry_members() and m.retry_wait_left() > 1.5
    m.current_followers[PeerID(n1.peer_id)] = None
    assert not m.missing_retry_members() and m.retry_wait_left() == 0.0
    m.current_followers = {}
    m.step_control.scheduled_time = get_dht_time() - 2.0  # past its time by one more period: no longer waits
    assert m.retry_wait_left() == 0.0


def test_the_share_audit_calls_every_contributor_that_accepts_calls(keys):
    """The audit's servers: the other valid members that accept calls, not client-mode ones (their
    entries reach the others through the servers) and not excluded ones."""
    import msgpack
    from hivemind.p2p import PeerID

    from grpo_swarm.node.swarm.group_plan import GroupPlan

    coordinator, (n0, n1, n2) = keys
    n3 = Identity.from_seed(b"\x04" * 32)

    def slot(who, client=False, round_index=4):
        claim = GatherClaim(make_ticket(coordinator, who.public_key_bytes, round_index, 6), 4, 0, 1.0, ())
        return PeerID(who.peer_id), msgpack.packb([None, 1 if client else 0, msgpack.packb(encode_gather(who, claim))])

    slots = [slot(n0), slot(n1, client=True), slot(n2), slot(n3, round_index=3)]  # n3: another round's ticket
    plan = GroupPlan.from_verdicts([p for p, _ in slots],
                                   group_verdicts([p.to_bytes() for p, _ in slots], [g for _, g in slots],
                                                  _rules(coordinator)))
    assert [v.ok for v in plan.verdicts] == [True, True, True, False]
    assert plan.audit_servers(PeerID(n0.peer_id)) == [PeerID(n2.peer_id)]
    assert plan.audit_servers(PeerID(n1.peer_id)) == [PeerID(n0.peer_id), PeerID(n2.peer_id)]


def test_weight_modes_follow_the_loss_normalisation(keys):
    coordinator, (n0, _, _) = keys
    assert [weight_mode_for_loss(x) for x in LOSS_TYPES] == ["sequences", "tokens", "sequences", "tokens"]
    claims = TicketClaims.from_ticket(parse_ticket(make_ticket(coordinator, n0.public_key_bytes, 1, 8, 41),
                                                   ticket_type()))
    assert claims.weight("sequences") == 8.0 and claims.weight("tokens") == 41.0 and not claims.final
    # the coordinator's own schema (no accepted_tokens yet) parses, and gives no token weight
    from grpo_swarm.protocol import grpo_swarm_pb2 as pb
    from grpo_swarm.protocol.rpc import sign_ticket

    plain = sign_ticket(pb.AdmissionTicket(run_id=RUN_ID, round_index=1, node_id=n0.node_id,
                                           node_public_key=n0.public_key_bytes, accepted_samples=8), coordinator)
    claims = TicketClaims.from_ticket(parse_ticket(plain.SerializeToString()))
    assert claims.weight("sequences") == 8.0 and claims.weight("tokens") == 0.0


def test_udp_transports_are_named_and_left_out():
    """QUIC, WebTransport and WebRTC addresses (all over UDP) are told from TCP ones by their components."""
    peer = Identity.generate().peer_id_base58
    tcp = [f"/ip4/10.0.0.1/tcp/31337/p2p/{peer}", f"/ip6/::1/tcp/4001/p2p/{peer}", f"/dns4/udp.example.org/tcp/1/p2p/{peer}"]
    udp = [f"/ip4/10.0.0.1/udp/31337/quic-v1/p2p/{peer}", f"/ip4/10.0.0.1/udp/1/quic/p2p/{peer}",
           f"/ip4/10.0.0.1/udp/1/quic-v1/webtransport/p2p/{peer}", f"/ip4/10.0.0.1/udp/1/webrtc-direct/p2p/{peer}"]
    assert [over_udp(m) for m in tcp + udp] == [False] * len(tcp) + [True] * len(udp)
    assert tcp_only(udp[:1] + tcp + udp[1:]) == tcp
    assert check_transports(tcp, "host address") == tcp and check_transports(None, "announce address") == []
    with pytest.raises(ValueError, match=r"--host-maddr '/ip4/10.0.0.1/udp/31337/quic-v1/.*UDP transport.*tcp"):
        check_transports(tcp[:1] + udp[:1], "--host-maddr")


def test_dht_from_node_key_file_and_bootstrap_errors(tmp_path, keys):
    coordinator, _ = keys
    ident = Identity.generate()
    ident.save(tmp_path / "node.key")
    ident = Identity.load(tmp_path / "node.key")
    loopback = ["/ip4/127.0.0.1/tcp/0"]
    dht = start_dht(ident, host_maddrs=loopback)  # libp2p copy of the key next to the key file
    try:
        assert dht.peer_id.to_base58() == ident.peer_id_base58
        assert (tmp_path / "node.key.libp2p").stat().st_mode & 0o077 == 0
        other = Identity.generate()
        with pytest.raises(ValueError, match="/p2p/"):
            start_dht(other, identity_path=tmp_path / "o", initial_peers=["/ip4/127.0.0.1/tcp/1"])
        dead = f"/ip4/127.0.0.1/tcp/1/p2p/{Identity.generate().peer_id_base58}"
        t0 = time.monotonic()
        with pytest.raises(DHTStartError) as err:
            start_dht(other, identity_path=tmp_path / "o", initial_peers=[dead], host_maddrs=loopback,
                      attempts=2, backoff_s=0.1)
        assert time.monotonic() - t0 < 30
        for hint in ("tcp/1", "port", "NAT", "--client-mode"):
            assert hint in str(err.value)
        # QUIC & co. are refused where a user gives them (p2pd cuts averaging streams over QUIC), and a
        # TCP-only host announces no UDP address
        for kwargs in (dict(host_maddrs=["/ip4/127.0.0.1/udp/0/quic-v1"]),
                       dict(host_maddrs=loopback, announce_maddrs=["/ip4/203.0.113.5/udp/31337/quic-v1"]),
                       dict(host_maddrs=loopback, initial_peers=[f"/ip4/127.0.0.1/udp/1/quic-v1/p2p/{ident.peer_id_base58}"])):
            with pytest.raises(ValueError, match="UDP transport"):
                start_dht(other, identity_path=tmp_path / "o", **kwargs)
        # two dead entries of three known peers do not block the live one
        live = [str(m) for m in dht.get_visible_maddrs()]
        assert live and not any(over_udp(m) for m in live), live
        # a listed peer's QUIC address is not dialled, though p2pd would reach that peer through it
        quic = started_dht(host_maddrs=["/ip4/127.0.0.1/udp/0/quic-v1"])
        try:
            over_quic = [str(m) for m in quic.get_visible_maddrs()]
            assert over_quic and all(over_udp(m) for m in over_quic), over_quic
            assert connect_peers(dht, over_quic) == []
            reached = run_in_dht(dht, functools.partial(_dial_in_dht, over_quic), limit=30.0)[0]
            assert reached == [quic.peer_id.to_base58()]
        finally:
            quic.shutdown()
        dead2 = f"/ip4/127.0.0.1/tcp/2/p2p/{Identity.generate().peer_id_base58}"
        joined = start_dht(other, identity_path=tmp_path / "o", initial_peers=[dead, dead2, *live],
                           host_maddrs=loopback)
        joined.shutdown()
        # the averager refuses this node's own bad input before sending anything
        averager = VerifiedAverager([torch.zeros(4)], dht=dht, prefix="unit", identity=ident,
                                    coordinator_key=coordinator.public_key_bytes, run_id=RUN_ID,
                                    weight_mode="sequences", norm_bound=10.0, ticket_type=ticket_type())
        try:
            ticket = make_ticket(coordinator, ident.public_key_bytes, 0, 4)
            with pytest.raises(LocalGradientError, match="NaN"):
                averager.average(0, ticket, [torch.tensor([0.0, float("nan"), 0, 0])])
            with pytest.raises(LocalGradientError, match="norm"):
                averager.average(0, ticket, [torch.full((4,), 100.0)])
            with pytest.raises(LocalGradientError, match="shape"):
                averager.average(0, ticket, [torch.zeros(5)])
            with pytest.raises(ValueError, match="another node"):
                averager.average(0, make_ticket(coordinator, other.public_key_bytes, 0, 4), [torch.zeros(4)])
            with pytest.raises(Exception, match="round"):
                averager.average(1, ticket, [torch.zeros(4)])
            for bad in (-1.0, float("nan"), float("inf")):
                with pytest.raises(ValueError, match="straggler_wait"):
                    averager.average(0, ticket, [torch.zeros(4)], straggler_wait=bad)
        finally:
            averager.shutdown()
        # the gradient is copied and measured chunk by chunk: the norm is the whole tensor's, and a NaN
        # in the last chunk of a tensor is still caught
        big = 2 * LOAD_CHUNK + 5
        averager = VerifiedAverager([torch.zeros(3), torch.zeros(big)], dht=dht, prefix="chunks", identity=ident,
                                    coordinator_key=coordinator.public_key_bytes, run_id=RUN_ID,
                                    weight_mode="sequences", norm_bound=1e4, ticket_type=ticket_type())
        try:
            grads = [torch.tensor([1.0, -2.0, 2.0]), torch.randn(big, generator=torch.Generator().manual_seed(1))]
            norm = averager.load_local_gradient(grads)
            assert norm == pytest.approx(float(torch.cat(grads).double().norm()), rel=1e-5)  # float32 chunk norms
            with averager.get_tensors() as buffers:
                assert all(torch.equal(b, g) for b, g in zip(buffers, grads))
            grads[1][-1] = float("nan")
            with pytest.raises(LocalGradientError, match="tensor 1 holds NaN"):
                averager.load_local_gradient(grads)
            # a bfloat16 gradient is converted into the buffers chunk by chunk (and checked as converted)
            half = [g.bfloat16() for g in grads]
            half[1][-1] = 0.0
            norm = averager.load_local_gradient(half)
            assert norm == pytest.approx(float(torch.cat([h.float() for h in half]).double().norm()), rel=1e-5)
            with averager.get_tensors() as buffers:
                assert all(torch.equal(b, h.float()) for b, h in zip(buffers, half))
            # a gradient computed in the averager's own buffers is checked where it is, not copied
            buffers = averager.gradient_buffers()
            buffers[0].copy_(torch.tensor([3.0, 0.0, -4.0]))
            buffers[1].zero_()
            with averager.get_tensors() as held:
                assert all(b.data_ptr() == h.data_ptr() for b, h in zip(buffers, held))
            assert averager.load_local_gradient(buffers) == pytest.approx(5.0)
            buffers[1][-1] = float("inf")
            with pytest.raises(LocalGradientError, match="tensor 1 holds NaN or infinite"):
                averager.load_local_gradient(buffers)
            buffers[1][-1] = 1e5
            with pytest.raises(LocalGradientError, match="norm"):
                averager.load_local_gradient(buffers)
        finally:
            averager.shutdown()
        with pytest.raises(ValueError, match="identity"):
            VerifiedAverager([torch.zeros(4)], dht=dht, prefix="unit", identity=other,
                             coordinator_key=coordinator.public_key_bytes, run_id=RUN_ID, weight_mode="sequences",
                             norm_bound=10.0, start=False)
    finally:
        dht.shutdown()


def _unstarted_averager(tmp_path, ident: Identity, coordinator: Identity):
    """A running DHT of ``ident``'s and a VerifiedAverager on it whose process is not started."""
    dht = start_dht(ident, identity_path=tmp_path / "k", host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    return dht, VerifiedAverager([torch.zeros(4)], dht=dht, prefix="unit", identity=ident,
                                 coordinator_key=coordinator.public_key_bytes, run_id=RUN_ID,
                                 weight_mode="sequences", norm_bound=10.0, ticket_type=ticket_type(), start=False)


def test_an_averager_process_killed_holding_its_tensors_lock_leaves_the_node_able_to_load(tmp_path, keys):
    """The averager process holds the tensors' lock through each all-reduce; killed then (out of memory),
    hivemind's semaphore stayed held and the node's next gradient load waited for it forever."""
    coordinator, _ = keys
    ident = Identity.generate()
    dht, averager = _unstarted_averager(tmp_path, ident, coordinator)
    try:
        pid = os.fork()
        if pid == 0:  # as the averager process, killed mid all-reduce
            averager.lock_averaged_tensors.acquire()
            os.kill(os.getpid(), signal.SIGKILL)
        os.waitpid(pid, 0)
        loaded = threading.Event()

        def load():
            with averager.get_tensors():
                loaded.set()

        threading.Thread(target=load, daemon=True).start()
        assert loaded.wait(10.0), "the node waits on a lock its dead averager held"
    finally:
        dht.shutdown()


def test_share_audit_handler_keeps_only_the_groups_contributors(tmp_path, keys, monkeypatch):
    """rpc_share_audit as a sybil calls it (any libp2p peer told the group id): its entries are never
    stored, so it cannot crowd the answers a member reads (at most 2·K entries); unknown groups get
    an empty answer and no store (no memory for made-up group ids); a member's first entry stays.
    And a member about to leave lingers until its groupmates have read its entries (bounded)."""
    import asyncio
    from types import SimpleNamespace

    from hivemind.p2p import P2PContext, PeerID

    from grpo_swarm.node.swarm.share_audit import MAX_AUDIT_ENTRY_BYTES, PHASE_REVEAL, PHASE_SKETCH, encode_entry
    from grpo_swarm.protocol import grpo_swarm_pb2 as pb

    from grpo_swarm.node.swarm import share_audit_rpc

    # (an answer waits this long for entries that never come here: 12 calls, 1 s each)
    monkeypatch.setattr(share_audit_rpc, "AUDIT_POLL_S", 0.05)
    coordinator, nodes = keys
    ident = Identity.generate()
    dht, averager = _unstarted_averager(tmp_path, ident, coordinator)
    members = [PeerID(ident.peer_id), PeerID(nodes[0].peer_id)]
    sybils = [PeerID(Identity.generate().peer_id) for _ in range(8)]
    group = b"G" * 32

    async def call(caller: PeerID, entry: bytes, group_id: bytes = group) -> list[bytes]:
        request = pb.ShareAuditExchange(group_id=group_id, phase=PHASE_REVEAL, entries=[entry])
        context = P2PContext(handle_name="rpc_share_audit", local_id=members[0], remote_id=caller)
        return list((await averager.rpc_share_audit(request, context)).entries)

    async def scenario():
        assert await call(sybils[0], b"x", group_id=b"U" * 32) == []  # a group we are not in
        assert not averager._audit_stores
        runner = asyncio.get_running_loop().create_future()
        runner.set_result(SimpleNamespace(sender_peer_ids=members))  # the group's reduction is running
        averager._running_groups[group] = runner
        for i, sybil in enumerate(sybils):
            assert await call(sybil, b"sybil %d" % i) == []
        assert await call(members[1], b"member") == [b"member"]
        assert await call(members[1], b"member, again") == [b"member"]  # one entry per caller: the first
        assert await call(sybils[0], b"sybil") == [b"member"]  # sybils still only read
        too_big = b"m" * (MAX_AUDIT_ENTRY_BYTES + 1)
        assert await call(members[0], too_big) == [b"member"]

    async def lingering():
        """A member leaving right after its audit (_shutdown) first waits until the other contributor
        has read every sketch entry from it, or until its bound: a groupmate finishing a moment later
        would otherwise find nobody to answer it, fail its attempt and lose its share of the round."""
        loop = asyncio.get_running_loop()
        me, other = ident, nodes[0]
        store = averager._audit_store(group, PHASE_SKETCH, create=True)
        store.expect({me.peer_id: me.public_key_bytes, other.peer_id: other.public_key_bytes})
        store.add(encode_entry(me, group, PHASE_SKETCH, [b"my sketch"]))
        averager._last_audit = (group, frozenset({other.peer_id}), loop.time() + 30.0)
        waiting = asyncio.ensure_future(averager._linger_for_audits(10.0))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # the other has not read our entries yet
        request = pb.ShareAuditExchange(group_id=group, phase=PHASE_SKETCH,
                                        entries=[encode_entry(other, group, PHASE_SKETCH, [b"its sketch"])])
        context = P2PContext(handle_name="rpc_share_audit", local_id=members[0], remote_id=members[1])
        answer = await averager.rpc_share_audit(request, context)
        assert len(answer.entries) == 2  # every entry: the other is served
        await asyncio.wait_for(waiting, 1.0)
        averager._audit_stores.clear()  # a group whose other member never calls: the bound ends the wait
        started = loop.time()
        await averager._linger_for_audits(0.4)
        assert 0.35 <= loop.time() - started < 2.0

    try:
        asyncio.run(scenario())
        asyncio.run(lingering())
    finally:
        averager.shutdown()
        dht.shutdown()


# the plan's rounds of waits, played by a second swarm beside the first: the late members (and the lost
# cancel's next round), then the stalls and drips through the kill (the sit-out round remembers the round
# before it; the kill ends H, and the gone round follows it)
WAITING_ROUNDS = frozenset(range(LATE_ROUND, AFTER_LOST_CANCEL_ROUND + 1)) | frozenset(range(STALL_ROUND, len(PLAN)))


def swarm_part(round_index: int) -> int:
    """Which of the two swarms plays ``round_index``: 1 for the rounds of waits, else 0."""
    return int(round_index in WAITING_ROUNDS)


# ---- the swarm ------------------------------------------------------------------------------------
class Swarm:
    """The two swarms' results, by round (the same three keys in both, so one list of peer ids)."""

    def __init__(self, works: list[Path], peer_ids: list[str]):
        self.works, self.peer_ids = works, peer_ids
        self.kill_time: float | None = None

    def work_of(self, round_index: int) -> Path:
        return self.works[swarm_part(round_index)]

    def report(self, round_index: int, peer: int) -> dict:
        path = self.work_of(round_index) / f"r{round_index}-p{peer}.json"
        assert path.exists(), f"peer {peer} wrote no result for round {round_index}\n{self.logs()}"
        return json.loads(path.read_text())

    def tensors(self, round_index: int, peer: int, kind: str) -> list[torch.Tensor]:
        from safetensors.torch import load_file

        data = load_file(str(self.work_of(round_index) / f"r{round_index}-p{peer}.safetensors"))
        n = sum(1 for k in data if k.startswith(f"{kind}."))
        assert n, f"peer {peer} has no {kind} tensors for round {round_index}"
        return [data[f"{kind}.{i}"] for i in range(n)]

    def logs(self, lines: int = 40) -> str:
        out = []
        for work in self.works:
            for p in sorted(work.glob("peer*.log")) + sorted(work.glob("events-*.log")):
                tail = p.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {work.name}/{p.name}\n" + "\n".join(tail))
        return "\n".join(out)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, keys):
    coordinator, _ = keys
    root = tmp_path_factory.mktemp("swarm")
    works = [root / "main", root / "waits"]
    nodes = [Identity.generate() for _ in range(3)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs: dict[tuple[int, int], subprocess.Popen | ForkedProcess] = {}  # (swarm part, peer) -> its process

    def attempts(i: int, rnd: dict) -> int | None:
        if "max_attempts" in rnd:
            return rnd["max_attempts"]
        if i == H and rnd["behaviour"]:  # no retry alone after the others are done; one retry when caught
            return 1 if rnd["round"] in HOSTILE_ONE_ATTEMPT else 2
        return None  # the averager's max_attempts

    try:
        for part, work in enumerate(works):
            work.mkdir()
            for i, node in enumerate(nodes):
                node.save(work / f"node{i}.key")
                peer_plan = [dict(rnd, max_attempts=attempts(i, rnd)) for rnd in PLAN if swarm_part(rnd["round"]) == part]
                cfg = dict(index=i, workdir=str(work), key_path=str(work / f"node{i}.key"),
                           coordinator_seed=bytes(range(32)).hex(), node_keys=[n.public_key_bytes.hex() for n in nodes],
                           role="hostile" if i == H else "honest", timing=TIMING, plan=peer_plan,
                           small_weights=SMALL_WEIGHTS, release=str(root / "release"))
                (work / f"peer{i}.json").write_text(json.dumps(cfg))
                # (forked with torch imported already, node/swarm/prefork.py)
                procs[part, i] = spawn([sys.executable, str(HERE / "swarm_peer.py"), str(work / f"peer{i}.json")],
                                       stdout=work / f"peer{i}.log", env=env)
        swarm = Swarm(works, [n.peer_id_base58 for n in nodes])
        waits = works[swarm_part(KILL_ROUND)]
        killed_proc = procs[swarm_part(KILL_ROUND), H]
        deadline = time.monotonic() + SWARM_TIMEOUT_S
        killed, stalled_at = False, None
        while not all((work / f"finished-p{i}").exists() for work in works for i in (A, B)):
            assert time.monotonic() < deadline, f"the swarm did not finish in {SWARM_TIMEOUT_S} s\n{swarm.logs()}"
            for (part, i), proc in procs.items():
                if proc.poll() not in (None, 0) and not (proc is killed_proc and killed):
                    pytest.fail(f"peer {i} of swarm {works[part].name} exited with {proc.returncode}\n{swarm.logs()}")
            if stalled_at is None and (waits / f"stalled-p{H}").exists():
                stalled_at = time.monotonic()
            # (killed at once, H as the group's leader once died before its word that the group had
            # formed reached B, who then looked for a group until its matchmaking timeout)
            if not killed and stalled_at is not None and time.monotonic() - stalled_at >= KILL_AFTER_STALL_S:
                os.killpg(killed_proc.pid, signal.SIGKILL)  # the hostile peer's whole process group: p2pd too
                killed, swarm.kill_time = True, time.time()
            time.sleep(0.1)
        # the peers stop together, once both swarms played (a stop is seconds of CPU for the averager
        # processes: one swarm's stop beside the other's not-in-group round once broke that round's timing)
        (root / "release").write_text("1")
        yield swarm
    finally:
        (root / "release").write_text("1")
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


@pytest.fixture(scope="module")
def union_gradients():
    """The reference: one trainer's gradient on all groups, for each loss type (computed here)."""
    torch.set_num_threads(1)
    trainer = make_trainer()
    batch = union_batch(trainer)
    sha = tensors_sha256([batch.rollouts.completion_ids, batch.rollouts.completion_mask])
    return sha, {loss: gradient(trainer, batch, range(NUM_GROUPS), loss)[0] for loss in LOSS_TYPES}


def _weighted(grads_by_peer: list[list[torch.Tensor]], weights: list[float]) -> list[torch.Tensor]:
    total = sum(weights)
    return [sum(w * g[k].double() for w, g in zip(weights, grads_by_peer)) / total
            for k in range(len(grads_by_peer[0]))]


def _max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


def _scale(a: list[torch.Tensor]) -> float:
    return max(float(x.abs().max()) for x in a)


def _same_bytes(swarm: Swarm, r: int, peers) -> str:
    shas = {p: swarm.report(r, p)["sha256"] for p in peers}
    assert None not in shas.values() and len(set(shas.values())) == 1, f"round {r}: {shas}"
    for p in peers:  # and the files hold what the reports hash
        assert tensors_sha256(swarm.tensors(r, p, "avg")) == shas[p]
    return next(iter(shas.values()))


@pytest.mark.parametrize("k", [3, 2])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_swarm_gradient_equals_the_union_gradient(swarm, union_gradients, k, loss_type):
    sha, union = union_gradients
    r = GRPO_ROUNDS[(k, loss_type)]
    reports = [swarm.report(r, p) for p in range(k)]
    for rep in reports:
        assert rep["ok"], rep
        assert rep["completion_sha"] == sha, "the peers sampled other completions than this process"
    _same_bytes(swarm, r, range(k))
    averaged = swarm.tensors(r, A, "avg")
    err = _max_err(averaged, union[loss_type]) / _scale(union[loss_type])
    mode = weight_mode_for_loss(loss_type)
    weights = [rep["weights"][mode] for rep in reports]
    assert reports[0]["attempts"][-1]["weights"] == {swarm.peer_ids[p]: float(w) for p, w in enumerate(weights)}
    print(f"\n{loss_type} K={k}: weights {mode} {weights}, max |avg - union| / max |union| = {err:.2e}, "
          f"round {max(rep['seconds'] for rep in reports):.2f} s")
    assert err <= 1e-6
    # the weighting matters: the other mode's weights would miss by far more (when they differ)
    other = [rep["weights"]["tokens" if mode == "sequences" else "sequences"] for rep in reports]
    if [w / sum(weights) for w in weights] != [w / sum(other) for w in other]:
        wrong = _weighted([swarm.tensors(r, p, "local") for p in range(k)], other)
        assert _max_err(wrong, union[loss_type]) / _scale(union[loss_type]) > 1e-3


@pytest.mark.parametrize("compression", ["none", "fp16", "8bit"])
def test_honest_round_gives_every_peer_the_same_bytes(swarm, compression):
    r = HONEST_ROUNDS[compression]
    reports = [swarm.report(r, p) for p in (A, B, H)]
    assert all(rep["ok"] for rep in reports), json.dumps(reports, indent=1)[:6000]
    _same_bytes(swarm, r, (A, B, H))
    # each member sends (K-1)/K of its gradient as parts and as many averages back, in fp32 or fp16
    values = sum(math.prod(s) for s in SMALL_SHAPES)
    for p in (A, B, H):
        attempt = swarm.report(r, p)["attempts"][-1]
        # (8-bit: parts of one byte per value plus a 1,032-byte codebook header, averages in fp16)
        expected_bytes = {"none": 4 / 3 * 4 * values, "fp16": 4 / 3 * 2 * values, "8bit": 2 / 3 * 3 * values}[compression]
        headers = 4 * 1032 if compression == "8bit" else 0
        assert 0.75 * expected_bytes < attempt["bytes_sent"] < 1.25 * expected_bytes + headers, attempt["bytes_sent"]
        assert 0.75 * expected_bytes < attempt["bytes_received"] < 1.25 * expected_bytes + headers
    expected = _weighted([small_grads(r, p) for p in (A, B, H)], SMALL_WEIGHTS)
    err = _max_err(swarm.tensors(r, A, "avg"), expected)
    flat = lambda ts: torch.cat([t.reshape(-1).double() for t in ts])  # noqa: E731
    rel = float((flat(swarm.tensors(r, A, "avg")) - flat(expected)).norm() / flat(expected).norm())
    print(f"\n{compression}: max |avg - weighted mean| = {err:.2e}, relative norm {rel:.2e}")
    assert err <= {"none": 1e-6, "fp16": 2e-3, "8bit": 0.2}[compression]
    assert rel <= {"none": 1e-6, "fp16": 1e-3, "8bit": 0.03}[compression]


def test_a_member_later_than_min_matchmaking_time_still_makes_the_group(swarm):
    """With a straggler wait, a partial group of the round's expected peers waits for a member whose
    gradient took 5 s longer (more than the 2 s min_matchmaking_time that would start without it:
    its verified work would be lost), and the full group starts as soon as it arrives."""
    reports = [swarm.report(LATE_ROUND, p) for p in (A, B, H)]
    assert all(rep["ok"] for rep in reports), json.dumps(reports, indent=1)[:6000]
    for rep in reports:
        assert len(rep["attempts"]) == 1 and len(rep["attempts"][0]["weights"]) == 3, rep["attempts"]
    # A and B waited for H (started 5 s after them), and not for the whole 8 s
    assert 4.0 < reports[A]["seconds"] < 8.0 + TIMING["allreduce_timeout"], reports[A]["seconds"]
    _same_bytes(swarm, LATE_ROUND, (A, B, H))
    err = _max_err(swarm.tensors(LATE_ROUND, A, "avg"),
                   _weighted([small_grads(LATE_ROUND, p) for p in (A, B, H)], SMALL_WEIGHTS))
    assert err <= 1e-6


def test_a_member_left_out_of_its_round_does_not_retry_once_the_round_went_on(swarm):
    """5 s late with the 2 s wait, the member misses the group: the other two average without it (a
    strict majority of the round's three). Asked every few seconds while it looks for a group whether
    the round went on (join asks the coordinator for a newer version), it cancels the search and
    makes no retry, instead of spending matchmaking timeouts on a group nobody would join; its
    later rounds (the rest of this module's plan) show that no search was left running."""
    a, b, h = (swarm.report(LEFT_OUT_ROUND, p) for p in (A, B, H))
    assert a["ok"] and b["ok"], (a, b)
    assert len(a["attempts"][-1]["weights"]) == 2 and swarm.peer_ids[H] not in a["attempts"][-1]["weights"]
    assert not h["ok"] and len(h["attempts"]) == 1, h
    assert ROUND_WENT_ON in h["error"], h["error"]
    assert "cancelled while looking for a group" in h["error"], h["error"]
    assert h["seconds"] < ROUND_OVER_POLL_S + 5.0 < TIMING["matchmaking_timeout"], h["seconds"]


def test_a_search_whose_cancel_was_lost_does_not_outlive_its_round(swarm):
    """hivemind cancels a step's search without waiting for it, and Python 3.11 can lose a cancel. H's
    search in the round it was left out of loses its cancel: it must still end (seeing the cancel
    pending, or its round gone), not live on into the next round and join that round's group with
    its old gather entry (the verdicts would then leave H out, while its real step found no group).
    In the next round all three average in one attempt."""
    h = swarm.report(LOST_CANCEL_ROUND, H)
    assert not h["ok"] and ROUND_WENT_ON in h["error"], h
    if not (swarm.work_of(LOST_CANCEL_ROUND) / f"lost-cancel-p{H}").exists():  # (its step ended before its search ever waited for a leader)
        pytest.skip("H's search never lost a cancel this run: nothing to check")
    reports = [swarm.report(AFTER_LOST_CANCEL_ROUND, p) for p in (A, B, H)]
    assert all(rep["ok"] for rep in reports), json.dumps(reports, indent=1)[:6000]
    for rep in reports:
        assert len(rep["attempts"]) == 1 and len(rep["attempts"][0]["weights"]) == 3, rep["attempts"]
    _same_bytes(swarm, AFTER_LOST_CANCEL_ROUND, (A, B, H))
    expected = _weighted([small_grads(AFTER_LOST_CANCEL_ROUND, p) for p in (A, B, H)], SMALL_WEIGHTS)
    assert _max_err(swarm.tensors(AFTER_LOST_CANCEL_ROUND, A, "avg"), expected) <= 1e-6


def test_a_key_outside_the_round_cannot_take_a_slot_in_its_groups(swarm):
    """A sybil knows everything hivemind's matchmaking asks for (the schema hash and the round's group
    key follow from public facts), and a group counts as full at the round's number of peers. If a
    leader let it in, the group would start without one of the round's peers, the verdicts would
    exclude the sybil, and the round would fail or go on without that peer: one cheap key could knock
    an honest peer out of every round. Leaders refuse keys outside the round and followers never ask
    them, so A and B average together in their one attempt, and H never shares a group with them."""
    a, b, h = (swarm.report(SYBIL_ROUND, p) for p in (A, B, H))
    assert a["ok"] and b["ok"], json.dumps([a, b], indent=1)[:6000]
    honest = {swarm.peer_ids[A], swarm.peer_ids[B]}
    for rep in (a, b):
        assert len(rep["attempts"]) == 1 and set(rep["attempts"][0]["members"]) == honest, rep["attempts"]
    assert not h["ok"], h
    for attempt in h["attempts"]:
        assert not honest & set(attempt["members"]), attempt
    _same_bytes(swarm, SYBIL_ROUND, (A, B))
    assert _max_err(swarm.tensors(SYBIL_ROUND, A, "avg"), _honest_mean(SYBIL_ROUND)) <= 1e-6


def test_a_client_mode_member_averages_and_audits_through_the_reducers(swarm):
    """B runs in client mode (behind NAT: nobody can call it). It sends its whole gradient to the two
    reducers, gets every average back, and takes part in the share audit only through them: its
    entries reach the other members relayed in the reducers' answers. Every member ends with the
    same checked bytes."""
    r = CLIENT_MODE_ROUND
    reports = [swarm.report(r, p) for p in (A, B, H)]
    assert all(rep["ok"] for rep in reports), json.dumps(reports, indent=1)[:6000]
    _same_bytes(swarm, r, (A, B, H))
    expected = _weighted([small_grads(r, p) for p in (A, B, H)], SMALL_WEIGHTS)
    assert _max_err(swarm.tensors(r, A, "avg"), expected) <= 1e-6
    values = sum(math.prod(s) for s in SMALL_SHAPES)
    client = reports[B]["attempts"][-1]
    assert 0.9 * 4 * values < client["bytes_sent"] < 1.1 * 4 * values  # all of it, to the reducers
    for rep in reports:  # everyone judged both reducers' shares
        assert "judge" in rep["attempts"][-1]["audit_seconds"], rep["attempts"][-1]


def _honest_mean(r: int) -> list[torch.Tensor]:
    return _weighted([small_grads(r, A), small_grads(r, B)], SMALL_WEIGHTS[:2])


def _check_honest_result(swarm: Swarm, r: int, tol: float = 1e-6) -> list[dict]:
    reports = [swarm.report(r, p) for p in (A, B)]
    for rep in reports:
        assert rep["ok"], _who_saw_what(swarm, [*reports, swarm.report(r, H)])
    _same_bytes(swarm, r, (A, B))
    assert _max_err(swarm.tensors(r, A, "avg"), _honest_mean(r)) <= tol
    return reports


@pytest.mark.parametrize("scenario", list(EXCLUDED_ROUNDS))
def test_hostile_member_is_excluded_before_the_reduction(swarm, scenario):
    r, reason = EXCLUDED_ROUNDS[scenario]
    hostile = swarm.peer_ids[H]
    seen = []
    for rep in _check_honest_result(swarm, r):
        # (normally one attempt; a matchmaking race can add one, and H is left out of every attempt)
        for attempt in rep["attempts"]:
            if hostile in attempt["members"]:
                assert attempt["excluded"][hostile].startswith(reason.value + ":"), attempt["excluded"]
                assert hostile not in attempt["weights"]
                seen.append(attempt["excluded"][hostile])
        print(f"\n{scenario}: {rep['seconds']:.2f} s, {len(rep['attempts'])} attempt(s), {seen[-1:]}")
    assert seen, "the hostile peer never met the honest ones"
    assert not swarm.report(r, H)["ok"]


def test_claimed_weight_above_the_ticket_is_ignored(swarm):
    r = CLAIMED_WEIGHT_ROUND
    reports = [swarm.report(r, p) for p in (A, B)]
    assert all(rep["ok"] for rep in reports)
    _same_bytes(swarm, r, (A, B, H))  # the hostile peer's content was honest: it gets the same average
    expected = _weighted([small_grads(r, p) for p in (A, B, H)], SMALL_WEIGHTS)
    assert _max_err(swarm.tensors(r, A, "avg"), expected) <= 1e-6
    for rep in reports:
        assert rep["attempts"][-1]["weight_claims_ignored"] == {swarm.peer_ids[H]: 1e6}
        assert rep["attempts"][-1]["weights"][swarm.peer_ids[H]] == SMALL_WEIGHTS[H]


@pytest.mark.parametrize("scenario", list(CAUGHT_ROUNDS))
def test_invalid_parts_fail_the_attempt_and_the_retry_excludes_the_sender(swarm, scenario):
    r, reason = CAUGHT_ROUNDS[scenario]
    tol = {"fp16": 2e-3, "8bit": 0.2}.get(scenario.rsplit("_", 1)[-1], 1e-6)
    reports = _check_honest_result(swarm, r, tol)
    hostile = swarm.peer_ids[H]
    # the attempt with the hostile sender fails for everyone in it (a peer that hivemind's matchmaking
    # left out of that group — it happens — sees only the retry)
    assert any(not a["ok"] for rep in reports for a in rep["attempts"])
    for rep in reports:
        last = rep["attempts"][-1]
        assert hostile not in last["weights"]
        if hostile in last["members"]:  # it came back for the retry: everyone left it out, before reducing
            assert last["excluded"][hostile].startswith("ACCUSED:"), last["excluded"]
    caught = [a["accused"].get(hostile) for rep in reports for a in rep["attempts"]]
    with_h = [a for rep in reports for a in rep["attempts"] if hostile in a["members"] and not a["ok"]]
    if not any(caught) and with_h and all(
            (a["first_failed"] or "").endswith(": NOT_IN_GROUP") and not a["first_failed"].startswith(hostile)
            for a in with_h):
        # hivemind's matchmaking counted an honest peer into a group it never joined (it answered
        # BAD_GROUP_ID): that attempt ended before H's values reached anyone, and H led no retry
        pytest.skip(f"matchmaking race: the attempt with H ended on {with_h[0]['first_failed']} before H sent anything")
    assert any(c is not None and c.startswith(reason.value + ":") for c in caught), caught
    print(f"\n{scenario}: {max(rep['seconds'] for rep in reports):.2f} s; caught: {caught}")


def test_a_member_silent_after_its_reveal_is_judged_without_its_sketch_and_not_reported(swarm):
    """H reveals its nonce, then sends no sketch: each honest member judges every share without it (a
    wrong average no sketch of H's could hide would still be caught: tests/test_share_audit.py), so
    H's silence is a failure, not an accusation, and nobody reports it (a node killed mid-audit is
    not banned). The attempt still fails (nothing unaudited is applied); the others name H as the
    member that broke it, and the retry leaves H out and averages without it."""
    r, hostile = WITHHOLD_ROUND, swarm.peer_ids[H]
    reports = _check_honest_result(swarm, r, 1e-6)
    with_h = [a for rep in reports for a in rep["attempts"] if hostile in a["weights"]]
    assert with_h, "the hostile peer never reduced with the honest ones"
    for attempt in with_h:  # (a member hivemind's matchmaking left out of that group sees only the retry)
        assert not attempt["ok"] and not attempt["accused"], attempt
        assert attempt["failed"][hostile].startswith("SKETCH_WITHHELD:"), attempt["failed"]
        assert attempt["first_failed"].startswith(f"{hostile}: SKETCH_WITHHELD"), attempt["first_failed"]
    for rep in reports:
        assert hostile not in rep["reportable"], rep["reportable"]
        last = rep["attempts"][-1]
        assert last["ok"] and hostile not in last["weights"]
        if hostile in last["members"]:  # it came back for the retry: both named it as the attempt's breaker
            assert last["excluded"][hostile].startswith("BROKE_FIRST:"), last["excluded"]


def test_a_member_signing_two_sketches_frames_nobody(swarm):
    """The equivocator shows the reducer it frames its honest sketch and everyone else a framing one.
    Each honest member reads every reducer's whole view before judging, so a member blames a reducer
    only on entries that reducer held too: one that reads both entries accuses the signer
    (BAD_AUDIT_ENTRY); a reducer that took the framing entry first (relayed before the signer's own
    push arrived) names the signer in the same attempt (SKETCH_MISMATCH, or BAD_AUDIT_ENTRY once the
    other entry arrives), so a groupmate's WRONG_AVERAGE stands against its word and is not reported.
    Who sees what first is a race (a member done before the second entry reaches anyone applies an
    average it checked), so: at least one honest member catches the signer, no honest member reports
    the other, and whatever completed is the ticket-weighted mean of its members' honest gradients."""
    r, hostile = EQUIVOCATE_ROUND, swarm.peer_ids[H]
    reports = {p: swarm.report(r, p) for p in (A, B)}
    caught = []
    for p, other in ((A, B), (B, A)):
        rep = reports[p]
        for i, attempt in enumerate(rep["attempts"]):
            blamed = attempt["accused"].get(swarm.peer_ids[other])
            if blamed is not None:  # only as the dispute: the blamed reducer named the signer then
                assert blamed.startswith("WRONG_AVERAGE:"), blamed
                named = reports[other]["attempts"][i]["accused"].get(hostile, "")
                assert named.startswith(("BAD_AUDIT_ENTRY:", "SKETCH_MISMATCH:")), reports[other]["attempts"][i]
        assert swarm.peer_ids[other] not in rep["reportable"], rep["reportable"]
        reason = rep["reportable"].get(hostile, "")
        caught += [reason] if reason.startswith(("BAD_AUDIT_ENTRY:", "SKETCH_MISMATCH:")) else []
        if rep["ok"]:
            weights = rep["attempts"][-1]["weights"]
            members = [q for q in (A, B, H) if swarm.peer_ids[q] in weights]
            expected = _weighted([small_grads(r, q) for q in members], [weights[swarm.peer_ids[q]] for q in members])
            assert _max_err(swarm.tensors(r, p, "avg"), expected) <= 1e-6
    assert caught, "no honest member caught the equivocator"
    print(f"\nequivocation: caught as {caught}; ok: {[reports[p]['ok'] for p in (A, B)]}")
    print(_who_saw_what(swarm, [reports[A], reports[B], swarm.report(r, H)]))


def test_members_shown_different_groups_blame_nobody_and_retry(swarm):
    """H holds the group in another slot order in its first attempt, as a member would that a hostile
    leader showed a different group under the same id. Reducers refuse streams from a groupmate whose
    view of the group differs (GROUP_VIEW_MISMATCH, a failure): nobody is accused — else parts cut by
    one plan, checked by another, would get honest members accused. A view mismatch is nobody's
    finding. The refusal reaches the sender as BAD_GROUP_ID (node/swarm/refusals.py delivers it),
    which names nobody the first time, so usually all three retry with one view and average; when a
    member saw another failure first (an abort the mismatch caused), the member the other two saw
    fail first is left out of the retry (BROKE_FIRST, not reported) and the other two average, holding
    the same bytes."""
    r = REORDERED_VIEW_ROUND
    reports = {p: swarm.report(r, p) for p in (A, B, H)}
    ok = [p for p, rep in reports.items() if rep["ok"]]
    assert len(ok) >= 2, json.dumps(reports, indent=1)[:6000]
    for p in set((A, B, H)) - set(ok):
        # left out, or out of attempts after the retry met an honest race: a member the leader had
        # counted in was not running the group (it answered BAD_GROUP_ID: NOT_IN_GROUP); seen once
        # in a full-suite run, the other two then averaging in a third attempt
        last = reports[p]["attempts"][-1]
        raced = any(v.startswith(Reason.NOT_IN_GROUP.value + ":") for v in last["failed"].values())
        assert Reason.BROKE_FIRST.value in reports[p]["error"] or raced, reports[p]["error"]
    _same_bytes(swarm, r, ok)
    weights = reports[ok[0]]["attempts"][-1]["weights"]
    assert set(weights) == {swarm.peer_ids[p] for p in ok}, weights
    assert _max_err(swarm.tensors(r, ok[0], "avg"),
                    _weighted([small_grads(r, p) for p in ok], [SMALL_WEIGHTS[p] for p in ok])) <= 1e-6
    reports = list(reports.values())
    for rep in reports:
        assert all(not a["accused"] for a in rep["attempts"]), rep["attempts"]
        assert not rep["reportable"], rep["reportable"]
    # whoever's stream meets the other view first records the mismatch (the others then see the
    # refusal or the abort it causes)
    mismatches = [reason for rep in reports for a in rep["attempts"] for reason in a["failed"].values()
                  if reason.startswith("GROUP_VIEW_MISMATCH:")]
    assert mismatches, [a["failed"] for rep in reports for a in rep["attempts"]]


def test_one_members_accusation_is_not_relayed_to_the_coordinator(swarm):
    """H breaks its first attempt (an accusation there would not be believed), then its gather accuses
    A of something A never did, saying it caught A first. Every member excludes A (verdicts are the
    same everywhere, and a real accusation must keep its target out of the retry), and H, whom A and
    B saw break the attempt, is not left out for it: its catch explains the abort, and a round of
    three (two needed) cannot spare both A and H — in a larger round H would go with A
    (UNCORROBORATED). Only the accuser reports A: were B to report everyone it excluded for another's
    accusation, one hostile member's word would make the majority a ban needs. B then averages with
    H, unless H, back first, led a group of itself and A before B returned (then nobody does)."""
    r = FALSE_ACCUSATION_ROUND
    a, b, h = (swarm.report(r, p) for p in (A, B, H))
    assert not a["ok"] and "ACCUSED" in a["error"], _who_saw_what(swarm, (a, b, h))
    # H, or A passing H's abort on; on a loaded machine B may come only after H broke its first attempt
    # with A alone (seen once in a full run), and then average with H at once
    assert b["attempts"][0]["first_failed"] or (b["ok"] and len(b["attempts"]) == 1), \
        _who_saw_what(swarm, (a, b, h))
    assert swarm.peer_ids[A] not in b["reportable"], b["reportable"]
    # B averages with H, unless H (back first: it waits no reducer timeout after the attempt it broke)
    # led a group of itself and A before B came back, as a hostile leader may
    assert any(att["excluded"].get(swarm.peer_ids[A], "").startswith("ACCUSED:") for rep in (b, h)
               for att in rep["attempts"][1:]), _who_saw_what(swarm, (a, b, h))
    if b["ok"]:
        assert set(b["attempts"][-1]["weights"]) == {swarm.peer_ids[B], swarm.peer_ids[H]}
        assert _max_err(swarm.tensors(r, B, "avg"), _weighted([small_grads(r, B), small_grads(r, H)],
                                                               SMALL_WEIGHTS[1:])) <= 1e-6


def test_a_member_accusing_most_of_its_group_is_left_out_instead(swarm):
    """H breaks its first attempt, then its gather accuses both other members. Believed, it would
    leave every honest member out of every round; with an honest majority no member catches most of
    its group at once, so H is left out instead (ACCUSES_MOST), A and B average, and each reports H:
    the signed accusation list is evidence each of them checked itself."""
    r, hostile = ACCUSE_ALL_ROUND, swarm.peer_ids[H]
    reports = [swarm.report(r, p) for p in (A, B)]
    for rep in reports:
        assert rep["ok"], _who_saw_what(swarm, [*reports, swarm.report(r, H)])
        assert rep["attempts"][-1]["excluded"][hostile].startswith("ACCUSES_MOST:"), rep["attempts"][-1]
        assert rep["reportable"][hostile].startswith("ACCUSES_MOST:"), rep["reportable"]
    _same_bytes(swarm, r, (A, B))
    assert _max_err(swarm.tensors(r, A, "avg"), _honest_mean(r)) <= 1e-6


def test_sender_lying_about_its_sketch_is_named_by_the_reducer_and_the_reducer_is_not_reported(swarm):
    """A sender that lies in the share audit about what it sent makes its reducer's average look wrong
    to everyone but that reducer, which holds the parts and names the liar (SKETCH_MISMATCH). The
    other honest peer can only blame the reducer (WRONG_AVERAGE), and reports it to nobody, as the
    reducer's next signed gather names the liar. Both are left out of the retry; seeing the reducer
    name the liar, the other peer drops its accusation from its later gathers. Which honest reducer
    the liar meets is a race, so: at least one names it, one of them was blamed by the other, and
    each honest member reports only the liar, if anyone."""
    r, hostile = SKETCH_LIE_ROUND, swarm.peer_ids[H]
    reports = {p: swarm.report(r, p) for p in (A, B)}
    caught = {p: [a["accused"].get(hostile, "") for a in reports[p]["attempts"]] for p in (A, B)}
    framed = [p for p in (A, B) if any(c.startswith("SKETCH_MISMATCH:") for c in caught[p])]
    assert framed, reports
    blamed = [a["accused"].get(swarm.peer_ids[f], "") for f in framed for a in reports[B if f == A else A]["attempts"]]
    assert any(b.startswith("WRONG_AVERAGE:") for b in blamed), reports
    for f in framed:
        assert reports[f]["reportable"][hostile].startswith("SKETCH_MISMATCH:")
    for p, o in ((A, B), (B, A)):
        assert swarm.peer_ids[o] not in reports[p]["reportable"], reports[p]["reportable"]
    for p in (A, B):  # whatever completed holds honest values only (the liar's parts were honest)
        if reports[p]["ok"]:
            _same_bytes(swarm, r, [p])
    print(f"\nsketch lie: reducers {framed} named the liar")


def test_killed_member_fails_the_round_cleanly_within_the_timeout(swarm):
    """The first honest peer to notice the dead member aborts; the abort reaches the other one as a
    failed reducer (CANCELLED), so it may name that peer instead of the dead one."""
    r = KILL_ROUND
    assert swarm.kill_time is not None, "the hostile peer never stalled"
    noticed = []
    for p in (A, B):
        rep = swarm.report(r, p)
        assert not rep["ok"] and rep["error"] and len(rep["attempts"]) == 1 and "traceback" not in rep
        attempt = rep["attempts"][0]
        assert attempt["failed"] and not attempt["accused"], attempt
        noticed.append(swarm.peer_ids[H] in attempt["failed"])
        assert rep["seconds"] < TIMING["allreduce_timeout"], rep["seconds"]
        print(f"\nkilled member: peer {p} failed in {rep['seconds']:.2f} s: {attempt['failed']}")
    assert any(noticed)


def test_a_peer_listed_as_gone_is_not_waited_for(swarm):
    r = GONE_ROUND
    for p in (A, B):
        rep = swarm.report(r, p)
        assert rep["ok"] and len(rep["attempts"]) == 1, rep
        assert rep["seconds"] < TIMING["min_matchmaking_time"] + 1.0 < 8.0, rep["seconds"]  # not the straggler wait
    _same_bytes(swarm, r, [A, B])


def test_a_retry_counts_its_group_full_without_the_peers_that_left():
    keys = frozenset(bytes([i]) * 32 for i in range(5))
    one, two, three = (frozenset(sorted(keys)[:n]) for n in (1, 2, 3))
    assert group_target(keys, frozenset(), 2) is None and group_target(None, one, 2) is None
    assert group_target(keys, one, 2) == 4
    assert group_target(keys, two, 2) == 3
    assert group_target(keys, three, 2) == 3  # never below a strict majority of the round's peers
    assert group_target(keys, one | {b"x" * 32}, 2) == 4  # a key outside the round changes nothing
    assert group_target(frozenset(sorted(keys)[:3]), one, 3) == 3  # nor below the averager's minimum
    assert left_peers(keys, lambda: [sorted(keys)[0], b"x" * 32]) == one
    assert left_peers(None, lambda: keys) == frozenset() and left_peers(keys, None) == frozenset()

    def unreachable():
        raise ConnectionError("the coordinator is down")

    assert left_peers(keys, unreachable) == frozenset()  # the attempt waits as it would


def test_a_member_that_stalls_every_attempt_is_left_out_of_the_retry(swarm):
    """H holds a valid ticket, joins every attempt, sends its first part and then nothing, its
    connection open. A stall used to be only a failure (a crash looks the same), so H could fail
    every attempt of the round for the price of one ticket. Now a member whose wait on H times out
    while the attempt is live saw H stall first-hand and names it (STALLED) in its next gather: the
    retry excludes H and A and B average without it. Nobody saw an honest member stall (the abort
    reaches them as ends and CANCELLED, not silence), and the stall is not reported to the
    coordinator: a dropped link looks the same."""
    r, hostile = STALL_ROUND, swarm.peer_ids[H]
    a, b, h = _left_out_of_the_retry_as_stalled(swarm, r)
    assert len(h["attempts"]) == 2 and SELF_EXCLUDED in h["error"], h
    assert not a["left_out_as_stalled"]  # join then tells its operator what to check
    for rep in (a, b):  # H joined both: the second excluded it
        first = rep["attempts"][0]
        assert not first["ok"] and len(first["weights"]) == 3, first
    assert any(hostile in att["stalled"] for rep in (a, b) for att in rep["attempts"][:-1])


def _left_out_of_the_retry_as_stalled(swarm: Swarm, r: int) -> tuple[dict, dict, dict]:
    """Round ``r``'s reports of A, B and H, checked: A and B averaged in a retry that left H out as
    STALLED (H knows why) — the second attempt, or the third when the two honest members missed each
    other in the second (on a loaded machine their matchmaking can miss); nobody else was named
    stalled and nobody reported H; the result is the honest-only mean, the same bytes on both."""
    hostile = swarm.peer_ids[H]
    a, b, h = (swarm.report(r, p) for p in (A, B, H))
    assert a["ok"] and b["ok"], json.dumps([a, b], indent=1)[:6000]
    assert not h["ok"] and h["left_out_as_stalled"], h
    honest = {swarm.peer_ids[A], swarm.peer_ids[B]}
    for rep in (a, b):
        assert 2 <= len(rep["attempts"]) <= TIMING["max_attempts"], json.dumps(rep["attempts"], indent=1)[:6000]
        last = rep["attempts"][-1]
        assert set(last["weights"]) == honest, last
        assert last["excluded"].get(hostile, "").startswith("ACCUSED") and "STALLED" in last["excluded"][hostile]
        assert all(set(att["stalled"]) <= {hostile} for att in rep["attempts"]), rep["attempts"]
        assert hostile not in rep["reportable"], rep["reportable"]
    _same_bytes(swarm, r, (A, B))
    assert _max_err(swarm.tensors(r, A, "avg"), _honest_mean(r)) <= 1e-6
    return a, b, h


def _ran_by(rep: dict, hostile: str) -> list[dict]:
    """The report's attempts but those whose group ``hostile`` never ran: an honest matchmaking race
    (a leader counted H in while H's search went to another leader's group) shows as H answering
    BAD_GROUP_ID (NOT_IN_GROUP) before its behaviour had a chance. Seen once in the drip rounds."""
    return [att for att in rep["attempts"] if not att["failed"].get(hostile, "").startswith("NOT_IN_GROUP")]


def test_a_member_that_drips_its_parts_is_left_out_of_the_retry(swarm):
    """H sends each part 0.8 sender timeouts after the last: nobody's wait on it times out, but a
    reducer's share then needs about 11 × 2.4 s, past the all-reduce timeout (9 s). At that deadline
    a reducer whose share still waits for H's part while the other sender's is in names H (STALLED)
    before it aborts; if H's own deadline comes first and it hangs up, the reducers name it for the
    time it held their share up (over two sender timeouts). The retry leaves H out and A and B
    average. Without the naming, every attempt would end at the deadline, unnamed."""
    r, hostile = DRIP_ROUND, swarm.peer_ids[H]
    a, b, _ = _left_out_of_the_retry_as_stalled(swarm, r)
    # named at the deadline, or (when H's own deadline came first and it hung up) for the time it held
    # the share up before it did
    named = [att["stalled"][hostile] for rep in (a, b) for att in _ran_by(rep, hostile)[:1]
             if hostile in att["stalled"]]
    assert named and all("all-reduce deadline" in n or "holding our share up" in n for n in named), named


def test_a_reducer_that_drips_its_averages_is_left_out_of_the_retry(swarm):
    """H reduces honestly but returns each average 0.8 reducer timeouts after the last: no wait on it
    times out, but A's and B's results from it need about 11 x 4.8 s, past the all-reduce timeout
    (9 s). At that deadline a member whose own share and the other reducer's are in, though H's
    is not, names H (STALLED); if H's deadline comes first and it hangs up, they name it for the time
    it held their results up (over two sender timeouts). The retry leaves H out and A and B average.
    Without the naming, every attempt would end at the deadline, unnamed."""
    r, hostile = DRIP_AVERAGE_ROUND, swarm.peer_ids[H]
    a, b, _ = _left_out_of_the_retry_as_stalled(swarm, r)
    named = [att["stalled"][hostile] for rep in (a, b) for att in _ran_by(rep, hostile)[:1]
             if hostile in att["stalled"]]
    assert named and all(n.startswith("REDUCER_FAILED") for n in named), named
    assert all("all-reduce deadline" in n or "holding our results up" in n for n in named), named


def test_a_member_that_hangs_up_every_attempt_is_left_out_of_the_retry(swarm):
    """H holds a valid ticket and aborts as each attempt's all-reduce begins: CANCELLED to everyone,
    which is also how an honest member passes on a groupmate's abort, so nobody could name it and
    it failed every attempt of every round (3 attempts in 0.23 s, before this). Now each member's
    next gather names whom it saw fail first; both A and B saw H, H names no finding (it blames A),
    so the retry leaves H out (BROKE_FIRST) and A and B average. A, whom H blames, stays: the round
    (2 of 3 needed) cannot spare both. Nobody reports H: a member whose link dropped looks the same."""
    r, hostile = HANG_UP_ROUND, swarm.peer_ids[H]
    a, b, h = (swarm.report(r, p) for p in (A, B, H))
    if not a["ok"] and _relay_came_first(swarm, a, b, hostile):
        pytest.skip("A's abort passing H's hang-up on reached B before the hang-up itself (this run's load "
                    "outlasted the abort grace): with H blaming A, A was left out, as the design allows\n"
                    + _who_saw_what(swarm, (a, b, h)))
    assert a["ok"] and b["ok"], _who_saw_what(swarm, (a, b, h))
    assert not h["ok"] and SELF_EXCLUDED in h["error"] and Reason.BROKE_FIRST.value in h["error"], h["error"]
    for rep in _hang_up_left_out(swarm, a, b, h):
        first = rep["attempts"][0]
        assert not first["accused"] and not first["stalled"], first
        print(f"\nhang-up: averaged in {rep['seconds']:.2f} s after {len(rep['attempts'])} attempts; first "
              f"attempt {first['seconds']:.2f} s, saw {first['first_failed']} first")
    _same_bytes(swarm, r, (A, B))
    assert _max_err(swarm.tensors(r, A, "avg"), _honest_mean(r)) <= 1e-6


def test_a_member_that_broke_the_last_round_sits_out_the_next_from_its_first_attempt(swarm):
    """After the not-in-group round, A and B remember H's BROKE_FIRST verdict (H blamed nobody) and list
    it in their gathers: in the next round H (honest this time) sits out from the first attempt
    (SITS_OUT, both others list it) and A and B average at once, without the failed attempts the
    refusals cost. The hang-up round before it struck nobody: H blamed A, who stayed (a round of three
    cannot spare both), and that case mirrors a hang-up on A alone."""
    hostile = swarm.peer_ids[H]
    for rep in (swarm.report(HANG_UP_ROUND, p) for p in (A, B)):
        assert not any(att["struck"] for att in rep["attempts"]), rep["attempts"]
    before = [swarm.report(NOT_IN_GROUP_ROUND, p) for p in (A, B)]
    if not all(att["struck"] == [hostile] for rep in before for att in rep["attempts"][-1:]):
        pytest.skip("the not-in-group round left H out otherwise (see its test): " + _who_saw_what(swarm, (*before,)))
    r = SIT_OUT_ROUND
    a, b, h = (swarm.report(r, p) for p in (A, B, H))
    assert a["ok"] and b["ok"], _who_saw_what(swarm, (a, b, h))
    assert not h["ok"] and h["sat_out"] and SELF_EXCLUDED in h["error"], h["error"]
    for rep in (a, b):
        assert len(rep["attempts"]) == 1, _who_saw_what(swarm, (a, b, h))
        first = rep["attempts"][0]
        assert first["excluded"][hostile].startswith(Reason.SITS_OUT.value), first["excluded"]
        assert set(first["weights"]) == {swarm.peer_ids[A], swarm.peer_ids[B]}, first["weights"]
        assert hostile not in rep["reportable"], rep["reportable"]  # a dropped link looks the same
        print(f"\nsat out: A and B averaged in {rep['seconds']:.2f} s (the not-in-group round: "
              f"{before[0]['seconds']:.2f} s, {len(before[0]['attempts'])} attempts)")
    _same_bytes(swarm, r, (A, B))
    assert _max_err(swarm.tensors(r, A, "avg"), _honest_mean(r)) <= 1e-6


def test_a_member_that_drips_and_hangs_up_every_attempt_is_left_out_of_the_retry(swarm):
    """H sends two parts 0.8 sender timeouts apart, then hangs up: too soon to be named for holding a
    share up (two sender timeouts), and an end of stream is what any member's abort looks like, so
    it used to fail every attempt unnamed. A and B saw it fail first: the retry leaves it out."""
    r, hostile = DRIP_HANG_UP_ROUND, swarm.peer_ids[H]
    a, b, h = (swarm.report(r, p) for p in (A, B, H))
    assert a["ok"] and b["ok"], _who_saw_what(swarm, (a, b, h))
    assert Reason.BROKE_FIRST.value in h["error"], h["error"]
    for rep in _hang_up_left_out(swarm, a, b, h):
        first = rep["attempts"][0]
        assert first["seconds"] > 2 * TIMING["sender_timeout"] * 0.6 and not first["stalled"], first
    _same_bytes(swarm, r, (A, B))
    assert _max_err(swarm.tensors(r, A, "avg"), _honest_mean(r)) <= 1e-6


def test_a_member_that_answers_not_in_group_every_attempt_is_left_out_of_the_third(swarm):
    """H holds a valid ticket and answers BAD_GROUP_ID to every stream, every attempt, sending nothing:
    what an honest member does once the leader counted it in after its own matchmaking gave up on
    the group. Such a member runs the retry, so one refusal names nobody; but both A and B saw H
    refuse first in two attempts in a row (NOT_IN_GROUP, then NOT_IN_GROUP_AGAIN), so the third
    attempt leaves H out (BROKE_FIRST) and A and B average. Before, every attempt failed unnamed."""
    r, hostile = NOT_IN_GROUP_ROUND, swarm.peer_ids[H]
    a, b, h = (swarm.report(r, p) for p in (A, B, H))
    seen = _who_saw_what(swarm, (a, b, h))
    assert a["ok"] and b["ok"], seen
    assert not h["ok"] and Reason.BROKE_FIRST.value in h["error"], h["error"]
    refusals = (f"{hostile}: NOT_IN_GROUP", f"{hostile}: REDUCER_FAILED")
    # refusals are delivered (node/swarm/refusals.py); one lost all the same reads as an end of H's
    # stream (REDUCER_FAILED), which names H at once: H is then left out one attempt sooner
    lost = [att for rep in (a, b) for att in rep["attempts"][:-1] if att["first_failed"] == refusals[1]]
    for rep in (a, b):
        *failed, last = rep["attempts"]
        assert all(att["first_failed"] in refusals for att in failed), seen
        assert not any(att["accused"] for att in failed), seen
        if not lost:
            assert len(failed) == 2 and hostile in failed[1]["weights"], seen  # the first refusal named nobody
        assert 1 <= len(failed) <= 2, seen
        assert set(last["weights"]) == {swarm.peer_ids[A], swarm.peer_ids[B]}, last
        assert last["excluded"][hostile].startswith("BROKE_FIRST:"), last["excluded"]
        assert hostile not in rep["reportable"], rep["reportable"]
        seconds = ", ".join(f"{x['seconds']:.2f}" for x in rep["attempts"])
        print(f"\nnot in group: averaged in {rep['seconds']:.2f} s; attempts {seconds} s")
    _same_bytes(swarm, r, (A, B))
    assert _max_err(swarm.tensors(r, A, "avg"), _honest_mean(r)) <= 1e-6


def _hang_up_left_out(swarm: Swarm, a: dict, b: dict, h: dict) -> tuple[dict, dict]:
    """A and B averaged without H, which hung up in every attempt, and no attempt left either of them
    out. The member whose abort passes H's hang-up on can reach the other before the hang-up does (a
    relay): then one names the other first, nobody is named by both, and the next attempt repeats the
    hang-up; but whoever relayed saw H itself, so one of A and B always names H first."""
    hostile, honest = swarm.peer_ids[H], {swarm.peer_ids[A], swarm.peer_ids[B]}
    seen = _who_saw_what(swarm, (a, b, h))
    assert any(rep["attempts"][0]["first_failed"].startswith(hostile + ": ") for rep in (a, b)), seen
    for rep in (a, b):
        first, *between, last = rep["attempts"]
        other = (honest - {rep["peer_id"]}).pop()
        for att in (first, *between):
            assert not att["ok"] and not honest & set(att["excluded"]), (att, seen)
            if att is not first and set(att["failed"].values()) <= {"NOT_IN_GROUP: answered BAD_GROUP_ID"}:
                # the matchmaking race that one BAD_GROUP_ID names nobody for: it too left H out
                assert att["excluded"][hostile].startswith("BROKE_FIRST:"), (att, seen)
            else:  # the hang-up, seen first from H itself or relayed by the other honest member
                assert att["first_failed"].startswith((hostile + ": ", other + ": ")), (att, seen)
        assert set(last["weights"]) == honest, (last, seen)
        assert hostile not in last["members"] or last["excluded"][hostile].startswith("BROKE_FIRST:"), (last, seen)
        assert hostile not in rep["reportable"], rep["reportable"]
    return a, b


def _relay_came_first(swarm: Swarm, a: dict, b: dict, hostile: str) -> bool:
    """A saw H fail first, B saw A fail first, and the retry left A out as BROKE_FIRST: timing (a relay
    outrunning the hang-up it passes on), not a wrong verdict."""
    first_a, first_b = a["attempts"][0]["first_failed"], b["attempts"][0]["first_failed"]
    left_out = len(a["attempts"]) > 1 and a["attempts"][1]["excluded"].get(swarm.peer_ids[A], "")
    return first_a.startswith(hostile + ": ") and first_b.startswith(swarm.peer_ids[A] + ": ") and \
        bool(left_out) and left_out.startswith("BROKE_FIRST:")


def _who_saw_what(swarm: Swarm, reports) -> str:
    """Each peer's attempts: whom it saw fail first, what failed, what the verdicts excluded."""
    names = {pid: "ABH"[i] for i, pid in enumerate(swarm.peer_ids)}
    short = lambda d: {names.get(p, p): v[:60] for p, v in d.items()}  # noqa: E731
    return "\n".join(f"{names[rep['peer_id']]} attempt {att['attempt']}: first {att['first_failed'][:70]!r}, "
                     f"failed {short(att['failed'])}, excluded {short(att['excluded'])}"
                     for rep in reports for att in rep["attempts"])


def test_every_round_is_accounted_for(swarm):
    """No honest round took longer than its timeouts allow, and the honest peers never raised."""
    limit = TIMING["max_attempts"] * (TIMING["matchmaking_timeout"] + TIMING["allreduce_timeout"])
    for rnd in PLAN:
        for p in rnd["participants"]:
            if rnd["round"] == KILL_ROUND and p == H:
                continue
            rep = swarm.report(rnd["round"], p)
            # no step of anyone's, the hostile peer's included, outlived its timeouts
            assert not any((a["error"] or "").startswith(STEP_STUCK) for a in rep["attempts"]), (rnd, p, rep)
            if p == H and rnd["behaviour"]:
                continue
            assert "traceback" not in rep, rep
            assert rep["seconds"] < limit
    assert math.isfinite(limit)


def test_a_step_stuck_past_its_timeouts_is_cancelled_and_reported(monkeypatch):
    """The node never waits on a step forever: one unfinished past its limit (its matchmaking,
    all-reduce and audit timeouts and a margin) is cancelled and the attempt reported as failed;
    one that finishes in time gives its result."""
    from hivemind.averaging.control import AveragingStage, StepControl
    from hivemind.utils.mpfuture import MPFuture

    from grpo_swarm.node.swarm.round_report import AttemptReport

    MPFuture()  # the process's first MPFuture must be a plain one (hivemind sets its backend up on the class)

    def step():
        control = StepControl(scheduled_time=0.0, deadline=1e12, allow_retries=True, weight=1.0, data_for_gather=b"")
        control.attach(MPFuture(), MPFuture())
        return control

    stuck = step()
    started = time.monotonic()
    report = VerifiedAverager._step_result(stuck, None, 0.3)
    assert isinstance(report, AttemptReport) and report.error.startswith(STEP_STUCK), report
    assert stuck.cancelled() and 0.3 <= time.monotonic() - started < 2.0
    done = step()
    done.set_result(AttemptReport(ok=True))
    assert VerifiedAverager._step_result(done, None, 5.0).ok
    asked = []
    monkeypatch.setattr(averaging, "ROUND_OVER_POLL_S", 0.05)
    polled = step()  # with round_over: asked while looking for a group, still bounded by the limit
    polled.stage = AveragingStage.LOOKING_FOR_GROUP
    report = VerifiedAverager._step_result(polled, lambda: asked.append(1) or False, 0.2)
    assert report.error.startswith(STEP_STUCK) and asked
    # the averager process gone: nothing will ever answer, so the attempt ends within a liveness poll
    alive = [True]
    orphan = step()
    threading.Timer(0.5, alive.clear).start()
    started = time.monotonic()
    report = VerifiedAverager._step_result(orphan, None, 60.0, alive=lambda: bool(alive))
    assert report.error.startswith(AVERAGER_DIED), report
    assert 0.5 <= time.monotonic() - started < 0.5 + LIVENESS_POLL_S + 1.0
    done = step()
    done.set_result(AttemptReport(ok=True))
    assert VerifiedAverager._step_result(done, None, 5.0, alive=lambda: False).ok  # a finished step still counts


def test_a_stuck_step_logs_where_each_task_waits(caplog):
    """What a stuck step leaves for the user's report: each distinct chain of awaits among the tasks of
    the averager's loop, with how many tasks wait that way (here: one holds a lock, three wait for it)."""
    import asyncio

    averager = VerifiedAverager.__new__(VerifiedAverager)  # _log_tasks reads nothing of the averager

    async def holds_the_lock(lock: asyncio.Lock, started: asyncio.Event):
        async with lock:
            started.set()
            await asyncio.sleep(3600)

    async def waits_for_the_lock(lock: asyncio.Lock):
        async with lock:
            pass

    async def main():
        lock, started = asyncio.Lock(), asyncio.Event()
        tasks = [asyncio.create_task(holds_the_lock(lock, started))]
        await started.wait()
        tasks += [asyncio.create_task(waits_for_the_lock(lock)) for _ in range(3)]
        await asyncio.sleep(0.01)
        await averager._log_tasks("a step is stuck")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    with caplog.at_level("WARNING", logger="grpo_swarm.node.swarm.averaging"):
        asyncio.run(main())
    text = caplog.text
    assert "a step is stuck; the averager's tasks:" in text, text
    holder = [line for line in text.splitlines() if "holds_the_lock" in line]
    waiters = [line for line in text.splitlines() if "waits_for_the_lock" in line]
    assert len(holder) == 1 and holder[0].startswith("  1 x ") and "sleep" in holder[0], text
    # the three waiters wait the same way: one line, counted
    assert len(waiters) == 1 and waiters[0].startswith("  3 x ") and "acquire" in waiters[0], text


def test_a_retry_after_timeouts_waits_for_the_members_still_timing_out():
    """After an attempt that failed on timeouts / cancels with nobody accused, a partial group waits
    a reducer timeout longer (its other members learn of the failure up to that much later than we
    did: seen as an honest member left out of the round on a slow machine); after an accusation, or
    with no group at all, the usual wait; never past the attempt's timeout."""
    from types import SimpleNamespace

    from grpo_swarm.node.swarm.round_report import AttemptReport

    me = SimpleNamespace(matchmaking_kwargs={"min_matchmaking_time": 2.0}, allreduce_kwargs={"reducer_timeout": 6.0})

    def wait(attempts, timeout=15.0, **kw):
        return VerifiedAverager._matchmaking_wait(me, attempts, timeout, **kw)

    timed_out = AttemptReport(members=["a", "b", "c"], failed={"c": "REDUCER_FAILED: timed out"})
    accused = AttemptReport(members=["a", "b", "c"], failed={"b": "x"}, accused={"c": "NAN_OR_INF: part 0"})
    assert wait([]) == 2.0
    assert wait([timed_out]) == 8.0
    assert wait([accused]) == 2.0
    assert wait([AttemptReport(error="could not find a group")]) == 2.0
    assert wait([timed_out], timeout=5.0) == 4.0
    # a straggler wait longer than min_matchmaking_time replaces it, in every attempt, within the same cap
    assert wait([], straggler_wait=7.0) == 7.0
    assert wait([], straggler_wait=0.5) == 2.0
    assert wait([timed_out], timeout=30.0, straggler_wait=7.0) == 13.0
    assert wait([], timeout=5.0, straggler_wait=7.0) == 4.0


def test_a_forked_averager_can_sketch_in_two_threads_at_once():
    # the averager process is forked from a caller that set torch's threads; its audit then runs
    # parallel ops in two fresh threads. Without rebuilding the pool first, about one fork in seven
    # failed with "Invalid thread pool!" (an AUDIT_FAILED round).
    script = """
import os, sys, threading, torch
from grpo_swarm.node.swarm.averaging import rebuild_thread_pool_after_fork
torch.set_num_threads(1)
x, half = torch.randn(1 << 20), torch.randn(1 << 20).half()
failed = 0
for _ in range(40):
    pid = os.fork()
    if pid == 0:
        rebuild_thread_pool_after_fork()
        errors = []
        def work():
            try:
                torch.empty(1 << 20).copy_(half)
                torch.index_select(x.view(1024, 1024), 0, torch.arange(0, 1024, 2))
            except RuntimeError as e:
                errors.append(e)
        threads = [threading.Thread(target=work) for _ in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        os._exit(1 if errors else 0)
    failed += os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0
print(failed)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "0", proc.stdout + proc.stderr[-2000:]


def test_an_averager_and_dht_whose_daemon_died_first_stop_at_once_without_a_traceback(tmp_path):
    """A Ctrl-C in the terminal reaches p2pd too, which often exits before the averager and DHT
    processes remove their handlers from it: hivemind's averager then printed a FileNotFoundError
    traceback, and its DHT process (which ignores SIGINT) waited on the dead daemon for an answer
    until its 3 s grace period ran out and it was terminated, with a warning at every Ctrl-C; a
    round's dial of the listed peers caught by it raised in the DHT process, and hivemind logged that
    with a traceback. (In a process of its own: what the averager process prints under pytest's
    capture is lost.)"""
    script = f"""
import signal, sys, time, psutil, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from grpo_swarm.node.swarm.averaging import VerifiedAverager
from grpo_swarm.node.swarm.child_calls import start_child
from grpo_swarm.node.swarm.dht import connect_peers, connected_peers, start_dht
from grpo_swarm.protocol.identity import Identity
from swarm_world import RUN_ID, ticket_type
ident = Identity.generate()
dht = start_dht(ident, identity_path={str(tmp_path / "k")!r}, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
averager = VerifiedAverager([torch.zeros(4)], dht=dht, prefix="unit", identity=ident, run_id=RUN_ID,
                            coordinator_key=Identity.generate().public_key_bytes, weight_mode="sequences",
                            norm_bound=10.0, ticket_type=ticket_type(), start=False)
start_child(averager, limit=60.0, what="averager")
daemons = [p for p in psutil.Process(dht.pid).children(recursive=True) if p.name() == "p2pd"]
assert len(daemons) == 1, daemons
daemons[0].send_signal(signal.SIGKILL)  # (a SIGINT ends it too, but in its own time: up to 30 s seen)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:  # (the DHT process reaps it only as it stops: a zombie has exited)
    try:
        if daemons[0].status() == psutil.STATUS_ZOMBIE:
            break
    except psutil.NoSuchProcess:
        break
    time.sleep(0.05)
# a round's dial of the listed peers, as the Ctrl-C lands: nobody reached, no traceback
assert connect_peers(dht, ["/ip4/127.0.0.1/tcp/9/p2p/" + Identity.generate().peer_id_base58]) == []
try:  # the live view's count of DHT peers: said here, not with a traceback there
    connected_peers(dht)
    raise AssertionError("a dead daemon listed its peers")
except RuntimeError as e:
    assert "p2pd did not answer" in str(e), e
averager.shutdown()
started = time.monotonic()
dht.shutdown()
print(averager.exitcode, dht.exitcode, time.monotonic() - started)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    averager_exit, dht_exit, dht_stop_s = proc.stdout.split()
    assert averager_exit == "0" and dht_exit == "0" and float(dht_stop_s) < 1.5, proc.stdout + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "the hard way" not in proc.stderr, proc.stderr[-3000:]

