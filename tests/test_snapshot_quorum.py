"""Snapshot publication needs a quorum of the producing round's verified work (protocol.publication).

The outside attack — a lone first reporter publishing v1, three fresh keys outvoting an honest
report, weights with one value per tensor set to 1000 becoming the signed current version — is
refused, with the reports (weight 0) and the refusal in the log; the honest path publishes; the
audit replays the rule and pinpoints forged publications; reports survive a restart; a
SmolLM2-size snapshot uploads under the default serve limits; a cut upload leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from grpo_swarm.coordinator import core
from grpo_swarm.coordinator.config import ConfigError, parse_run_config
from grpo_swarm.node import proving
from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.audit import audit
from grpo_swarm.protocol.client import CoordinatorClient, CoordinatorError
from grpo_swarm.protocol.log import LogEntry, ProtocolLog
from grpo_swarm.protocol.publication import (
    NO_QUORUM,
    NO_ROUND,
    NOT_REPORTED,
    WRONG_VERSION,
    Publication,
    PublicationRefused,
)
from grpo_swarm.protocol.recorder import RunRecorder
from grpo_swarm.protocol.run_spec import load_hooks

from coordinator_world import HonestNode, Served, write_run_toml
from protocol_world import COORDINATOR, World, identity
from test_coordinator_process import ServeProcess, cli


def flat(groups):
    return [p for g in groups for p in g]


def ref(version: int, sha: bytes) -> pb.PolicySnapshotRef:
    return pb.PolicySnapshotRef(version=version, sha256=sha)


def refusal(fn) -> PublicationRefused:
    with pytest.raises(PublicationRefused) as info:
        fn()
    return info.value


def refused_upload(client: CoordinatorClient, path, snapshot: pb.PolicySnapshotRef) -> str:
    """The detail of an upload refused FAILED_PRECONDITION."""
    with pytest.raises(CoordinatorError) as info:
        client.upload_snapshot(path, snapshot)
    assert info.value.code == "FAILED_PRECONDITION", info.value
    return info.value.detail


# ---- the rule --------------------------------------------------------------------------------------
A, B, C = "a" * 32, "b" * 32, "c" * 32
GOOD, EVIL = b"\x01" * 32, b"\x66" * 32


def nobody(node_id: str) -> bool:
    return False


def test_rule_counts_reports_by_verified_work_in_the_producing_round():
    pub = Publication()
    assert refusal(lambda: pub.check(1, GOOD, A, 0, nobody)).code == NO_ROUND  # nothing produced v1 yet
    assert pub.report(A, 1, GOOD, 0, nobody) == {"node_id": A, "version": 1, "sha256": GOOD.hex(), "round": None,
                                                "weight": 0.0}
    pub.round_closed(0, {A: 0.5, B: 0.3, C: 0.2})
    assert not pub.reports  # made before round 0 closed: about another average
    sybils = [str(i) * 32 for i in range(3)]
    assert [pub.report(s, 1, EVIL, 0, nobody)["weight"] for s in sybils] == [0.0, 0.0, 0.0]
    r = refusal(lambda: pub.check(1, EVIL, sybils[0], 0, nobody))
    assert r.code == NO_QUORUM and r.tally.support_weight == 0.0 and r.tally.reports == 3
    assert pub.report(A, 1, GOOD, 0, nobody)["weight"] == 0.5
    assert pub.report(A, 1, GOOD, 0, nobody) is None  # a repeated report is not logged again
    assert refusal(lambda: pub.check(1, GOOD, A, 0, nobody)).code == NO_QUORUM  # 0.5 is not MORE than half
    assert refusal(lambda: pub.check(1, GOOD, B, 0, nobody)).code == NOT_REPORTED
    assert refusal(lambda: pub.check(2, GOOD, A, 0, nobody)).code == WRONG_VERSION
    assert pub.report(B, 1, EVIL, 0, nobody)["weight"] == 0.3
    assert pub.report(B, 1, GOOD, 0, nobody) is not None  # a changed report is logged
    t = pub.check(1, GOOD, B, 0, nobody)
    assert (t.round, t.support_weight, t.total_weight, t.reporters, t.reports) == (0, 0.8, 1.0, (A, B), 5)
    assert refusal(lambda: pub.check(1, GOOD, B, 0, lambda n: n == B)).code == NO_QUORUM  # banned: weight 0
    pub.round_closed(1, {C: 1.0})  # a later round produces the next version: reports start over
    assert refusal(lambda: pub.check(1, GOOD, A, 0, nobody)).code == NOT_REPORTED
    pub.published()
    assert refusal(lambda: pub.check(2, GOOD, A, 1, nobody)).code == NO_ROUND
    with pytest.raises(ValueError):
        pub.report(A, 3, GOOD, 1, nobody)  # only current + 1 can be published next
    with pytest.raises(ValueError):
        pub.report(A, 2, GOOD[:31], 1, nobody)
    for bad in (0.49, 1.0, True, "0.5"):
        with pytest.raises(ValueError):
            Publication(bad)
    two_thirds = Publication(2 / 3)
    two_thirds.round_closed(0, {A: 2 / 3, B: 1 / 3})
    two_thirds.report(A, 1, GOOD, 0, nobody)
    assert refusal(lambda: two_thirds.check(1, GOOD, A, 0, nobody)).code == NO_QUORUM


def test_publish_quorum_is_a_run_setting():
    import tomllib

    from grpo_swarm.coordinator.config import template_text

    data = tomllib.loads(template_text())
    cfg = parse_run_config(data)
    spec = cfg.run_spec(100, eos_token_ids=(1,), vocab_size=10)
    assert cfg.swarm.publish_quorum == 0.5 and spec.to_payload()["publish_quorum"] == 0.5
    data["swarm"]["publish_quorum"] = 0.75
    assert parse_run_config(data).run_spec(100, eos_token_ids=(1,), vocab_size=10).publish_quorum == 0.75
    data["swarm"]["publish_quorum"] = 0.3
    with pytest.raises(ConfigError, match="swarm.publish_quorum"):
        parse_run_config(data)


# ---- recorder, restart and audit ---------------------------------------------------------------------
def rechain(entries, changes):
    """The log as a dishonest coordinator would rewrite it: payloads replaced, re-hashed and re-signed
    with its own (trusted) key."""
    out, prev = [], entries[0].prev_hash
    for e in entries:
        new = LogEntry.create(e.index, prev, e.time_ms, e.kind, changes.get(e.index, e.payload), COORDINATOR)
        out.append(new)
        prev = new.hash
    return out


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Round 0: node 0 has 2 accepted groups, node 1 one (weights 2/3, 1/3); 3 fresh keys report a
    poisoned hash, node 1 reports the real one alone (refused), node 0 joins; the recorder restarts
    from its log; v1 is published."""
    torch.set_num_threads(1)
    world = World(group_size=4, prompts_per_round=2, max_staleness=1)
    tmp = tmp_path_factory.mktemp("quorum")
    salts: dict[int, bytes] = {}
    log = ProtocolLog(tmp / "log.sqlite")
    rec = RunRecorder(log, COORDINATOR, world.run_spec(), hooks=world.hooks, on_salt=salts.__setitem__)
    n0, n1 = identity(0), identity(1)
    sybils = [identity(5 + i) for i in range(3)]
    for n in (n0, n1, *sybils):
        rec.register(n.public_key_bytes)
    rec.publish_snapshot(0, world.shas[0])  # the initial weights need no reports
    verdicts = rec.submit(flat(world.groups(n0, 0, 0))) + rec.submit(world.groups(n1, 0, 0)[0])
    assert all(v.accepted for v in verdicts), verdicts
    sha = world.train_step(world.assigned(n0, 0))
    assert refusal(lambda: rec.publish_snapshot(1, sha)).code == NO_ROUND
    rec.close_round()
    assert [rec.report_hash(s.node_id, 1, EVIL).payload["weight"] for s in sybils] == [0.0] * 3
    r = refusal(lambda: rec.check_publication(1, EVIL, sybils[0].node_id))
    rec.refuse_upload(sybils[0].node_id, 1, EVIL, r)
    assert rec.report_hash(n1.node_id, 1, sha).payload["weight"] == pytest.approx(1 / 3)
    assert rec.report_hash(n1.node_id, 1, sha) is None  # heartbeats repeat it: logged once
    r = refusal(lambda: rec.check_publication(1, sha, n1.node_id))
    assert r.code == NO_QUORUM
    rec.refuse_upload(n1.node_id, 1, sha, r)
    rec.report_hash(n0.node_id, 1, sha)
    log.close()

    log = ProtocolLog(tmp / "log.sqlite")
    resumed = RunRecorder.resume(log, COORDINATOR, salts=salts, hooks=world.hooks, on_salt=salts.__setitem__)
    for attr in ("quorum", "round", "weights", "reports"):
        assert getattr(resumed.publication, attr) == getattr(rec.publication, attr), attr
    entry = resumed.publish_snapshot(1, sha, uploader=n0.node_id)
    assert entry.payload == {"version": 1, "sha256": sha.hex(), "round": 0, "support_weight": 1.0,
                             "total_weight": 1.0, "reporters": sorted([n0.node_id, n1.node_id]),
                             "uploader": n0.node_id}
    assert resumed.publication.round is None and not resumed.publication.reports
    return {"world": world, "log": log, "entries": list(log), "sybils": sybils, "n0": n0, "sha": sha}


def test_the_audit_replays_reports_refusals_and_the_publication(recorded):
    result = audit(recorded["entries"], recorded["world"].hooks, trusted_signers=[COORDINATOR.public_key_bytes])
    assert result.ok, result.problem
    assert (result.replayed["hash_reports"], result.replayed["upload_refusals"], result.replayed["publications"]) \
        == (5, 2, 1)


def _first(entries, kind, **match):
    return next(e for e in entries if e.kind == kind and all(e.payload.get(k) == v for k, v in match.items()))


@pytest.mark.parametrize("forgery", ["sybil_weight", "sybil_reporter", "evil_published", "quorum_missing",
                                     "refusal_code", "repeated_report"])
def test_a_forged_publication_is_pinpointed(recorded, forgery):
    """Re-chained and re-signed with the coordinator's own key, each lie is caught at its entry."""
    entries, sybils = recorded["entries"], recorded["sybils"]
    published = _first(entries, "snapshot_published", version=1)
    target, change = published, None
    if forgery == "sybil_weight":  # a fresh key's report logged as if it had done work
        target = _first(entries, "hash_reported", node_id=sybils[0].node_id)
        change = {**target.payload, "weight": 1.0, "round": 0}
    elif forgery == "sybil_reporter":
        change = {**published.payload, "reporters": sorted(published.payload["reporters"] + [sybils[0].node_id])}
    elif forgery == "evil_published":  # the sybils' weights become the signed current version
        change = {**published.payload, "sha256": EVIL.hex(), "reporters": sorted(s.node_id for s in sybils)}
    elif forgery == "quorum_missing":  # node 0's report was for another hash: no quorum behind v1
        target = _first(entries, "hash_reported", node_id=recorded["n0"].node_id)
        change = {**target.payload, "sha256": EVIL.hex()}
    elif forgery == "refusal_code":
        target = _first(entries, "upload_refused", code=NO_QUORUM)
        change = {**target.payload, "code": NOT_REPORTED}
    else:  # the coordinator logs a node's report only when it is new or changed
        first_report = _first(entries, "hash_reported", node_id=sybils[1].node_id)
        target = _first(entries, "hash_reported", node_id=sybils[2].node_id)
        change = first_report.payload
    result = audit(rechain(entries, {target.index: change}), trusted_signers=[COORDINATOR.public_key_bytes])
    bad_at = published.index if forgery == "quorum_missing" else target.index
    assert result.problem is not None and result.problem.index == bad_at, result.problem
    if forgery in ("evil_published", "quorum_missing"):
        assert "without a quorum" in result.problem.reason


# ---- the attack over gRPC ----------------------------------------------------------------------------
def changed_snapshot(node: HonestNode, directory, scale: float):
    """The weights an averaging round would produce (here: scaled), saved; (path, state-dict hash)."""
    with torch.no_grad():
        for p in node.model.parameters():
            p.mul_(scale)
    sha = proving.save_snapshot(node.model, directory)
    return directory / f"{sha.hex()}.safetensors", sha


def poisoned_snapshot(node: HonestNode, directory):
    """The attack's file: the node's weights with one value per tensor set to 1000."""
    state = {k: v.detach().clone().contiguous() for k, v in node.model.state_dict().items()}
    for t in state.values():
        t.view(-1)[0] = 1000.0
    sha = proving.state_dict_sha256(state)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{sha.hex()}.safetensors"
    save_file(state, str(path))
    return path, sha


def test_fresh_keys_cannot_outvote_verified_work(tmp_path):
    s = Served(tmp_path, samples_per_round=8)  # one node's 2 groups x G=4 close a round
    try:
        honest = HonestNode(s.address, tmp_path)
        sybils = [s.client() for _ in range(3)]
        for c in sybils:
            c.register()
        evil_path, evil_sha = poisoned_snapshot(honest, tmp_path / "evil")
        # before any round closed nothing may be published, however many keys report
        for c in sybils:
            c.heartbeat(1, computed=ref(1, evil_sha))
        assert "no round has closed" in refused_upload(sybils[0], evil_path, ref(1, evil_sha))
        # the honest node earns its ticket: round 0 closes with it as the only participant
        _, groups = honest.round_proofs()
        reply = honest.client.submit_proofs(flat(groups))
        assert reply.round_closed and all(v.accepted for v in reply.verdicts), [v.detail for v in reply.verdicts]
        # 3 fresh keys against 1 honest report
        for c in sybils:
            c.heartbeat(1, computed=ref(1, evil_sha))
        good_path, good_sha = changed_snapshot(honest, tmp_path / "good", 1.01)
        honest.client.heartbeat(1, computed=ref(1, good_sha))
        honest.client.heartbeat(1, computed=ref(1, good_sha))  # repeated by every heartbeat: logged once
        assert "weight 0 of round 0's 1" in refused_upload(sybils[0], evil_path, ref(1, evil_sha))
        with pytest.raises(CoordinatorError) as info:  # computed must name the next version
            sybils[1].heartbeat(1, computed=ref(2, evil_sha))
        assert info.value.code == "INVALID_ARGUMENT"
        reply = honest.client.upload_snapshot(good_path, ref(1, good_sha))
        assert reply.published == ref(1, good_sha) and (reply.supporting_reports, reply.total_reports) == (1, 4)
        assert sybils[0].manifest().snapshot.sha256 == good_sha

        entries = list(honest.client.get_log())
        reports = [e.payload for e in entries if e.kind == "hash_reported"]
        sybil_ids = {c.identity.node_id for c in sybils}
        assert [(p["round"], p["weight"], p["node_id"] in sybil_ids) for p in reports] == \
            [(None, 0.0, True)] * 3 + [(0, 0.0, True)] * 3 + [(0, 1.0, False)]
        refused = [e.payload for e in entries if e.kind == "upload_refused"]
        assert [(p["code"], p["node_id"], p["support_weight"]) for p in refused] == [
            ("NO_ROUND_CLOSED", sybils[0].identity.node_id, 0.0), ("NO_QUORUM", sybils[0].identity.node_id, 0.0)]
        published = [e.payload for e in entries if e.kind == "snapshot_published"][-1]
        assert published == {"version": 1, "sha256": good_sha.hex(), "round": 0, "support_weight": 1.0,
                             "total_weight": 1.0, "reporters": [honest.identity.node_id],
                             "uploader": honest.identity.node_id}
        hooks = load_hooks(entries[0].payload, model="tiny", snapshots=str(s.data_dir / "snapshots"),
                           allow_plugin_rewards=True)
        result = audit(entries, hooks, trusted_signers=[honest.reply.coordinator_public_key])
        assert result.ok, result.problem
        assert result.replayed["publications"] == 1 and result.replayed["upload_refusals"] == 2
    finally:
        s.stop()


def test_one_ticket_holder_cannot_close_the_next_round_alone_while_the_others_average(tmp_path):
    """The attack (found this session, run against the coordinator before the fix: it published
    version 1 with weights of its choosing): round 0 closes with a, b and h; while a and b average it,
    h starts round 1 at once, waits out the round timeout and submits, which closed round 1 with h
    as its only participant — all of the producing round's weight — and h's report alone published
    its weights. Now the open round does not close, timed out or full (h's two fresh keys doing
    round 1's work too), while the holders of more than half of round 0's weight are still
    averaging it; once a moves on, it closes with everyone who did round 1's work."""
    s = Served(tmp_path, samples_per_round=24, spot_check_rate=0.0, round_timeout_s=1.0)
    try:
        nodes = []
        for name in ("a", "b", "h", "s1", "s2"):
            (tmp_path / name).mkdir()
            nodes.append(HonestNode(s.address, tmp_path / name))
        a, b, h, *sybils = nodes
        for n in (a, b, h):
            n.submit(n.sample(n.heartbeat(completions_per_s=12.5, tokens_per_s=50.0)))
        assert h.client.heartbeat(0, sample=False).current_round == 1
        works = {n: n.sample(n.heartbeat(completions_per_s=12.5, tokens_per_s=50.0)) for n in (h, *sybils)}
        time.sleep(1.5)  # past round 1's timeout
        replies = [n.submit(works[n]) for n in (h, *sybils)]  # h's and then enough for a full round
        assert all(all(v.accepted for v in r.verdicts) for r in replies)
        assert not any(r.round_closed for r in replies) and replies[-1].current_round == 1
        for t in h.trainer.trainable:  # h's weights of choice, reported for version 1
            t.grad = torch.full_like(t, 100.0)
        h.trainer.apply_gradients()
        sha = h.state_sha256()
        h.report(1, sha)
        with pytest.raises(CoordinatorError, match="publishing needs more than 0.5"):
            h.upload(1, sha)
        # a is done with round 0 (its averaging failed, say): with h, more than half of round 0's weight
        a.submit(a.sample(a.heartbeat(completions_per_s=12.5, tokens_per_s=50.0)))
        hb = a.client.heartbeat(0, sample=False)
        assert hb.current_round == 2 and len(hb.round_participants) == 4  # h, its two keys and a
    finally:
        s.stop()


def test_a_lone_first_reporter_needs_more_than_half_and_reports_survive_a_restart(tmp_path):
    s = Served(tmp_path, samples_per_round=16)
    try:
        a, b = HonestNode(s.address, tmp_path), HonestNode(s.address, tmp_path)
        for n in (a, b):
            _, groups = n.round_proofs()
            assert all(v.accepted for v in n.client.submit_proofs(flat(groups)).verdicts)
        assert s.coordinator.state.current_round == 1  # round 0: a and b, 8 samples each
        path, sha = changed_snapshot(a, tmp_path / "a", 1.01)
        _, sha_b = changed_snapshot(b, tmp_path / "b", 1.01)  # b averaged the same gradients
        assert sha_b == sha
        a.client.heartbeat(1, computed=ref(1, sha))
        detail = refused_upload(a.client, path, ref(1, sha))
        assert "weight 0.5 of round 0's 1" in detail and "more than 0.5" in detail
        b.client.heartbeat(1, computed=ref(1, sha))
        coordinator_key = a.reply.coordinator_public_key
    finally:
        s.stop()
    s = Served(tmp_path, samples_per_round=16)  # the same data directory: the run resumes from its log
    try:
        client = CoordinatorClient(s.address, a.identity, coordinator_key=coordinator_key, timeout_s=30)
        reply = client.upload_snapshot(path, ref(1, sha))
        assert reply.published.version == 1 and (reply.supporting_reports, reply.total_reports) == (2, 2)
        result = audit(list(client.get_log()), trusted_signers=[coordinator_key])
        assert result.ok, result.problem
        assert result.replayed["publications"] == 1 and result.replayed["upload_refusals"] == 1
    finally:
        s.stop()


# ---- uploads under the default limits; cut uploads -----------------------------------------------------
CHUNK = 4 << 20
BIG_FLOATS = 136 * CHUNK // 4  # 570 MB of float32: with the header, 137 chunks of 4 MiB (SmolLM2: ~129)


def test_a_smollm2_size_snapshot_uploads_under_the_default_limits(tmp_path, monkeypatch):
    # a tiny-model run: its versions may not grow past 4 x its size, which a SmolLM2-size one does
    monkeypatch.setattr(core, "MAX_VERSION_GROWTH", 1000)
    s = Served(tmp_path, samples_per_round=8)  # ServerLimits(): 20 requests/s per key, burst 100
    big = tmp_path / "big.safetensors"
    try:
        node = HonestNode(s.address, tmp_path)
        _, groups = node.round_proofs()
        assert node.client.submit_proofs(flat(groups)).round_closed
        state = {"model.big": torch.full((BIG_FLOATS,), 0.5)}
        sha = proving.state_dict_sha256(state)
        save_file(state, str(big))
        del state
        size = big.stat().st_size
        assert size >= 540_000_000 and -(-size // CHUNK) >= 129
        node.client.heartbeat(1, computed=ref(1, sha))
        started = time.monotonic()
        reply = node.client.upload_snapshot(big, ref(1, sha), chunk_size=CHUNK, timeout_s=600)
        assert reply.published == ref(1, sha), time.monotonic() - started
        m = node.client.manifest()
        assert m.snapshot.sha256 == sha and m.total_bytes == size and len(m.chunk_sha256) == -(-size // CHUNK)
        assert s.coordinator.metrics.registry.get_sample_value(
            "grpo_coordinator_requests_total", {"method": "UploadSnapshot", "code": "RESOURCE_EXHAUSTED"}) is None
    finally:
        s.stop()
        big.unlink(missing_ok=True)
        shutil.rmtree(s.data_dir / "snapshots", ignore_errors=True)


def test_a_cut_upload_leaves_no_partial_file_after_a_restart(tmp_path):
    """kill -9 of ``grpo-coordinator serve`` while it receives an upload; the restart removes the
    partial file (and a cut save_snapshot's), keeps the snapshots, and the standing report still
    lets the node publish."""
    config = write_run_toml(tmp_path / "run.toml", samples_per_round=8)
    data = tmp_path / "coord"
    snaps = data / "snapshots"
    junk = tmp_path / "junk.bin"
    serve = ServeProcess(tmp_path, config, data, "a")
    try:
        node = HonestNode(serve.address, tmp_path)
        coordinator_key = node.reply.coordinator_public_key
        _, groups = node.round_proofs()
        assert node.client.submit_proofs(flat(groups)).round_closed
        path, sha = changed_snapshot(node, tmp_path / "up", 1.01)
        node.client.heartbeat(1, computed=ref(1, sha))
        with open(junk, "wb") as f:  # a large upload under that hash, cut while it streams
            f.truncate(384 << 20)
        errors: list[Exception] = []

        def upload():
            try:
                node.client.upload_snapshot(junk, ref(1, sha), timeout_s=120)
            except CoordinatorError as e:
                errors.append(e)

        t = threading.Thread(target=upload)
        t.start()
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in snaps.glob(".upload-*")):
            assert t.is_alive() and time.monotonic() < deadline, errors
            time.sleep(0.002)
        os.kill(serve.proc.pid, signal.SIGKILL)
        serve.proc.wait(30)
        t.join(60)
        assert not t.is_alive() and errors and list(snaps.glob(".upload-*"))
        (snaps / f"{sha.hex()}.tmp4242").write_bytes(b"a save_snapshot cut short")
        (snaps / f"{sha.hex()}.manifest.tmp").write_bytes(b"a manifest cut short")
        kept = sorted(p.name for p in snaps.iterdir() if not p.name.startswith(".upload-") and ".tmp" not in p.name)
    finally:
        serve.stop()
        junk.unlink(missing_ok=True)

    restarted = ServeProcess(tmp_path, config, data, "b")
    try:
        assert sorted(p.name for p in snaps.iterdir()) == kept  # the leftovers are gone, nothing else
        client = CoordinatorClient(restarted.address, node.identity, coordinator_key=coordinator_key, timeout_s=30)
        assert client.upload_snapshot(path, ref(1, sha)).published.version == 1
    finally:
        restarted.proc.send_signal(signal.SIGTERM)
        restarted.proc.wait(30)
        restarted.stop()
    out = cli("grpo-audit", "verify", str(data / "protocol.sqlite"), "--signer", coordinator_key.hex(), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
