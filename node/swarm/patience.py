"""Waiting out a coordinator's refusals for load instead of exiting.

RESOURCE_EXHAUSTED is a coordinator saying "not now": its allowance for new keys from this network
(coordinator/networks.py), its download slots, all taken while many nodes (re)join at once
(coordinator/outbound.py), or this key's request rate. A volunteer's node that exits on it must be
restarted by hand; one that waits, with doubling pauses (jittered, so that nodes refused together do
not come back together), gets in once the load passes. Every other error is raised at once.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.client import CoordinatorClient, CoordinatorError

log = logging.getLogger(__name__)
T = TypeVar("T")

REGISTER_WAIT_S = 1800.0  # how long a new key waits for its network's allowance (coordinator/networks.py)
REGISTER_RETRY_S = (5.0, 300.0)  # first wait between tries, doubling up to the second
# a stalled download's slot is freed within the coordinator's stream_idle_s (30 s by default)
DOWNLOAD_WAIT_S = 600.0
DOWNLOAD_RETRY_S = (1.0, 30.0)


def patiently(call: Callable[[], T], refused: str, *, wait_s: float, retry_s: tuple[float, float]) -> T:
    """``call()``, tried again while the coordinator refuses it for load (RESOURCE_EXHAUSTED), for up to
    ``wait_s``; pauses start at ``retry_s[0]`` and double up to ``retry_s[1]``. ``refused`` completes
    "the coordinator ..." in the warning that says why this node waits."""
    started, delay = time.monotonic(), retry_s[0]
    while True:
        try:
            return call()
        except CoordinatorError as e:
            left = wait_s - (time.monotonic() - started)
            if e.code != "RESOURCE_EXHAUSTED" or left <= 0:
                raise
            pause = min(random.uniform(delay / 2, delay), left)
            log.warning("the coordinator %s for now (%s); trying again in %.0f s", refused, e.detail, pause)
            time.sleep(pause)
            delay = min(2 * delay, retry_s[1])


def register_patiently(client: CoordinatorClient, hardware: pb.HardwareSummary, *, wait_s: float = REGISTER_WAIT_S,
                       retry_s: tuple[float, float] = REGISTER_RETRY_S) -> pb.RegisterResponse:
    """Register, waiting while the coordinator registers no new key from this network (its allowance
    for keys without verified work refills over the hour) or refuses this key's request rate: a
    volunteer behind a busy address gets in later instead of exiting."""
    return patiently(lambda: client.register(hardware=hardware), "registers no new key from here",
                     wait_s=wait_s, retry_s=retry_s)


def download_patiently(client: CoordinatorClient, dest: str | os.PathLike, manifest: pb.SnapshotManifest, *,
                       wait_s: float = DOWNLOAD_WAIT_S, retry_s: tuple[float, float] = DOWNLOAD_RETRY_S
                       ) -> pb.SnapshotManifest:
    """Download a snapshot (resuming), waiting while every download slot is taken: a swarm restarted
    all at once has more nodes asking for the version than the coordinator sends to at once."""
    return patiently(lambda: client.download_snapshot(dest, manifest=manifest), "sends no snapshot to this node",
                     wait_s=wait_s, retry_s=retry_s)
