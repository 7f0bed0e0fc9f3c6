"""The share audit: after a reduction, every member checks every reducer's average.

A reducer sees the parts of its share and returns their weighted average; nobody else sees those
parts, so a reducer could return a wrong average (the same wrong values to everyone) and every
other check would pass. After a successful reduction, and before anyone applies it:

1. **Reveal.** Each member holds every average, then reveals the nonce it committed to in its
   signed gather entry (``commitment(nonce)``). The seed is SHA-256 of the group id and all the
   contributors' nonces: nobody knows it until every honest member holds its averages, so no
   reducer can fit a wrong average to the projection, and nobody can grind it (the nonces were
   committed before the group formed).
2. **Sketch.** Each member sends, for every share, the sketch (:mod:`.share_sketch`, a secret
   random projection drawn from the seed, reading the rows the seed samples at the group's audit
   fraction: the largest its contributors signed for) of the values it sent to that share's
   reducer, and the sketch of the average it received.
3. **Judge** (:func:`judge`, every member on its own): for each share, the sketch of the average
   must equal the ticket-weighted mean of the senders' sketches up to rounding
   (:func:`.share_sketch.share_tolerance`); otherwise the reducer is accused (WRONG_AVERAGE). A
   sender could lie about its sketch to frame an honest reducer, but that reducer holds the parts it
   received and, when its share does not add up, checks each sender's sketch against them
   (SKETCH_MISMATCH). A reducer's own values
   for its own share are seen by nobody, so its sketch of them is only held to its committed norm
   (SKETCH_IMPLAUSIBLE, as is any sketch): a cheating reducer's change to its share is bounded by
   a few times the change it could make as a sender anyway. Members whose copies of a share's
   average differ fail the attempt (AUDIT_FAILED: the reducer or the member could be lying).

Any finding fails the attempt (the averager restores its gradient); accusations go into the next
attempt's gather as usual. A contributor whose reveal does not arrive in time is accused too
(AUDIT_WITHHELD): without its nonce nobody has the seed, while it may hold everyone else's and know
whether the sampled rows would catch its wrong average, so silence must cost it what being caught
does, or it would be a free retry. A sketch that does not arrive after the reveal is only a failure
(SKETCH_WITHHELD; a crash looks the same): :func:`judge` then holds every share to the room the
silent senders' sketches would have had, so the verdict is the one the best lie it could have
told would get, and a reducer caught by the rows is caught in silence too. When a reducer that others accuse of WRONG_AVERAGE accuses a sender of
SKETCH_MISMATCH in turn, third parties cannot tell who lied (only the reducer saw the parts): both
are left out of the retry and neither is reported to the coordinator for it
(:meth:`.round_report.RoundResult.reportable`).

Entries are ``msgpack([payload, Ed25519(key, AUDIT_DOMAIN || payload)])`` with ``payload =
msgpack([AUDIT_VERSION, group_id, phase, signer_peer_id, body])``; members relay each other's
entries (client-mode members cannot be called), and every receiver checks each signature against
the signer's key from the group's gather. Nothing is unpickled. Each member judges with the first
valid entry it holds from each signer (:class:`AuditStore`), and only after every reducer has
answered with its own first entries: a member that signed two different payloads (to show a
reducer one sketch and the others a framing one) is accused by whoever reads both
(BAD_AUDIT_ENTRY), and nobody judges a reducer on entries it did not hold too.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np

from grpo_swarm.protocol.identity import SIGNATURE_SIZE, Identity, verify_signature

from .share_sketch import (
    SKETCH_DIMS,
    plausible,
    plausible_norm,
    share_residual,
    share_tolerance,
    sketch_tolerance,
)
from .gather import strict_unpack
from .reasons import Reason

AUDIT_DOMAIN = b"grpo-swarm/v1/share-audit\n"
AUDIT_VERSION = 1
PHASE_REVEAL = 1
PHASE_SKETCH = 2
NONCE_BYTES = 32
MAX_GROUP = 256
MAX_AUDIT_ENTRY_BYTES = 2 * MAX_GROUP * (SKETCH_DIMS * 9 + 8) + 1024


AUDIT_POLL_S = 1.0  # an audit exchange call waits this long at most for the callee to hold every entry
AUDIT_WAITING_S = 1.0  # an exchange still missing entries or answers after this long asks who left the round


class AuditStore:
    """The audit entries this member holds for one (group, phase), by signer.

    ``first``: each contributor's first valid entry — what this member judges with and what it
    answers callers with, never replaced. ``second``: a valid entry of the same signer with a
    different signed payload, kept as the proof that the signer equivocated (it travels in the
    answers, so every member that reads them sees it too). Pushes arriving before this member's own
    audit knows the group's keys wait in ``pending``, one per caller, and are answered raw (whoever
    reads them checks the signatures)."""

    def __init__(self, group_id: bytes, phase: int):
        self.group_id, self.phase = bytes(group_id), int(phase)
        self.keys: dict[bytes, bytes] | None = None
        self.pending: dict[bytes, bytes] = {}
        self.first: dict[bytes, tuple[bytes, bytes, object]] = {}  # signer -> (raw, payload, body)
        self.second: dict[bytes, bytes] = {}  # signer -> raw entry with another payload
        self._filed: dict[bytes, bytes] = {}  # raw entries kept -> signer (answers repeat them: checked once)
        self.served: set[bytes] = set()  # callers we answered with every entry (a leaving member waits for them)
        self.changed = asyncio.Event()

    @property
    def expected(self) -> frozenset[bytes] | None:
        return None if self.keys is None else frozenset(self.keys)

    def push(self, caller: bytes, raw: bytes) -> None:
        """An entry a caller sent us: before the keys are known only its first is kept (unchecked)."""
        if self.keys is None:
            if caller not in self.pending:
                self.pending[caller] = raw
                self.changed.set()
        else:
            self.add(raw)

    def expect(self, keys: Mapping[bytes, bytes]) -> None:
        """The group's contributors (peer id -> key): from now on entries are checked as they come."""
        self.keys = dict(keys)
        pending, self.pending = self.pending, {}
        for raw in pending.values():
            self.add(raw)
        self.changed.set()

    def add(self, raw: bytes) -> bytes | None:
        """File a signed entry (ours, pushed or relayed); its signer, or None if it is not valid."""
        assert self.keys is not None, "expect() the group's keys first"
        raw = bytes(raw)
        if raw in self._filed:
            return self._filed[raw]
        try:
            signer, payload, body = decode_signed(raw, self.keys, self.group_id, self.phase)
        except AuditEntryError:
            return None  # relayed or garbled: the signer's own copy may still arrive
        held = self.first.get(signer)
        if held is None:
            self.first[signer] = (raw, payload, body)
        elif held[1] != payload and signer not in self.second:
            self.second[signer] = raw
        else:
            return signer  # (only what is kept is remembered: endless payloads cost checks, not memory)
        self._filed[raw] = signer
        self.changed.set()
        return signer

    def bodies(self) -> dict[bytes, object]:
        return {signer: body for signer, (_, _, body) in self.first.items()}

    def equivocators(self) -> frozenset[bytes]:
        return frozenset(self.second)

    def entries(self) -> list[bytes]:
        """What we answer with: every first entry, every proof of equivocation, pushes not yet checked."""
        return [raw for raw, _, _ in self.first.values()] + list(self.second.values()) + list(self.pending.values())

    def complete(self) -> bool:
        return self.keys is not None and self.keys.keys() <= self.first.keys()

    async def wait_complete(self) -> None:
        while not self.complete():
            self.changed.clear()
            await self.changed.wait()


class AuditEntryError(ValueError):
    """An audit entry that does not decode, is not signed by its member, or is for another group/phase."""


def nonce_for(secret: bytes, round_index: int, attempt: int) -> bytes:
    """This member's nonce for one attempt: derived from a per-process secret, so both of the
    averager's processes know it without passing it around."""
    return hmac.new(secret, b"nonce" + int(round_index).to_bytes(8, "big") + int(attempt).to_bytes(4, "big"),
                    hashlib.sha256).digest()


def commitment(nonce: bytes) -> bytes:
    return hashlib.sha256(AUDIT_DOMAIN + b"nonce\n" + nonce).digest()


def audit_seed(group_id: bytes, nonces: Sequence[bytes]) -> bytes:
    """The group's projection seed: the group id and every contributor's nonce, in slot order."""
    h = hashlib.sha256(AUDIT_DOMAIN + b"seed\n" + len(group_id).to_bytes(2, "big") + group_id)
    for n in nonces:
        h.update(n)
    return h.digest()


def encode_entry(identity: Identity, group_id: bytes, phase: int, body) -> bytes:
    payload = msgpack.packb([AUDIT_VERSION, bytes(group_id), int(phase), identity.peer_id, body], use_bin_type=True)
    return msgpack.packb([payload, identity.sign(AUDIT_DOMAIN + payload)], use_bin_type=True)


def decode_entry(raw: bytes, keys: Mapping[bytes, bytes], group_id: bytes, phase: int) -> tuple[bytes, object]:
    """(signer peer id, body) of a signed entry, checked against the signer's key in ``keys`` (peer
    id -> public key: the group's contributors), the group and the phase."""
    signer, _, body = decode_signed(raw, keys, group_id, phase)
    return signer, body


def decode_signed(raw: bytes, keys: Mapping[bytes, bytes], group_id: bytes, phase: int
                  ) -> tuple[bytes, bytes, object]:
    """:func:`decode_entry`, with the signed payload (two payloads signed by one member for the same
    group and phase prove it equivocated; the outer framing is not signed, so it is not compared)."""
    try:
        top = strict_unpack(raw, MAX_AUDIT_ENTRY_BYTES)
        if not (isinstance(top, list) and len(top) == 2 and all(isinstance(x, bytes) for x in top)
                and len(top[1]) == SIGNATURE_SIZE):
            raise ValueError("entry is not [payload, signature]")
        payload, signature = top
        body = strict_unpack(payload, MAX_AUDIT_ENTRY_BYTES)
    except ValueError as e:
        raise AuditEntryError(f"malformed: {e}") from None
    if not (isinstance(body, list) and len(body) == 5 and body[0] == AUDIT_VERSION):
        raise AuditEntryError(f"not a version-{AUDIT_VERSION} audit entry")
    if body[1] != bytes(group_id) or body[2] != phase:
        raise AuditEntryError("for another group or phase")
    signer = body[3]
    if not isinstance(signer, bytes) or signer not in keys:
        raise AuditEntryError("not signed by a contributor of the group")
    if not verify_signature(keys[signer], AUDIT_DOMAIN + payload, signature):
        raise AuditEntryError("not signed by the member's key")
    return signer, bytes(payload), body[4]


def reveal_body(nonce: bytes) -> bytes:
    return bytes(nonce)


def check_reveal(body, nonce_commitment: bytes) -> bytes:
    if not (isinstance(body, bytes) and len(body) == NONCE_BYTES):
        raise AuditEntryError(f"the nonce is not {NONCE_BYTES} bytes")
    if not hmac.compare_digest(commitment(body), nonce_commitment):
        raise AuditEntryError("the nonce does not match its commitment in the gather")
    return body


def sketch_body(inputs: Sequence[np.ndarray | None], outputs: Sequence[np.ndarray | None]) -> list:
    as_list = lambda s: None if s is None else [float(v) for v in np.asarray(s, dtype=np.float64)]  # noqa: E731
    return [[as_list(s) for s in inputs], [as_list(s) for s in outputs]]


def check_sketch_body(body, num_shares: int) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
    def vector(x):
        if x is None:
            return None
        if not (isinstance(x, list) and len(x) == SKETCH_DIMS and all(isinstance(v, float) for v in x)):
            raise AuditEntryError(f"a sketch is not {SKETCH_DIMS} floats")
        v = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(v)):
            raise AuditEntryError("a sketch is not finite")
        return v

    if not (isinstance(body, list) and len(body) == 2 and all(isinstance(b, list) and len(b) == num_shares
                                                               for b in body)):
        raise AuditEntryError(f"sketches are not [inputs, outputs] of {num_shares} shares each")
    return [vector(x) for x in body[0]], [vector(x) for x in body[1]]


@dataclass(frozen=True)
class Sender:
    peer_id: bytes
    weight: float
    committed_norm: float


@dataclass
class Findings:
    """What the audit found: accusations (content, go into the next gather) and failures."""

    accused: dict[bytes, tuple[Reason, str]] = field(default_factory=dict)
    failed: dict[bytes, tuple[Reason, str]] = field(default_factory=dict)

    def accuse(self, peer: bytes, reason: Reason, detail: str) -> None:
        self.accused.setdefault(bytes(peer), (reason, detail))

    def fail(self, peer: bytes, reason: Reason, detail: str) -> None:
        self.failed.setdefault(bytes(peer), (reason, detail))

    @property
    def clean(self) -> bool:
        return not self.accused and not self.failed


def judge(*, me: bytes, senders: Sequence[Sender], reducers: Sequence[bytes], share_numels: Sequence[int],
          my_outputs: Sequence[np.ndarray | None], output_norms: Sequence[float],
          sketches: Mapping[bytes, tuple[list, list]],
          received: Callable[[], Mapping[bytes, tuple[np.ndarray, float]] | None] | None,
          fp16_output: bool) -> Findings:
    """Check every non-empty share. ``reducers[j]``: the peer reducing share j; ``my_outputs[j]`` /
    ``output_norms[j]``: this member's sketch and norm of share j's average; ``sketches``: every
    sender's (inputs, outputs) sketches by peer; ``received``: when this member reduces a share, a
    function giving each remote sender's (sketch, norm) of the parts it received from them (decoded:
    the values it added up, of which the sender's sketch must be, exactly). It costs a pass over the
    share per sender, so it is called only when this member's own share does not add up — the only
    time a sender's lie matters (lies that cancel out leave an honest average).

    A sender missing from ``sketches`` (it revealed its nonce, then sent no sketch in time) is judged
    by the best lie it could have told: every share is held only to the others' sketches leaving room
    for the silent senders' parts, each within its committed norm (:func:`silent_room`). A sender's
    own values for its own share are held to nothing more when it speaks, so a reducer whose wrong
    average would be caught is caught in silence too, and silence buys no fresh draw of the rows."""
    found = Findings()
    my_share = reducers.index(me) if me in reducers else -1
    silent = [s for s in senders if s.peer_id not in sketches]
    spoken = [s for s in senders if s.peer_id in sketches]
    for s in spoken:
        for j, numel in enumerate(share_numels):
            if numel and not plausible(sketches[s.peer_id][0][j], s.committed_norm):
                found.accuse(s.peer_id, Reason.SKETCH_IMPLAUSIBLE, f"its sketch of share {j} is too large for "
                                                                   f"its committed norm {s.committed_norm:.6g}")
    weights = [s.weight for s in spoken]
    norms = [s.committed_norm for s in spoken]

    def off_by(j: int) -> tuple[float, float] | None:
        """Share j's worst residual and its tolerance (None: a sender sent no sketch of it); with silent
        senders, the norm of what the others' sketches leave unexplained and the room for it."""
        inputs = [sketches[s.peer_id][0][j] for s in spoken]
        if any(x is None for x in inputs):
            return None  # that sender is accused of SKETCH_IMPLAUSIBLE above
        if silent:
            return silent_room(my_outputs[j], inputs, weights, silent,
                               share_tolerance(output_norms[j], [*weights, *(s.weight for s in silent)],
                                               [*norms, *(s.committed_norm for s in silent)], share_numels[j],
                                               fp16_output=fp16_output))
        residual = share_residual(my_outputs[j], inputs, weights)
        tolerance = share_tolerance(output_norms[j], weights, norms, share_numels[j], fp16_output=fp16_output)
        return float(np.max(np.abs(residual))), tolerance

    if received is not None and my_share >= 0 and share_numels[my_share]:
        mine = off_by(my_share)
        if mine is not None and not mine[0] <= mine[1]:
            for peer, (sketch, norm) in (received() or {}).items():
                if peer not in sketches:
                    continue  # silent: it claimed nothing
                claimed = sketches[peer][0][my_share]
                gap = float(np.max(np.abs(np.asarray(claimed) - sketch))) if claimed is not None else math.inf
                limit = sketch_tolerance(norm)
                if not gap <= limit:
                    found.accuse(peer, Reason.SKETCH_MISMATCH, f"its sketch of the parts it sent this reducer is "
                                                               f"off by {gap:.3g} > {limit:.3g}")
    for j, numel in enumerate(share_numels):
        if not numel:
            continue
        reducer = reducers[j]
        for s in spoken:  # every member must hold the same average of share j
            theirs = sketches[s.peer_id][1][j]
            limit = sketch_tolerance(output_norms[j])
            if s.peer_id != me and (theirs is None or not float(np.max(np.abs(theirs - my_outputs[j]))) <= limit):
                found.fail(reducer, Reason.AUDIT_FAILED, f"members hold different averages of share {j}")
        result = off_by(j)
        if result is None:
            continue
        worst, tolerance = result
        if not worst <= tolerance:
            if reducer == me:
                if not any(r == Reason.SKETCH_MISMATCH for r, _ in found.accused.values()):
                    found.fail(me, Reason.AUDIT_FAILED, f"share {j}: the senders' sketches do not add up "
                                                        f"({worst:.3g} > {tolerance:.3g})")
            else:
                unheard = f" (with no sketch from {len(silent)} sender(s): the most their parts could explain)" \
                    if silent else ""
                found.accuse(reducer, Reason.WRONG_AVERAGE, f"its average of share {j} is off by {worst:.3g} > "
                                                            f"{tolerance:.3g} in a secret projection{unheard}")
    return found


def silent_room(out_sketch: np.ndarray, in_sketches: Sequence[np.ndarray], weights: Sequence[float],
                silent: Sequence[Sender], tolerance: float) -> tuple[float, float]:
    """A share whose ``silent`` senders sent no sketch: (the norm of what the others' sketches leave
    unexplained in the average's sketch, the most the silent senders' parts could explain). The
    unexplained rest must be the silent senders' weighted sketches, each at most
    :func:`.share_sketch.plausible_norm` of its committed norm — the same room their own sketches
    would have had (a reducer's sketch of its own values is held to nothing else) — plus rounding
    (``tolerance`` per dimension, as for a whole share)."""
    total = float(sum(weights) + sum(s.weight for s in silent))
    explained = sum(float(w) * np.asarray(x, dtype=np.float64) for w, x in zip(weights, in_sketches)) / total
    rest = float(np.linalg.norm(np.asarray(out_sketch, dtype=np.float64) - explained))
    room = sum(s.weight * plausible_norm(s.committed_norm) for s in silent) / total
    return rest, room + math.sqrt(SKETCH_DIMS) * tolerance
