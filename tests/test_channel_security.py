"""This node's p2pd offers TLS 1.3 alone (node/swarm/channel_security.py), and a peer running hivemind's
defaults (Noise and TLS) still reaches it: two real DHTs on loopback."""

from __future__ import annotations

import time

import psutil
from hivemind.p2p.p2p_daemon import P2P
from hivemind.utils import get_dht_time

from grpo_swarm.node.swarm.dht import start_dht
from grpo_swarm.protocol.identity import Identity
from hivemind_children import started_dht

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def _p2pd_args(identity_path) -> list[str]:
    for p in psutil.Process().children(recursive=True):
        try:
            args = p.cmdline()
        except psutil.Error:
            continue
        if args and args[0].endswith("p2pd") and f"-id={identity_path}" in args:
            return args
    raise AssertionError(f"no p2pd runs with -id={identity_path}")


def test_our_daemon_offers_tls_alone_and_a_stock_peer_still_connects(tmp_path, monkeypatch):
    ours = start_dht(Identity.generate(), identity_path=tmp_path / "ours.libp2p", host_maddrs=LOOPBACK)
    stock = None
    try:
        args = _p2pd_args(tmp_path / "ours.libp2p")
        assert "-tls=1" in args and "-noise=0" in args, args
        # a peer as hivemind starts it: Noise offered first, then TLS
        monkeypatch.setattr(P2P, "_make_process_args", staticmethod(P2P._make_process_args.__wrapped__))
        stock = started_dht(host_maddrs=LOOPBACK,
                            initial_peers=[str(m) for m in ours.get_visible_maddrs()])
        stock_args = next(p.cmdline() for p in psutil.Process().children(recursive=True)
                          if p.cmdline() and p.cmdline()[0].endswith("p2pd") and p.cmdline() != args)
        assert not any(a.startswith("-noise") for a in stock_args), stock_args
        assert stock.store("greeting", b"over TLS", expiration_time=get_dht_time() + 60)
        deadline = time.monotonic() + 10
        while (found := ours.get("greeting", latest=True)) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert found is not None and found.value == b"over TLS"
    finally:
        if stock is not None:
            stock.shutdown()
        ours.shutdown()
