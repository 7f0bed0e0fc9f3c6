"""`grpo-node join` through failures, in real processes on loopback: `grpo-coordinator serve` and
three node processes (real hivemind DHTs and verified averagers) with the demo's run
(node/configs/swarm-demo.toml), driven by :class:`grpo_swarm.node.swarm.demo.LocalSwarm`.

* a member that vanishes mid-round: it hangs in the middle of a reduction and its whole process
  group is SIGKILLed; the other two finish that round within the averaging timeout, and the
  member, restarted with the same key and work directory, holds the published snapshot and is
  averaged with them again within 60 s of its restart (sitting out at most one round first: the
  survivors remember it breaking the killed round);
* in a pair, a partner killed mid-round and restarted: it resumes the round from its saved batch
  and the pair averages it together; killed again with that batch gone, the survivor stops that
  round as soon as the coordinator lists the partner as gone on to the next round, and the pair
  averages again;
* a hostile member (NaN in every part it sends, tests/swarm_hostile.py through
  tests/swarm_join_node.py): the honest peers' round still succeeds without it, they exclude it
  with the reason, report it to the coordinator, and their two reports ban it;
* a member that hangs up in every attempt and leads the retry into groups of two, failing every
  round of three it holds a ticket in: the coordinator's stall rule finds it within four failed
  rounds and it sits out, the honest pair publishing every round from then on;
* a designated uploader that stalls every upload after its first chunk: the next contributor by
  node id races it after the grace period and publishes each version (the third sends nothing),
  and the swarm keeps one policy.

In both, after every round every honest peer holds the same bytes (weights + optimizer state),
those of the snapshot the coordinator published for that version; `grpo-audit verify` passes on the
hostile run's log (reports and the ban included).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
import tomllib
from grpo_swarm.node.swarm.demo import LocalSwarm, demo_config_text
from grpo_swarm.node.swarm.join import _node_id_of_peer
from grpo_swarm.protocol.client import CoordinatorClient, CoordinatorError
from grpo_swarm.protocol.identity import Identity
from grpo_swarm.protocol.log import read_log

HERE = Path(__file__).resolve().parent
SWARM = tomllib.loads(demo_config_text())["swarm"]


def hostile(behaviour: str, first_round: int, marker: Path | None = None) -> list[str]:
    """The program of a node whose averager does ``behaviour`` from ``first_round`` on."""
    return [sys.executable, str(HERE / "swarm_join_node.py"), behaviour, str(first_round), str(marker or "")]


def logs(swarm: LocalSwarm, lines: int = 30) -> str:
    out = []
    for path in sorted(swarm.logs.glob("*.log")):
        out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)


def wait_until(condition, timeout_s: float, swarm: LocalSwarm, what: str, running: tuple[int, ...] = ()):
    deadline = time.monotonic() + timeout_s
    while not condition():
        for i in running:
            code = swarm.nodes[i].poll()
            assert code is None, f"node {i} exited with {code} while waiting for {what}\n{logs(swarm)}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s\n{logs(swarm)}"
        time.sleep(0.05)


def log_entries(swarm: LocalSwarm) -> list:
    return list(read_log(swarm.out / "coordinator" / "protocol.sqlite"))


def participants(entries) -> dict[int, int]:
    """round -> how many nodes held a ticket in it (the coordinator's round_closed entries)."""
    return {int(e.payload["round"]): len(e.payload["participants"]) for e in entries if e.kind == "round_closed"}


def published(entries) -> dict[int, str]:
    """version -> hex state hash of every snapshot the coordinator published."""
    return {int(e.payload["version"]): e.payload["sha256"] for e in entries if e.kind == "snapshot_published"}


def assert_one_policy(records: dict[int, list[dict]], snapshots: dict[int, str]) -> None:
    """After every round each of these peers holds a published snapshot's exact bytes, and in each
    round they all hold the same one."""
    by_round: dict[int, dict[int, tuple[int, str]]] = {}
    for node, recs in records.items():
        for r in recs:
            assert not r["note"].startswith("error"), (node, r)
            assert r["sha256"] and r["sha256"] == snapshots.get(r["held_version"]), (node, r, snapshots)
            by_round.setdefault(r["round"], {})[node] = (r["held_version"], r["sha256"])
    for rnd, held in by_round.items():
        assert len(set(held.values())) == 1, (rnd, held)


def audit_ok(swarm: LocalSwarm) -> None:
    result = swarm.audit(report=False)
    assert result.audit_ok, result.audit_problem


@pytest.mark.slow
def test_a_member_killed_mid_averaging_restarts_resyncs_and_rejoins(tmp_path):
    first_stall = 2  # two ordinary rounds first
    marker = tmp_path / "stalled"
    victim = 2
    with LocalSwarm(tmp_path / "swarm", nodes=3) as swarm:
        swarm.start_coordinator()
        for i in (0, 1):
            swarm.start_node(i)
        swarm.start_node(victim, program=hostile("stall", first_stall, marker))
        # the victim sends its first part of a reduction and hangs there: kill it (and its p2pd) now
        wait_until(marker.exists, 240, swarm, "stalled reduction", running=(0, 1, 2))
        before = len(swarm.records(victim))
        swarm.kill_node(victim)
        killed_at = time.time()
        swarm.start_node(victim)  # the plain `grpo-node join`, same key and work directory
        restarted_at = time.time()

        def rejoined() -> bool:
            mine = [r for r in swarm.records(victim)[before:] if r["averaged"] and r["peers"] == 3]
            return bool(mine) and all(any(r["round"] == mine[0]["round"] for r in swarm.records(i)) for i in (0, 1))

        wait_until(rejoined, 75, swarm, "round averaged by all three after the restart", running=(0, 1, victim))
        swarm.stop_nodes(grace_s=0)
        records = {i: swarm.records(i) for i in range(3)}
        entries = log_entries(swarm)

    # the round the victim died in: the survivors finished it within the averaging timeout
    killed_round = min(r["round"] for i in (0, 1) for r in records[i] if r["ended"] > killed_at and r["round"] >= 0)
    assert killed_round >= first_stall
    # restarted while the survivors still retried, the victim may resume the round from its saved
    # batch and average it with them (its record then says so); otherwise they finished without it
    resumed = [r for r in records[victim] if r["round"] == killed_round and r["averaged"]]
    assert all(r["note"].startswith("resumed after a restart") and r["peers"] == 3 for r in resumed), resumed
    for i in (0, 1):
        (r,) = [r for r in records[i] if r["round"] == killed_round]
        print(f"\nnode {i}, round {killed_round}: averaged={r['averaged']} peers={r['peers']} "
              f"averaging {r['averaging_s']:.1f} s, done {r['ended'] - killed_at:.1f} s after the kill; {r['note']}")
        assert r["ended"] - killed_at < SWARM["averaging_timeout_s"], r
        assert r["averaging_s"] < SWARM["averaging_timeout_s"], r
        if r["averaged"]:  # the retry without the dead member (2 of the 3 participants: a majority),
            assert r["peers"] == (3 if resumed else 2), r  # or with it, resumed
    # the victim came back: its first record holds the published snapshot (checked below for every
    # record), and it was averaged with both others within 60 s of its restart
    back = records[victim][before:]
    assert back, "no record after the restart"
    first_with_all = next(r for r in back if r["averaged"] and r["peers"] == 3)
    print(f"restarted node averaged with all three in round {first_with_all['round']}, "
          f"{first_with_all['ended'] - restarted_at:.1f} s after its restart")
    assert first_with_all["ended"] - restarted_at < 60.0, first_with_all
    # every other round was averaged by all of its participants (all three, or the two survivors
    # while the victim was away), but for at most one round the victim sat out after its restart: the
    # survivors' pointers named it the breaker of the killed round (a dropped link costs one round)
    members = participants(entries)
    sat_out = {r["round"] for r in back if "SITS_OUT" in (r["note"] or "")}
    assert len(sat_out) <= 1 and all(r > killed_round for r in sat_out), sat_out
    for i in (0, 1):
        others = [r for r in records[i] if r["round"] != killed_round]
        assert all(r["averaged"] and r["peers"] == members[r["round"]] - (r["round"] in sat_out) for r in others), \
            (records[i], members, sat_out)
        (r,) = [r for r in records[i] if r["round"] == first_with_all["round"]]
        assert r["averaged"] and r["peers"] == 3, r
    snapshots = published(entries)
    assert_one_policy({i: records[i] for i in (0, 1)}, snapshots)
    assert_one_policy({victim: back}, snapshots)
    # (a round the victim sat out, it holds the version before: it loads the published one next round)
    assert_one_policy({i: [r for r in records[i] if r["round"] != killed_round and r["round"] not in sat_out]
                       for i in range(3)}, snapshots)


def _demo_config(*changes: tuple[str, str]) -> str:
    """The demo's run with each (line, replacement) of ``changes`` made (each line must be there)."""
    text = demo_config_text()
    for old, new in changes:
        assert old in text, old
        text = text.replace(old, new)
    return text


def _restart_config() -> str:
    """The demo's run with short averaging timeouts, so that a wedged step passes its limit (its
    matchmaking, all-reduce and audit timeouts and a margin: 5 + 8 + 8 + 3 s, the victim's margin set
    by tests/swarm_join_node.py) within the test."""
    return _demo_config(("matchmaking_timeout_s = 15.0", "matchmaking_timeout_s = 5.0"),
                        ("averaging_timeout_s = 30.0", "averaging_timeout_s = 8.0\nsender_timeout_s = 2.0"))


def _daemons_of(proc) -> list:
    import psutil

    return [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == "p2pd"]


@pytest.mark.slow
def test_a_node_killed_after_its_round_closed_resumes_it_else_its_partner_stops_once_it_moved_on(tmp_path):
    """Two nodes; in round 1 one of them hangs after the round closed, before its averaging, and is
    SIGKILLed, then restarted (same key and work directory). (One killed mid-reduction may have been
    named stalled by its partner, which then leaves it out of the rest of that round: see the next
    test.) Its accepted batch was saved when the coordinator accepted its groups
    (node/swarm/round_batch_file.py): it resumes round 1 with the same gradient and the pair averages
    the round it died in together — before, that round was lost to both (an attempt needs 2 of its 2
    participants). Later it hangs and is killed again, and this time the saved batch is gone (a
    wiped disk): the survivor cannot finish that round alone and stops as soon as the coordinator
    lists the restarted partner among the round's participants that started sampling the next round —
    not after waiting out every attempt (3 x (matchmaking + averaging timeouts), over two minutes
    here). The pair then averages together again, holding the published snapshot. (First, the demo's
    ``swarm.min_peers`` = 2: the node that comes up alone waits for a peer and nothing is bound.)"""
    marker, marker2 = tmp_path / "stalled", tmp_path / "stalled-again"
    victim, survivor = 1, 0
    with LocalSwarm(tmp_path / "swarm", nodes=2) as swarm:
        swarm.start_coordinator()
        swarm.start_node(survivor)
        waiting = lambda: "waiting for peers: 1 of the 2" in (swarm.logs / f"node{survivor}.log").read_text()  # noqa: E731
        wait_until(waiting, 60, swarm, "the lone node waiting for a peer", running=(survivor,))
        time.sleep(1.5)  # a heartbeat or two more: still alone, still nothing bound
        assert not [e for e in log_entries(swarm) if e.kind == "round_dispatched"]
        swarm.start_node(victim, program=hostile("hang_before_averaging", 1, marker))
        wait_until(marker.exists, 180, swarm, "the victim hanging before its averaging", running=(survivor, victim))
        assert (swarm.workdir(victim) / "round_batch.safetensors").exists()
        swarm.kill_node(victim)
        before = len(swarm.records(victim))
        swarm.start_node(victim, program=hostile("stall", 4, marker2))  # honest in rounds 1-3
        resumed = lambda: any("resumed" in r["note"] for r in swarm.records(victim)[before:])  # noqa: E731
        wait_until(resumed, 120, swarm, "the restarted node resuming the round it died in", running=(survivor, victim))
        wait_until(marker2.exists, 180, swarm, "the second stalled reduction", running=(survivor, victim))
        swarm.kill_node(victim)
        (swarm.workdir(victim) / "round_batch.safetensors").unlink()  # this time the batch is gone
        before2 = len(swarm.records(victim))
        swarm.start_node(victim)
        restarted_at = time.time()

        def together_again() -> bool:
            mine = [r for r in swarm.records(victim)[before2:] if r["averaged"] and r["peers"] == 2]
            return bool(mine) and any(r["round"] == mine[0]["round"] and r["averaged"] for r in swarm.records(survivor))

        wait_until(together_again, 90, swarm, "a round averaged by both after the restart", running=(survivor, victim))
        swarm.stop_nodes(grace_s=0)
        records = {i: swarm.records(i) for i in (survivor, victim)}
        entries = log_entries(swarm)

    back = next(r for r in records[victim][before:] if "resumed" in r["note"])
    (mate,) = [r for r in records[survivor] if r["round"] == back["round"]]
    print(f"\nround {back['round']}, resumed by the restarted node: averaged {back['averaged']} with "
          f"{back['peers']} peers; the survivor's averaging took {mate['averaging_s']:.1f} s")
    assert back["round"] == 1 and back["averaged"] and back["peers"] == 2, back
    assert mate["averaged"] and mate["peers"] == 2, mate
    killed_round = next(r["round"] for r in records[survivor] if r["round"] >= 4 and not r["averaged"])
    (r,) = [r for r in records[survivor] if r["round"] == killed_round]
    print(f"survivor, round {killed_round}: averaging {r['averaging_s']:.1f} s, done "
          f"{r['ended'] - restarted_at:.1f} s after the partner's restart without its batch; {r['note']}")
    assert "went on" in r["note"], r
    worst = 3 * (SWARM["matchmaking_timeout_s"] + SWARM["averaging_timeout_s"])
    assert r["ended"] - restarted_at < 30.0 and r["averaging_s"] < worst / 2, r
    assert_one_policy(records, published(entries))


@pytest.mark.slow
def test_a_node_restarts_its_dht_and_averager_when_one_dies_or_wedges(tmp_path):
    """A volunteer's node outlives its own swarm side: (1) its averager process dies (SIGKILL) as an
    all-reduce begins; (2) the new averager's next all-reduce wedges (a task that loses every cancel);
    (3) its p2p daemon is killed. After each, the node restarts its DHT, daemon and averager
    (same key), says why in its record, and is averaged with both others again; the other two
    average every round, and every peer holds the published snapshot throughout."""
    marker = tmp_path / "fault"
    victim = 2
    with LocalSwarm(tmp_path / "swarm", nodes=3, config_text=_restart_config()) as swarm:
        swarm.start_coordinator()
        for i in (0, 1):
            swarm.start_node(i)
        swarm.start_node(victim, program=hostile("die_then_wedge", 2, marker))

        def back_after(reason: str):
            """The victim's round that restarted for ``reason``, and a later one averaged by all three."""
            recs = swarm.records(victim)
            at = next((k for k, r in enumerate(recs) if reason in r.get("restarted", "")), None)
            if at is None:
                return None
            return next((r for r in recs[at:] if r["averaged"] and r["peers"] == 3), None)

        wait_until(lambda: back_after("averager process is gone"), 150, swarm,
                   "the victim averaged with all three after its averager died", running=(0, 1, victim))
        wait_until(lambda: back_after("did not finish within its timeouts"), 150, swarm,
                   "the victim averaged with all three after its averager wedged", running=(0, 1, victim))
        (old_daemon,) = _daemons_of(swarm.nodes[victim])
        old_daemon.kill()
        killed_at = time.time()
        wait_until(lambda: back_after("p2p daemon"), 90, swarm,
                   "the victim averaged with all three after its p2p daemon was killed", running=(0, 1, victim))
        daemons = _daemons_of(swarm.nodes[victim])
        swarm.stop_nodes(grace_s=0)
        records = {i: swarm.records(i) for i in range(3)}
        entries = log_entries(swarm)

    assert marker.with_name("fault.died").exists() and marker.with_name("fault.wedged").exists()
    assert len(daemons) == 1 and daemons[0].pid != old_daemon.pid, daemons  # one daemon, not a leftover too
    restarts = [r for r in records[victim] if r.get("restarted")]
    for r in restarts:
        print(f"\nvictim, round {r['round']}: restarted ({r['restarted']}); averaged={r['averaged']} "
              f"peers={r['peers']} in {r['seconds']:.1f} s; {r['note']}")
    reasons = [r["restarted"] for r in restarts]
    assert [sum(w in x for x in reasons) for w in ("averager process is gone", "did not finish", "p2p daemon")] \
        == [1, 1, 1], reasons  # one restart for each fault, none spurious
    back = next(r for r in restarts if "p2p daemon" in r["restarted"])
    assert back["ended"] - killed_at < 60, back
    # the others never waited on the victim's faults past their own timeouts: each of their rounds
    # was averaged by all of its participants, or by the two of them when the victim failed it
    for i in (0, 1):
        for r in records[i]:
            assert r["averaged"] and r["peers"] in (2, 3), (i, r)
    snapshots = published(entries)
    assert_one_policy({i: records[i] for i in (0, 1)}, snapshots)
    assert_one_policy({victim: [r for r in records[victim] if r["averaged"]]}, snapshots)


@pytest.mark.slow
def test_a_hostile_member_is_excluded_reported_and_banned(tmp_path):
    """From round 1 on, one node sends NaN in every part. The honest pair averages without it each
    round; each honest node reports only what it caught itself (the first catch aborts the attempt,
    which can keep the other from seeing the parts: then it excludes the node for the other's
    accusation and does not report it), so the ban comes once both have caught it first-hand,
    in one round or in rounds within the report window; the banned node is told so and exits."""
    first_nan = 1
    hostile_rounds = 5
    bad = 2
    with LocalSwarm(tmp_path / "swarm", nodes=3) as swarm:
        swarm.start_coordinator()
        for i in (0, 1):
            swarm.start_node(i, rounds=first_nan + hostile_rounds)
        swarm.start_node(bad, rounds=first_nan + hostile_rounds, program=hostile("nan", first_nan))
        # the hostile node stops once banned (or after its rounds); then the honest ones need only
        # finish the round of the ban
        wait_until(lambda: swarm.nodes[bad].poll() is not None, 360, swarm, "the hostile node's end", running=(0, 1))
        bans = [e.payload for e in log_entries(swarm) if e.kind == "node_banned"]
        assert bans, logs(swarm)
        wait_until(lambda: all(swarm.nodes[i].poll() is not None or
                               any(r["round"] >= bans[0]["round"] for r in swarm.records(i)) for i in (0, 1)),
                   120, swarm, "the honest nodes' round of the ban")
        assert all(swarm.nodes[i].poll() in (None, 0) for i in (0, 1)), logs(swarm)
        records = {i: swarm.records(i) for i in range(3)}
        bad_key = Identity.load(swarm.workdir(bad) / "node.key")
        # the coordinator refuses the banned node from now on; the node said so and stopped
        client = CoordinatorClient(swarm.address, bad_key, timeout_s=30)
        try:
            with pytest.raises(CoordinatorError, match="banned"):
                client.register()
        finally:
            client.close()
        bad_log = (swarm.logs / f"node{bad}.log").read_text(errors="replace")
        assert swarm.nodes[bad].returncode == 0 or ("banned:" in bad_log and swarm.nodes[bad].returncode == 1), \
            bad_log[-2000:]
        entries = log_entries(swarm)
        swarm.stop()
        audit_ok(swarm)

    bad_peer = bad_key.peer_id_base58
    bad_node = _node_id_of_peer(bad_peer)
    bans = [e.payload for e in entries if e.kind == "node_banned"]
    assert [b["node_id"] for b in bans] == [bad_node], bans
    banned_in = bans[0]["round"]
    for i in (0, 1):
        for r in [r for r in records[i] if first_nan <= r["round"] <= banned_in]:
            print(f"\nnode {i}, round {r['round']}: averaged={r['averaged']} peers={r['peers']} "
                  f"in {r['averaging_s']:.1f} s; reported {r['excluded']}")
            assert r["averaged"] and r["peers"] == 2, r  # the honest pair's average
            assert set(r["excluded"]) <= {bad_peer}, r["excluded"]
    assert not any(r["averaged"] for r in records[bad] if r["round"] >= first_nan), records[bad]
    reports = [e.payload for e in entries if e.kind == "peer_reported"]
    honest_ids = {_node_id_of_peer(Identity.load(swarm.workdir(i) / "node.key").peer_id_base58) for i in (0, 1)}
    assert {p["node_id"] for p in reports if p["peer_node_id"] == bad_node} == honest_ids, reports
    assert all(p["peer_node_id"] == bad_node and p["reason"].startswith("NON_FINITE") for p in reports), reports
    assert set(bans[0]["reporters"]) == honest_ids
    # the honest rounds: averaged by all of their participants; one policy throughout
    members = participants(entries)
    assert members[first_nan] == 3, members
    for i in (0, 1):
        honest = [r for r in records[i] if r["round"] < first_nan]
        assert all(r["averaged"] and r["peers"] == members[r["round"]] for r in honest), (records[i], members)
    assert_one_policy({i: records[i] for i in (0, 1)}, published(entries))


@pytest.mark.slow
def test_a_peer_failing_every_round_of_three_is_found_and_sits_out(tmp_path):
    """One node hangs up in every attempt and leads the retry into groups of two, with more attempts
    than the others (tests/swarm_hostile.py ``hang_up_lead``): a round of three cannot pin it on it,
    so each round it holds a ticket in publishes nothing. The coordinator's stall rule finds it
    within n + 1 such rounds; from then on it sits out (its node is told why), the honest pair
    averages and publishes every round and holds one policy, and `grpo-audit verify` replays who
    sat out."""
    rounds, bad = 9, 2
    with LocalSwarm(tmp_path / "swarm", nodes=3) as swarm:
        swarm.start_coordinator()
        for i in (0, 1):
            swarm.start_node(i, rounds=rounds)
        swarm.start_node(bad, program=hostile("hang_up_lead", 0))  # until stopped
        wait_until(lambda: all(swarm.nodes[i].poll() is not None for i in (0, 1)), 420, swarm,
                   "the honest nodes' rounds", running=(bad,))
        assert all(swarm.nodes[i].returncode == 0 for i in (0, 1)), logs(swarm)
        records = {i: swarm.records(i) for i in range(3)}
        entries = log_entries(swarm)
        swarm.stop()
        audit_ok(swarm)

    bad_node = _node_id_of_peer(Identity.load(swarm.workdir(bad) / "node.key").peer_id_base58)
    closes = {e.payload["round"]: e.payload for e in entries if e.kind == "round_closed"}
    produced = {e.payload["round"] for e in entries if e.kind == "snapshot_published" and "round" in e.payload}
    failed = sorted(r for r, p in closes.items() if r + 1 in closes and r not in produced)
    benched = {r: p.get("benched", {}) for r, p in closes.items()}
    print("\nfailed rounds", failed, "sat out", {r: list(b) for r, b in benched.items() if b})
    assert all(bad_node in closes[r]["participants"] and bad_node not in benched[r] for r in failed), closes
    found = next(r for r, b in sorted(benched.items()) if "found" in b.get(bad_node, ""))
    # n + 1 failed rounds at most, besides those a probe could not sit anyone out of (an honest
    # member late for the round: the two left could not publish without one of them)
    short = [r for r in failed if len(closes[r]["participants"]) < 3]
    assert 2 <= len(failed) <= 3 + 1 + len(short) and max(failed) < found, (failed, short, found)
    later = [r for r in closes if r >= found and r + 1 in closes]
    assert later and all(r in produced and list(benched[r]) == [bad_node] for r in later), (later, benched)
    for i in (0, 1):
        for r in [r for r in records[i] if r["round"] in later]:
            assert r["averaged"] and r["peers"] == 2, r
    assert any(r["note"].startswith(f"sits out round {found}") for r in records[bad]), records[bad]
    # (version 0 as a node holds it, a fresh optimizer's state included, is not the weights-only file
    # published as version 0: the rounds that failed before the first publication are left out; a
    # member sitting a round out goes on at once with the version it holds)
    assert_one_policy({i: [r for r in records[i] if r["held_version"] > 0 and not r["note"].startswith("sits out")]
                       for i in (0, 1)}, published(entries))
    at_start = {(r["round"], r["sha256"]) for i in (0, 1) for r in records[i] if r["held_version"] == 0}
    assert len({sha for _, sha in at_start}) <= 1, at_start


@pytest.mark.slow
def test_a_swarm_restarted_all_at_once_meets_again(tmp_path):
    """Both nodes crash (SIGKILL to everything: a power cut) and start again at once: the coordinator
    still lists each one's old, dead address (peers seen within three heartbeats; a node that stops
    on its own says goodbye and is not listed), so neither can bootstrap through it; each starts a
    DHT of its own, dials the address the coordinator lists at its next round, and they average
    together again."""
    text = demo_config_text().replace("heartbeat_interval_s = 2.0", "heartbeat_interval_s = 20.0")
    assert "heartbeat_interval_s = 20.0" in text
    with LocalSwarm(tmp_path / "swarm", nodes=2, config_text=text) as swarm:
        swarm.start_coordinator()
        for i in (0, 1):
            swarm.start_node(i)
        wait_until(lambda: all(swarm.records(i) for i in (0, 1)), 180, swarm, "a round on each node", running=(0, 1))
        for i in (0, 1):
            swarm.cut_power(i)  # (nothing says goodbye for them: their dead addresses stay listed)
        before = {i: len(swarm.records(i)) for i in (0, 1)}
        assert all(r["averaged"] for i in (0, 1) for r in swarm.records(i)), logs(swarm)
        for i in (0, 1):
            swarm.start_node(i)
        # (not a fixed number of rounds each: a node that resumes the round it was killed in may count
        # one round more than the other, finish first, and leave the other waiting for a peer)
        wait_until(lambda: all(any(r["averaged"] and r["peers"] == 2 for r in swarm.records(i)[before[i]:])
                               for i in (0, 1)), 240, swarm, "a round averaged by both after the restart",
                   running=(0, 1))
        after = {i: swarm.records(i)[before[i]:] for i in (0, 1)}
        node_logs = {i: (swarm.logs / f"node{i}.log").read_text(errors="replace") for i in (0, 1)}
    for i in (0, 1):
        assert "the coordinator listed answered" in node_logs[i], node_logs[i][-3000:]
        assert any(r["averaged"] and r["peers"] == 2 for r in after[i]), after[i]


def test_the_swarm_rides_out_a_coordinator_restart_and_a_copied_key_runs_its_newest_process(tmp_path):
    """The coordinator is stopped (SIGTERM: a host's reboot or upgrade) and started again on its port
    a few seconds later, resuming the run from its directory. Both nodes stay up through the gap, then
    average together again in a round begun after it, every round's bytes are a published snapshot's,
    and the log (both of the coordinator's lives) passes the audit. Then node 0's key is copied to
    another work directory (as to another machine: this machine's lock, node/swarm/instance_lock.py,
    refuses the same key file) and joins there: it takes over, and the first process exits 1 saying
    why and what to do (coordinator/instances.py). (One swarm for both: each costs ~15 s to start.)"""
    import shutil

    with LocalSwarm(tmp_path / "swarm", nodes=2) as swarm:
        address = swarm.start_coordinator()
        for i in (0, 1):
            swarm.start_node(i)
        wait_until(lambda: all(any(r["averaged"] for r in swarm.records(i)) for i in (0, 1)), 240, swarm,
                   "round averaged by both", running=(0, 1))
        swarm.stop_coordinator()
        time.sleep(4.0)  # two heartbeat intervals with nobody answering
        back = time.time()
        swarm.start_coordinator(port=int(address.rsplit(":", 1)[1]))

        def averaged_after() -> bool:
            return all(any(r["averaged"] and r["peers"] == 2 and r["ended"] - r["seconds"] >= back
                           for r in swarm.records(i)) for i in (0, 1))

        wait_until(averaged_after, 120, swarm, "round begun after the restart averaged by both", running=(0, 1))
        records = {i: [r for r in swarm.records(i) if r["round"] >= 0] for i in (0, 1)}

        copy = 2  # node 0's key in another work directory
        swarm.workdir(copy).mkdir(parents=True)
        shutil.copy(swarm.workdir(0) / "node.key", swarm.workdir(copy) / "node.key")
        swarm.start_node(copy)
        assert swarm.nodes[0].wait(timeout=120) == 1, logs(swarm)
        stopped = " ".join((swarm.logs / "node0.log").read_text(errors="replace").split())
        assert "stopped: superseded" in stopped and "--identity" in stopped, stopped[-2000:]
        wait_until(lambda: "joined run" in (swarm.logs / f"node{copy}.log").read_text(errors="replace"), 120, swarm,
                   "the copy joining", running=(1, copy))
        assert swarm.nodes[copy].poll() is None
        swarm.stop_nodes(grace_s=0)
        entries = log_entries(swarm)
    assert_one_policy(records, published(entries))
    audit_ok(swarm)


HEARTBEAT_S, SLOW_S = 0.5, 2.0  # a node silent for 3 heartbeat intervals (1.5 s) is no longer live


def test_ctrl_c_or_sigterm_leaves_the_swarm_and_takes_the_nodes_processes_with_it(tmp_path):
    """Three nodes, with rounds that would wait 300 s for work that never comes (``round_timeout_s``).
    Node 2 samples 2 s longer than the others, silent but for its background heartbeats, while a
    node silent for 1.5 s counts as gone: every round still waits for its work (3 participants).
    Node 0 gets a Ctrl-C in its terminal (SIGINT to its whole process group: the node, its DHT and
    averager processes, p2pd): the other two go on averaging as a pair without waiting out the round
    timeout (the coordinator closes a round once every live node's work is in). Then node 1 gets a
    SIGTERM to its main process alone (`docker stop`, `kill`). Each says it is leaving and why, exits
    0, and nothing it started outlives it. Before: hivemind's averager start left every node ignoring
    SIGINT for good (it trained on), a SIGTERM ended a node at once, leaving its DHT, averager, p2pd
    (and its ports) and torch's shm manager running, and every round after a node left waited
    ``round_timeout_s``."""
    # (a stock hivemind averager started in this process, as the liveness tests' is, left SIGINT
    # ignored here, and the nodes would inherit that)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    config = _demo_config(("round_timeout_s = 15.0", "round_timeout_s = 300.0"),
                          ("heartbeat_interval_s = 2.0", f"heartbeat_interval_s = {HEARTBEAT_S}"))
    with LocalSwarm(tmp_path / "swarm", nodes=3, config_text=config) as swarm:
        swarm.start_coordinator()
        for i in (0, 1):
            swarm.start_node(i)  # no --rounds: until stopped
        # node 2 samples for SLOW_S more than the others from round 1 on: silent to the coordinator
        # for longer than 3 heartbeat intervals but for its background heartbeats
        swarm.start_node(2, program=[sys.executable, str(HERE / "swarm_join_node.py"), "slow_sample", "1", str(SLOW_S)])
        wait_until(lambda: all(len(swarm.records(i)) >= 2 for i in (0, 1, 2)), 180, swarm,
                   "two rounds on each node", running=(0, 1, 2))
        slow = [r for r in swarm.records(2) if r["round"] >= 1]
        assert slow and all(r["phases"].get("sample", 0) >= SLOW_S for r in slow), slow
        members = participants(log_entries(swarm))
        assert all(members[r["round"]] == 3 for r in slow if r["round"] in members), (members, slow)
        started = {i: [p.pid for p in psutil.Process(swarm.nodes[i].pid).children(recursive=True)] for i in (0, 1)}
        assert all(len(pids) >= 3 for pids in started.values()), started  # DHT, p2pd, averager (+ shm manager)
        rounds_before = {i: len(swarm.records(i)) for i in (0, 1)}
        os.killpg(swarm.nodes[0].pid, signal.SIGINT)
        assert swarm.nodes[0].wait(timeout=30) == 0, logs(swarm)
        left_at = time.time()
        pair = lambda i: [r for r in swarm.records(i) if r["ended"] > left_at and r["averaged"] and r["peers"] == 2]  # noqa: E731
        wait_until(lambda: len(pair(1)) >= 2 and len(pair(2)) >= 2, 90, swarm,
                   "two rounds averaged by the pair after node 0 left", running=(1, 2))
        paired_in = max(r["ended"] for r in pair(1)[:2]) - left_at
        print(f"\nafter node 0 left: two rounds averaged by the other two in {paired_in:.1f} s")
        assert paired_in < 60.0  # far less than the 300 s round timeout each round would have waited
        swarm.nodes[1].send_signal(signal.SIGTERM)
        assert swarm.nodes[1].wait(timeout=30) == 0, logs(swarm)
        for i, why in ((0, "Ctrl-C"), (1, "SIGTERM")):
            assert f"leaving the swarm ({why})" in (swarm.logs / f"node{i}.log").read_text(errors="replace"), logs(swarm)
        assert len(swarm.records(0)) <= rounds_before[0] + 1  # it stopped, not trained on
        deadline = time.monotonic() + 10
        everything = started[0] + started[1]
        while (left := [pid for pid in everything if _running(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, [psutil.Process(pid).cmdline() for pid in left if _running(pid)]


def _default_heartbeats_config() -> str:
    """The demo's run with the default 10 s heartbeats (a silent node counts as gone after 30 s) and
    rounds that would wait 300 s for work that never comes."""
    return _demo_config(("round_timeout_s = 15.0", "round_timeout_s = 300.0"),
                        ("heartbeat_interval_s = 2.0", "heartbeat_interval_s = 10.0"))


def _two_rounds_as_a_pair(swarm: LocalSwarm, since: float, what: str) -> float:
    """Seconds from ``since`` until nodes 1 and 2 had each averaged two rounds as a pair (node 0 gone)."""
    pair = lambda i: [r for r in swarm.records(i) if r["ended"] > since and r["averaged"] and r["peers"] == 2]  # noqa: E731
    wait_until(lambda: len(pair(1)) >= 2 and len(pair(2)) >= 2, 120, swarm,
               f"two rounds averaged by the pair after node 0 {what}", running=(1, 2))
    return max(r["ended"] for r in pair(1)[:2] + pair(2)[:2]) - since


@pytest.mark.slow
def test_a_node_that_leaves_is_not_waited_for_at_the_default_heartbeat_interval(tmp_path):
    """Three nodes with rounds that would wait 300 s for work that never comes and the default 10 s
    heartbeats, so a silent node counts as gone only after 30 s. Node 0 gets a Ctrl-C and says
    goodbye as it leaves (``HeartbeatRequest.leaving``): the other two average two rounds as a pair
    within 20 s of its exit. Before, the round after it left waited for its work until the
    coordinator stopped counting it as live, 30 s after its last heartbeat."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (see the test above)
    with LocalSwarm(tmp_path / "swarm", nodes=3, config_text=_default_heartbeats_config()) as swarm:
        swarm.start_coordinator()
        for i in range(3):
            swarm.start_node(i)
        wait_until(lambda: all(len(swarm.records(i)) >= 1 for i in range(3)), 180, swarm,
                   "a round on each node", running=(0, 1, 2))
        left_at = time.time()
        os.killpg(swarm.nodes[0].pid, signal.SIGINT)
        assert swarm.nodes[0].wait(timeout=30) == 0, logs(swarm)
        paired_in = _two_rounds_as_a_pair(swarm, left_at, "left")
        print(f"\nafter node 0's Ctrl-C: two rounds averaged by the other two in {paired_in:.1f} s")
        assert paired_in < 20.0, logs(swarm)
        # the Ctrl-C stopped its p2pd too, often before its DHT and averager removed their handlers from it
        node0 = (swarm.logs / "node0.log").read_text(errors="replace")
        assert "Traceback" not in node0 and "the hard way" not in node0, logs(swarm, 60)


@pytest.mark.slow
def test_a_node_killed_while_it_samples_is_not_waited_for_at_the_default_heartbeat_interval(tmp_path):
    """As above, but node 0 hangs while it samples round 2 (its assignment taken, nothing submitted)
    and is SIGKILLed with its process group, as the out-of-memory killer would: it says nothing. Its
    goodbye watcher (node/swarm/goodbye_watcher.py, in a session of its own) says the goodbye for it:
    the other two average two rounds as a pair within 20 s of the kill. Without it, round 2 waited
    for node 0's work until the coordinator counted it as gone, 30 s after its last heartbeat."""
    marker = tmp_path / "sampling"
    with LocalSwarm(tmp_path / "swarm", nodes=3, config_text=_default_heartbeats_config()) as swarm:
        swarm.start_coordinator()
        for i in range(3):
            swarm.start_node(i, program=hostile("hang_while_sampling", 2, marker) if i == 0 else None)
        wait_until(marker.exists, 180, swarm, "node 0 hanging while it samples round 2", running=(0, 1, 2))
        swarm.kill_node(0)
        killed_at = time.time()
        paired_in = _two_rounds_as_a_pair(swarm, killed_at, "was killed")
        print(f"\nafter node 0's SIGKILL while sampling: two rounds averaged by the other two in {paired_in:.1f} s")
        assert paired_in < 20.0, logs(swarm)
        assert "told the coordinator node" in (swarm.logs / "node0.log").read_text(errors="replace"), logs(swarm)


@pytest.mark.slow
def test_a_node_killed_in_the_share_audit_holds_nobody_and_is_not_banned(tmp_path):
    """Node 0 reduces round 2 honestly, reveals its share-audit nonce and hangs before its sketch,
    where it is SIGKILLed (an out-of-memory kill); its goodbye watcher says the goodbye. The other two
    stop waiting for its sketch once the coordinator lists it gone, not at the audit's 20 s timeout;
    they judge every share without its sketch (a failure, not an accusation: its silence could hide
    nothing) and average the round as a pair. Nobody reports it, so its restart is not refused as
    banned: it averages with both again. Before, the two waited the audit out, accused it
    AUDIT_WITHHELD, and their two reports banned it."""
    marker = tmp_path / "in_audit"
    with LocalSwarm(tmp_path / "swarm", nodes=3, config_text=_default_heartbeats_config()) as swarm:
        victim_id = Identity.load_or_create(swarm.workdir(0) / "node.key").node_id
        swarm.start_coordinator()
        for i in range(3):
            swarm.start_node(i, program=hostile("hang_in_audit", 2, marker) if i == 0 else None)
        wait_until(marker.exists, 180, swarm, "node 0 hanging in the share audit", running=(0, 1, 2))
        before = len(swarm.records(0))
        swarm.kill_node(0)
        killed_at = time.time()
        pair = lambda i: [r for r in swarm.records(i) if r["ended"] > killed_at and r["averaged"]]  # noqa: E731
        wait_until(lambda: pair(1) and pair(2), 90, swarm, "a round averaged by the other two after the kill",
                   running=(1, 2))
        first = {i: pair(i)[0] for i in (1, 2)}
        swarm.start_node(0)
        restarted_at = time.time()
        back = lambda: [r for r in swarm.records(0)[before:] if r["averaged"] and r["peers"] == 3]  # noqa: E731
        wait_until(back, 90, swarm, "a round averaged by all three after node 0's restart", running=(0, 1, 2))
        rejoined = back()[0]
        swarm.stop_nodes(grace_s=0)
        entries = log_entries(swarm)
    held = max(r["ended"] for r in first.values()) - killed_at
    print(f"\nnode 0 killed in the audit of round {first[1]['round']}: the pair averaged it {held:.1f} s later; "
          f"node 0 averaged with both {rejoined['ended'] - restarted_at:.1f} s after its restart")
    for r in first.values():
        assert r["peers"] == 2 and r["round"] == first[1]["round"], first
    assert held < 10.0, first  # the audit's timeout alone is 20 s here
    assert not [e.payload for e in entries if e.kind == "node_banned"]
    assert not [e.payload for e in entries if e.kind == "peer_reported" and e.payload["peer_node_id"] == victim_id]
    assert rejoined["ended"] - restarted_at < 60.0, rejoined


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


UPLOAD_GRACE_S = 3.0


@pytest.mark.slow
def test_a_designated_uploader_that_stalls_is_raced_every_round(tmp_path):
    rounds = 2
    text = demo_config_text().replace("heartbeat_interval_s = 2.0",
                                      f"heartbeat_interval_s = 2.0\nupload_grace_s = {UPLOAD_GRACE_S}")
    assert f"upload_grace_s = {UPLOAD_GRACE_S}" in text
    with LocalSwarm(tmp_path / "swarm", nodes=3, config_text=text) as swarm:
        keys = {i: Identity.load_or_create(swarm.workdir(i) / "node.key") for i in range(3)}
        # the contributor with the smallest node id uploads each version first: make it the stalling one
        bad = min(keys, key=lambda i: keys[i].node_id)
        swarm.start_coordinator()
        for i in range(3):
            swarm.start_node(i, rounds=rounds, program=hostile("stall_upload", 0) if i == bad else None)
        wait_until(lambda: all(p.poll() is not None for p in swarm.nodes.values()), 240, swarm, "end of the rounds")
        assert [swarm.nodes[i].returncode for i in range(3)] == [0, 0, 0], logs(swarm)
        records = {i: swarm.records(i) for i in range(3)}
        entries = log_entries(swarm)
        swarm.stop()
        audit_ok(swarm)

    uploaders = {int(e.payload["version"]): e.payload.get("uploader") for e in entries if e.kind == "snapshot_published"}
    assert sorted(uploaders) == list(range(rounds + 1)), uploaders
    honest_ids = {keys[i].node_id for i in range(3) if i != bad}
    assert all(uploaders[v] in honest_ids for v in range(1, rounds + 1)), uploaders
    version_bytes = (tmp_path / "swarm" / "coordinator" / "snapshots").glob("*.safetensors")
    size = max(p.stat().st_size for p in version_bytes)
    for rnd in range(rounds):
        mine = {i: next(r for r in records[i] if r["round"] == rnd) for i in range(3)}
        print(f"\nround {rnd}: uploaded " + ", ".join(f"node {i} {r['upload_bytes']}" for i, r in mine.items())
              + f" of {size}; publish " + ", ".join(f"{r['phases'].get('publish', 0):.1f} s" for r in mine.values()))
        assert all(r["averaged"] and r["published"] and r["peers"] == 3 for r in mine.values()), mine
        assert mine[bad]["upload_bytes"] < size
        # one rank at a time: the next contributor by node id raced it, the third never needed to
        assert sorted(r["upload_bytes"] for i, r in mine.items() if i != bad)[0] == 0
        assert sorted(r["upload_bytes"] for i, r in mine.items() if i != bad)[1] >= size
        # the grace (the run's upload_grace_s), then a fast upload
        assert all(r["phases"]["publish"] < UPLOAD_GRACE_S + 20 for r in mine.values()), mine
    assert_one_policy(records, published(entries))


def test_the_straggler_wait_scales_with_the_nodes_own_gradient_time():
    """A partial group waits for the round's missing peers ``swarm.straggler_wait`` times this node's
    own time from the round's close to its averaging, at least 2 s (tiny models: the averager's old
    fixed wait) and at most half the matchmaking timeout (a peer that is gone costs one such wait)."""
    from types import SimpleNamespace

    from grpo_swarm.node.swarm.join import MIN_STRAGGLER_WAIT_S, SwarmPeer

    peer = SimpleNamespace(straggler_wait=1.0, matchmaking_timeout_s=30.0)
    wait = lambda own_s: SwarmPeer._straggler_wait(peer, own_s)  # noqa: E731
    assert MIN_STRAGGLER_WAIT_S == 2.0
    assert wait(0.05) == 2.0 and wait(-1.0) == 2.0
    assert wait(7.5) == 7.5  # SmolLM2 here: the others finish their gradients within about that
    assert wait(40.0) == 15.0
    peer.straggler_wait = 0.5
    assert wait(10.0) == 5.0
    peer.straggler_wait = 0.0
    assert wait(10.0) == 2.0


def test_a_node_asks_the_coordinator_whether_its_round_went_on():
    """The averager's ``round_over`` for round 7, gradient taken at version 4: True once the
    coordinator serves version 5, once round 8 closed too, or once so many of the round's
    participants started sampling round 8 that those left cannot make the strict majority an
    attempt needs; False before, and when the coordinator cannot be asked."""
    from types import SimpleNamespace

    from grpo_swarm.node.swarm.join import SwarmPeer

    a, b, c = (bytes([i]) * 32 for i in (1, 2, 3))
    served = {"version": 4, "round": 8, "moved": []}

    def heartbeat():
        if served["version"] is None:
            raise CoordinatorError("Heartbeat", "UNAVAILABLE", "connection refused")
        return SimpleNamespace(current=SimpleNamespace(version=served["version"]), current_round=served["round"],
                               round_moved_on=list(served["moved"]))

    peer = SimpleNamespace(heartbeat=heartbeat, _participants=[a, b, c])

    def went_on(**change):
        served.update(change)
        return SwarmPeer._round_went_on(peer, 7, 4)

    assert went_on() is False
    assert went_on(version=5) is True
    assert went_on(version=4, round=9) is True  # round 8 closed: it produces the next version now
    assert went_on(round=8, moved=[b]) is False  # a and c still make 2 of 3
    assert went_on(moved=[b, c]) is True  # a alone cannot
    peer._participants = [a, b]
    assert went_on(moved=[b]) is True  # a's partner restarted and went on to round 8
    assert went_on(moved=[]) is False
    peer._participants = []  # the coordinator listed nobody: only a publication ends the round
    assert went_on(moved=[b, c]) is False
    assert went_on(version=None) is False


def test_a_node_whose_swarm_side_keeps_dying_stops_and_says_why(monkeypatch):
    """The round loop rides out single faults (a restart, a round without averaging, a failed
    restart), but a node that restarts its DHT and averager in MAX_SWARM_RESTARTS rounds in a row, or
    cannot restart them, without averaging once stops with what to check instead of failing every
    round the others wait for. A round averaged, or one that needed no restart, starts the count again."""
    from types import SimpleNamespace

    from grpo_swarm.node.swarm import join
    from grpo_swarm.node.swarm.join import MAX_SWARM_RESTARTS, RoundRecord, SwarmPeer

    monkeypatch.setattr(join.time, "sleep", lambda s: None)  # (the loop's back-off after a failed round)
    died = "the averager process is gone (exit code -9: killed)"

    def run(script):
        steps, records = iter(script), []

        def round_():
            step = next(steps)
            if isinstance(step, Exception):
                raise step
            return step

        peer = SimpleNamespace(opts=SimpleNamespace(rounds=len(script)), round=round_, on_round=records.append,
                               participant=SimpleNamespace(snapshot=SimpleNamespace(version=0)),
                               _held_state=lambda: (0, ""))
        SwarmPeer.run(peer)
        return records

    dying = RoundRecord(1, 0, restarted=died)
    fine = RoundRecord(1, 0, averaged=True, restarted=died)  # restarted, then averaged: the restart worked
    left_out = RoundRecord(1, 0)  # no restart, no average (late, benched, ...)
    failed_restart = join.SwarmSideRestartFailed("could not restart this node's DHT and averager: port in use")
    n = MAX_SWARM_RESTARTS
    assert n == 5
    ok = [dying] * (n - 1) + [fine] + [dying] * (n - 2) + [left_out] + [dying] * (n - 1) + [failed_restart]
    assert len(run(ok[:-1])) == len(ok) - 1
    with pytest.raises(join.SwarmSideFailing, match=f"in {n} rounds in a row.*port in use.*dmesg"):
        run(ok[:-1] + [failed_restart])
    with pytest.raises(join.SwarmSideFailing, match=f"in {n} rounds in a row.*exit code -9"):
        run([left_out] + [dying] * n)
