"""What keys without verified work may have the coordinator log, counted per network.

Keys are free, and every key may add a few log entries: its registration, a dispatch a round, refused
groups as evidence, a hash report and a refused upload a version. Bounded per key, that still grows
the log with the number of keys (~143 new keys a second from one client process). So the entries of
keys without verified work (no accepted work in the open round, no part in a closed one) are charged
to the network the request came from — an IPv4 address, an IPv6 /48 (what one site is given, so that
an attacker with a /48 counts once) — from a token bucket of ``burst`` entries refilled at
``per_hour``. Once it is spent, new keys from that network are refused registration, its keys without
verified work get no assignment and have no groups recorded (RESOURCE_EXHAUSTED), and their hash
reports and refused uploads are not logged. Nodes with verified work are never charged, and a
network's allowance is its own: an attacker spends only its own networks' (a shared allowance would
let it starve every honest newcomer). The same networks count keys without verified work once each
toward ``swarm.min_peers`` (:meth:`.core.Coordinator.live_nodes`). Loopback and Unix-socket clients
are not charged unless ``limit_loopback``: they run on the coordinator's host. Behind a reverse proxy
every client is the proxy's address, so the allowance is then the whole swarm's.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .limits import RateLimiter

IPV6_PREFIX = 48  # one site's allocation


def network_of(peer: str, limit_loopback: bool = False) -> str | None:
    """The network a gRPC ``context.peer()`` string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, ``unix:...``)
    is charged to: ``"1.2.3.4"``, ``"2001:db8:1::/48"``; None for loopback and Unix sockets (unless
    ``limit_loopback``: then ``"127.0.0.1"``, ``"::1"``, ``"unix"``), and ``"unknown"`` for a peer
    string that does not parse (all of those share one allowance)."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("unix", "unix-abstract"):
        return "unix" if limit_loopback else None
    host = rest.rsplit(":", 1)[0].strip("[]") if scheme in ("ipv4", "ipv6") else ""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return "unknown"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback and not limit_loopback:
        return None
    if isinstance(addr, ipaddress.IPv4Address) or addr.is_loopback:
        return str(addr)
    return str(ipaddress.ip_network(f"{addr}/{IPV6_PREFIX}", strict=False))


class NewcomerAllowance:
    """Token buckets of log entries, one per network (thread-safe)."""

    def __init__(self, per_hour: float, burst: int, limit_loopback: bool = False):
        self.per_hour, self.burst, self.limit_loopback = float(per_hour), int(burst), bool(limit_loopback)
        self._buckets = RateLimiter(self.per_hour / 3600.0, self.burst)

    def for_peer(self, peer: str) -> Charge | None:
        """What a request from ``peer`` charges (None: nothing, a trusted client; with ``per_hour`` 0
        the charge names the network and always pays)."""
        net = network_of(peer, self.limit_loopback)
        return None if net is None else Charge(net, self)

    def take(self, net: str, entries: int) -> bool:
        return self._buckets.allow(net.encode(), float(entries))


@dataclass(frozen=True)
class Charge:
    net: str
    allowance: NewcomerAllowance

    def take(self, entries: int = 1) -> bool:
        """Charge ``entries`` to the network; False (nothing charged) when its allowance cannot pay."""
        return self.allowance.take(self.net, entries)

    def spent(self, what: str) -> str:
        a = self.allowance
        return (f"{what}: keys without verified work from network {self.net} have had the log entries its allowance "
                f"gives them ({a.burst} at once, {a.per_hour:g} an hour); retry later, or keep using a key "
                "that has done verified work")
