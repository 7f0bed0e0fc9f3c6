"""Who may publish the next policy version: the snapshot quorum rule.

One implementation, used by the coordinator's :class:`~.recorder.RunRecorder` (live),
:func:`~.recorder.restore_state` (after a restart) and the offline audit (:mod:`.audit`), so the
three cannot disagree about a log.

The rule. Round r closes with ``participants`` and ``weights`` — each participant's share of the
round's accepted samples, i.e. of its verified work. The peers then average the gradients of that
round's ticket holders into version current + 1. Hence:

* the only version that may be published next is current + 1, and it is *produced* by the most
  recently closed round since the last publication; with no round closed since, nothing may be
  published;
* a parameter-hash report ("version current + 1 has state-dict hash h") counts with the
  reporter's weight in the producing round; keys without verified work in it (fresh keys,
  sybils), banned nodes and participants the stall rule sat out (:mod:`.stalls`) count 0 — their
  reports are still logged, with weight 0;
* an upload of hash h is accepted from a node that reported h, when the weight behind h is more
  than ``quorum`` (:data:`PUBLISH_QUORUM` = 0.5, "more than half") of the producing round's total.

A report belongs to the producing round it was made in: when another round closes before a
publication, its participants produce another average, so earlier reports are dropped and must be
made again; a publication drops them too. Publishing a bad version therefore needs the reports of
nodes holding more than half of one round's verified sample weight: doing that much verified work.

The first ``snapshot_published`` of a log is the run's initial weights (the configured model) and
needs no reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

PUBLISH_QUORUM = 0.5  # support must be MORE than this share of the producing round's weight

# why an upload is refused (the ``code`` of an ``upload_refused`` entry)
WRONG_VERSION = "WRONG_VERSION"  # not current + 1
NO_ROUND = "NO_ROUND_CLOSED"  # no round closed since the last publication: nothing produced it
NOT_REPORTED = "NOT_REPORTED"  # the uploader did not report this hash in the producing round
NO_QUORUM = "NO_QUORUM"  # the hash's support is not more than the quorum of the round's weight
REFUSAL_CODES = (WRONG_VERSION, NO_ROUND, NOT_REPORTED, NO_QUORUM)

IsBanned = Callable[[str], bool]


def check_quorum(quorum: float) -> float:
    """``quorum`` as a float in [0.5, 1): below one half, two hashes could both have a quorum."""
    if isinstance(quorum, bool) or not isinstance(quorum, (int, float)) or not 0.5 <= quorum < 1:
        raise ValueError(f"publish_quorum must be a number in [0.5, 1), got {quorum!r}")
    return float(quorum)


@dataclass(frozen=True)
class Tally:
    """The support of one (version, hash) in the producing round."""

    round: int | None  # the producing round (None: no round closed since the last publication)
    support_weight: float  # summed round weight of the participants that reported this hash
    total_weight: float  # the producing round's total weight
    reporters: tuple[str, ...]  # those participants (weight > 0), sorted
    reports: int  # nodes with a report for this version in the producing round (any hash, any weight)


class PublicationRefused(Exception):
    """The rule refuses a publication; ``code`` is one of :data:`REFUSAL_CODES`."""

    def __init__(self, code: str, detail: str, tally: Tally):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail, self.tally = code, detail, tally


class Publication:
    """The publication state since the last snapshot_published: the producing round's weights and
    the hash reports made for it. Feed it round closes, reports and publications in log order."""

    def __init__(self, quorum: float = PUBLISH_QUORUM):
        self.quorum = check_quorum(quorum)
        self.round: int | None = None
        self.weights: dict[str, float] = {}
        self.benched: frozenset[str] = frozenset()
        self.reports: dict[str, tuple[int, bytes]] = {}  # node -> (version, state-dict hash)

    # -- what the log records
    def round_closed(self, round_index: int, weights: Mapping[str, float], benched: Iterable[str] = ()) -> None:
        """A newer round produces the next version: earlier reports were about another average.
        ``benched``: participants the stall rule sat out (:mod:`.stalls`): their weight stays in the
        total, their reports count 0."""
        self.round = round_index
        self.weights = {str(n): float(w) for n, w in weights.items()}
        self.benched = frozenset(str(n) for n in benched)
        self.reports.clear()

    def published(self) -> None:
        self.round, self.weights, self.benched = None, {}, frozenset()
        self.reports.clear()

    def weight_of(self, node_id: str, is_banned: IsBanned) -> float:
        return 0.0 if is_banned(node_id) or node_id in self.benched else self.weights.get(node_id, 0.0)

    def report(self, node_id: str, version: int, sha256: bytes, current_version: int,
               is_banned: IsBanned) -> dict | None:
        """Record a node's report; the ``hash_reported`` payload when it is new or changed, None when
        it repeats the node's standing report (a heartbeat sends it again and again).
        ValueError unless it names version current + 1 and a 32-byte hash."""
        if isinstance(version, bool) or not isinstance(version, int) or version != current_version + 1:
            raise ValueError(f"a report must name the next version {current_version + 1}, not {version!r}")
        sha256 = bytes(sha256)
        if len(sha256) != 32:
            raise ValueError("a report's sha256 must be 32 bytes")
        if not isinstance(node_id, str):
            raise ValueError("node_id must be a string")
        if self.reports.get(node_id) == (version, sha256):
            return None
        self.reports[node_id] = (version, sha256)
        return {"node_id": node_id, "version": version, "sha256": sha256.hex(), "round": self.round,
                "weight": self.weight_of(node_id, is_banned)}

    # -- the rule
    def tally(self, version: int, sha256: bytes, is_banned: IsBanned) -> Tally:
        claim = (version, bytes(sha256))
        reporters = tuple(sorted(n for n, r in self.reports.items() if r == claim and self.weight_of(n, is_banned) > 0))
        # fsum over a fixed order: the audit recomputes exactly the logged figures
        support = math.fsum(self.weights[n] for n in reporters)
        total = math.fsum(self.weights[n] for n in sorted(self.weights))
        reports = sum(1 for r in self.reports.values() if r[0] == version)
        return Tally(self.round, support, total, reporters, reports)

    def check(self, version: int, sha256: bytes, uploader: str | None, current_version: int,
              is_banned: IsBanned) -> Tally:
        """The tally when ``uploader`` (None: not checked) may publish ``sha256`` as ``version``;
        PublicationRefused (with the tally) otherwise."""
        sha256 = bytes(sha256)
        t = self.tally(version, sha256, is_banned)
        short = sha256.hex()[:16] + "..."
        if version != current_version + 1:
            raise PublicationRefused(WRONG_VERSION, f"version {version} is not the next version "
                                                    f"{current_version + 1}", t)
        if self.round is None:
            raise PublicationRefused(NO_ROUND, f"no round has closed since version {current_version} was "
                                               f"published: nothing may be published yet", t)
        if uploader is not None and self.reports.get(uploader) != (version, sha256):
            raise PublicationRefused(NOT_REPORTED, f"node {uploader} has not reported hash {short} for version "
                                                   f"{version} since round {self.round} closed", t)
        if not t.support_weight > self.quorum * t.total_weight:
            raise PublicationRefused(
                NO_QUORUM, f"hash {short} has weight {t.support_weight:.6g} of round {self.round}'s "
                           f"{t.total_weight:.6g} ({len(t.reporters)} participant(s) of {len(self.weights)}); "
                           f"publishing needs more than {self.quorum:g} of it", t)
        return t

    def published_payload(self, version: int, sha256: bytes, uploader: str | None, current_version: int,
                          is_banned: IsBanned) -> dict:
        """The ``snapshot_published`` payload of a checked publication (PublicationRefused otherwise)."""
        t = self.check(version, sha256, uploader, current_version, is_banned)
        payload = {"version": version, "sha256": bytes(sha256).hex(), "round": t.round,
                   "support_weight": t.support_weight, "total_weight": t.total_weight, "reporters": list(t.reporters)}
        if uploader is not None:
            payload["uploader"] = uploader
        return payload


def refused_payload(node_id: str, version: int, sha256: bytes, refusal: PublicationRefused) -> dict:
    """The ``upload_refused`` payload: who tried to publish what, and why not."""
    t = refusal.tally
    return {"node_id": node_id, "version": version, "sha256": bytes(sha256).hex(), "code": refusal.code,
            "detail": refusal.detail, "round": t.round, "support_weight": t.support_weight,
            "total_weight": t.total_weight}
