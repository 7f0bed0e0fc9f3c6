"""The protocol log: an append-only, hash-chained, signed record of a run, in SQLite (WAL).

Every entry is ``{index, prev_hash, time_ms, kind, payload, signer, signature}`` (plus its
``hash``). Specification (version 1):

* ``canonical_json(v)`` = ``json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
  allow_nan=False)`` encoded as ASCII, for values built from ``None``, ``bool``, ``int``, finite
  ``float`` (written as Python's shortest round-trip ``repr``, e.g. ``1e-05``), ``str``, lists and
  objects with string keys, nested at most :data:`MAX_JSON_DEPTH` deep. Anything else is refused.
* ``hash = SHA-256(b"grpo-swarm/v1/LogEntry\\n" || canonical_json({"index": i, "prev_hash": hex,
  "time_ms": t, "kind": k, "payload": p, "signer": hex}))`` — the signer's key is hashed too, so a
  signature can never be moved to another key.
* ``signature = Ed25519(signer, b"grpo-swarm/v1/LogEntryHash\\n" || hash)`` (the domain tag keeps
  these 32 signed bytes apart from everything else a node key signs).
* entry 0 has ``prev_hash`` = 32 zero bytes, entry ``i`` has ``prev_hash`` = hash of entry ``i-1``;
  indices are 0, 1, 2, ...; ``time_ms`` never decreases.
* entry 0 is ``run_started``; its payload may name the keys allowed to sign the log
  (``"log_signers"``: list of hex public keys; default: entry 0's signer alone). Every entry must
  be signed by one of them.

:class:`ProtocolLog` stores entries in SQLite (``journal_mode=WAL``, ``synchronous=FULL``, one
``BEGIN IMMEDIATE`` transaction per append, triggers refusing UPDATE and DELETE) and exports /
imports JSON Lines (one canonical JSON object per line, import verifies everything first).
:func:`verify_entries` checks a chain and names the first bad entry; :func:`read_log` reads
either format. Malformed input raises :class:`LogError` (with the entry index or line number),
never anything else.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, verify_signature

ENTRY_DOMAIN = b"grpo-swarm/v1/LogEntry\n"
SIGN_DOMAIN = b"grpo-swarm/v1/LogEntryHash\n"
GENESIS_HASH = bytes(32)
HASH_SIZE = 32
MAX_JSON_DEPTH = 64
MAX_PAYLOAD_BYTES = 8 << 20  # one entry's canonical payload
MAX_LINE_BYTES = 3 * MAX_PAYLOAD_BYTES  # one JSONL line (generous: escapes)
MAX_KIND_CHARS = 64
SQLITE_MAGIC = b"SQLite format 3\x00"

RUN_STARTED = "run_started"
NODE_REGISTERED = "node_registered"
SNAPSHOT_PUBLISHED = "snapshot_published"
PROOFS_ACCEPTED = "proofs_accepted"
PROOFS_REJECTED = "proofs_rejected"
ROUND_CLOSED = "round_closed"
NODE_BANNED = "node_banned"
HASH_REPORTED = "hash_reported"  # a node's parameter hash for the next version (protocol.publication)
UPLOAD_REFUSED = "upload_refused"  # a snapshot upload the publication rule refused, and why
ROUND_DISPATCHED = "round_dispatched"  # a node's first Heartbeat in a round: the version it must sample with
PEER_REPORTED = "peer_reported"  # a round participant reports another it excluded from averaging (protocol.peers)
NODE_UNBANNED = "node_unbanned"  # the operator lifted a ban
KINDS = (RUN_STARTED, NODE_REGISTERED, SNAPSHOT_PUBLISHED, PROOFS_ACCEPTED, PROOFS_REJECTED, ROUND_CLOSED, NODE_BANNED,
         HASH_REPORTED, UPLOAD_REFUSED, ROUND_DISPATCHED, PEER_REPORTED, NODE_UNBANNED)

_ENTRY_KEYS = {"index", "prev_hash", "time_ms", "kind", "payload", "signer", "signature", "hash"}


class LogError(Exception):
    """The log (a file, a line, an entry) is unusable or fails verification.

    ``index`` is the first bad entry's index when known, ``line`` the 1-based JSONL line."""

    def __init__(self, reason: str, *, index: int | None = None, line: int | None = None):
        self.reason = reason
        self.index = index
        self.line = line
        where = []
        if index is not None:
            where.append(f"entry {index}")
        if line is not None:
            where.append(f"line {line}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)

    def __reduce__(self):
        return (_rebuild_log_error, (self.reason, self.index, self.line))


def _rebuild_log_error(reason, index, line):
    return LogError(reason, index=index, line=line)


# ---- canonical JSON ------------------------------------------------------------------------------
def _check_json(value: Any, depth: int, where: str) -> Any:
    """A copy of ``value`` with tuples as lists; ValueError for anything without a canonical form."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_JSON_DEPTH}")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} has no JSON encoding")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_check_json(v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: object key {k!r} is not a string")
            out[k] = _check_json(v, depth + 1, f"{where}.{k}")
        return out
    raise ValueError(f"{where}: {type(value).__name__} is not a JSON value")


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes of ``value`` (see module docstring); ValueError if it has none."""
    checked = _check_json(value, 0, "value")
    return json.dumps(checked, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def _loads(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: invalid JSON ({e})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed in canonical JSON")


# ---- entries -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogEntry:
    index: int
    prev_hash: bytes
    time_ms: int
    kind: str
    payload: dict
    signer: bytes
    signature: bytes
    hash: bytes = field(repr=False)

    # -- hashing / signing
    @staticmethod
    def hashed_object(index: int, prev_hash: bytes, time_ms: int, kind: str, payload: Any, signer: bytes) -> dict:
        return {
            "index": index,
            "prev_hash": prev_hash.hex(),
            "time_ms": time_ms,
            "kind": kind,
            "payload": payload,
            "signer": signer.hex(),
        }

    @classmethod
    def compute_hash(cls, index: int, prev_hash: bytes, time_ms: int, kind: str, payload: Any, signer: bytes) -> bytes:
        body = canonical_json(cls.hashed_object(index, prev_hash, time_ms, kind, payload, signer))
        return hashlib.sha256(ENTRY_DOMAIN + body).digest()

    def recompute_hash(self) -> bytes:
        return self.compute_hash(self.index, self.prev_hash, self.time_ms, self.kind, self.payload, self.signer)

    def signature_valid(self) -> bool:
        return verify_signature(self.signer, SIGN_DOMAIN + self.hash, self.signature)

    @classmethod
    def create(cls, index: int, prev_hash: bytes, time_ms: int, kind: str, payload: Any, identity: Identity) -> LogEntry:
        _check_kind(kind)
        payload = _normalise_payload(payload)
        signer = identity.public_key_bytes
        h = cls.compute_hash(index, prev_hash, time_ms, kind, payload, signer)
        return cls(index, prev_hash, time_ms, kind, payload, signer, identity.sign(SIGN_DOMAIN + h), h)

    # -- JSON form
    def to_json(self) -> dict:
        return {
            "index": self.index,
            "prev_hash": self.prev_hash.hex(),
            "time_ms": self.time_ms,
            "kind": self.kind,
            "payload": self.payload,
            "signer": self.signer.hex(),
            "signature": self.signature.hex(),
            "hash": self.hash.hex(),
        }

    def to_jsonl(self) -> str:
        return canonical_json(self.to_json()).decode("ascii")

    @classmethod
    def from_json(cls, obj: Any, *, line: int | None = None) -> LogEntry:
        """Strictly parse the JSON form (structure only: call :func:`verify_entries` for the chain)."""
        index = obj.get("index") if isinstance(obj, dict) else None
        index = index if isinstance(index, int) and not isinstance(index, bool) else None

        def bad(reason: str) -> LogError:
            return LogError(reason, index=index, line=line)

        if not isinstance(obj, dict):
            raise bad(f"an entry is a JSON object, got {type(obj).__name__}")
        keys = set(obj)
        if keys != _ENTRY_KEYS:
            missing, extra = sorted(_ENTRY_KEYS - keys), sorted(keys - _ENTRY_KEYS)
            raise bad(f"entry keys wrong (missing {missing}, unexpected {extra})")
        for name in ("index", "time_ms"):
            v = obj[name]
            if not isinstance(v, int) or isinstance(v, bool):
                raise bad(f"{name} must be an integer")
        if obj["index"] < 0:
            raise bad("index is negative")
        if not isinstance(obj["kind"], str):
            raise bad("kind must be a string")
        if not isinstance(obj["payload"], dict):
            raise bad("payload must be a JSON object")
        try:
            _check_kind(obj["kind"])
            payload = _normalise_payload(obj["payload"])
        except ValueError as e:
            raise bad(str(e)) from None
        fields = {}
        for name, size in (("prev_hash", HASH_SIZE), ("signer", PUBLIC_KEY_SIZE), ("signature", SIGNATURE_SIZE),
                           ("hash", HASH_SIZE)):
            fields[name] = _hex_field(obj[name], name, size, bad)
        return cls(obj["index"], fields["prev_hash"], obj["time_ms"], obj["kind"], payload, fields["signer"],
                   fields["signature"], fields["hash"])


def _hex_field(value: Any, name: str, size: int, bad) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size:
        raise bad(f"{name} must be {2 * size} hex characters")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise bad(f"{name} is not hex") from None
    if raw.hex() != value:
        raise bad(f"{name} must be lowercase hex")
    return raw


def _check_kind(kind: Any) -> None:
    if not isinstance(kind, str) or not kind or len(kind) > MAX_KIND_CHARS:
        raise ValueError(f"kind must be a non-empty string of at most {MAX_KIND_CHARS} characters")
    if not all(c.isascii() and (c.isalnum() or c == "_") for c in kind):
        raise ValueError(f"kind {kind!r} may only hold ASCII letters, digits and '_'")


def _normalise_payload(payload: Any) -> dict:
    if not isinstance(payload, Mapping):
        raise ValueError(f"payload must be a JSON object (dict), got {type(payload).__name__}")
    raw = canonical_json(payload)
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload is {len(raw)} bytes of canonical JSON, limit {MAX_PAYLOAD_BYTES}")
    return json.loads(raw)


# ---- chain verification --------------------------------------------------------------------------
@dataclass(frozen=True)
class ChainProblem:
    """The first entry that breaks the chain and why."""

    index: int
    reason: str

    def __str__(self) -> str:
        return f"entry {self.index}: {self.reason}"


def _signers_of(entry: LogEntry) -> set[bytes] | ChainProblem:
    listed = entry.payload.get("log_signers")
    if listed is None:
        return {entry.signer}
    if not isinstance(listed, list) or not listed:
        return ChainProblem(entry.index, "run_started.log_signers must be a non-empty list of hex keys")
    out = set()
    for k in listed:
        if not isinstance(k, str) or len(k) != 2 * PUBLIC_KEY_SIZE:
            return ChainProblem(entry.index, "run_started.log_signers must hold 64-character hex keys")
        try:
            out.add(bytes.fromhex(k))
        except ValueError:
            return ChainProblem(entry.index, "run_started.log_signers holds a non-hex key")
    if entry.signer not in out:
        return ChainProblem(entry.index, "run_started is not signed by one of its own log_signers")
    return out


class ChainChecker:
    """Incremental chain verification: feed entries in order; the first problem is kept."""

    def __init__(self, trusted_signers: Iterable[bytes] | None = None):
        self.trusted = {bytes(k) for k in trusted_signers} if trusted_signers is not None else None
        self.expected_index = 0
        self.prev_hash = GENESIS_HASH
        self.prev_time = None
        self.signers: set[bytes] | None = None
        self.problem: ChainProblem | None = None

    def feed(self, entry: LogEntry) -> ChainProblem | None:
        if self.problem is not None:
            return self.problem
        self.problem = self._check(entry)
        if self.problem is None:
            self.expected_index += 1
            self.prev_hash = entry.hash
            self.prev_time = entry.time_ms
        return self.problem

    def _check(self, e: LogEntry) -> ChainProblem | None:
        i = self.expected_index
        if e.index != i:
            return ChainProblem(i, f"expected index {i}, found {e.index} (an entry is missing, duplicated or reordered)")
        if e.prev_hash != self.prev_hash:
            return ChainProblem(i, "prev_hash does not match the previous entry's hash (chain broken)")
        try:
            recomputed = e.recompute_hash()
        except ValueError as err:
            return ChainProblem(i, f"entry cannot be hashed: {err}")
        if recomputed != e.hash:
            return ChainProblem(i, "hash does not match the entry's contents (entry modified)")
        if not e.signature_valid():
            return ChainProblem(i, "signature does not verify for its signer")
        if self.prev_time is not None and e.time_ms < self.prev_time:
            return ChainProblem(i, f"time_ms {e.time_ms} is before the previous entry's {self.prev_time}")
        if i == 0:
            if e.kind != RUN_STARTED:
                return ChainProblem(0, f"entry 0 must be {RUN_STARTED}, found {e.kind!r}")
            signers = _signers_of(e)
            if isinstance(signers, ChainProblem):
                return signers
            if self.trusted is not None and not (signers & self.trusted):
                return ChainProblem(0, "run_started is not signed by a trusted key")
            self.signers = signers
        else:
            if e.kind == RUN_STARTED:
                return ChainProblem(i, "a second run_started entry")
            if self.signers is not None and e.signer not in self.signers:
                return ChainProblem(i, f"signer {e.signer.hex()[:16]}... is not one of the run's log_signers")
        return None


def verify_entries(entries: Iterable[LogEntry], trusted_signers: Iterable[bytes] | None = None) -> ChainProblem | None:
    """Check the chain, hashes, signatures and signers of ``entries``; the first problem or None.

    ``trusted_signers``: if given, entry 0 must be signed by one of these keys (pin the
    coordinator's key, so a wholly rewritten log is caught too). An empty log is not a problem."""
    checker = ChainChecker(trusted_signers)
    try:
        for e in entries:
            if checker.feed(e) is not None:
                return checker.problem
    except LogError as err:
        return ChainProblem(err.index if err.index is not None else checker.expected_index, err.reason)
    return None


# ---- SQLite storage ------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    prev_hash BLOB NOT NULL,
    time_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    signer BLOB NOT NULL,
    signature BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_kind ON entries(kind);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'the protocol log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'the protocol log is append-only'); END;
"""
SCHEMA_VERSION = "1"


def _row_to_entry(row) -> LogEntry:
    idx, prev_hash, time_ms, kind, payload, signer, signature, h = row
    try:
        if not isinstance(payload, str):
            raise ValueError("payload column is not text")
        obj = _loads(payload, "payload")
        if not isinstance(obj, dict):
            raise ValueError("payload is not a JSON object")
        if canonical_json(obj).decode("ascii") != payload:
            raise ValueError("payload is not stored in canonical JSON")
        for name, v in (("prev_hash", prev_hash), ("signer", signer), ("signature", signature), ("hash", h)):
            if not isinstance(v, bytes):
                raise ValueError(f"{name} column is not a blob")
        if not isinstance(time_ms, int) or not isinstance(kind, str):
            raise ValueError("time_ms/kind columns have the wrong type")
    except ValueError as e:
        raise LogError(str(e), index=idx if isinstance(idx, int) else None) from None
    return LogEntry(idx, prev_hash, time_ms, kind, obj, signer, signature, h)


class ProtocolLog:
    """An append-only protocol log in a SQLite file (WAL, synchronous=FULL)."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True, readonly: bool = False):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise LogError(f"log file {self.path} does not exist")
        if self.path.exists():
            _check_sqlite_file(self.path)
        try:
            if readonly:
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                           check_same_thread=False)
            else:
                self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30,
                                           check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                                 (SCHEMA_VERSION,))
            self._db.execute("SELECT count(*) FROM entries").fetchone()
        except sqlite3.DatabaseError as e:
            raise LogError(f"{self.path} is not a usable protocol log: {e}") from None

    # -- context manager
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ProtocolLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading
    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM entries").fetchone()[0]

    def head(self) -> tuple[int, bytes, int | None]:
        """(next index, hash of the last entry or the genesis hash, last time_ms or None)."""
        row = self._db.execute("SELECT idx, hash, time_ms FROM entries ORDER BY idx DESC LIMIT 1").fetchone()
        if row is None:
            return 0, GENESIS_HASH, None
        return row[0] + 1, row[1], row[2]

    def get(self, index: int) -> LogEntry:
        row = self._db.execute(
            "SELECT idx, prev_hash, time_ms, kind, payload, signer, signature, hash FROM entries WHERE idx = ?",
            (index,),
        ).fetchone()
        if row is None:
            raise LogError("no such entry", index=index)
        return _row_to_entry(row)

    def entries(self, start: int = 0, kind: str | None = None) -> Iterator[LogEntry]:
        sql = "SELECT idx, prev_hash, time_ms, kind, payload, signer, signature, hash FROM entries WHERE idx >= ?"
        args: tuple = (start,)
        if kind is not None:
            sql += " AND kind = ?"
            args += (kind,)
        try:
            for row in self._db.execute(sql + " ORDER BY idx", args):
                yield _row_to_entry(row)
        except sqlite3.DatabaseError as e:
            raise LogError(f"{self.path}: cannot read entries: {e}") from None

    def last(self, *kinds: str) -> LogEntry | None:
        """The newest entry of one of ``kinds`` (of any kind when none is given), or None."""
        sql = "SELECT idx, prev_hash, time_ms, kind, payload, signer, signature, hash FROM entries"
        if kinds:
            sql += f" WHERE kind IN ({', '.join('?' * len(kinds))})"
        row = self._db.execute(sql + " ORDER BY idx DESC LIMIT 1", kinds).fetchone()
        return _row_to_entry(row) if row is not None else None

    def __iter__(self) -> Iterator[LogEntry]:
        return self.entries()

    # -- writing
    def append(self, kind: str, payload: Mapping[str, Any], identity: Identity, *, time_ms: int | None = None) -> LogEntry:
        """Append one signed entry in its own transaction; returns it. ValueError on a bad payload."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            index, prev_hash, last_time = self.head()
            t = time.time_ns() // 1_000_000 if time_ms is None else int(time_ms)
            if last_time is not None and t < last_time:
                if time_ms is not None:
                    raise ValueError(f"time_ms {t} is before the last entry's {last_time}")
                t = last_time  # clock stepped back: keep the log monotone
            entry = LogEntry.create(index, prev_hash, t, kind, payload, identity)
            self._insert(entry)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return entry

    def _insert(self, e: LogEntry) -> None:
        self._db.execute(
            "INSERT INTO entries(idx, prev_hash, time_ms, kind, payload, signer, signature, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (e.index, e.prev_hash, e.time_ms, e.kind, canonical_json(e.payload).decode("ascii"), e.signer,
             e.signature, e.hash),
        )

    # -- verification and exchange
    def verify_chain(self, trusted_signers: Iterable[bytes] | None = None) -> ChainProblem | None:
        """The first bad entry (index and reason), or None when the whole chain is sound."""
        return verify_entries(self.entries(), trusted_signers)

    def export_jsonl(self, path: str | os.PathLike) -> int:
        """Write every entry as one canonical JSON line; returns the number written."""
        n = 0
        tmp = Path(f"{path}.tmp{os.getpid()}")
        with open(tmp, "w", encoding="ascii", newline="\n") as f:
            for e in self.entries():
                f.write(e.to_jsonl() + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return n

    @classmethod
    def import_jsonl(cls, jsonl_path: str | os.PathLike, db_path: str | os.PathLike,
                     trusted_signers: Iterable[bytes] | None = None) -> ProtocolLog:
        """Create a new SQLite log from a JSONL export after verifying every entry (LogError names the
        first bad one; nothing is written then)."""
        entries = list(read_jsonl(jsonl_path))
        problem = verify_entries(entries, trusted_signers)
        if problem is not None:
            raise LogError(problem.reason, index=problem.index)
        if Path(db_path).exists():
            raise LogError(f"{db_path} already exists; import writes a new log")
        log = cls(db_path)
        log._db.execute("BEGIN IMMEDIATE")
        try:
            for e in entries:
                log._insert(e)
            log._db.execute("COMMIT")
        except BaseException:
            log._db.execute("ROLLBACK")
            log.close()
            raise
        return log


def _check_sqlite_file(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as e:
        raise LogError(f"cannot read {path}: {e.strerror or e}") from None
    if head and head != SQLITE_MAGIC:
        raise LogError(f"{path} is not a SQLite file")


# ---- JSONL ---------------------------------------------------------------------------------------
def parse_jsonl_line(text: str | bytes, line: int | None = None) -> LogEntry:
    if isinstance(text, bytes):
        if len(text) > MAX_LINE_BYTES:
            raise LogError(f"line longer than {MAX_LINE_BYTES} bytes", line=line)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LogError(f"not UTF-8 ({e})", line=line) from None
    if len(text) > MAX_LINE_BYTES:
        raise LogError(f"line longer than {MAX_LINE_BYTES} characters", line=line)
    try:
        obj = _loads(text, "line")
    except ValueError as e:
        raise LogError(str(e), line=line) from None
    return LogEntry.from_json(obj, line=line)


def read_jsonl(path: str | os.PathLike) -> Iterator[LogEntry]:
    """Parse a JSONL log export entry by entry (blank lines are skipped). Structure only."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise LogError(f"cannot open {path}: {e.strerror or e}") from None
    with f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise LogError(f"line longer than {MAX_LINE_BYTES} bytes", line=lineno)
            if not raw.strip():
                continue
            yield parse_jsonl_line(raw, lineno)


def is_sqlite_file(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def read_log(path: str | os.PathLike) -> Iterator[LogEntry]:
    """Entries of a log file, SQLite or JSONL (decided by the file's first bytes)."""
    path = Path(path)
    if not path.is_file():
        raise LogError(f"log file {path} does not exist")
    if is_sqlite_file(path):
        log = ProtocolLog(path, create=False, readonly=True)
        try:
            yield from log.entries()
        finally:
            log.close()
    else:
        yield from read_jsonl(path)
