"""Which channel security this node's p2p daemon offers: TLS 1.3 only.

hivemind starts p2pd with both Noise and TLS 1.3 enabled (its only knob is ``tls``), and two such
daemons settle on Noise (ChaCha20-Poly1305). With Noise off they settle on TLS 1.3 (AES-GCM, which
this hardware runs in AES-NI): p2pd took ~14 % less CPU per averaging round, and p2pd is 40-50 % of
a round's CPU (bench/RESULTS.md, session 40). A peer that runs hivemind's defaults still connects:
it offers Noise, is refused it, and takes TLS. :func:`prefer_tls` wraps hivemind's argument builder
for p2pd, process-wide, once; every DHT this process (or a child forked after) starts afterwards
runs that way, unless the environment has ``GRPO_SWARM_P2P_NOISE=1`` (hivemind's defaults: for a
peer whose daemon lacks TLS, and for bench/averaging.py's ``--p2p-noise`` comparison).
"""

from __future__ import annotations

import functools
import os

NOISE_ENV = "GRPO_SWARM_P2P_NOISE"

_installed = False


def prefer_tls() -> None:
    """Make every p2pd this process starts from now on offer TLS 1.3 alone (idempotent)."""
    global _installed
    if _installed:
        return
    from hivemind.p2p.p2p_daemon import P2P  # heavy import, kept out of module import

    build = P2P._make_process_args

    @functools.wraps(build)
    def tls_only(*args, **kwargs):
        if kwargs.get("tls", True) and "noise" not in kwargs and os.environ.get(NOISE_ENV) != "1":
            # (a caller that turned TLS off keeps Noise)
            kwargs["noise"] = False
        return build(*args, **kwargs)

    P2P._make_process_args = staticmethod(tls_only)
    _installed = True
