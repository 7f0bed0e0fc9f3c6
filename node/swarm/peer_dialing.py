"""Which of the peers the coordinator lists a node dials, and when it stops dialling one.

The coordinator lists the live peers that announced addresses (:mod:`grpo_swarm.protocol.peers`).
Registering a key costs nothing, and every address a peer announces that never answers costs the
dialler a dial's timeout (5 s here). So a node dials only the peers the coordinator marks
``verified`` (accepted work in the open round, or a participant of a recent closed round: the
peers it can average with). Only while none is listed (a run's first round) does it dial
unverified ones, the first :data:`MAX_UNVERIFIED_PEERS` of the list. A joining DHT starts through the
first :data:`MAX_BOOTSTRAP_PEERS` of those (the list puts the open round's workers first). A peer
it could not reach waits before the next dial, twice as long after each failure
(:class:`DialBackoff`): a verified peer announcing dead addresses then costs a dial now and then,
not one every round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from grpo_swarm.protocol import grpo_swarm_pb2 as pb

from .dht import tcp_only

MAX_UNVERIFIED_PEERS = 4  # dialled only while no verified peer is listed
MAX_BOOTSTRAP_PEERS = 8  # a joining DHT needs one to answer; it meets the others through the DHT and _meet
FIRST_BACKOFF_S = 10.0  # after a peer's first failed dial; doubled after each further one
MAX_BACKOFF_S = 600.0


def peer_id(peer: pb.PeerAddress) -> str | None:
    """The libp2p peer id a listed peer's addresses end in (the coordinator checked that they all do)."""
    for maddr in peer.multiaddrs:
        if "/p2p/" in maddr:
            return maddr.rsplit("/p2p/", 1)[1]
    return None


def dial_candidates(peers: Iterable[pb.PeerAddress]) -> list[pb.PeerAddress]:
    """The listed peers worth dialling, with their TCP addresses only (:func:`.dht.tcp_only`): the
    verified ones, or, when none is listed, the first MAX_UNVERIFIED_PEERS in the list's order."""
    usable = []
    for p in peers:
        addrs = tcp_only(p.multiaddrs)
        if addrs and peer_id(p) is not None:
            usable.append(pb.PeerAddress(node_id=p.node_id, multiaddrs=addrs, last_seen_ms=p.last_seen_ms,
                                         verified=p.verified))
    verified = [p for p in usable if p.verified]
    return verified if verified else usable[:MAX_UNVERIFIED_PEERS]


def addresses(peers: Sequence[pb.PeerAddress]) -> list[str]:
    return [m for p in peers for m in p.multiaddrs]


class DialBackoff:
    """Per listed peer (its peer id and the addresses it announces: new addresses start afresh), the
    failed dials in a row and when the next dial is due."""

    def __init__(self, first_s: float = FIRST_BACKOFF_S, max_s: float = MAX_BACKOFF_S,
                 clock: Callable[[], float] = time.monotonic):
        self.first_s, self.max_s, self._clock = float(first_s), float(max_s), clock
        self._failed: dict[tuple[str, tuple[str, ...]], tuple[int, float]] = {}  # key -> (failures, due at)

    @staticmethod
    def _key(peer: pb.PeerAddress) -> tuple[str, tuple[str, ...]]:
        return peer_id(peer) or "", tuple(sorted(peer.multiaddrs))

    def due(self, peer: pb.PeerAddress) -> bool:
        failed = self._failed.get(self._key(peer))
        return failed is None or self._clock() >= failed[1]

    def record(self, peer: pb.PeerAddress, reached: bool) -> None:
        key = self._key(peer)
        if reached:
            self._failed.pop(key, None)
            return
        failures = self._failed.get(key, (0, 0.0))[0] + 1
        self._failed[key] = failures, self._clock() + min(self.max_s, self.first_s * 2 ** (failures - 1))
        if len(self._failed) > 4096:  # keys that rotate addresses cannot grow this without bound
            self._failed.pop(next(iter(self._failed)))
