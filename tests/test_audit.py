"""grpo_swarm.protocol.audit and grpo-audit: a real 4-node run of the tiny model (1,024 honest proofs,
zero rejections, spot-checks under the claimed versions, stale-by-one submissions) is logged and
audited; rejected attacks replay to the same reason; every kind of tampering is pinpointed."""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from grpo_swarm.node import proving
from grpo_swarm.protocol import ReasonCode
from grpo_swarm.protocol.audit import audit
from grpo_swarm.protocol.recorder import RunRecorder
from grpo_swarm.protocol.report import write_report
from grpo_swarm.protocol.run_spec import AuditHooks, load_hooks
from grpo_swarm.protocol.audit_cli import app
from grpo_swarm.protocol.log import KINDS, LogEntry, ProtocolLog, read_log
from grpo_swarm.protocol.proofs import parse_proof
from grpo_swarm.protocol.verify import VerifierPolicy, spot_check_selected
from protocol_world import COORDINATOR, World, forge, identity, inflate

NODES = [identity(i) for i in range(4)]
ROUNDS = 4
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])


def flat(groups):
    return [p for g in groups for p in g]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 nodes x 4 batches x 8 assigned prompts x G=8 = 1,024 proofs from real rollouts. Nodes 0-1
    sample and submit rounds 0-3 at the current version; nodes 2-3 sample rounds 1-4 one step early:
    after round r closes, the policy takes a GRPO step, the round's participants report its hash
    and it is published (a quorum of round r's weight), and only then do nodes 2-3 submit their
    round r + 1 proofs, now one version stale (η = 1). Round 4 closes at the end, so every round's
    salt is revealed. Spot-check rate 0.25, salted per round."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("run")
    world = World(group_size=8, prompts_per_round=8, spot_check_rate=0.25, max_staleness=1)
    log = ProtocolLog(tmp / "log.sqlite")
    rec = RunRecorder(log, COORDINATOR, world.run_spec(), hooks=world.hooks)
    for n in NODES:
        rec.register(n.public_key_bytes)
    rec.publish_snapshot(0, world.shas[0])
    verdicts, seq, proofs_sent = [], {n.node_id: 0 for n in NODES}, 0

    def batch(n, r):
        nonlocal proofs_sent
        proofs = flat(world.groups(n, r, seq[n.node_id]))
        seq[n.node_id] += len(proofs)
        proofs_sent += len(proofs)
        return proofs

    early = {}  # nodes 2-3: round r + 1 proofs sampled in round r, at its version
    for r in range(ROUNDS):
        for n in NODES[:2]:
            verdicts += rec.submit(batch(n, r))
        for n in NODES[2:]:
            early[n.node_id] = batch(n, r + 1)
        participants = rec.close_round().payload["participants"]
        sha = world.train_step(world.assigned(NODES[0], r))
        for node_id in participants:
            rec.report_hash(node_id, world.version, sha)
        rec.publish_snapshot(world.version, sha)
        for n in NODES[2:]:
            verdicts += rec.submit(early[n.node_id])
    rec.close_round()
    snapshots = tmp / "snapshots"
    for model in world.versions.values():
        proving.save_snapshot(model, snapshots)
    log.export_jsonl(tmp / "log.jsonl")
    return {"world": world, "log": log, "rec": rec, "verdicts": verdicts, "proofs": proofs_sent, "tmp": tmp,
            "snapshots": snapshots, "entries": list(log)}


def test_zero_rejections_over_1024_honest_proofs(run):
    verdicts = run["verdicts"]
    assert run["proofs"] == 1024 and len(verdicts) == 128
    bad = [v for v in verdicts if not v.accepted]
    assert not bad, bad[:3]
    assert all(v.skipped == () for v in verdicts)  # every check ran, the spot-check included
    checked = sum(len(v.spot_checked) for v in verdicts)
    assert 150 <= checked <= 370  # ≈ 0.25 x 1024
    accepted = list(run["log"].entries(kind="proofs_accepted"))
    versions = Counter(parse_proof(base64.b64decode(e.payload["proofs"][0])).policy.version for e in accepted)
    assert set(versions) == set(range(ROUNDS))
    rewards = {parse_proof(base64.b64decode(b)).reward_total for e in accepted for b in e.payload["proofs"]}
    assert len(rewards) >= 3  # right / wrong answers and overlong penalties: real reward arithmetic


def test_audit_replays_everything_with_the_model(run):
    live_checks = sum(len(v.spot_checked) for v in run["verdicts"])
    result = audit(run["log"].path, run["world"].hooks, trusted_signers=[COORDINATOR.public_key_bytes])
    assert result.ok, result.problem
    assert result.replayed["accepted_groups"] == 128 and result.replayed["rounds"] == ROUNDS + 1
    assert result.replayed["publications"] == ROUNDS and result.replayed["hash_reports"] == 2 + 4 * (ROUNDS - 1)
    assert result.replayed["spot_checks"] == live_checks
    assert not result.skipped
    stale = [s.staleness for s in result.samples]
    assert len(stale) == 1024 and stale.count(1) == 512 and stale.count(0) == 512


def test_audit_without_hooks_checks_chain_and_structure_and_says_what_it_skipped(run):
    result = audit(run["tmp"] / "log.jsonl")
    assert result.ok, result.problem
    assert result.replayed["accepted_groups"] == 128
    assert result.skipped["rewards"] == 128 and result.skipped["decode"] == 128


def test_cli_verify_with_plugin_model_and_snapshots(run):
    runner = CliRunner()
    res = runner.invoke(app, ["verify", str(run["tmp"] / "log.jsonl"), "--model", "tiny",
                              "--snapshots", str(run["snapshots"]), "--signer", COORDINATOR.public_key_bytes.hex(),
                              "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["ok"] and summary["skipped"] == {}
    assert summary["replayed"]["spot_checks"] == sum(len(v.spot_checked) for v in run["verdicts"])
    res = runner.invoke(app, ["verify", str(run["log"].path), "--signer", COORDINATOR.public_key_bytes.hex()])
    assert res.exit_code == 0 and "not checked: spot_check" in res.output  # no --model: said, not hidden
    res = runner.invoke(app, ["verify", str(run["log"].path), "--signer", "00" * 32])
    assert res.exit_code == 1 and "entry 0" in res.output
    res = runner.invoke(app, ["verify", str(run["tmp"] / "nope.sqlite")])
    assert res.exit_code == 2


def test_plugin_hooks_from_the_run_started_entry(run):
    hooks = load_hooks(run["entries"][0].payload)
    assert isinstance(hooks, AuditHooks) and hooks.logprob_fn is None
    assert hooks.reward_recomputer is not None and hooks.decode_fn is not None and hooks.prompt_sha256_fn is not None
    plugin_only = dict(run["entries"][0].payload)
    plugin_only["policy"] = {**plugin_only["policy"], "reward_specs": [{"name": "os:system", "weight": 1.0, "args": {}}]}
    hooks = load_hooks(plugin_only)  # a log must not make the auditor import code
    assert hooks.reward_recomputer is None and any("plugins" in n for n in hooks.notes)


def test_report(run, tmp_path):
    result = audit(run["log"].path)
    paths = write_report(result, tmp_path / "report")
    for name in ("nodes.csv", "nodes.md", "summary.json", "reward_by_version.png", "contributions_per_node.png",
                 "staleness_hist.png"):
        assert paths[name].is_file()
    for name in ("reward_by_version.png", "contributions_per_node.png", "staleness_hist.png"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = paths["nodes.csv"].read_text().splitlines()
    assert rows[0].startswith("node_id,accepted_groups,accepted_samples,rejected_total")
    assert len(rows) == 1 + len(NODES)
    summary = json.loads(paths["summary.json"].read_text())
    assert {n["accepted_samples"] for n in summary["nodes"]} == {256}
    by_node = {n["node_id"]: n for n in summary["nodes"]}
    assert by_node[NODES[3].node_id]["mean_staleness"] == 1.0 and by_node[NODES[0].node_id]["mean_staleness"] == 0.0
    res = CliRunner().invoke(app, ["report", str(run["tmp"] / "log.jsonl"), "--out", str(tmp_path / "r2"),
                                   "--no-hooks"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r2" / "staleness_hist.png").is_file()


def test_cli_on_garbage_and_empty_files(tmp_path):
    runner = CliRunner()
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x00\xffnot a log\n")
    res = runner.invoke(app, ["verify", str(garbage)])
    assert res.exit_code == 1 and "entry 0" in res.output and "line 1" in res.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = runner.invoke(app, ["verify", str(empty), "--no-hooks"])
    assert res.exit_code == 1 and "no entries" in res.output
    fake_sqlite = tmp_path / "fake.sqlite"
    fake_sqlite.write_bytes(b"SQLite format 3\x00" + b"\x01" * 200)
    res = runner.invoke(app, ["verify", str(fake_sqlite), "--no-hooks"])
    assert res.exit_code == 1 and "BAD" in res.output


# ---- tampering -----------------------------------------------------------------------------------
def rechain(entries, changes, signer=COORDINATOR):
    """The log as a dishonest coordinator would rewrite it: payloads (or (kind, payload)) replaced,
    everything re-hashed and re-signed with its own (trusted) key."""
    out, prev = [], entries[0].prev_hash
    for e in entries:
        change = changes.get(e.index, e.payload)
        kind, payload = change if isinstance(change, tuple) else (e.kind, change)
        new = LogEntry.create(e.index, prev, e.time_ms, kind, payload, signer)
        out.append(new)
        prev = new.hash
    return out


def first(entries, kind, start=0):
    return next(e for e in entries if e.kind == kind and e.index >= start)


def test_tampered_entry_is_pinpointed(run, tmp_path):
    lines = (run["tmp"] / "log.jsonl").read_text().splitlines()
    target = first(run["entries"], "proofs_accepted", 40).index
    obj = json.loads(lines[target])
    proof = parse_proof(base64.b64decode(obj["payload"]["proofs"][0]))
    proof.reward_total += 1
    obj["payload"]["proofs"][0] = base64.b64encode(proof.SerializeToString()).decode()
    lines[target] = json.dumps(obj)
    bad = tmp_path / "tampered.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    result = audit(bad)
    assert result.problem.index == target and "modified" in result.problem.reason
    res = CliRunner().invoke(app, ["verify", str(bad), "--no-hooks"])
    assert res.exit_code == 1 and f"entry {target} (proofs_accepted)" in res.output


def test_coordinator_cannot_log_a_bad_group_as_accepted(run):
    """Even re-chained and re-signed with the coordinator's key, a group the verifier would reject is
    caught by the replay at its entry."""
    world, entries = run["world"], run["entries"]
    target = first(entries, "proofs_accepted", 30)
    proofs = [parse_proof(base64.b64decode(b)) for b in target.payload["proofs"]]
    node = next(n for n in NODES if n.node_id == target.payload["node_id"])
    k = next((p.completion_index for p in proofs if p.rewards[0].value == 0.0), 0)
    inflated = inflate(proofs, k, node)
    payload = {**target.payload, "proofs": [base64.b64encode(p.SerializeToString()).decode() for p in inflated]}
    result = audit(rechain(entries, {target.index: payload}), world.hooks,
                   trusted_signers=[COORDINATOR.public_key_bytes])
    assert result.problem.index == target.index
    assert "replay rejects it" in result.problem.reason and "REWARD_MISMATCH" in result.problem.reason


@pytest.mark.parametrize("what", ["spot_checked", "salt", "participants", "registration", "snapshot", "round"])
def test_inconsistent_entries_are_pinpointed(run, what):
    entries = run["entries"]
    if what == "spot_checked":
        e = first(entries, "proofs_accepted", 20)
        change = {**e.payload, "spot_checked": [k for k in range(8) if k not in e.payload["spot_checked"]]}
    elif what == "salt":
        e = first(entries, "round_closed")
        change = {**e.payload, "spot_check_salt": "ab" * 32}
    elif what == "participants":
        e = first(entries, "round_closed")
        change = {**e.payload, "participants": e.payload["participants"] + ["f" * 32]}
    elif what == "registration":
        e = first(entries, "node_registered")
        change = {**e.payload, "node_id": "0" * 32}
    elif what == "snapshot":
        e = first(entries, "snapshot_published", 10)
        change = {**e.payload, "version": 0}
    else:
        e = first(entries, "round_closed")
        change = {**e.payload, "round": 7}
    result = audit(rechain(entries, {e.index: change}))
    assert result.problem is not None and result.problem.index == e.index, result.problem


def test_spot_check_selection_follows_the_revealed_salts(run):
    """The replay's selection is recomputed from the salt revealed at round end, so the coordinator
    cannot pick which members it checks (and a node could not know before the round closed)."""
    entries = run["entries"]
    salts = {e.payload["round"]: bytes.fromhex(e.payload["spot_check_salt"]) for e in entries
             if e.kind == "round_closed"}
    round_of, r = {}, 0
    for e in entries:
        if e.kind == "round_closed":
            r += 1
        round_of[e.index] = r
    for e in entries:
        if e.kind == "proofs_accepted":
            proofs = [parse_proof(base64.b64decode(b)) for b in e.payload["proofs"]]
            chosen = [p.completion_index for p in proofs
                      if spot_check_selected(p.run_id, e.payload["node_id"], p.round_index, p.prompt_index,
                                             p.completion_index, 0.25, salts[round_of[e.index]])]
            assert chosen == e.payload["spot_checked"]
    commitment = bytes.fromhex(entries[0].payload["spot_check_commitment"])
    assert hashlib.sha256(salts[0]).digest() == commitment


# ---- rejected attacks in the log replay to the same reason ----------------------------------------
@pytest.fixture(scope="module")
def attacked(run, tmp_path_factory):
    world = run["world"]
    log = ProtocolLog(tmp_path_factory.mktemp("attacked") / "log.sqlite")
    policy = VerifierPolicy(**{**world.policy.__dict__, "spot_check_rate": 1.0})  # every forgery is checked
    rec = RunRecorder(log, COORDINATOR, world.run_spec(policy=policy), hooks=world.hooks)
    node, liar, stranger = NODES[0], NODES[1], identity(9)
    rec.register(node.public_key_bytes)
    rec.register(liar.public_key_bytes)
    rec.publish_snapshot(world.version, world.shas[world.version])
    groups = world.groups(node, 0, 10_000)
    codes = []
    codes += [v.code for v in rec.submit(groups[0])]  # honest
    codes += [v.code for v in rec.submit(groups[0])]  # replayed
    g = groups[1]
    k = next((p.completion_index for p in g if p.rewards[0].value == 0.0), 0)
    codes += [v.code for v in rec.submit(inflate(g, k, node))]
    codes += [v.code for v in rec.submit(flat(world.groups(stranger, 0, 0))[:8])]
    codes.append(rec.submit_bytes([b"\x0a\xff garbage"] * 8).code)
    codes.append(rec.submit_bytes([g[0].SerializeToString()[:-7]] + [p.SerializeToString() for p in g[1:]]).code)
    codes.append(rec.submit_bytes([b"\x00" * (2 << 20)]).code)
    codes += [v.code for v in rec.submit(groups[2])]  # node's round is void after its REWARD_MISMATCH
    # another node: its first failed check is the spot-check
    fake_lp = [forge(p, liar, behaviour_logprobs=[-0.01] * p.num_completion_tokens)
               for p in world.groups(liar, 0, 0)[0]]
    codes += [v.code for v in rec.submit(fake_lp)]
    rec.ban(node.node_id, "spot-check failed")
    codes += [v.code for v in rec.submit(groups[3])]
    rec.close_round()
    return log, codes


def test_attacks_in_the_log_replay_to_the_same_reason(run, attacked):
    log, codes = attacked
    assert codes[0] is None
    assert codes[1:] == [ReasonCode.REPLAYED_SEQUENCE, ReasonCode.REWARD_MISMATCH, ReasonCode.UNKNOWN_KEY,
                         ReasonCode.MALFORMED, ReasonCode.MALFORMED, ReasonCode.OVERSIZED,
                         ReasonCode.TICKET_VOIDED, ReasonCode.SPOT_CHECK_FAILED, ReasonCode.BANNED_KEY]
    result = audit(log.path, run["world"].hooks)
    assert result.ok, result.problem
    assert result.replayed["rejections"] == 8 and result.skipped == {"rejection OVERSIZED (truncated evidence)": 1}
    rejected = result.nodes[NODES[0].node_id].rejected
    assert rejected["REPLAYED_SEQUENCE"] == 8 and rejected["TICKET_VOIDED"] == 8 and rejected["BANNED_KEY"] == 8
    assert result.nodes[NODES[0].node_id].failed_checks == 1  # the reward lie
    assert result.nodes[NODES[1].node_id].rejected["SPOT_CHECK_FAILED"] == 8
    assert result.nodes[NODES[1].node_id].failed_checks == 1
    # without the model, the spot-check and reward rejections cannot be confirmed: said, not failed
    bare = audit(log.path)
    assert bare.ok, bare.problem
    assert bare.skipped["rejection REWARD_MISMATCH (unconfirmed)"] == 1
    assert bare.skipped["rejection SPOT_CHECK_FAILED (unconfirmed)"] == 1


def test_a_rejection_logged_with_the_wrong_reason_is_pinpointed(run, attacked):
    log, _ = attacked
    entries = list(log)
    e = next(e for e in entries if e.kind == "proofs_rejected" and e.payload["code"] == "UNKNOWN_KEY")
    result = audit(rechain(entries, {e.index: {**e.payload, "code": "BAD_SIGNATURE"}}))
    assert result.problem.index == e.index and "UNKNOWN_KEY" in result.problem.reason
    # an honest group logged as rejected (a node cheated of its contribution) is caught too
    honest = next(x for x in entries if x.kind == "proofs_accepted")
    as_rejected = {"node_id": honest.payload["node_id"], "code": "REWARD_MISMATCH", "detail": "x", "member": 0,
                   "evidence": {"proofs": honest.payload["proofs"]}}
    result = audit(rechain(entries, {honest.index: ("proofs_rejected", as_rejected)}), run["world"].hooks)
    assert result.problem.index == honest.index and "replay accepts it" in result.problem.reason


# ---- fuzzing the payload parsers of the replay ------------------------------------------------------
payload_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**64) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
payload_keys = st.sampled_from(["node_id", "public_key", "version", "sha256", "proofs", "spot_checked", "group_id",
                                "round", "code", "detail", "evidence", "participants", "weights", "spot_check_salt",
                                "next_spot_check_commitment", "reason", "bytes", "size", "truncated", "x"])


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KINDS[1:] + ("other_kind",)),
                          st.dictionaries(payload_keys, payload_values, max_size=6)), max_size=6))
def test_fuzz_audit_of_arbitrary_signed_entries(run, items):
    """Validly chained and signed entries with arbitrary payloads: the audit names a bad entry or
    passes, never crashes."""
    entries = run["entries"][:6]
    prev, t = entries[-1].hash, entries[-1].time_ms
    for i, (kind, payload) in enumerate(items):
        e = LogEntry.create(len(entries), prev, t, kind, payload, COORDINATOR)
        entries.append(e)
        prev = e.hash
    result = audit(entries)
    assert result.ok or result.problem.index >= 6


def test_read_log_detects_format(run):
    assert [e.index for e in read_log(run["tmp"] / "log.jsonl")][:3] == [0, 1, 2]
    assert [e.index for e in read_log(run["log"].path)][:3] == [0, 1, 2]


@pytest.mark.slow
def test_bench_proofs_prints_one_json_line():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "proofs.py"), "--nodes", "1", "--rounds", "1", "--repeats", "1",
         "--spot-models", "tiny", "--tiny-length", "8", "--no-long"],
        cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    res = json.loads(lines[0])
    for key in ("sign_per_s", "verify_signature_per_s", "verify_full_no_model_per_s", "ed25519_verify_only_per_s"):
        assert res[key] > 0, key
    tiny = res["spot_check"]["tiny"]
    assert tiny["honest_max_abs_delta"] < res["verifier_tolerance"]["max_abs"]
    assert 0 < tiny["fraction_vs_generating_it"]
