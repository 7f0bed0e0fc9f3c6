"""grpo_swarm.protocol.log: append-only signed hash chain in SQLite (WAL), JSONL export/import,
tamper detection naming the first bad entry, and fuzzing of every parser."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from json_strategies import json_values

from grpo_swarm.protocol.identity import Identity
from grpo_swarm.protocol.log import (
    ENTRY_DOMAIN,
    GENESIS_HASH,
    KINDS,
    SIGN_DOMAIN,
    LogEntry,
    LogError,
    ProtocolLog,
    canonical_json,
    parse_jsonl_line,
    read_jsonl,
    read_log,
    verify_entries,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture])
COORD = Identity.from_seed(b"\x11" * 32)
MALLORY = Identity.from_seed(b"\x66" * 32)
T0 = 1_700_000_000_000


def fill(log: ProtocolLog, n: int = 8) -> list[LogEntry]:
    out = [log.append("run_started", {"run_id": "r", "log_signers": [COORD.public_key_bytes.hex()]}, COORD, time_ms=T0)]
    for i in range(1, n):
        kind = KINDS[1 + i % (len(KINDS) - 1)]
        out.append(log.append(kind, {"i": i, "x": [1.5, None, True, "ü"], "nested": {"b": 1, "a": -2**70}}, COORD,
                              time_ms=T0 + i))
    return out


@pytest.fixture
def log(tmp_path):
    with ProtocolLog(tmp_path / "log.sqlite") as db:
        fill(db)
        yield db


def raw(db: ProtocolLog) -> sqlite3.Connection:
    """A plain connection with the append-only triggers removed: what an attacker with the file does."""
    con = sqlite3.connect(str(db.path), isolation_level=None)
    con.execute("DROP TRIGGER entries_no_update")
    con.execute("DROP TRIGGER entries_no_delete")
    return con


# ---- spec ----------------------------------------------------------------------------------------
def test_canonical_json_spec():
    assert canonical_json({"b": [1, 2.5, None, True], "a": "é", "c": {"z": 1e-5, "y": 10**30}}) == (
        b'{"a":"\\u00e9","b":[1,2.5,null,true],"c":{"y":1000000000000000000000000000000,"z":1e-05}}')
    assert canonical_json((1, 2)) == b"[1,2]"
    for bad in ({1: "x"}, {"x": float("nan")}, {"x": float("inf")}, {"x": b"bytes"}, {"x": object()}):
        with pytest.raises(ValueError):
            canonical_json(bad)
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ValueError, match="deeper"):
        canonical_json(deep)


def test_entry_hash_and_signature_spec(log):
    e = log.get(1)
    body = canonical_json({"index": 1, "prev_hash": log.get(0).hash.hex(), "time_ms": e.time_ms, "kind": e.kind,
                           "payload": e.payload, "signer": COORD.public_key_bytes.hex()})
    assert e.hash == hashlib.sha256(ENTRY_DOMAIN + body).digest()
    assert COORD.verify(SIGN_DOMAIN + e.hash, e.signature)
    assert log.get(0).prev_hash == GENESIS_HASH
    assert e.prev_hash == log.get(0).hash


def test_append_read_and_pragmas(log):
    assert len(log) == 8 and [e.index for e in log] == list(range(8))
    assert log.head()[0] == 8
    assert log.verify_chain() is None
    assert log.verify_chain(trusted_signers=[COORD.public_key_bytes]) is None
    assert log._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert log._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert [e.index for e in log.entries(kind="node_registered")] == [e.index for e in log if e.kind == "node_registered"]
    with pytest.raises(LogError, match="entry 99"):
        log.get(99)
    # time never goes backwards: an explicit earlier time is refused, the clock default is clamped
    with pytest.raises(ValueError, match="before"):
        log.append("node_banned", {}, COORD, time_ms=T0)
    for bad_payload, bad_kind in (({"x": float("nan")}, "node_banned"), ([1], "node_banned"), ({}, "bad kind!"),
                                  ({}, "")):
        with pytest.raises(ValueError):
            log.append(bad_kind, bad_payload, COORD)
    assert len(log) == 8  # failed appends leave nothing behind


def test_log_is_append_only_in_sqlite(log):
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        log._db.execute("UPDATE entries SET kind = 'x' WHERE idx = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        log._db.execute("DELETE FROM entries WHERE idx = 7")


def test_reopen_and_concurrent_writers(tmp_path):
    path = tmp_path / "log.sqlite"
    a = ProtocolLog(path)
    b = ProtocolLog(path)
    a.append("run_started", {"run_id": "r"}, COORD)
    for i in range(10):
        (a if i % 2 else b).append("node_registered", {"i": i}, COORD)
    a.close()
    b.close()
    with ProtocolLog(path, create=False) as c:
        assert len(c) == 11 and c.verify_chain() is None


def _append_many(path, n):
    with ProtocolLog(path) as db:
        for i in range(n):
            db.append("node_registered", {"i": i}, COORD)


def test_appends_from_two_processes_keep_one_chain(tmp_path):
    path = tmp_path / "log.sqlite"
    with ProtocolLog(path) as db:
        db.append("run_started", {"run_id": "r"}, COORD)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), 15)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with ProtocolLog(path, create=False) as db:
        assert len(db) == 31 and db.verify_chain() is None


# ---- tampering: the first bad entry is named ------------------------------------------------------
def test_modified_payload_is_pinpointed(log):
    con = raw(log)
    con.execute("UPDATE entries SET payload = ? WHERE idx = 5", (canonical_json({"i": 500}).decode(),))
    problem = log.verify_chain()
    assert problem.index == 5 and "modified" in problem.reason


def test_rehashed_but_not_resigned_is_pinpointed(log):
    e = log.get(4)
    forged_hash = LogEntry.compute_hash(4, e.prev_hash, e.time_ms, e.kind, {"i": 400}, e.signer)
    con = raw(log)
    con.execute("UPDATE entries SET payload = ?, hash = ? WHERE idx = 4",
                (canonical_json({"i": 400}).decode(), forged_hash))
    problem = log.verify_chain()
    assert problem.index == 4 and "signature" in problem.reason


def test_rewritten_tail_signed_by_another_key_is_pinpointed(log):
    """Mallory rewrites entry 3 and re-chains everything after it with her own key."""
    entries = list(log)
    con = raw(log)
    prev = entries[2].hash
    for e in entries[3:]:
        payload = {"i": 300} if e.index == 3 else e.payload
        new = LogEntry.create(e.index, prev, e.time_ms, e.kind, payload, MALLORY)
        con.execute("UPDATE entries SET payload=?, signer=?, signature=?, hash=?, prev_hash=? WHERE idx=?",
                    (canonical_json(new.payload).decode(), new.signer, new.signature, new.hash, prev, e.index))
        prev = new.hash
    problem = log.verify_chain()
    assert problem.index == 3 and "log_signers" in problem.reason


def test_wholly_rewritten_log_needs_a_pinned_key(tmp_path):
    with ProtocolLog(tmp_path / "fake.sqlite") as fake:
        fake.append("run_started", {"run_id": "r"}, MALLORY)
        assert fake.verify_chain() is None  # self-consistent...
        problem = fake.verify_chain(trusted_signers=[COORD.public_key_bytes])
        assert problem.index == 0 and "trusted" in problem.reason  # ...but not the coordinator's


@pytest.mark.parametrize("edit, index, words", [
    ("DELETE FROM entries WHERE idx = 3", 3, "missing"),
    ("UPDATE entries SET idx = idx + 100 WHERE idx = 6", 6, "missing"),
    ("UPDATE entries SET time_ms = 5 WHERE idx = 2", 2, "modified"),
    ("UPDATE entries SET kind = 'node_banned' WHERE idx = 1", 1, "modified"),
    ("UPDATE entries SET payload = ' ' || payload WHERE idx = 2", 2, "canonical"),
    ("UPDATE entries SET signature = zeroblob(64) WHERE idx = 7", 7, "signature"),
    ("UPDATE entries SET prev_hash = zeroblob(32) WHERE idx = 5", 5, "prev_hash"),
])
def test_sql_edits_are_pinpointed(log, edit, index, words):
    raw(log).execute(edit)
    problem = verify_entries_safely(log)
    assert problem.index == index and words in problem.reason, problem


def verify_entries_safely(log):
    try:
        return log.verify_chain()
    except LogError as e:  # a row so broken it does not even parse still names its entry
        return type("P", (), {"index": e.index, "reason": e.reason})()


def test_second_run_started_and_non_run_start_are_refused(tmp_path):
    with ProtocolLog(tmp_path / "a.sqlite") as db:
        db.append("node_registered", {}, COORD)
        assert db.verify_chain().index == 0
    with ProtocolLog(tmp_path / "b.sqlite") as db:
        db.append("run_started", {}, COORD)
        db.append("run_started", {}, COORD)
        assert "second" in db.verify_chain().reason


def test_time_going_backwards_is_pinpointed(log):
    entries = [e.to_json() for e in log]
    prev = bytes.fromhex(entries[2]["hash"])
    rebuilt = [LogEntry.from_json(o) for o in entries[:3]]
    for o in entries[3:]:
        t = T0 - 1 if o["index"] == 3 else o["time_ms"]
        e = LogEntry.create(o["index"], prev, t, o["kind"], o["payload"], COORD)
        rebuilt.append(e)
        prev = e.hash
    problem = verify_entries(rebuilt)
    assert problem.index == 3 and "before" in problem.reason


# ---- JSONL ---------------------------------------------------------------------------------------
def test_jsonl_round_trip(log, tmp_path):
    out = tmp_path / "log.jsonl"
    assert log.export_jsonl(out) == 8
    lines = out.read_text().splitlines()
    assert all(line == canonical_json(json.loads(line)).decode() for line in lines)
    assert [e.to_json() for e in read_jsonl(out)] == [e.to_json() for e in log]
    with ProtocolLog.import_jsonl(out, tmp_path / "copy.sqlite") as copy:
        assert [e.to_json() for e in copy] == [e.to_json() for e in log]
        assert copy.verify_chain() is None
        copy.append("round_closed", {"round": 0}, COORD)  # the copy continues the same chain
        assert copy.verify_chain() is None
    assert [e.index for e in read_log(out)] == list(range(8))
    assert [e.index for e in read_log(log.path)] == list(range(8))


def test_jsonl_import_refuses_tampering_and_names_it(log, tmp_path):
    out = tmp_path / "log.jsonl"
    log.export_jsonl(out)
    lines = out.read_text().splitlines()
    obj = json.loads(lines[6])
    obj["payload"]["i"] = 600
    lines[6] = json.dumps(obj)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogError) as err:
        ProtocolLog.import_jsonl(bad, tmp_path / "x.sqlite")
    assert err.value.index == 6
    assert not (tmp_path / "x.sqlite").exists()
    lines[6] = "{not json"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogError) as err:
        ProtocolLog.import_jsonl(bad, tmp_path / "x.sqlite")
    assert err.value.line == 7 and "invalid JSON" in str(err.value)
    with pytest.raises(LogError, match="already exists"):
        ProtocolLog.import_jsonl(out, log.path)


def test_unreadable_files_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"\x00\x01not a database" * 100)
    with pytest.raises(LogError, match="not a SQLite file"):
        ProtocolLog(garbage)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t(x)").connection.commit()
    with pytest.raises(LogError, match="not a usable protocol log"):
        ProtocolLog(other, readonly=True)
    with pytest.raises(LogError, match="does not exist"):
        list(read_log(tmp_path / "missing"))
    with pytest.raises(LogError, match="does not exist"):
        ProtocolLog(tmp_path / "missing.sqlite", create=False)
    truncated = tmp_path / "truncated.sqlite"
    truncated.write_bytes(b"SQLite format 3\x00" + b"\x00" * 50)
    with pytest.raises(LogError):
        list(read_log(truncated))


# ---- fuzzing -------------------------------------------------------------------------------------


@FUZZ
@given(json_values)
def test_fuzz_canonical_json_round_trips(value):
    once = canonical_json(value)
    assert canonical_json(json.loads(once)) == once


@FUZZ
@given(st.binary(max_size=500) | st.text(max_size=300).map(str.encode))
def test_fuzz_jsonl_line_parser_random_bytes(data):
    try:
        parse_jsonl_line(data, 1)
    except LogError as e:
        assert e.line == 1


@FUZZ
@given(st.dictionaries(st.sampled_from(["index", "prev_hash", "time_ms", "kind", "payload", "signer", "signature",
                                        "hash", "extra"]), json_values, max_size=9))
def test_fuzz_entry_objects(obj):
    try:
        LogEntry.from_json(obj)
    except LogError:
        pass


@pytest.fixture(scope="module")
def valid_lines(tmp_path_factory):
    path = tmp_path_factory.mktemp("fz") / "log.sqlite"
    with ProtocolLog(path) as db:
        fill(db, 4)
        return [e.to_jsonl() for e in db]


@FUZZ
@given(st.integers(0, 3), st.lists(st.tuples(st.integers(0, 10**5), st.characters(codec="utf-8")), min_size=1,
                                   max_size=5))
def test_fuzz_mutated_lines_never_verify_unless_unchanged(valid_lines, which, edits):
    line = list(valid_lines[which])
    for pos, ch in edits:
        line[pos % len(line)] = ch
    text = "".join(line)
    try:
        entry = parse_jsonl_line(text, which + 1)
    except LogError:
        return
    entries = [parse_jsonl_line(t) for t in valid_lines]
    entries[which] = entry
    problem = verify_entries(entries)
    if problem is None:  # only edits that do not change the meaning (e.g. JSON whitespace) may pass
        assert entry.to_jsonl() == valid_lines[which]
    else:
        assert problem.index <= which


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_log_files(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("f") / "log"
    path.write_bytes(data)
    try:
        entries = list(read_log(path))
        verify_entries(entries)
    except LogError:
        pass
    path.write_bytes(b"SQLite format 3\x00" + data)
    try:
        list(read_log(path))
    except LogError:
        pass
