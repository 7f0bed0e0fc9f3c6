"""A node that dies without a goodbye (SIGKILL) has one said for it (node/swarm/goodbye_watcher.py).

A real coordinator on loopback (tests/coordinator_world.py) and real processes: a small program
plays the node (registers with an instance id, takes its round's assignment, starts the product's
watcher) and is killed. Before, the open round waited for it 3 heartbeat intervals (90 s here);
now it closes at the goodbye. The watcher stays silent where a goodbye would be wrong: the node
stopped cleanly, it died in a pair holding a saved round batch (a restart resumes that round, which
its partner cannot average alone), or a newer process of the key took over (the coordinator refuses
the old instance's goodbye)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from grpo_swarm.protocol.client import CoordinatorClient
from grpo_swarm.protocol.identity import Identity
from grpo_swarm.protocol.peers import PEER_TTL_INTERVALS

from coordinator_world import HonestNode, Served, flat

INTERVAL_S = 30.0  # a silent node counts as gone only after 90 s

NODE = """
import os, sys, time
from pathlib import Path
from grpo_swarm.protocol.client import CoordinatorClient
from grpo_swarm.protocol.identity import Identity
from grpo_swarm.node.swarm.goodbye_watcher import GoodbyeWatcher

address, key, batch, mode = sys.argv[1:5]
identity = Identity.load(key)
client = CoordinatorClient(address, identity, timeout_s=30, instance=os.urandom(16))
reply = client.register()
hb = client.heartbeat(0, sample=True)  # takes the round's assignment
watcher = GoodbyeWatcher.start(address=address, private_key_pem=identity.private_key_pem(),
                               coordinator_key=reply.coordinator_public_key, instance=client.instance,
                               round_batch=Path(batch), version=0, live=hb.live_nodes)
watcher.version(0)
pid = watcher.proc.pid
if mode == "pair":
    watcher.live(2)  # (what the coordinator's last reply said)
if mode == "close":
    watcher.close()
print(pid, flush=True)
time.sleep(600)
"""


def _serve(tmp_path) -> Served:
    return Served(tmp_path, samples_per_round=64, round_timeout_s=3600.0, heartbeat_interval_s=INTERVAL_S,
                  close_when_all_submitted=True)


class FakeNodeProcess:
    """The program above in a session of its own; ``watcher``: its watcher's pid."""

    def __init__(self, s: Served, tmp: Path, name: str, mode: str = "", identity: Identity | None = None):
        self.identity = identity or Identity.generate()
        self.key = self.identity.save(tmp / f"{name}.key")
        self.batch = tmp / f"{name}.round_batch"
        self.log = tmp / f"{name}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", NODE, s.address, str(self.key), str(self.batch), mode],
                                         stdout=subprocess.PIPE, stderr=err, start_new_session=True, text=True)
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), (line, self.log.read_text())
        self.watcher = int(line)

    def kill_group(self) -> None:
        """SIGKILL the node's whole process group (the watcher is in a session of its own)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def wait_watcher_gone(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if psutil.Process(self.watcher).status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)
        raise AssertionError(f"the watcher {self.watcher} still runs {timeout_s} s after its node died")


def test_a_killed_node_has_its_goodbye_said_and_the_round_closes_without_it(tmp_path):
    s = _serve(tmp_path)
    try:
        a, b = HonestNode(s.address, tmp_path / "a"), HonestNode(s.address, tmp_path / "b")
        (_, ga), (_, gb) = a.round_proofs(), b.round_proofs()
        c = FakeNodeProcess(s, tmp_path, "c")
        a.client.submit_proofs(flat(ga))
        assert not b.client.submit_proofs(flat(gb)).round_closed  # c is live and has submitted nothing
        assert a.client.heartbeat(0, sample=False).live_nodes == 3
        killed = time.monotonic()
        c.kill_group()
        while a.client.heartbeat(0, sample=False).current_round == 0:
            assert time.monotonic() - killed < 10.0 < PEER_TTL_INTERVALS * INTERVAL_S, \
                f"the round still waits for the killed node: {c.log.read_text()}"
            time.sleep(0.1)
        print(f"\nthe round closed {time.monotonic() - killed:.2f} s after the kill (else {PEER_TTL_INTERVALS * INTERVAL_S:.0f} s)")
        closed = [e for e in a.client.get_log() if e.kind == "round_closed"]
        assert sorted(closed[0].payload["participants"]) == sorted([a.identity.node_id, b.identity.node_id])
        assert a.client.heartbeat(0, sample=False).live_nodes == 2
        assert s.coordinator.metrics.nodes_left._value.get() == 1
        c.wait_watcher_gone()
        assert "told the coordinator node" in c.log.read_text()
        back = CoordinatorClient(s.address, c.identity, timeout_s=30, instance=os.urandom(16))  # a restart
        back.register()
        assert a.client.heartbeat(0, sample=False).live_nodes == 3
    finally:
        s.stop()


def test_the_watcher_stays_silent_after_a_clean_stop_in_a_pair_holding_its_batch_or_after_a_takeover(tmp_path):
    s = _serve(tmp_path)
    try:
        a = HonestNode(s.address, tmp_path / "a")
        a.round_proofs()
        clean = FakeNodeProcess(s, tmp_path, "clean", mode="close")  # it says its own goodbye, or must not
        pair = FakeNodeProcess(s, tmp_path, "pair", mode="pair")
        pair.batch.write_bytes(b"accepted work, not averaged yet")  # a restart would resume its pair's round
        taken = FakeNodeProcess(s, tmp_path, "taken")
        newer = CoordinatorClient(s.address, taken.identity, timeout_s=30, instance=os.urandom(16))
        newer.register()  # the key's newer process (a restart, another machine)
        crowd = FakeNodeProcess(s, tmp_path, "crowd")  # the control: with 5 live, its goodbye is said
        crowd.batch.write_bytes(b"accepted work, not averaged yet")
        assert a.client.heartbeat(0, sample=False).live_nodes == 5
        for n in (clean, pair, taken, crowd):
            n.kill_group()
        for n in (clean, pair, taken, crowd):
            n.wait_watcher_gone()
        hb = a.client.heartbeat(0, sample=False)
        assert hb.live_nodes == 4, [n.log.read_text() for n in (clean, pair, taken, crowd)]
        assert s.coordinator.metrics.nodes_left._value.get() == 1
        assert "in a pair holding its round's saved batch: no goodbye" in pair.log.read_text()
        assert pair.batch.exists()  # for the restart to resume
        assert "told the coordinator node" in crowd.log.read_text()
        assert not crowd.batch.exists()  # its groupmates go on without it: nothing to resume
        assert "could not tell the coordinator" in taken.log.read_text()
        assert "superseded" in taken.log.read_text().lower()
        assert clean.log.read_text() == ""
        assert newer.heartbeat(0, sample=False).live_nodes == 4  # the newer process runs on
    finally:
        s.stop()
