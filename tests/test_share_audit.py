"""The share audit's arithmetic and verdicts without a network (node/swarm/share_sketch.py,
share_audit.py; the multi-process cases are in tests/test_swarm_averaging.py): the layout follows
hivemind's own partition, sketches are linear and the same on every platform, an honest average
passes under many projections and a wrong one fails, a lying sender is named by its reducer, the
signed entries refuse what was not signed for this group and phase, and the coordinator report
leaves out a reducer whose word stands against a sender's, and a member that signs two different
entries is held to both."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import Float16Compression, NoCompression

from grpo_swarm.node.swarm.round_report import SELF_EXCLUDED, AttemptReport, RoundResult
from grpo_swarm.node.swarm.share_audit import (
    PHASE_REVEAL,
    PHASE_SKETCH,
    AuditEntryError,
    AuditStore,
    Sender,
    audit_seed,
    check_reveal,
    check_sketch_body,
    commitment,
    decode_entry,
    encode_entry,
    judge,
    nonce_for,
    sketch_body,
)
from grpo_swarm.node.swarm.share_sketch import (
    HALF_BLOCK_ROWS,
    ROW,
    SKETCH_DIMS,
    Projection,
    ShareLayout,
    always_audited,
    flat_views,
    plausible,
    share_residual,
    share_tolerance,
    sketch_parts,
    sketch_share,
    sketch_tolerance,
)
from grpo_swarm.node.swarm.reasons import Reason
from grpo_swarm.protocol.identity import Identity

SHAPES = [(3000,), (40, 25), (7,), (20000,)]
WEIGHTS = [3.0, 5.0, 7.0]


def _layout(tensors, compression=NoCompression(), part_size_bytes=8192):
    c = TensorPartContainer(tensors, [1.0] * len(WEIGHTS), compression=compression, part_size_bytes=part_size_bytes)
    parts = [[p for p, _ in ps] for ps in c._input_parts_by_peer]
    return ShareLayout.from_partition([[p.numel() for p in ps] for ps in parts], c.num_parts_by_tensor), parts


def _grads(seed):
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(s, generator=g) for s in SHAPES]


def test_layout_follows_hiveminds_partition_and_sketches_of_parts_match():
    xs = _grads(0)
    layout, parts = _layout(xs, part_size_bytes=4 * ROW * 3 + 40)  # parts not a multiple of a row
    flat = flat_views(xs)
    for j in range(layout.num_shares):
        assert len(layout.parts[j]) == len(parts[j])
        for span, part in zip(layout.parts[j], parts[j]):  # each part is where the layout says
            assert torch.equal(flat[span.tensor_index][span.start: span.start + span.numel], part)
        proj = Projection.draw(b"seed", j, layout.rows[j])
        by_share = sketch_share(layout, j, flat, proj)
        by_parts = sketch_parts(layout, j, [p.clone() for p in parts[j]], proj)
        np.testing.assert_allclose(by_parts, by_share, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["float32", "through_fp16", "float16"])
def test_a_sampled_share_sketched_at_once_equals_the_sum_of_its_spans(kind):
    # the sampled path gathers every span's rows into shared blocks (and short last rows into one
    # padded block); it must give what sketching span by span gives, across block edges, with spans of
    # a few values, tails sampled or not, and rows always read
    g = torch.Generator().manual_seed(3)
    shapes = [(700 * ROW + 5,), (7,), (ROW,), (3 * ROW + 1000,), (300 * ROW,), (ROW - 1,), (9 * ROW + 3,)]
    xs = [0.1 * torch.randn(s, generator=g) for s in shapes]
    layout, _ = _layout(xs, part_size_bytes=4 * ROW * 97 + 44)
    flat = flat_views([x.half() for x in xs] if kind == "float16" else xs)
    for j in range(layout.num_shares):
        for fraction in (0.25, 0.9, 2.0 ** -10):
            proj = Projection.draw(b"seed", j, layout.rows[j], fraction=fraction, always=always_audited(layout, j))
            got = sketch_share(layout, j, flat, proj, through_fp16=kind == "through_fp16")
            want = sum(proj.block(flat[s.tensor_index][s.start: s.start + s.numel], s.row_offset,
                                  kind == "through_fp16").numpy() for s in layout.spans[j])
            norm = float(torch.cat([f.float() for f in flat]).norm())
            np.testing.assert_allclose(got, want, rtol=0, atol=sketch_tolerance(norm) * 1e-2)
            if fraction > 0.1:  # (rows were read: 2^-10 of a share may be none but its small parts)
                assert np.abs(got).max() > 100 * sketch_tolerance(norm)


@pytest.mark.parametrize("numel", [5, ROW, 3 * ROW + 17, (HALF_BLOCK_ROWS + 3) * ROW, (2 * HALF_BLOCK_ROWS) * ROW + 1])
def test_a_float16_block_sketches_as_its_float32_values(numel):
    # fp16 parts are sketched from their bytes, converted a block of rows at a time: the sketch must be
    # that of the exact float32 values (up to float32 summation order), wherever the blocks end
    half = (0.1 * torch.randn(numel, generator=torch.Generator().manual_seed(numel))).half()
    proj = Projection.draw(b"seed", 0, -(-numel // ROW) + 2)
    got, want = proj.block(half, 2).numpy(), proj.block(half.float(), 2).numpy()
    assert not np.array_equal(want, np.zeros_like(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=sketch_tolerance(float(half.float().norm())))


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_a_sender_sketches_its_fp16_parts_without_keeping_them(fraction):
    # with Float16Compression a sender sketches its float32 gradient rounded through float16 in the
    # sketch's own blocks, instead of keeping the parts it sent: the sketch must be that of the
    # bytes hivemind sent (values past float16's range clamped, as its compress does), whole spans
    # and short tails alike, and must differ from the sketch of the unrounded values
    from hivemind.compression import CompressionInfo

    xs = _grads(7)
    xs[0].view(-1)[:3] = torch.tensor([1e6, -1e6, 65519.0])  # past the range, and at its rounding edge
    layout, parts = _layout(xs, Float16Compression(), part_size_bytes=4 * ROW * 3 + 40)
    flat = flat_views(xs)
    for j in range(layout.num_shares):
        proj = Projection.draw(b"seed", j, layout.rows[j], fraction=fraction, always=always_audited(layout, j))
        sent = [torch.from_numpy(np.frombuffer(Float16Compression().compress(
            part, CompressionInfo.from_tensor(part)).buffer, dtype=np.float16).copy()) for part in parts[j]]
        want = sketch_parts(layout, j, sent, proj)
        got = sketch_share(layout, j, flat, proj, through_fp16=True)
        norm = float(torch.cat([t.float() for t in sent]).norm())
        # float32 products of the same rows in other batches differ in the last bits (~1e-2 of the
        # tolerance here, with values up to 65504); fp16 rounding left out would differ by ~1x of it
        np.testing.assert_allclose(got, want, rtol=0, atol=sketch_tolerance(norm) * 0.05)
        if j == 0 and fraction == 1.0:  # the clamped values are in share 0's first row
            assert np.abs(sketch_share(layout, j, flat, proj) - want).max() > sketch_tolerance(norm)


def test_projection_is_portable_and_seeded():
    p = Projection.draw(b"seed", 2, 5)
    assert p.U.shape == (ROW, SKETCH_DIMS) and p.V.shape == (5, SKETCH_DIMS) and p.U.dtype == torch.float32
    # the values are SHAKE-256 integers scaled: pin them, so another platform must draw the same
    digest = hashlib.sha256(p.U.numpy().tobytes() + p.V.numpy().tobytes()).hexdigest()
    assert digest == "699b565c0e48a1036356e70fdb27d4f0bce42d20bfb3d13c89206f7ff8c6fe3f"
    assert not torch.equal(p.U, Projection.draw(b"seed", 1, 5).U)
    assert not torch.equal(p.U, Projection.draw(b"other", 2, 5).U)
    assert abs(float(p.U.pow(2).mean()) - 1.0) < 0.05  # unit variance: E[(r.x)^2] = |x|^2
    assert float(p.U.abs().max()) <= 3 ** 0.5
    v = Projection.draw(b"seed", 2, 4096).V  # row weights: 8-bit draws, also unit variance, and 256 levels
    assert abs(float(v.pow(2).mean()) - 1.0) < 0.02 and abs(float(v.mean())) < 0.02
    assert float(v.abs().max()) <= 3 ** 0.5 and v.unique().numel() == 256


@pytest.mark.parametrize("compression", [NoCompression(), Float16Compression()], ids=["none", "fp16"])
def test_honest_average_passes_and_a_wrong_one_fails(compression):
    fp16 = isinstance(compression, Float16Compression)
    xs = [_grads(i) for i in range(3)]
    layout, _ = _layout(xs[0], compression)
    sent = [[t.half().float() for t in x] if fp16 else x for x in xs]
    avg = [sum(w * s[k] for w, s in zip(WEIGHTS, sent)) / sum(WEIGHTS) for k in range(len(SHAPES))]
    if fp16:
        avg = [a.half().float() for a in avg]
    norms = [float(torch.cat([t.reshape(-1) for t in x]).norm()) for x in xs]
    for trial in range(20):
        for j in range(layout.num_shares):
            proj = Projection.draw(bytes([trial]), j, layout.rows[j])
            ins = [sketch_share(layout, j, flat_views(x), proj) for x in sent]  # what the reducer added up
            assert all(plausible(s, n) for s, n in zip(ins, norms))
            out_norm = float(torch.sqrt(sum(flat_views(avg)[s.tensor_index][s.start:s.start + s.numel].double().pow(2)
                                            .sum() for s in layout.spans[j])))
            tol = share_tolerance(out_norm, WEIGHTS, norms, layout.numel(j), fp16_output=fp16)
            honest = np.abs(share_residual(sketch_share(layout, j, flat_views(avg), proj), ins, WEIGHTS)).max()
            assert honest < 0.5 * tol  # ~7 sigma of the honest rounding; the tolerance is ~14
            bad = [a.clone() for a in avg]
            span = layout.spans[j][0]
            flat_views(bad)[span.tensor_index][span.start] += 0.05 * out_norm  # 5 % of the share's norm
            wrong = np.abs(share_residual(sketch_share(layout, j, flat_views(bad), proj), ins, WEIGHTS)).max()
            assert wrong > tol


def test_a_sampled_audit_reads_its_secret_rows_and_catches_a_change_there():
    # sampling rows is the full projection with the other rows' weights zeroed, for float32 and
    # float16 values, for whole spans and for parts; small parts are always read; a reducer that
    # changes m rows, not knowing the seed, escapes about (1 - f)^m of the audits
    x = torch.randn(3_000_000)
    layout = ShareLayout.from_partition([[1_000_000, 1_000_000, 500, 999_500]], [2, 2])
    assert always_audited(layout, 0) == [(1954, 1)]
    for fraction in (0.25, 0.05):
        proj = Projection.draw(b"seed", 0, layout.rows[0], fraction=fraction, always=always_audited(layout, 0))
        assert abs(len(proj.sampled) / layout.rows[0] - fraction) < 0.03 and 1954 in proj.sampled
        weights = torch.zeros(layout.rows[0], 1)
        weights[torch.from_numpy(proj.sampled)] = 1.0
        full = Projection(proj.U, proj.V * weights)
        for values in (x, x.half()):
            flat = [values[:2_000_000].float(), values[2_000_000:].float()]
            parts = [values[:1_000_000], values[1_000_000:2_000_000], values[2_000_000:2_000_500], values[2_000_500:]]
            want, atol = sketch_share(layout, 0, flat, full), sketch_tolerance(float(values.float().norm()))
            np.testing.assert_allclose(sketch_share(layout, 0, flat, proj), want, rtol=0, atol=atol)
            np.testing.assert_allclose(sketch_parts(layout, 0, parts, proj), want, rtol=0, atol=atol)  # float16 blocks
    flat = [x[:2_000_000], x[2_000_000:]]
    tol = share_tolerance(float(x.norm()), [1.0], [float(x.norm())], x.numel(), fp16_output=False)

    def caught(rows, seed, fraction=0.25):
        proj = Projection.draw(seed, 0, layout.rows[0], fraction=fraction, always=always_audited(layout, 0))
        bad = [t.clone() for t in flat]
        for r in rows:  # one value per row, moved by 1 % of the share's norm
            bad[0 if r < 1954 else 1][r * ROW if r < 1954 else (r - 1954) * ROW] += 0.01 * x.norm()
        return np.abs(sketch_share(layout, 0, bad, proj) - sketch_share(layout, 0, flat, proj)).max() > tol

    assert all(caught([1954], bytes([s])) for s in range(10))  # the 500-value part: read at any fraction
    assert all(caught(range(0, 1900, 19), bytes([s])) for s in range(10))  # 100 rows: escape 0.75^100
    escaped_one = sum(not caught([7], bytes([s])) for s in range(200)) / 200
    escaped_four = sum(not caught([7, 300, 901, 1500], bytes([s])) for s in range(200)) / 200
    assert 0.62 < escaped_one < 0.87 and 0.2 < escaped_four < 0.44  # 0.75 and 0.32
    assert all(caught([7], bytes([s]), fraction=1.0) for s in range(10))


def test_plausibility_bounds_a_sketch_by_the_committed_norm():
    x = torch.randn(50000)
    layout = ShareLayout.from_partition([[50000]], [1])
    proj = Projection.draw(b"s", 0, layout.rows[0])
    s = sketch_share(layout, 0, [x], proj)
    assert plausible(s, float(x.norm()))
    assert not plausible(s * 100, float(x.norm()))
    assert not plausible(np.full(SKETCH_DIMS, np.nan), 1.0)
    assert not plausible(s[:3], float(x.norm()))


def _peers(n=3):
    ids = [Identity.from_seed(bytes([i + 7]) * 32) for i in range(n)]
    return ids, {i.peer_id: i.public_key_bytes for i in ids}


def test_entries_are_bound_to_signer_group_and_phase():
    ids, keys = _peers()
    gid = b"group-1"
    nonce = nonce_for(b"secret", 4, 0)
    entry = encode_entry(ids[0], gid, PHASE_REVEAL, nonce)
    signer, body = decode_entry(entry, keys, gid, PHASE_REVEAL)
    assert signer == ids[0].peer_id and check_reveal(body, commitment(nonce)) == nonce
    with pytest.raises(AuditEntryError, match="another group"):
        decode_entry(entry, keys, b"group-2", PHASE_REVEAL)
    with pytest.raises(AuditEntryError, match="another group or phase"):
        decode_entry(entry, keys, gid, PHASE_SKETCH)
    with pytest.raises(AuditEntryError, match="contributor"):
        decode_entry(entry, {ids[1].peer_id: ids[1].public_key_bytes}, gid, PHASE_REVEAL)
    tampered = bytearray(entry)
    tampered[-70] ^= 1
    with pytest.raises(AuditEntryError):
        decode_entry(bytes(tampered), keys, gid, PHASE_REVEAL)
    with pytest.raises(AuditEntryError, match="commitment"):
        check_reveal(nonce_for(b"secret", 4, 1), commitment(nonce))
    # the seed needs every nonce: one member's change changes it
    assert audit_seed(gid, [b"a" * 32, b"b" * 32]) != audit_seed(gid, [b"a" * 32, b"c" * 32])
    with pytest.raises(AuditEntryError, match="floats"):
        check_sketch_body([[[1.0] * 3], [None]], 1)
    with pytest.raises(AuditEntryError, match="finite"):
        check_sketch_body([[[float("inf")] * SKETCH_DIMS], [None]], 1)


def test_the_store_judges_with_first_entries_and_keeps_the_proof_of_equivocation():
    """An entry store as a member's audit exchange fills it: pushes before the group's keys are known
    wait unchecked; afterwards only valid entries count, the first of each signer is kept for good,
    and a second, differently signed one is kept as the proof — but the same signed payload framed
    differently by a relayer (the framing is not signed) is not taken for equivocation."""
    import msgpack

    ids, keys = _peers()
    gid = b"group-1"
    store = AuditStore(gid, PHASE_SKETCH)
    honest = encode_entry(ids[1], gid, PHASE_SKETCH, [[None], [None]])
    store.push(ids[1].peer_id, honest)
    store.push(ids[1].peer_id, b"again")  # one unchecked push per caller
    assert store.entries() == [honest] and not store.complete()
    store.expect(keys)
    assert store.bodies() == {ids[1].peer_id: [[None], [None]]} and not store.complete()
    assert store.add(b"garbage") is None
    assert store.add(encode_entry(ids[0], b"group-2", PHASE_SKETCH, [[None], [None]])) is None
    store.add(encode_entry(ids[0], gid, PHASE_SKETCH, [[None], [None]]))
    # a relayer re-frames ids[2]'s entry: a bin32 header instead of bin8 (same payload, same signature)
    first = encode_entry(ids[2], gid, PHASE_SKETCH, [[None], [None]])
    payload, signature = msgpack.unpackb(first)
    reframed = b"\x92" + b"\xc6" + len(payload).to_bytes(4, "big") + payload + msgpack.packb(signature)
    assert reframed != first and msgpack.unpackb(reframed) == [payload, signature]
    assert store.add(first) == store.add(reframed) == ids[2].peer_id
    assert store.complete() and not store.equivocators()
    lie = encode_entry(ids[1], gid, PHASE_SKETCH, [[[1.0] * SKETCH_DIMS], [None]])
    assert store.add(lie) == ids[1].peer_id
    assert store.equivocators() == {ids[1].peer_id}
    assert store.bodies()[ids[1].peer_id] == [[None], [None]]  # the first stays what we judge with
    assert lie in store.entries() and honest in store.entries()  # the proof goes out with our answers


def _judge_world(lie_share=None, wrong_share=None, liar=1, wrong_by=1.0, silent=(), best_lie=False):
    """Three members, each reducing one share; member 0 judges. Returns judge()'s findings. ``silent``:
    members whose sketch entries never came; ``best_lie``: the reducer of ``wrong_share`` sends, for its
    own share, the sketch that makes it add up exactly (it holds every part it added up)."""
    ids, _ = _peers()
    me = ids[0].peer_id
    xs = [_grads(i) for i in range(3)]
    layout, _ = _layout(xs[0])
    avg = [sum(w * x[k] for w, x in zip(WEIGHTS, xs)) / sum(WEIGHTS) for k in range(len(SHAPES))]
    if wrong_share is not None:
        span = layout.spans[wrong_share][0]
        flat_views(avg)[span.tensor_index][span.start] += wrong_by
    norms = [float(torch.cat([t.reshape(-1) for t in x]).norm()) for x in xs]
    projs = [Projection.draw(b"seed", j, layout.rows[j]) for j in range(3)]
    sketches = {}
    for i, ident in enumerate(ids):
        ins = [sketch_share(layout, j, flat_views(xs[i]), projs[j]) for j in range(3)]
        if i == liar and lie_share is not None:
            ins[lie_share] = ins[lie_share] + 0.5
        outs = [sketch_share(layout, j, flat_views(avg), projs[j]) for j in range(3)]
        sketches[ident.peer_id] = check_sketch_body(sketch_body(ins, outs), 3)
    if best_lie:
        j, w = wrong_share, np.asarray(WEIGHTS)
        others = sum(w[i] * sketches[ids[i].peer_id][0][j] for i in range(3) if i != j)
        sketches[ids[j].peer_id][0][j] = (w.sum() * sketches[me][1][j] - others) / w[j]
    for i in silent:
        del sketches[ids[i].peer_id]
    # member 0 reduces share 0: what it received from 1 and 2 (their true parts)
    received = {ids[i].peer_id: (sketch_share(layout, 0, flat_views(xs[i]), projs[0]),
                                 float(torch.sqrt(sum(flat_views(xs[i])[s.tensor_index][s.start:s.start + s.numel]
                                                      .double().pow(2).sum() for s in layout.spans[0]))))
                for i in (1, 2)}
    out_norms = [float(torch.sqrt(sum(flat_views(avg)[s.tensor_index][s.start:s.start + s.numel].double().pow(2)
                                      .sum() for s in layout.spans[j]))) for j in range(3)]
    calls = []  # judge() asks for the reducer's own sketches of what it received only when needed
    return ids, judge(me=me, senders=[Sender(i.peer_id, w, n) for i, w, n in zip(ids, WEIGHTS, norms)],
                      reducers=[i.peer_id for i in ids], share_numels=[layout.numel(j) for j in range(3)],
                      my_outputs=sketches[me][1], output_norms=out_norms, sketches=sketches,
                      received=lambda: calls.append(1) or received, fp16_output=False), calls


def test_judge_honest_wrong_average_and_lying_sender():
    ids, found, calls = _judge_world()
    assert found.clean and not calls  # nothing to dispute: the reducer's received parts are not sketched
    ids, found, calls = _judge_world(wrong_share=2)
    assert list(found.accused) == [ids[2].peer_id] and found.accused[ids[2].peer_id][0] == Reason.WRONG_AVERAGE
    assert not calls  # another reducer's share is wrong: member 0's own share adds up
    # member 1 lies about what it sent to share 0 (member 0's): member 0 holds the parts and names it
    ids, found, calls = _judge_world(lie_share=0, liar=1)
    assert found.accused == {ids[1].peer_id: found.accused[ids[1].peer_id]} and calls == [1]
    assert found.accused[ids[1].peer_id][0] == Reason.SKETCH_MISMATCH
    # member 2 lies about share 1 (member 1's): member 0 can only blame that reducer
    ids, found, calls = _judge_world(lie_share=1, liar=2)
    assert list(found.accused) == [ids[1].peer_id] and found.accused[ids[1].peer_id][0] == Reason.WRONG_AVERAGE


def test_a_sketch_withheld_is_judged_as_the_best_lie_its_sender_could_have_told():
    """A member that revealed its nonce and then sent no sketch (a crash, or a reducer that saw the
    rows would catch it): the shares are judged without it, so its silence is no accusation. Silence
    never beats speaking: a wrong average its reducer could hide with a sketch chosen to make its
    share add up passes either way (the audit's stated bound), and one no sketch can hide is caught
    in silence too."""
    ids, found, calls = _judge_world(silent=(2,))
    assert found.clean and not calls
    ids, found, _ = _judge_world(silent=(1,))  # member 0's own share, with a sender silent: still adds up
    assert found.clean
    for wrong_by, caught in ((1.0, False), (1000.0, True)):
        ids, spoken, _ = _judge_world(wrong_share=2, wrong_by=wrong_by, best_lie=True)
        ids, quiet, _ = _judge_world(wrong_share=2, wrong_by=wrong_by, silent=(2,))
        assert (ids[2].peer_id in spoken.accused) == (ids[2].peer_id in quiet.accused) == caught, (spoken, quiet)
        if caught:  # spoken, the sketch that adds up is too large for its norm; silent, the share
            assert spoken.accused[ids[2].peer_id][0] == Reason.SKETCH_IMPLAUSIBLE
            assert quiet.accused[ids[2].peer_id][0] == Reason.WRONG_AVERAGE
            assert "no sketch from 1 sender" in quiet.accused[ids[2].peer_id][1]
    # the naive liar (its true sketch) is caught at 1.0 when it speaks: what its silence would have spared
    # it before, were silence not judged
    ids, naive, _ = _judge_world(wrong_share=2, wrong_by=1.0)
    assert naive.accused[ids[2].peer_id][0] == Reason.WRONG_AVERAGE
    # two silent members (a reducer and a colluder) have the room of both, and no more
    ids, pair, _ = _judge_world(wrong_share=2, wrong_by=1000.0, silent=(1, 2))
    assert pair.accused[ids[2].peer_id][0] == Reason.WRONG_AVERAGE and ids[1].peer_id not in pair.accused
    ids, pair, _ = _judge_world(wrong_share=2, wrong_by=1.0, silent=(1, 2))
    assert pair.clean


def test_reportable_leaves_out_a_reducer_that_names_a_liar():
    r, s = "reducer", "sender"
    blamed = AttemptReport(attempt=0, accused={r: "WRONG_AVERAGE: off"})
    named = AttemptReport(attempt=1, excluded={r: "ACCUSED: (WRONG_AVERAGE) by 1", s: "ACCUSED: (SKETCH_MISMATCH)"},
                          accusations_seen={r: {s: "SKETCH_MISMATCH"}, s: {r: "WRONG_AVERAGE"}})
    silent = AttemptReport(attempt=1, excluded={r: "ACCUSED: (WRONG_AVERAGE) by 1"}, accusations_seen={r: {}})
    assert r not in RoundResult(False, 3, None, [blamed, named], 1.0).reportable()
    # the sender was excluded for the reducer's accusation: the reducer reports it, not us (hearsay)
    assert s not in RoundResult(False, 3, None, [blamed, named], 1.0).reportable()
    verified = AttemptReport(attempt=0, excluded={s: "TICKET_BAD_SIGNATURE: forged"})
    assert RoundResult(False, 3, None, [verified], 1.0).reportable() == {s: "TICKET_BAD_SIGNATURE: forged"}
    assert r in RoundResult(False, 3, None, [blamed, silent], 1.0).reportable()
    # a sender that held its entry back until the reducer gave up: the reducer names it as silent
    held_back = AttemptReport(attempt=1, excluded={r: "ACCUSED: (WRONG_AVERAGE) by 1"},
                              accusations_seen={r: {s: "AUDIT_WITHHELD"}})
    assert r not in RoundResult(False, 3, None, [blamed, held_back], 1.0).reportable()
    unrelated = AttemptReport(attempt=1, excluded={r: "ACCUSED: (WRONG_AVERAGE) by 1"},
                              accusations_seen={r: {s: "NON_FINITE"}})
    assert r in RoundResult(False, 3, None, [blamed, unrelated], 1.0).reportable()
    # never seen again after the accusation: one word against another is possible, so not reported
    assert r not in RoundResult(False, 3, None, [blamed], 1.0).reportable()
    other = AttemptReport(attempt=0, accused={s: "NON_FINITE: part 0"})
    assert RoundResult(False, 3, None, [other], 1.0).reportable() == {s: "NON_FINITE: part 0"}


def test_reportable_leaves_out_one_word_against_another():
    """Left out for the group's first-failure pointers, or as a sole accuser: one word against another
    (a dropped connection looks like a hang-up), never reported. A first attempt naming anyone is
    signed evidence of its own, and is."""
    excluded = {"a": "BROKE_FIRST: 2 of the 2 other members saw it fail first",
                "b": "BROKE_WITH: named by a member that broke the last attempt first",
                "c": "UNCORROBORATED: no other member backs its accusation of d",
                "d": "ACCUSED: named earlier in this round (NON_FINITE) by 1 member(s)",
                "e": "ACCUSES_UNPROMPTED: its first attempt of the round already names a peer"}
    result = RoundResult(False, 3, None, [AttemptReport(attempt=1, excluded=excluded)], 1.0)
    assert result.reportable() == {"e": excluded["e"]}
    left_out = RoundResult(False, 3, None, [], 1.0, error=f"{SELF_EXCLUDED}: {excluded['a']}")
    assert left_out.left_out_as_breaker and not left_out.left_out_as_stalled and not result.left_out_as_breaker


def test_a_disputed_wrong_average_is_left_out_of_the_next_gathers():
    """An honest member framed into blaming a reducer, then seeing the reducer name the liar, drops
    that accusation: kept with its true accusation of the liar, it would accuse most of a group of
    three and be left out (ACCUSES_MOST: seen in the equivocation test). It keeps it when the
    reducer names this member itself, or only repeats a counter it had already made."""
    from grpo_swarm.node.swarm.round_report import withdrawn_wrong_averages

    me, r, s = "me", "reducer", "sender"
    blamed = AttemptReport(attempt=0, accused={r: "WRONG_AVERAGE: off"}, accusations_seen={r: {}})
    names_liar = AttemptReport(attempt=1, accusations_seen={r: {s: "BAD_AUDIT_ENTRY"}})
    assert withdrawn_wrong_averages([blamed, names_liar], me) == {r}
    assert withdrawn_wrong_averages([blamed], me) == set()  # not seen again yet
    names_me = AttemptReport(attempt=1, accusations_seen={r: {me: "SKETCH_MISMATCH"}})
    assert withdrawn_wrong_averages([blamed, names_me], me) == set()
    unrelated = AttemptReport(attempt=1, accusations_seen={r: {s: "NON_FINITE"}})
    assert withdrawn_wrong_averages([blamed, unrelated], me) == set()
    # a counter made before the accusation shields nothing: the reducer must answer this one
    old_counter = AttemptReport(attempt=1, accused={r: "WRONG_AVERAGE: off again"},
                                accusations_seen={r: {s: "SKETCH_MISMATCH"}})
    repeated = AttemptReport(attempt=2, accusations_seen={r: {s: "SKETCH_MISMATCH"}})
    assert withdrawn_wrong_averages([AttemptReport(attempt=0), old_counter, repeated], me) == set()
