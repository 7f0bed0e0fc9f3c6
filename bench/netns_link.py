"""Capped links for benchmarks: N network namespaces on one bridge, each uplink shaped with tbf.

    with CappedBridge(3, "100mbit") as net:      # root only (ip netns, tc)
        subprocess.Popen(net.exec_prefix(0) + [sys.executable, ...])   # runs in peer 0's namespace
        net.address(0)                           # "10.213.0.1": what the process binds to

Layout: a namespace ``gsn<tag>b`` holds a bridge; peer ``i`` lives in namespace ``gsn<tag>p<i>``
with one end of a veth pair (``gsn<tag>v<i>``, address 10.213.0.<i+1>/24) whose other end is a
bridge port. Each peer's veth gets ``tc qdisc add ... root tbf rate RATE burst BURST latency
LATENCY``: that caps what the peer *sends* (its uplink); the bridge side is not shaped, so a peer
receives as fast as its senders' uplinks allow. netem is not used (this kernel has no sch_netem).
A burst below the 64 KB GSO frame makes tbf split packets to MTU size and the shaping itself eats
the CPU at 1 Gbit/s: keep it >= 2mbit there.

Everything is removed in :meth:`CappedBridge.close` (also called by ``__exit__``): deleting a
namespace deletes the veth ends inside it. Processes still running inside a namespace keep it
alive, so stop them first. :func:`remove_stale` removes namespaces left by a killed run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

SUBNET = "10.213.0"
PREFIX = "gsn"
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(bit|kbit|mbit|gbit|tbit)\s*$", re.IGNORECASE)
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


def rate_bits(rate: str) -> float:
    """A tc rate such as ``100mbit`` or ``1gbit`` in bits/s (tc's units: k = 1000). Byte units
    (``mbps``) are refused: tc reads them as bytes, an easy factor-8 mistake."""
    m = _RATE.match(rate)
    if not m:
        raise ValueError(f"rate {rate!r}: use a number with bit, kbit, mbit or gbit (e.g. 100mbit, 1gbit)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def unavailable() -> str | None:
    """Why capped links cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns, tc)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "ip or tc (iproute2) not found"
    return None


def _sh(*cmd: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {(p.stderr or p.stdout).strip() or f'exit {p.returncode}'}")


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces named ``<prefix>...`` whose creating process is gone (the tag is its pid)."""
    removed = []
    for path in Path("/var/run/netns").glob(f"{prefix}*") if Path("/var/run/netns").is_dir() else ():
        m = re.match(rf"^{prefix}(\d+)[bp]\d*$", path.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", path.name], capture_output=True)
            removed.append(path.name)
    return removed


class CappedBridge:
    def __init__(self, peers: int, rate: str, *, burst: str = "2mbit", latency: str = "50ms", tag: str | None = None):
        self.peers, self.rate, self.burst, self.latency = peers, rate, burst, latency
        self.rate_bits = rate_bits(rate)
        self.tag = tag or str(os.getpid())
        self.bridge_ns = f"{PREFIX}{self.tag}b"
        self.created: list[str] = []

    def ns(self, i: int) -> str:
        return f"{PREFIX}{self.tag}p{i}"

    def dev(self, i: int) -> str:
        return f"{PREFIX}{self.tag}v{i}"[:15]

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns(i)]

    def open(self) -> CappedBridge:
        try:
            _sh("ip", "netns", "add", self.bridge_ns)
            self.created.append(self.bridge_ns)
            _sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
            for i in range(self.peers):
                ns, dev, port = self.ns(i), self.dev(i), f"{PREFIX}{self.tag}q{i}"[:15]
                _sh("ip", "netns", "add", ns)
                self.created.append(ns)
                _sh("ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port, "netns",
                    self.bridge_ns)
                _sh("ip", "-n", self.bridge_ns, "link", "set", port, "master", "br0")
                _sh("ip", "-n", self.bridge_ns, "link", "set", port, "up")
                _sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", dev)
                _sh("ip", "-n", ns, "link", "set", dev, "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                    "burst", self.burst, "latency", self.latency)
        except BaseException:
            self.close()
            raise
        return self

    def tx_bytes_path(self, i: int) -> str:
        """Read from *inside* peer i's namespace (``ip netns exec`` mounts that namespace's /sys)."""
        return f"/sys/class/net/{self.dev(i)}/statistics/tx_bytes"

    def describe(self) -> str:
        return (f"{self.peers} namespaces on a bridge, veth MTU 1500, each uplink tbf rate {self.rate} "
                f"burst {self.burst} latency {self.latency}")

    def close(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()

    def __enter__(self) -> CappedBridge:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()
