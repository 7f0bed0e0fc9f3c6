"""`grpo-node join` as a container's PID 1 (node/swarm/container_init.py), in a real PID namespace
(``unshare --pid --fork``, root only: skipped elsewhere) and against a real coordinator on loopback.

When PID 1 dies, the kernel kills the rest of its namespace at once. A node that is PID 1 and killed
(the out-of-memory killer in a container) took its goodbye watcher with it: the control below shows
the goodbye never said. With the init, PID 1 outlives the node: the watcher says the goodbye and the
namespace's exit status is the node's (137 after SIGKILL). A `docker stop` (SIGTERM to PID 1)
reaches the node through the init, which then exits with the node's 0."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from grpo_swarm.protocol.identity import Identity

from coordinator_world import HonestNode, Served

NODE = """
import os, signal, sys, time
from pathlib import Path
from grpo_swarm.node.swarm.container_init import become_init_if_pid1

address, key, batch, init = sys.argv[1:5]
if init == "init":
    become_init_if_pid1()
from grpo_swarm.protocol.client import CoordinatorClient
from grpo_swarm.protocol.identity import Identity
from grpo_swarm.node.swarm.goodbye_watcher import GoodbyeWatcher

identity = Identity.load(key)
client = CoordinatorClient(address, identity, timeout_s=30, instance=os.urandom(16))
reply = client.register()
hb = client.heartbeat(0, sample=True)
watcher = GoodbyeWatcher.start(address=address, private_key_pem=identity.private_key_pem(),
                               coordinator_key=reply.coordinator_public_key, instance=client.instance,
                               round_batch=Path(batch), version=0, live=hb.live_nodes)

def stop(signum, frame):
    watcher.close()
    print("node: SIGTERM, stopping cleanly", flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
print(f"ready {os.getpid()}", flush=True)
time.sleep(600)
"""


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_work(), reason="needs `unshare --pid` (root)")


class Contained:
    """The program above as PID 1 of a fresh PID namespace; ``init``: whether it becomes an init."""

    def __init__(self, s: Served, tmp: Path, name: str, init: bool):
        self.identity = Identity.generate()
        key = self.identity.save(tmp / f"{name}.key")
        self.log = tmp / f"{name}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", NODE,
                                          s.address, str(key), str(tmp / f"{name}.batch"), "init" if init else "-"],
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("ready"), (line, self.log.read_text())
        self.inner_pid = int(line.split()[1])
        (self.pid1,) = psutil.Process(self.proc.pid).children()  # PID 1 inside
        mine = psutil.Process(self.pid1.pid).children()
        self.node = mine[0] if init else self.pid1  # the node: PID 1's child, or PID 1 itself

    def output(self) -> str:
        return self.proc.stdout.read() + self.log.read_text()


def test_a_node_killed_as_pid1_has_its_goodbye_said_only_with_the_init(tmp_path):
    s = Served(tmp_path, samples_per_round=64, round_timeout_s=3600.0, heartbeat_interval_s=30.0,
               close_when_all_submitted=True)
    try:
        a = HonestNode(s.address, tmp_path / "a")
        live = lambda: a.client.heartbeat(0, sample=False).live_nodes  # noqa: E731
        bare = Contained(s, tmp_path, "bare", init=False)
        assert bare.inner_pid == 1
        inited = Contained(s, tmp_path, "inited", init=True)
        assert inited.inner_pid != 1  # the node runs as PID 1's child
        assert live() == 3
        bare.node.kill()  # PID 1 dies: the kernel takes the watcher too
        assert bare.proc.wait(timeout=10) != 0  # (unshare reports a child killed by a signal as 1)
        killed = time.monotonic()
        inited.node.kill()
        assert inited.proc.wait(timeout=15) == 137  # the node's status, once the watcher was done
        print(f"\nthe init exited {time.monotonic() - killed:.2f} s after the node was killed")
        assert "told the coordinator node" in inited.output()
        assert "goodbye watcher" not in bare.output()
        assert live() == 2  # inited said goodbye; bare still counts as live until its TTL
        assert s.coordinator.metrics.nodes_left._value.get() == 1
    finally:
        s.stop()


def test_a_docker_stop_reaches_the_node_through_the_init(tmp_path):
    s = Served(tmp_path, heartbeat_interval_s=30.0)
    try:
        c = Contained(s, tmp_path, "stopped", init=True)
        os.kill(c.pid1.pid, signal.SIGTERM)  # `docker stop`: to PID 1 only
        assert c.proc.wait(timeout=15) == 0
        out = c.output()
        assert "node: SIGTERM, stopping cleanly" in out and "goodbye watcher" not in out, out
    finally:
        s.stop()
